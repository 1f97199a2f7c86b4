"""Training: the trainer, objectives (one file per pipeline), optimizers and schedules."""

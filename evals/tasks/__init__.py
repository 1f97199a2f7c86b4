"""Eval tasks, one per file; each defines `TASK` (see evals.registry). `workbench eval --list` lists them."""

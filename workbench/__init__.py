"""workbench: modern models from scratch, verified against their references, trained on one trainer (see README.md)."""

"""Objectives: the Objective protocol (base.py) and one file per pipeline (lm.py)."""

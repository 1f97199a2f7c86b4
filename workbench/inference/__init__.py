"""Inference: the Generator protocol and its implementations."""

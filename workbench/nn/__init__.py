"""Shared primitives only: norms, RoPE, the attention core and mask spec, KV caches, SwiGLU. Single-device code."""

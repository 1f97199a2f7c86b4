"""Checkpoints: run folders (run.py), safetensors I/O, one loader for --ckpt/--hf-dir, Hugging Face adapters (hf/)."""

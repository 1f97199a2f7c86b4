"""Model families, one file each (llama3.py), and what they share (base.py: decoder interface, registry)."""

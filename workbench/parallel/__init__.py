"""Everything torch.distributed lives here: the Engine protocol and its implementations (single now)."""

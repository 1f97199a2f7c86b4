"""Stable Diffusion from scratch: `unet` (the noise predictor), `schedulers` (noise schedules, objectives,
DDPM / DDIM samplers), `autoencoder` (the KL VAE whose latents SD diffuses), `text_encoder` (CLIP's text
tower) and `clip_tokenizer` (its BPE), `pipeline` (text-to-image with classifier-free guidance).
docs/stable-diffusion.md has the math and the parity figures."""

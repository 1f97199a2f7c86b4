"""Video models: the Mochi-style asymmetric diffusion transformer, its flow-matching sampler and the causal video VAE."""

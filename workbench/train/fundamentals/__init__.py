"""The fundamentals' experiments: small single-process runs of the models in workbench/models/fundamentals/.

    runner.py     `workbench fundamentals CONFIG.toml`: the config, the run folder, the torch loop (Context.fit)
    plots.py      confusion matrices and image grids
    autograd.py   task "autograd": the NumPy autograd engine's MLP and CNN on scikit-learn's digits
    vision.py     task "cnn": CNN / ResNet on CIFAR-10 (or the digits or generated shapes when it is absent)
    sequence.py   tasks "sequence" (RNN / LSTM on a noisy signal) and "sentiment" (LSTM vs bag of words)
    vae.py        task "vae": a variational autoencoder, held-out ELBO, samples and interpolations

Configs: configs/fundamentals/*.toml; notes: docs/fundamentals.md.
"""

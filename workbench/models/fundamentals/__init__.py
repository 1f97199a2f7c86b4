"""Fundamentals, each from scratch with its notes: the building blocks the large models stand on.

    autograd/   a NumPy tensor with reverse-mode autodiff, layers, SGD with momentum and AdamW
    cnn.py      convolution, pooling, batch norm, ResNet basic and bottleneck blocks, a CIFAR-10 ResNet
    rnn.py      Elman RNN and LSTM cells and layers, equal to torch.nn.RNN / torch.nn.LSTM on shared weights
    vae.py      a variational autoencoder: encoder, decoder, reparameterisation, ELBO and an IWAE bound

Their experiments (data, training, pictures) are in workbench/train/fundamentals/; docs/fundamentals.md is the
index of the notes and measured figures.
"""

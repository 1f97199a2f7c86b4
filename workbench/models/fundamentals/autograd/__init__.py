"""A reverse-mode automatic differentiation engine in NumPy, and enough of a neural-network library on top
of it (layers, optimizers, a training loop) to train an MLP and a small CNN on the digits images.

    tensor.py      Tensor, the graph, backward (topological order), broadcasting, no_grad, primitive ops
    functional.py  softmax / log_softmax / cross-entropy, conv2d and max-pool via im2col, dropout
    nn.py          Module, Parameter, Linear, Conv2d, MaxPool2d, Flatten, Sequential, MLP, SmallCNN
    optim.py       SGD (momentum, Nesterov) and AdamW with PyTorch's update rules; gradient clipping
    train.py       mini-batch training loop with a resumable position, evaluation

The notes (how it works, how it is checked, measured figures) are in docs/autograd.md. Nothing here imports
torch: the tests compare against torch.autograd and torch.optim from the outside.
"""

from workbench.models.fundamentals.autograd import functional
from workbench.models.fundamentals.autograd.nn import (
    MLP,
    Conv2d,
    Dropout,
    Flatten,
    Linear,
    MaxPool2d,
    Module,
    Parameter,
    ReLU,
    Sequential,
    SmallCNN,
)
from workbench.models.fundamentals.autograd.optim import SGD, AdamW, clip_grad_norm
from workbench.models.fundamentals.autograd.tensor import Tensor, is_grad_enabled, no_grad
from workbench.models.fundamentals.autograd.train import Position, evaluate, fit

__all__ = ["Tensor", "no_grad", "is_grad_enabled", "functional", "Module", "Parameter", "Linear", "Conv2d",
           "MaxPool2d", "Flatten", "ReLU", "Dropout", "Sequential", "MLP", "SmallCNN", "SGD", "AdamW",
           "clip_grad_norm", "Position", "evaluate", "fit"]

"""RMSNorm: root-mean-square layer normalization (Zhang & Sennrich, 2019).

    RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w

Unlike LayerNorm there is no mean subtraction and no bias: re-centering buys little in a pre-norm
transformer and the norm is cheaper. The statistic is computed in float32 and the result is cast back to
the input dtype *before* the weight multiply; Hugging Face and Meta both do this, and doing the multiply
in float32 instead changes bf16 outputs in the last bit, which breaks parity.
"""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()  # no copy when x is already fp32
        # x * rsqrt(mean(x^2) + eps), in fp32; the in-place ops touch only the (..., 1) statistic
        x = x * (x * x).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"

"""SwiGLU feed-forward (Shazeer, 2020, "GLU Variants Improve Transformer").

    FFN(x) = W2 ( SiLU(W1 x) * (W3 x) )

A gated linear unit: W1 x passes through SiLU and gates W3 x elementwise, then W2 projects back to the
model width. Three matrices instead of two, so the hidden width is usually scaled by 2/3 to keep the
parameter count of a 4x MLP (Llama: ffn_dim = multiple_of * ceil(ffn_multiplier * 8d/3 / multiple_of));
the families store the resulting width explicitly. Names follow Meta's checkpoints: w1 = gate,
w3 = up, w2 = down (Hugging Face: gate_proj, up_proj, down_proj).
"""

import torch
import torch.nn.functional as F
from torch import nn

from workbench.nn.linear import Linear


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.w1 = Linear(dim, hidden_dim, bias=bias)  # gate
        self.w3 = Linear(dim, hidden_dim, bias=bias)  # up
        self.w2 = Linear(hidden_dim, dim, bias=bias)  # down

    def init_weights(self, std: float, out_std: float) -> None:
        """Inputs projections ~ N(0, std); the output projection (into the residual) ~ N(0, out_std)."""
        for lin, s in ((self.w1, std), (self.w3, std), (self.w2, out_std)):
            nn.init.trunc_normal_(lin.weight, mean=0.0, std=s, a=-3 * s, b=3 * s)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # W2 (SiLU(W1 x) * W3 x)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

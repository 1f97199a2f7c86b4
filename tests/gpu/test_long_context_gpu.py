"""Long-context pieces on CUDA: compiled FlexAttention for sliding-window and MoBA specs (forward and gradients,
which CPU FlexAttention lacks) against the dense reference, and Muon's bf16 Newton-Schulz. `make test-gpu`."""

import pytest
import torch

from workbench.nn.attention import AttentionCore, MaskSpec
from workbench.nn.moba import MobaSpec
from workbench.train.optim.muon import newton_schulz5

pytestmark = pytest.mark.gpu


def qkv(B=1, H=4, KV=2, T=1024, D=64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, n, T, D, device="cuda", generator=g, requires_grad=True) for n in (H, KV, KV)]


@pytest.mark.parametrize("spec", [MaskSpec(sliding_window=200), MaskSpec(moba=MobaSpec(block_size=128, topk=3))],
                         ids=["window", "moba"])
def test_compiled_flex_equals_the_dense_reference_with_gradients(spec):
    torch.backends.cuda.matmul.allow_tf32 = False
    scale = 64 ** -0.5
    q, k, v = qkv()
    ref = AttentionCore(scale, backend="math")(q, k, v, spec)
    grads_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    out = AttentionCore(scale, backend="flex", flex_compile=True)(q, k, v, spec)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


def test_bf16_newton_schulz_singular_values_stay_in_band():
    """Every singular direction the input really has (singular value above 1% of its Frobenius norm) comes out
    with a singular value near 1; 1:4 random matrices have no tiny ones, square ones do (those stay small)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in [(256, 256), (128, 512), (768, 192)]:
        G = torch.randn(*shape, device="cuda", generator=g)
        X = newton_schulz5(G)
        assert X.dtype == G.dtype
        s_in, s = torch.linalg.svdvals(G), torch.linalg.svdvals(X.float())
        kept = s[s_in > 0.01 * torch.linalg.matrix_norm(G)]
        assert len(kept) > 0.8 * len(s)
        assert kept.min() > 0.6 and kept.max() < 1.25, (shape, float(kept.min()), float(kept.max()))

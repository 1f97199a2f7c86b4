"""Activation checkpointing: the same gradients as without it, and the block's forward really runs again."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from workbench.models.base import ModelSection, build_model
from workbench.parallel.checkpointing import apply_activation_checkpointing
from workbench.parallel.plans import plan_for


def grads_and_calls(mode: str):
    torch.manual_seed(0)
    model = build_model(ModelSection.of("llama3", "debug"))
    apply_activation_checkpointing(model, plan_for("llama3"), mode)
    calls = []
    model.layers[0].attention.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with CountMatmuls() as mm:
        logits = model.logits(model({"input_ids": ids}).hidden)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    with torch.no_grad():  # evaluation does not checkpoint (nothing to recompute)
        model({"input_ids": ids})
    return {n: p.grad for n, p in model.named_parameters()}, len(calls), list(model.state_dict()), mm.count


class CountMatmuls(TorchDispatchMode):
    """Counts the matrix multiplies that run (forward, recomputation and backward)."""

    def __enter__(self):
        self.count = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_recomputes_and_keeps_gradients_and_names(mode):
    ref, ref_calls, ref_names, ref_mm = grads_and_calls("none")
    got, calls, names, mm = grads_and_calls(mode)
    assert ref_calls == 2 and calls == 3  # forward, no-grad forward; checkpointed: + the recompute in backward
    # full reruns the block's projections in backward (up to the last one whose output backward needs:
    # 6 of 7 per layer here); selective keeps the matmul outputs, so it runs no extra matmul
    assert mm == ref_mm + (6 * 2 if mode == "full" else 0), (mm, ref_mm)
    assert names == ref_names  # state-dict keys unchanged: checkpoints and plans still address the same names
    for n in ref:
        assert torch.equal(got[n], ref[n]), n


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="expected one of none, full, selective"):
        apply_activation_checkpointing(build_model(ModelSection.of("llama3", "debug")), plan_for("llama3"), "some")

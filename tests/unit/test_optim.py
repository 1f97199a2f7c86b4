"""Learning-rate schedules: the warmup-stable-decay shape, and cosine/constant as before."""

import math
from types import SimpleNamespace

import pytest
import torch

from workbench.train.optim import build_scheduler, lr_multiplier


def test_wsd_warms_up_holds_then_decays_linearly_to_the_floor():
    total, warmup, r, frac = 100, 10, 0.1, 0.2
    lrs = [lr_multiplier(s, total, warmup, "wsd", r, decay_fraction=frac) for s in range(total + 1)]
    # warmup: (s + 1) / warmup, as for the other schedules
    assert lrs[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    # stable: exactly 1.0 from the end of warmup until the decay starts at total - 20 = 80
    assert all(v == 1.0 for v in lrs[warmup:81])
    # decay: linear from 1.0 at step 80 to r at step 100 (one past the last update), like cosine's floor
    for s in range(80, 101):
        assert lrs[s] == pytest.approx(1.0 - (1.0 - r) * (s - 80) / 20)
    assert lrs[99] == pytest.approx(r + (1 - r) / 20)  # the last update
    assert lrs[100] == pytest.approx(r)
    diffs = [b - a for a, b in zip(lrs[80:], lrs[81:])]
    assert diffs == pytest.approx([-(1 - r) / 20] * 20)  # constant slope: linear
    assert all(a >= b for a, b in zip(lrs[warmup - 1:], lrs[warmup:]))  # monotone after warmup
    assert lr_multiplier(150, total, warmup, "wsd", r, decay_fraction=frac) == pytest.approx(r)  # clamped


def test_wsd_decay_fraction_default_and_extremes():
    # default decay_fraction is 0.2
    assert lr_multiplier(80, 100, 0, "wsd", 0.0) == 1.0
    assert lr_multiplier(90, 100, 0, "wsd", 0.0) == pytest.approx(0.5)
    # decay_fraction = 1 with no warmup: a straight line from 1 to r over the whole run
    assert [lr_multiplier(s, 10, 0, "wsd", 0.0, decay_fraction=1.0) for s in range(11)] == pytest.approx(
        [1 - s / 10 for s in range(11)])
    # a decay window overlapping the warmup starts at the end of warmup instead
    lrs = [lr_multiplier(s, 20, 10, "wsd", 0.0, decay_fraction=0.9) for s in range(21)]
    assert lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0) and lrs[20] == pytest.approx(0.0)
    assert lrs[15] == pytest.approx(0.5)
    # a tiny run still decays over at least one step
    assert lr_multiplier(3, 4, 0, "wsd", 0.1, decay_fraction=0.01) == 1.0
    assert lr_multiplier(4, 4, 0, "wsd", 0.1, decay_fraction=0.01) == pytest.approx(0.1)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="decay_fraction"):
            lr_multiplier(50, 100, 0, "wsd", 0.1, decay_fraction=bad)


def test_cosine_and_constant_unchanged():
    r = 0.1
    for s in range(10, 101):
        p = min(1.0, (s - 10) / 90)
        assert lr_multiplier(s, 100, 10, "cosine", r) == pytest.approx(r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p)))
        assert lr_multiplier(s, 100, 10, "constant", r) == 1.0
    assert lr_multiplier(4, 100, 10, "constant", r) == pytest.approx(0.5)  # warmup applies to constant too
    # decay_fraction does not affect them
    assert lr_multiplier(95, 100, 10, "cosine", r, decay_fraction=0.5) == lr_multiplier(95, 100, 10, "cosine", r)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_multiplier(50, 100, 10, "linear", r)


def _optim(**kw):
    base = dict(lr=1.0, warmup_steps=2, schedule="wsd", min_lr_ratio=0.0)
    return SimpleNamespace(**(base | kw))


# 10 steps: the default 0.2 decays over steps 8..10, decay_fraction=0.4 over steps 6..10
@pytest.mark.parametrize("section, expect_7_9", [(_optim(), (1.0, 0.5)), (_optim(decay_fraction=0.4), (0.75, 0.25))])
def test_build_scheduler_uses_decay_fraction_with_default(section, expect_7_9):
    """build_scheduler reads optim.decay_fraction, falling back to 0.2 when the section lacks it."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=section.lr)
    sched = build_scheduler(opt, section, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert (lrs[7], lrs[9]) == pytest.approx(expect_7_9)

"""EMA: the warm-up schedule and the update rule, against diffusers' EMAModel that it replaces."""

from __future__ import annotations

import torch
from diffusers.training_utils import EMAModel

from ddpm.training.ema import EMA


def test_matches_diffusers_emamodel_step_for_step():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    ours = EMA(params, max_decay=0.999, power=0.75)
    theirs = EMAModel(params, decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=0.75, foreach=True)
    for _ in range(50):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        ours.update(params)
        theirs.step(params)
        assert ours.decay() == theirs.get_decay(theirs.optimization_step)
    for a, b in zip(ours.shadow, theirs.shadow_params):
        assert torch.allclose(a, b, atol=1e-6)


def test_first_update_copies_and_decay_is_capped():
    params = [torch.nn.Parameter(torch.ones(3))]
    ema = EMA(params, max_decay=0.9, power=1.0)
    with torch.no_grad():
        params[0].fill_(5.0)
    ema.update(params)
    assert torch.equal(ema.shadow[0], torch.full((3,), 5.0))  # decay 0 at the first step
    ema.steps = 10_000
    assert ema.decay() == 0.9
    target = [torch.nn.Parameter(torch.zeros(3))]
    ema.copy_to(target)
    assert torch.equal(target[0].data, ema.shadow[0])

"""Training that notices when it breaks: non-finite steps skipped on the device, a divergence detected on the log
windows (and quiet on real healthy curves), the last good checkpoint kept, and the run's own reaction to both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddpm.models.checkpoint import last_good_step, mark_last_good, remove_after, save_checkpoint
from ddpm.training.divergence import (
    PATIENCE,
    WARMUP_WINDOWS,
    DivergenceDetector,
    NonFiniteSteps,
    all_finite,
    skip_optimizer_step,
)
from ddpm.training.ema import EMA
from tests.conftest import ROOT

CURVES = ROOT / "tests" / "data" / "loss-curves"


def test_a_non_finite_gradient_skips_the_step_on_the_device_and_leaves_everything_as_it_was():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, fused=True)
    ema = EMA(net.parameters(), max_decay=0.9, power=0.75)
    guard = NonFiniteSteps(torch.device("cpu"))

    def step(x: torch.Tensor) -> torch.Tensor:
        net(x).pow(2).mean().backward()
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        bad = guard.check(norm)
        assert skip_optimizer_step(opt, bad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(net.parameters(), skipped=bad)
        return bad

    assert step(torch.randn(8, 4)) == 0  # a good step moves everything
    weights = [p.detach().clone() for p in net.parameters()]
    moments = [opt.state[p]["exp_avg"].clone() for p in net.parameters()]
    steps = [opt.state[p]["step"].clone() for p in net.parameters()]
    shadow = [s.clone() for s in ema.shadow]
    for poison in (float("nan"), float("inf")):
        assert step(torch.full((8, 4), poison)) == 1
    assert all(torch.equal(a, p) for a, p in zip(weights, net.parameters()))
    assert all(torch.equal(a, opt.state[p]["exp_avg"]) for a, p in zip(moments, net.parameters()))
    assert all(torch.equal(a, opt.state[p]["step"]) for a, p in zip(steps, net.parameters()))
    assert all(torch.equal(a, s) for a, s in zip(shadow, ema.shadow))
    assert (guard.skipped.item(), guard.streak.item(), guard.longest.item()) == (2, 2, 2)
    step(torch.randn(8, 4))
    assert (guard.skipped.item(), guard.streak.item(), guard.longest.item()) == (2, 0, 2)
    guard.new_window()
    assert guard.longest.item() == 0
    assert all_finite(list(net.parameters())) and not all_finite([torch.tensor([1.0, float("nan")])])


def test_an_optimizer_that_cannot_skip_on_the_device_says_so():
    net = torch.nn.Linear(2, 2)
    assert not skip_optimizer_step(torch.optim.AdamW(net.parameters(), foreach=True), torch.zeros(()))


def replay(rows: list[dict]) -> list:
    detector, verdicts, start = DivergenceDetector(), [], 0
    for r in rows:
        verdicts.append((r["step"], detector.update(start, r["step"], r["loss"], r.get("grad_norm", 0.0))))
        start = r["step"]
    return verdicts


def recorded(name: str) -> list[dict]:
    lines = (CURVES / name).read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.parametrize("curve", sorted(p.name for p in CURVES.glob("healthy-*.jsonl")))
def test_the_detector_is_quiet_on_real_healthy_curves(curve):
    """The loss and gradient norm that real runs logged (the default digits run, the tutorial UNet at its recipe):
    no spike, no divergence, from the first window to the last."""
    rows = recorded(curve)
    assert len(rows) >= 20
    noisy = [(s, v.spike or v.reason) for s, v in replay(rows) if v.spike or v.diverged]
    assert not noisy, noisy


def test_the_detector_names_a_collapse_and_the_window_it_began_in():
    rows = [{"step": 10 * (i + 1), "loss": 0.12 + 0.01 * (-1) ** i, "grad_norm": 0.3} for i in range(12)]
    rows.append({"step": 130, "loss": 0.15, "grad_norm": 8.4})  # the gradient spikes first
    rows += [{"step": 140 + 10 * i, "loss": 1.0, "grad_norm": 1.0} for i in range(PATIENCE)]
    verdicts = dict(replay(rows))
    assert "gradient-norm spike by step 130" in verdicts[130].spike and not verdicts[130].diverged
    assert verdicts[130].suspect_from == 120  # the window after step 120
    assert [s for s, v in verdicts.items() if v.diverged] == [120 + 10 * (PATIENCE + 1)]
    assert verdicts[120 + 10 * (PATIENCE + 1)].suspect_from == 120


def test_a_spike_that_recovers_by_itself_is_named_but_not_a_divergence():
    rows = [{"step": i + 1, "loss": 0.1, "grad_norm": 0.3} for i in range(10)]
    rows += [{"step": 11, "loss": 0.9, "grad_norm": 0.3}, {"step": 12, "loss": 0.1, "grad_norm": 0.3}]
    rows += [{"step": 13 + i, "loss": 0.1, "grad_norm": 0.3} for i in range(10)]
    verdicts = dict(replay(rows))
    assert verdicts[11].spike.startswith("loss spike by step 11") and verdicts[11].suspect_from == 10
    assert not any(v.diverged for v in verdicts.values()) and verdicts[12].suspect_from is None


def test_the_first_windows_of_a_run_are_not_judged():
    losses = [1.0 / (i + 1) if i != 2 else 5.0 for i in range(WARMUP_WINDOWS)]
    falling = [{"step": i + 1, "loss": loss, "grad_norm": 1.0} for i, loss in enumerate(losses)]
    assert not any(v.spike or v.diverged for _, v in replay(falling))


def test_the_detector_keeps_its_history_across_a_resume():
    rows = [{"step": i + 1, "loss": 0.1 + 0.001 * i, "grad_norm": 0.3} for i in range(10)]
    a = DivergenceDetector()
    for r in rows:
        a.update(r["step"] - 1, r["step"], r["loss"], r["grad_norm"])
    b = DivergenceDetector()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.update(10, 11, 1.0, 0.3).spike  # judged at once, no new warm-up


def write(ckpt_dir: Path, step: int, keep: int) -> None:
    save_checkpoint(
        ckpt_dir, step, tensors={"unet": {"w": torch.ones(2)}}, torch_states={}, rank_states={}, state={"step": step},
        keep=keep,
    )  # fmt: skip


def test_pruning_never_deletes_the_last_good_checkpoint(tmp_path):
    for step in (100, 200):
        write(tmp_path, step, keep=2)
    mark_last_good(tmp_path, 100, "loss spike by step 250")
    for step in (300, 400, 500):
        write(tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000100", "step-00000400", "step-00000500"]
    assert last_good_step(tmp_path) == 100
    assert remove_after(tmp_path, 100, keep_aside=True) == ["step-00000500", "step-00000400"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "diverged-step-00000400",
        "diverged-step-00000500",
        "step-00000100",
    ]

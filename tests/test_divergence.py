"""Training that notices when it breaks: non-finite steps skipped on the device, a divergence detected on the log
windows (and quiet on real healthy curves), the last good checkpoint kept, and the run's own reaction to both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddpm.models.checkpoint import all_finite, last_good_step, mark_last_good, remove_after, save_checkpoint
from ddpm.training.divergence import (
    PATIENCE,
    WARMUP_WINDOWS,
    DivergenceDetector,
    NonFiniteSteps,
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
    assert len(rows) >= 10
    noisy = [(s, v.spike or v.reason) for s, v in replay(rows) if v.spike or v.diverged]
    assert not noisy, noisy


def test_the_detector_catches_the_real_divergence_three_windows_after_it_began():
    """The tutorial UNet over colour photos at 1.6e-3, batch 16: the gradient norm jumped 0.23 -> 8.24 by step
    160, the loss went 0.07 -> 1.01 and stayed (tests/data/loss-curves/README.md)."""
    verdicts = dict(replay(recorded("diverged-photos-tutorial-unet-lr1.6e-3-bs16.jsonl")))
    assert [s for s, v in verdicts.items() if v.spike] == [160, 170]
    assert min(s for s, v in verdicts.items() if v.diverged) == 190
    assert verdicts[190].suspect_from == 150  # the rollback target: the newest checkpoint from before step 150


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


def test_a_resume_in_the_middle_of_a_spike_keeps_it_open():
    a = DivergenceDetector()
    for i in range(10):
        a.update(i, i + 1, 0.1, 0.3)
    assert a.update(10, 11, 1.0, 0.3).suspect_from == 10
    b = DivergenceDetector()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # through a checkpoint's state.json
    b.update(11, 12, 1.0, 0.3)
    verdict = b.update(12, 13, 1.0, 0.3)
    assert verdict.diverged and verdict.suspect_from == 10  # the target is still from before the spike


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
    for step in (400, 500):  # a rerun from step 100 that diverges at the same steps again
        write(tmp_path, step, keep=2)
    assert remove_after(tmp_path, 100, keep_aside=True) == ["step-00000500", "step-00000400"]
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert names[-1] == "step-00000100" and len(names) == 5
    assert (
        sorted(n.rsplit("-", 1)[0] for n in names[:-1])
        == ["diverged-step-00000400"] * 2 + ["diverged-step-00000500"] * 2
    )


# --------------------------------------------------------------------------------------
# The run's own reaction: real tiny runs with a fault injected into the loss (tests/poisoned_training.py).


def poison(monkeypatch, kind: str, first: int, end: int) -> None:
    import torch.nn.functional as F

    from tests.poisoned_training import poisoned

    monkeypatch.setattr(F, "mse_loss", poisoned(kind, first, end))


def train_cli(overrides: list[str], capsys) -> tuple[int, list[str]]:
    from jobs.cli import main

    code = main(["train", *overrides])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ddpm train")]
    return code, err


def checkpoint(run_dir: Path, step: int) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    path = run_dir / "checkpoints" / f"step-{step:08d}"
    state = torch.load(path / "optimizer.pt", weights_only=True)["state"]
    moments = {f"{k}.{m}": v[m] for k, v in state.items() for m in ("exp_avg", "exp_avg_sq", "step")}
    return {"unet": load_file(path / "unet.safetensors"), "ema": load_file(path / "ema.safetensors"), "adam": moments}


def every_tensor_finite(run_dir: Path) -> bool:
    from safetensors.torch import load_file

    files = [*run_dir.glob("checkpoints/step-*/*.safetensors"), *run_dir.glob("pipeline/unet/*.safetensors")]
    return bool(files) and all(torch.isfinite(t).all() for f in files for t in load_file(f).values())


def rows(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def events(run_dir: Path) -> list[tuple[int, str]]:
    """What the run announced (a log line, a W&B alert where online, and a divergence/<event> mark in metrics)."""
    lines = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], k.removeprefix("divergence/")) for r in lines for k in r if k.startswith("divergence/")]


# The collapse tests train the tiny UNet at the digits demo's rate, where its loss is well below the collapsed 1.0
# by step 40 (0.35-0.4; at the default 4e-4 it is still falling through 0.6).
COLLAPSE = ("optim.lr=1.6e-3", "train.log_every=5", "train.checkpoint_every=10")


def test_nan_steps_are_skipped_leaving_weights_ema_and_optimizer_as_they_were(tiny, monkeypatch, capsys):
    from ddpm.config import load_config

    overrides = tiny("train.max_steps=10", "train.checkpoint_every=1", "train.keep_checkpoints=20")
    poison(monkeypatch, "nan", 3, 5)  # optimizer steps 4 and 5, in the log windows 3-4 and 5-6
    code, err = train_cli(overrides, capsys)
    run_dir = load_config(None, overrides).run_dir
    assert code == 0 and not err
    before, after = checkpoint(run_dir, 3), checkpoint(run_dir, 5)
    for part in before:
        assert all(torch.equal(before[part][k], after[part][k]) for k in before[part]), part
    assert not torch.equal(checkpoint(run_dir, 6)["unet"]["conv_in.weight"], after["unet"]["conv_in.weight"])
    assert [r["skipped_steps"] for r in rows(run_dir)] == [0, 1, 2, 2, 2]
    assert all(r["loss"] == r["loss"] for r in rows(run_dir))  # each window's mean leaves its NaN out
    assert every_tensor_finite(run_dir) and (run_dir / "pipeline" / "model_index.json").is_file()


def test_a_run_of_nan_steps_stops_with_the_last_good_weights_checkpointed(tiny, monkeypatch, capsys):
    from ddpm.config import load_config

    overrides = tiny("train.max_steps=30", "train.checkpoint_every=2", "train.keep_checkpoints=10",
                     "train.max_nonfinite_steps=3")  # fmt: skip
    poison(monkeypatch, "nan", 4, 1000)  # from optimizer step 5 on
    code, err = train_cli(overrides, capsys)
    run_dir = load_config(None, overrides).run_dir
    assert code == 2 and len(err) == 1, err
    assert "step 8: 4 optimizer steps in a row had NaN/inf gradients" in err[0]
    good, last = checkpoint(run_dir, 4), checkpoint(run_dir, 8)
    assert all(torch.equal(good["unet"][k], last["unet"][k]) for k in good["unet"])
    assert every_tensor_finite(run_dir) and not (run_dir / "pipeline").exists()


def test_a_collapse_is_detected_and_rolled_back_to_the_last_good_checkpoint(tiny, monkeypatch, capsys):
    from ddpm.config import load_config

    overrides = tiny(*COLLAPSE, "train.max_steps=80", "train.keep_checkpoints=2")
    poison(monkeypatch, "collapse", 40, 55)  # optimizer steps 41-55 predict zero noise
    code, err = train_cli(overrides, capsys)
    run_dir = load_config(None, overrides).run_dir
    assert code == 0 and not err
    assert events(run_dir) == [(45, "spike"), (55, "rollback")]  # named at once, acted on after 3 windows
    assert json.loads((run_dir / "checkpoints" / "last-good.json").read_text())["step"] == 40
    final = json.loads((run_dir / "checkpoints" / "step-00000080" / "state.json").read_text())
    assert (final["rollbacks"], final["lr_scale"]) == (1, 0.5)
    by_step = {r["step"]: r for r in rows(run_dir)}
    cfg = load_config(None, overrides)
    from ddpm.training.loop import lr_factor

    assert by_step[60]["lr"] == pytest.approx(0.5 * cfg.optim.lr * lr_factor(59, 2, 80, "cosine"))
    assert by_step[75]["loss"] < 0.6  # trained on after the rollback
    # pruning kept step 40, the last good one, beside the newest two
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == [
        "step-00000040",
        "step-00000070",
        "step-00000080",
    ]
    assert every_tensor_finite(run_dir)


@pytest.mark.parametrize("mode, good", [("stop", 40), ("rollback", 55)])
def test_a_collapse_that_stays_stops_with_one_line_and_a_failing_exit(tiny, monkeypatch, capsys, mode, good):
    """stop at once, or rollback until train.max_rollbacks is spent: exit status 2 (a SLURM job chained with
    afterok does not start), no export, the diverged checkpoints set aside and the last good one kept: step 40, or
    the checkpoint written right after the rollback at step 55 (step 40's weights at half the rate)."""
    from ddpm.config import load_config

    overrides = tiny(*COLLAPSE, f"train.on_divergence={mode}", "train.max_rollbacks=1", "train.max_steps=100")
    poison(monkeypatch, "collapse", 40, 10_000)
    code, err = train_cli(overrides, capsys)
    run_dir = load_config(None, overrides).run_dir
    assert code == 2 and len(err) == 1, err
    assert "training diverged" in err[0] and f"train.on_divergence={mode}" in err[0]
    assert f"{int(mode == 'rollback')} rollbacks" in err[0] and f"step-{good:08d}" in err[0]
    assert not (run_dir / "pipeline").exists() and events(run_dir)[-1][1] == "stopped"
    kept = sorted(int(p.name.removeprefix("step-")) for p in (run_dir / "checkpoints").glob("step-*"))
    aside = sorted(int(p.name.split("-")[2]) for p in (run_dir / "checkpoints").glob("diverged-*"))
    assert kept[-1] == good and aside and aside[0] > good  # a rerun resumes from the last good one


def test_warn_only_names_the_divergence_and_trains_on(tiny, monkeypatch, capsys):
    from ddpm.config import load_config

    overrides = tiny(*COLLAPSE, "train.on_divergence=warn", "train.max_steps=70")
    poison(monkeypatch, "collapse", 40, 60)
    code, _ = train_cli(overrides, capsys)
    run_dir = load_config(None, overrides).run_dir
    assert code == 0 and events(run_dir) == [(45, "spike"), (55, "diverged")]  # once, not at every window it lasts
    assert (run_dir / "pipeline" / "model_index.json").is_file()


def test_two_processes_decide_together_when_one_sees_nan(tiny, tmp_path):
    """A NaN on rank 1 alone: the all-reduced gradients carry it to rank 0, both skip, and both stop at the same
    log step with the same error instead of one waiting forever in a collective."""
    import os
    import subprocess
    import sys

    overrides = tiny("train.max_steps=30", "train.max_nonfinite_steps=3")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "POISON": "nan", "POISON_STEPS": "4:1000",
           "POISON_RANK": "1"}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "tests" / "poisoned_training.py"), "train", *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    # (the two processes write stderr at the same moment: their lines may share one)
    said = "ddpm train: error: step 8: 4 optimizer steps in a row had NaN/inf gradients"
    assert proc.stderr.count("ddpm train: error:") == proc.stderr.count(said) == 2, proc.stderr[-3000:]


def test_an_in_training_score_far_worse_than_the_runs_best_is_a_warning(tmp_path, caplog):
    """The second alarm: scores.jsonl holds the run's earlier in-training scores; a new one over EVAL_ALARM x the
    best is named beside it, one within it is not."""
    from ddpm.config import TrainConfig
    from ddpm.evaluation.scores import append_score
    from ddpm.training.reports import EVAL_ALARM, score_ema

    class Tracker:
        def log(self, metrics, step): ...

        def alert(self, title, text): self.alerted = text  # fmt: skip

    net = torch.nn.Linear(2, 2)
    base = {"metric": "digitsnet", "kd_digitsnet": 1.0, "seconds": 1.0, "num_images": 16, "model_fingerprint": "",
            "scheduler": "ddim", "steps": 2, "seed": 0, "source": "training", "reference_data": "digits at 8px",
            "reference_images": 64, "precision": "fp32"}  # fmt: skip
    append_score(tmp_path, {**base, "step": 100, "fd_digitsnet": 4.0})
    for step, fd in ((200, 4.0 * EVAL_ALARM * 0.9), (300, 4.0 * EVAL_ALARM * 1.5)):
        tracker = Tracker()
        with caplog.at_level("WARNING"):
            caplog.clear()
            score_ema(EMA(net.parameters(), 0.9, 0.75), net, lambda *a, fd=fd: {**base, "fd_digitsnet": fd}, None,
                      TrainConfig(), tmp_path, tracker, None, step)  # fmt: skip
        fell = "sample quality fell" in caplog.text
        assert fell == (step == 300), caplog.text
        assert fell == hasattr(tracker, "alerted")
    assert "step 300: fd_digitsnet 12 is over 2x this run's best, 4" in caplog.text

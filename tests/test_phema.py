"""Post-hoc EMA (EDM2): the profiles tracked in training, their snapshots on disk, the least-squares reconstruction
of any EMA length from them, and `ddpm ema`, which exports one as a plain pipeline."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline
from safetensors.torch import load_file

from ddpm.config import load_config
from ddpm.models.phema import (
    gamma_of,
    list_snapshots,
    reconstruct,
    sigma_rel_of,
    snapshot_dir,
    write_snapshot,
)
from ddpm.publishing.hub import model_card
from ddpm.training.ema import PowerEMAProfiles
from ddpm.training.loop import train
from tests.conftest import ROOT, cli


def test_sigma_rel_and_the_exponent_are_each_others_inverse():
    # EDM2's two default profiles: sigma_rel 0.05 and 0.10 are the exponents 16.97 and 6.94 (its section 3.1)
    assert gamma_of(0.05) == pytest.approx(16.97, abs=0.01) and gamma_of(0.10) == pytest.approx(6.94, abs=0.01)
    for gamma in (0.5, 3.0, 16.97, 100.0):
        assert gamma_of(sigma_rel_of(gamma)) == pytest.approx(gamma, rel=1e-9)


def test_tracked_profile_is_the_power_function_average_of_the_weights():
    """With beta_t = (1 - 1/t)^(gamma + 1) the average after t steps weights step tau by
    (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1): a discrete power function, exactly."""
    torch.manual_seed(0)
    thetas = torch.randn(50, 4, dtype=torch.float64)
    p = torch.nn.Parameter(thetas[0].clone())
    profiles = PowerEMAProfiles([("w", p)], (0.1,), Path("unused"), 0, "fp16", is_main=False)
    for theta in thetas:
        p.data.copy_(theta)
        profiles.update([p])
    g, t = gamma_of(0.1), len(thetas)
    tau = torch.arange(1, t + 1, dtype=torch.float64)
    weights = (tau ** (g + 1) - (tau - 1) ** (g + 1)) / t ** (g + 1)
    assert torch.allclose(profiles.shadows[0][0], (weights[:, None] * thetas).sum(0), atol=1e-12)


def _track(steps: int, every: int, directory: Path, dtype: str) -> tuple[PowerEMAProfiles, PowerEMAProfiles]:
    """A drifting random walk of weights, with the two snapshotted profiles and, aside, two tracked profiles that
    are never snapshotted (0.07, between them, and 0.2, wider than both)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(300)), torch.nn.Parameter(torch.zeros(4, 5))]
    named = list(zip("ab", params))
    snapshotted = PowerEMAProfiles(named, (0.05, 0.10), directory, every, dtype, is_main=True)
    aside = PowerEMAProfiles(named, (0.07, 0.2), directory / "unused", 0, dtype, is_main=True)
    velocity = [torch.zeros_like(p) for p in params]
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p, v in zip(params, velocity):
                v.mul_(0.99).add_(torch.randn_like(p), alpha=0.01)
                p.add_(v).add_(torch.randn_like(p), alpha=0.01)
        snapshotted.update(params)
        aside.update(params)
        snapshotted.snapshot(step, steps)
    return snapshotted, aside


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[n] - b[n]).square().sum() for n in a).sqrt())


def test_a_profile_reconstructed_from_snapshots_matches_the_same_profile_tracked_directly(tmp_path):
    """EDM2's validation: 400 steps, fp16 snapshots of 0.05 and 0.10 every 20; the rebuilt 0.07 and 0.2 are within
    2% of the distance between the tracked profiles (0.5% and 0.4% measured)."""
    snapshotted, aside = _track(400, 20, tmp_path, "fp16")
    snapshots = list_snapshots(tmp_path)
    assert [s.step for s in snapshots] == list(range(20, 401, 20)) and snapshots[-1].t == 400
    rec = reconstruct(snapshots, [0.07, 0.2])
    tracked = {sr: dict(zip(aside.names, shadow)) for sr, shadow in zip(aside.sigma_rels, aside.shadows)}
    narrow = dict(zip(snapshotted.names, snapshotted.shadows[0]))
    for sr in (0.07, 0.2):
        gap = _distance(tracked[sr], narrow)
        assert _distance(rec.weights[sr], tracked[sr]) < 0.02 * gap, sr
    assert rec.coefficients.sum(axis=0) == pytest.approx([1.0, 1.0])
    # a tracked profile at the newest step is its own best reconstruction
    own = reconstruct(snapshots, [0.05])
    assert _distance(own.weights[0.05], snapshots[-1].weights(0.05)) < 1e-6


def test_reconstruction_refuses_what_it_cannot_do(tmp_path):
    from ddpm.errors import UserError

    with pytest.raises(UserError, match="no EMA snapshots"):
        reconstruct([], [0.1])
    write_snapshot(tmp_path, 10, 10, {0.05: {"w": torch.ones(2)}}, "fp16")
    with pytest.raises(UserError, match="no EMA snapshot at step 7"):
        reconstruct(list_snapshots(tmp_path), [0.1], step=7)
    with pytest.raises(UserError, match="sigma_rel 0.3"):
        reconstruct(list_snapshots(tmp_path), [0.3])


def test_snapshots_survive_checkpoint_pruning_and_a_resume_keeps_them_exact(tiny):
    """keep_checkpoints=1 prunes the checkpoints, never the snapshots; a run resumed from step 3 writes the same
    snapshots as a straight one."""
    extra = ("train.ema_snapshot_every=2", "train.keep_checkpoints=1", "optim.loss_weighting=min_snr")
    straight = load_config(None, tiny(*extra, name="straight"))
    train(straight)
    assert [p.name for p in (straight.run_dir / "checkpoints").iterdir()] == ["step-00000006"]
    snaps = list_snapshots(snapshot_dir(straight.run_dir))
    assert [(s.step, s.t, s.sigma_rels) for s in snaps] == [
        (2, 2, (0.05, 0.1)),
        (4, 4, (0.05, 0.1)),
        (6, 6, (0.05, 0.1)),
    ]
    resumed = load_config(None, tiny(*extra, "train.stop_after=3", name="resumed"))
    train(resumed)
    train(load_config(None, tiny(*extra, name="resumed")))
    for a, b in zip(snaps, list_snapshots(snapshot_dir(resumed.run_dir))):
        wa, wb = load_file(a.path), load_file(b.path)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), a.path.name
    pa, pb = (
        load_file(r / "checkpoints" / "step-00000006" / "phema.safetensors")
        for r in (straight.run_dir, resumed.run_dir)
    )
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


WRITER = """
import sys, torch
from pathlib import Path
from ddpm.models.phema import write_snapshot
w = {"w": torch.randn(4_000_000)}
print("ready", flush=True)
step = 0
while True:
    step += 1
    write_snapshot(Path(sys.argv[1]), step, step, {0.05: w, 0.1: w}, "fp16")
"""


@pytest.mark.slow  # 10-30 s of child processes, as the other kill loops (docs/reliability.md, fault 13)
def test_a_sigkill_leaves_no_half_snapshot(tmp_path):
    """A process that writes 16 MB snapshots back to back, killed as soon as one is being written, until two kills
    have left a write unfinished (a temporary file behind): every snapshot under its final name is whole, and the
    next write clears what the kills left."""
    directory = tmp_path / "ema-snapshots"
    killed_mid_write = 0
    for _ in range(10):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(directory)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.time() + 30
        while not any(directory.glob(".tmp-*")) and time.time() < deadline:
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        killed_mid_write += any(directory.glob(".tmp-*"))  # left behind: the kill came in the middle of a write
        for snap in list_snapshots(directory):
            w = load_file(snap.path)
            assert w["0.05/w"].shape == (4_000_000,) and w["0.1/w"].shape == (4_000_000,)
        if killed_mid_write == 2:
            break
    assert killed_mid_write == 2
    write_snapshot(directory, 999, 999, {0.05: {"w": torch.ones(1)}}, "fp16")
    assert not list(directory.glob(".tmp-*"))


def test_ddpm_ema_exports_a_plain_pipeline_with_its_sigma_rel(tiny, tmp_path):
    cfg = load_config(None, tiny("train.ema_snapshot_every=2"))
    train(cfg)
    result = cli("ema", "--run", str(cfg.run_dir), "--sigma-rel", "0.08", "--check")
    assert result.returncode == 0, result.stderr
    out = cfg.run_dir / "ema-reconstructions" / "step-00000006-sigma_rel-0.08"
    assert f"pipeline: {out}" in result.stdout and result.stdout.count("check: sigma_rel") == 2
    pipe = DDPMPipeline.from_pretrained(out)
    images = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (1, 8, 8, 1)
    settings = json.loads((out / "ema.json").read_text())
    assert (settings["sigma_rel"], settings["step"], len(settings["snapshots"])) == (0.08, 6, 3)
    rec = reconstruct(list_snapshots(snapshot_dir(cfg.run_dir)), [0.08])
    exported = pipe.unet.state_dict()
    assert all(torch.equal(exported[n], w) for n, w in rec.weights[0.08].items())
    card = model_card(out, "someone/tiny")
    assert "post-hoc EMA, sigma_rel 0.08" in card
    assert "samples.png" not in card  # the run's final grid was drawn by the classic EMA's weights, not these
    assert "samples.png" in model_card(cfg.run_dir / "pipeline", "someone/tiny")
    # at another step, and into a folder of one's choice
    result = cli("ema", "--run", str(cfg.run_dir), "--sigma-rel", "0.1", "--step", "4", "--out", str(tmp_path / "e"))
    assert result.returncode == 0 and json.loads((tmp_path / "e" / "ema.json").read_text())["step"] == 4


def test_ddpm_ema_errors_are_one_line(tiny):
    cfg = load_config(None, tiny("optim.ema_profiles=[]"))
    train(cfg)
    assert not snapshot_dir(cfg.run_dir).exists()
    for args, says in (
        (["--run", str(cfg.run_dir)], "no EMA snapshots"),
        (["--run", str(cfg.run_dir), "--sigma-rel", "0.5"], "--sigma-rel must be in (0, 0.289)"),
        (["--run", str(cfg.run_dir.parent / "nothing")], "is not a training run"),
    ):
        result = cli("ema", *args)
        assert result.returncode == 2 and says in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_ddpm_ema_never_replaces_what_is_not_a_post_hoc_export_and_checks_before_exporting(tiny, tmp_path):
    cfg = load_config(None, tiny("train.ema_snapshot_every=2", "train.keep_checkpoints=1"))
    train(cfg)
    run_files = sorted(p.name for p in cfg.run_dir.iterdir())
    for out, says in (
        (cfg.run_dir, "it holds files and is not a pipeline"),  # the run directory itself
        (cfg.run_dir / "pipeline", "holds a pipeline that is not a post-hoc EMA export"),  # the classic EMA's export
    ):
        result = cli("ema", "--run", str(cfg.run_dir), "--sigma-rel", "0.1", "--out", str(out))
        assert result.returncode == 2 and says in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == run_files
    assert not (cfg.run_dir / "pipeline" / "ema.json").exists()
    # The snapshot of step 4 is kept, its checkpoint pruned: --check refuses before writing anything.
    result = cli("ema", "--run", str(cfg.run_dir), "--sigma-rel", "0.1", "--step", "4", "--check")
    assert result.returncode == 2 and "steps that can be checked: 6" in result.stderr, result.stderr
    assert not (cfg.run_dir / "ema-reconstructions").exists()


def test_ddpm_ema_of_a_class_conditional_run_exports_its_conditional_pipeline(tiny):
    from diffusers import DiffusionPipeline

    cfg = load_config(None, tiny("train.ema_snapshot_every=2", "model.num_classes=auto"))
    train(cfg)
    result = cli("ema", "--run", str(cfg.run_dir), "--sigma-rel", "0.1")
    assert result.returncode == 0, result.stderr
    out = cfg.run_dir / "ema-reconstructions" / "step-00000006-sigma_rel-0.1"
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert type(pipe).__name__ == "ClassConditionalDDPMPipeline" and pipe.config.id2label["3"] == "3"
    images = pipe(class_labels=[3], guidance_scale=2.0, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 8, 8, 1)
    assert cli("sample", "--pipeline", str(out), "--label", "3", "--steps", "2", "--num-images", "1").returncode == 0

"""On the real two-node SLURM cluster of slurm/dev (`make cluster-up`): multi-node training, an upload that
waits for it, a sweep array with its merge, and a preempted job that requeues itself and resumes.

Skipped when no cluster answers, unless DDPM_REQUIRE_SLURM=1 (set by .ci/run, which starts the cluster):
then a missing cluster fails the suite instead of hiding the tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDPMPipeline

from tests.conftest import TINY_MODEL, run_cli


def _cluster_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    return r.returncode == 0 and any(s.startswith(("idle", "mix", "alloc", "comp")) for s in r.stdout.split())


if not _cluster_answers():
    if os.environ.get("DDPM_REQUIRE_SLURM") == "1":
        raise RuntimeError("DDPM_REQUIRE_SLURM=1 but no SLURM cluster answers: run `make cluster-up` (as root)")
    pytest.skip("no SLURM cluster (make cluster-up)", allow_module_level=True)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# 300 steps of the tiny model on two 1-CPU nodes: about half a minute of training.
TRAIN = [
    *TINY_MODEL,
    "data.resolution=8",
    "train.batch_size=16",
    "train.max_steps=300",
    "train.log_every=5",
    "train.checkpoint_every=100",
    "train.sample_every=0",
    "train.sample_images=4",
    "train.sample_steps=2",
    "train.eval_every=0",  # the grid test turns it on
    "train.mixed_precision=fp32",
    "optim.warmup_steps=10",
    "tracking.wandb=false",
]


def submit(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    r = run_cli("submit", *args, timeout=timeout)
    print(r.stdout, r.stderr)
    return r


def job_ids(stdout: str) -> dict[str, str]:
    """{"train": "12", "upload (after job 12 succeeds)": "13", ...} from the submit command's output."""
    out = {}
    for line in stdout.splitlines():
        if " job " in line and not line.startswith(" "):
            kind, _, job = line.rpartition(" job ")
            out[kind] = job.strip()
    return out


def scontrol(job: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, check=True).stdout
    return dict(f.split("=", 1) for f in text.split() if "=" in f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm") / "runs"


@pytest.fixture(scope="module")
def trained(runs) -> tuple[Path, dict[str, str]]:
    """A two-node run to the end, with an upload job (dry run) that waits on it."""
    r = submit(
        "train",
        "--cluster",
        "local",
        "--wait",
        "--upload",
        "someone/tiny-digits",
        "--dry-run-upload",
        "name=two-nodes",
        f"runs_dir={runs}",
        f"data.cache_dir={runs.parent / 'cache'}",
        *TRAIN,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "world size 2 on local" in r.stdout
    return runs / "two-nodes", job_ids(r.stdout)


def test_two_node_training_runs_one_rank_per_node_and_exports_once(trained):
    run_dir, jobs = trained
    logs = run_dir / "slurm" / jobs["train"]
    rank0 = (logs / f"{jobs['train']}_0_log.out").read_text()
    rank1 = (logs / f"{jobs['train']}_1_log.out").read_text()
    assert "rank 0 of 2 on ddpm-n1: device cpu" in rank0 and "rank 1 of 2 on ddpm-n2: device cpu" in rank1
    assert "exported" in rank0 and "exported" not in rank1  # rank 0 alone writes the pipeline
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 300
    assert (run_dir / "pipeline" / "model_index.json").is_file()
    assert not list(run_dir.glob(".tmp-*")) and not list(run_dir.glob(".old-*"))
    # The job ran from the code snapshot, not from the checkout.
    assert scontrol(jobs["train"])["WorkDir"].startswith(str(run_dir.parent / ".code"))


def test_the_upload_job_starts_only_after_training_succeeded(trained):
    run_dir, jobs = trained
    upload = next(v for k, v in jobs.items() if k.startswith("upload"))
    train_info, upload_info = scontrol(jobs["train"]), scontrol(upload)
    assert upload_info["JobState"] == "COMPLETED" and upload_info["Dependency"] in (
        "(null)",
        f"afterok:{jobs['train']}(unfulfilled)",
    )
    assert upload_info["StartTime"] >= train_info["EndTime"]  # ISO timestamps compare as strings
    out = (run_dir / "slurm" / upload / f"{upload}_0_log.out").read_text()
    assert "dry run, nothing sent: would upload" in out and "model_index.json" in out and "README.md" in out


def test_a_failed_training_job_cancels_its_upload(runs):
    r = submit(
        "train",
        "--cluster",
        "local",
        "--wait",
        "--upload",
        "someone/x",
        "--dry-run-upload",
        "name=fails",
        f"runs_dir={runs}",
        f"data.cache_dir={runs.parent / 'cache'}",
        *TRAIN,
        "data.source=folder",
        f"data.path={runs.parent / 'no-such-folder'}",
    )
    assert r.returncode == 1
    jobs = job_ids(r.stdout)
    upload = next(v for k, v in jobs.items() if k.startswith("upload"))
    assert scontrol(jobs["train"])["JobState"] == "FAILED" and scontrol(upload)["JobState"] == "CANCELLED"
    err = (runs / "fails" / "slurm" / jobs["train"] / f"{jobs['train']}_0_log.err").read_text()
    assert "no-such-folder" in err


def test_a_sweep_array_and_its_merge(trained, tmp_path):
    run_dir, _ = trained
    spec = {
        "name": "arr",
        "out_dir": str(tmp_path / "sweeps"),
        "models": [{"pipeline": str(run_dir / "pipeline")}],
        "schedulers": ["ddim", "dpmsolver++"],
        "steps": [2, 4],
        "num_images": 8,
        "batch_size": 8,
        "grid_images": 4,
        "metric": "digitsnet",
        "device": "cpu",
        "precision": "fp32",
        "tracking": {"wandb": False},
    }
    config = tmp_path / "arr.yaml"
    config.write_text(yaml.safe_dump(spec))
    r = submit("sweep", "--cluster", "local", "--config", str(config), "--shards", "2", "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sweep array (2 tasks, 4 cells)" in r.stdout
    jobs = job_ids(r.stdout)
    array = next(v for k, v in jobs.items() if k.startswith("sweep array"))
    logs = tmp_path / "sweeps" / "arr" / "slurm"
    assert (logs / f"{array}_0" / f"{array}_0_0_log.out").is_file() and (
        logs / f"{array}_1" / f"{array}_1_0_log.out"
    ).is_file()
    rows = json.loads((tmp_path / "sweeps" / "arr" / "results.json").read_text())
    assert len(rows) == 4 and all(r["fd_digitsnet"] > 0 for r in rows)


def test_a_preempted_job_requeues_itself_and_ends_where_an_uninterrupted_one_does(trained, runs):
    reference, _ = trained
    r = submit(
        "train",
        "--cluster",
        "local",
        "name=preempted",
        f"runs_dir={runs}",
        f"data.cache_dir={runs.parent / 'cache'}",
        *TRAIN,
    )
    assert r.returncode == 0, r.stderr
    job = job_ids(r.stdout)["train"]
    metrics = runs / "preempted" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # signal it mid-run, as SLURM does before a time limit
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        if lines and json.loads(lines[-1])["step"] >= 60:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the job did not reach step 60 in 5 minutes")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)

    from slurm.launch import wait

    assert wait([job], poll_s=3) == {job: "COMPLETED"}
    info = scontrol(job)
    assert info["Restarts"] == "1"
    log = (runs / "preempted" / "slurm" / job / f"{job}_0_log.out").read_text()
    assert "stop requested (SIGUSR2)" in log and "requeue of job" in log and "resuming" in log
    assert json.loads((runs / "preempted" / "summary.json").read_text())["steps"] == 300
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(5, 301, 5))  # every log step once: nothing lost, nothing repeated
    # Exact resume: the same weights as the run that was never interrupted.
    ours = DDPMPipeline.from_pretrained(runs / "preempted" / "pipeline").unet.state_dict()
    theirs = DDPMPipeline.from_pretrained(reference / "pipeline").unet.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_prepare_array_decodes_the_cache_and_training_after_it_decodes_nothing(runs, tmp_path):
    """`ddpm submit prepare` (two CPU tasks, each its parts), then `ddpm submit train --after` the array: training
    starts after both tasks succeeded and opens the complete cache without decoding or listing the folder."""
    from PIL import Image

    folder = tmp_path / "prepare-images"
    folder.mkdir()
    for i in range(40):
        Image.new("RGB", (12, 12), (i * 6, 255 - i * 6, 90)).save(folder / f"{i:02d}.png")
    data = [
        "data.source=folder",
        f"data.path={folder}",
        f"data.cache_dir={tmp_path / 'prepared-cache'}",
        "data.resolution=8",
        "data.shard_size=8",
    ]
    r = submit("prepare", "--cluster", "local", "--tasks", "2", *data)
    assert r.returncode == 0, r.stdout + r.stderr
    prepare = job_ids(r.stdout)["prepare array (2 tasks)"]
    assert f"--after {prepare}" in r.stdout
    r = submit(
        "train",
        "--cluster",
        "local",
        "--nodes",
        "1",
        "--wait",
        "--after",
        prepare,
        "name=after-prepare",
        f"runs_dir={runs}",
        *TRAIN,
        "train.max_steps=20",
        *data,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    train = job_ids(r.stdout)["train"]
    assert scontrol(train)["StartTime"] >= max(scontrol(f"{prepare}_{t}")["EndTime"] for t in (0, 1))
    content = [p for p in (tmp_path / "prepared-cache").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(content) == 1 and json.loads((content[0] / "meta.json").read_text())["count"] == 40
    logs = tmp_path / "prepared-cache" / ".slurm"
    parts = "".join((logs / f"{prepare}_{t}" / f"{prepare}_{t}_0_log.out").read_text() for t in (0, 1))
    assert parts.count("Job completed successfully") == 2 and "prepared: " in parts  # the last task finished it
    err = (runs / "after-prepare" / "slurm" / train / f"{train}_0_log.err").read_text()
    assert "caching" not in err and "listed" not in err  # no decode, no listing: the warm start


def test_a_bad_image_seen_by_rank_0_ends_every_rank_with_its_error(runs, tmp_path):
    """Rank 0 decodes the part holding the bad file while rank 1 waits in a barrier: rank 0's error must end the
    job promptly (not after the profile's 10-minute process-group time-out) and be the job's error."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        Image.new("RGB", (12, 12), (i * 30, 0, 0)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    start = time.monotonic()
    r = submit(
        "train",
        "--cluster",
        "local",
        "--wait",
        "name=bad-image",
        f"runs_dir={runs}",
        f"data.cache_dir={runs.parent / 'cache'}",
        *TRAIN,
        "data.source=folder",
        f"data.path={folder}",
        "data.on_bad_image=error",
    )
    elapsed = time.monotonic() - start
    assert r.returncode == 1, r.stdout + r.stderr
    job = job_ids(r.stdout)["train"]
    assert scontrol(job)["JobState"] == "FAILED"
    err = (runs / "bad-image" / "slurm" / job / f"{job}_0_log.err").read_text()
    assert "broken.png: cannot decode image" in err
    assert elapsed < 300, f"the job took {elapsed:.0f} s to end"
    print(f"bad image on rank 0: submitted to FAILED in {elapsed:.0f} s")


def _task_pid(job: str, rank: int) -> int | None:
    """The pid of the Python process of task `rank` of a job (all "nodes" of the dev cluster share this machine's
    process table)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(e.split("=", 1) for e in (proc / "environ").read_text().split("\0") if "=" in e)
            cmd = (proc / "cmdline").read_text()
        except OSError:
            continue
        if (env.get("SLURM_JOB_ID"), env.get("SLURM_PROCID")) == (job, str(rank)) and "submitit" in cmd:
            return int(proc.name)
    return None


def test_a_rank_killed_on_the_second_node_ends_the_job_and_the_rerun_resumes(trained, runs):
    import signal

    from slurm.launch import wait

    args = ["name=killed", f"runs_dir={runs}", f"data.cache_dir={runs.parent / 'cache'}", *TRAIN]
    r = submit("train", "--cluster", "local", *args)
    assert r.returncode == 0, r.stderr
    job = job_ids(r.stdout)["train"]
    metrics = runs / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # past the first checkpoint (step 100)
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        if lines and json.loads(lines[-1])["step"] >= 120:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the job did not reach step 120 in 5 minutes")
    pid = _task_pid(job, 1)
    assert pid is not None, "no process of rank 1 found"
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    states = wait([job], poll_s=2)
    ended_after = time.monotonic() - killed
    assert states[job] != "COMPLETED" and ended_after < 120, (states, ended_after)
    print(f"rank 1 killed: job {states[job]} {ended_after:.0f} s later")
    # The rerun (by hand, or the job's own requeue where the profile allows it) resumes from the checkpoint.
    r = submit("train", "--cluster", "local", "--wait", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    rerun = job_ids(r.stdout)["train"]
    log = (runs / "killed" / "slurm" / rerun / f"{rerun}_0_log.out").read_text()
    assert "resuming" in log and "step 100" in log.split("resuming", 1)[1].splitlines()[0], log[-2000:]
    assert json.loads((runs / "killed" / "summary.json").read_text())["steps"] == 300


IMAGE = "localhost/ddpm:image-test"  # what `make image-test` builds (.ci/run builds it before these tests)


@pytest.fixture(scope="module")
def container_profile(tmp_path_factory) -> Path:
    """The local profile with its Python inside a real container root file system that has no SLURM client: the
    image of `make image-test`, entered with chroot (tests/chroot_runtime.sh stands in for apptainer)."""
    if shutil.which("buildah") is None or subprocess.run(["buildah", "inspect", IMAGE], capture_output=True).returncode:
        if os.environ.get("DDPM_REQUIRE_SLURM") == "1":
            pytest.fail(f"no image {IMAGE}: run `make image-test` first (as .ci/run does)")
        pytest.skip(f"no image {IMAGE} (make image-test)")
    ctr = subprocess.run(["buildah", "from", "-q", IMAGE], capture_output=True, text=True, check=True).stdout.strip()
    rootfs = subprocess.run(["buildah", "mount", ctr], capture_output=True, text=True, check=True).stdout.strip()
    assert not (Path(rootfs) / "usr/bin/scontrol").exists()
    local = yaml.safe_load((Path(__file__).parents[1] / "slurm/clusters/local.yaml").read_text())
    local["python"] = "/opt/venv/bin/python"
    local["container"] = {
        "image": rootfs,
        "runtime": str(Path(__file__).parent / "chroot_runtime.sh"),
        "binds": ["/etc/hosts"],  # the dev cluster's node names
    }
    path = tmp_path_factory.mktemp("profile") / "local-container.yaml"
    path.write_text(yaml.safe_dump(local))
    yield path
    subprocess.run(["buildah", "umount", ctr], capture_output=True)
    subprocess.run(["buildah", "rm", ctr], capture_output=True)


def test_a_job_in_a_container_requeues_itself_from_the_host_side_and_resumes_exactly(trained, runs, container_profile):
    reference, _ = trained
    args = ["name=contained", f"runs_dir={runs}", f"data.cache_dir={runs.parent / 'cache'}", *TRAIN]
    r = submit("train", "--cluster", str(container_profile), *args)
    assert r.returncode == 0, r.stderr
    job = job_ids(r.stdout)["train"]
    metrics = runs / "contained" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        if lines and json.loads(lines[-1])["step"] >= 60:
            break
        time.sleep(0.5)
    else:
        log = runs / "contained" / "slurm" / job / f"{job}_0_log.err"
        pytest.fail("the job did not reach step 60 in 5 minutes: " + (log.read_text()[-3000:] if log.is_file() else ""))
    subprocess.run(["scancel", "--signal=USR2", job], check=True)

    from slurm.launch import wait

    assert wait([job], poll_s=3) == {job: "COMPLETED"}
    assert scontrol(job)["Restarts"] == "1"
    log = (runs / "contained" / "slurm" / job / f"{job}_0_log.out").read_text()
    assert "asking the host side to requeue" in log and "accepted (from the host side)" in log and "resuming" in log
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(5, 301, 5))
    ours = DDPMPipeline.from_pretrained(runs / "contained" / "pipeline").unet.state_dict()
    theirs = DDPMPipeline.from_pretrained(reference / "pipeline").unet.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)  # the same weights as the uninterrupted run


def test_a_sweep_shard_in_a_container_requeues_from_the_host_side_and_skips_its_done_cells(
    trained, tmp_path, container_profile
):
    run_dir, _ = trained
    spec = {
        "name": "contained",
        "out_dir": str(tmp_path / "sweeps"),
        "models": [{"pipeline": str(run_dir / "pipeline")}],
        "schedulers": ["ddpm"],
        "steps": [200, 300, 400, 500, 600, 700],  # 2 to 5 s per cell on the dev cluster
        "num_images": 8,
        "batch_size": 8,
        "grid_images": 4,
        "metric": "digitsnet",
        "device": "cpu",
        "precision": "fp32",
        "tracking": {"wandb": False},
    }
    config = tmp_path / "contained.yaml"
    config.write_text(yaml.safe_dump(spec))
    r = submit("sweep", "--cluster", str(container_profile), "--config", str(config), "--shards", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    jobs = job_ids(r.stdout)
    array = next(v for k, v in jobs.items() if k.startswith("sweep array"))
    merge = next(v for k, v in jobs.items() if "merge" in k)
    cells = tmp_path / "sweeps" / "contained" / "cells"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(cells.rglob("row.json"))) < 1:
        time.sleep(0.2)
    done_before = len(list(cells.rglob("row.json")))
    assert 1 <= done_before < 6, "the shard finished no cell (or all of them) before the signal"
    subprocess.run(["scancel", "--signal=USR2", array], check=True)  # one shard: submitit submits a plain job

    from slurm.launch import wait

    assert wait([merge], poll_s=3) == {merge: "COMPLETED"}
    assert scontrol(array)["Restarts"] == "1"
    log = (tmp_path / "sweeps" / "contained" / "slurm" / array / f"{array}_0_log.out").read_text()
    assert "asking the host side to requeue" in log and "accepted (from the host side)" in log
    assert "already done; skipping them" in log
    rows = json.loads((tmp_path / "sweeps" / "contained" / "results.json").read_text())
    assert len(rows) == 6


def submit_training_grid(runs: Path, tmp_path: Path, *overrides: str):
    """`ddpm submit train` of a grid (comma lists in `overrides`) on one node of the local cluster, waited for: 20
    steps, a checkpoint every 10, scored with FD-digitsnet. Returns (the grid's runs_dir, the finished process)."""
    grid_runs = tmp_path / "runs"
    r = run_cli(
        "submit", "train", "--cluster", "local", "--nodes", "1", "--wait", f"runs_dir={grid_runs}",
        f"data.cache_dir={runs.parent / 'cache'}", *TRAIN, "train.max_steps=20", "train.checkpoint_every=10",
        "train.eval_metric=digitsnet", *overrides,
        env={"DDPM_CACHE": str(runs.parent / "ddpm-cache")}, timeout=900,
    )  # fmt: skip
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    return grid_runs, r


def test_a_training_grid_is_one_array_of_scored_runs_grouped_in_wandb_and_compared(runs, tmp_path):
    """2 learning rates x 2 batch sizes: one array, a run directory and W&B run per point with its scores, then one
    report of the four runs."""
    from tests import wandb_files

    grid_runs, r = submit_training_grid(
        runs, tmp_path, "name=grid", "train.eval_every=10", "train.eval_images=16", "tracking.wandb=true",
        "optim.lr=1e-4,1e-3", "train.batch_size=8,16",
    )  # fmt: skip
    array = job_ids(r.stdout)["training grid array (4 runs)"]
    grid = json.loads((grid_runs / "grid-grid" / "grid.json").read_text())
    assert grid["array_job"] == array
    names = [p["name"] for p in grid["points"]]
    assert names == [f"grid_lr-{lr}_batch_size-{b}" for lr in ("1e-4", "1e-3") for b in (8, 16)]
    for point in grid["points"]:
        run_dir = Path(point["run_dir"])
        assert json.loads((run_dir / "summary.json").read_text())["steps"] == 20
        scores = [json.loads(line) for line in (run_dir / "scores.jsonl").read_text().splitlines()]
        assert [s["step"] for s in scores] == [10, 20] and all(s["metric"] == "digitsnet" for s in scores)
        [wandb_file] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
        config = wandb_files.run_config(wandb_file)
        lr, batch = re.fullmatch(r"grid_lr-(.+)_batch_size-(\d+)", point["name"]).groups()
        assert config["optim"]["lr"] == float(lr) and config["train"]["batch_size"] == int(batch)
        assert config["tracking"]["group"] == "grid" and config["run"]["slurm_job_id"]
        run_record = next(x.run for x in wandb_files.records(wandb_file) if x.WhichOneof("record_type") == "run")
        assert run_record.run_group == "grid"
        evals = {
            h["_step"]: h["eval/fd_digitsnet"] for h in wandb_files.history(wandb_file) if "eval/fd_digitsnet" in h
        }
        assert evals == {s["step"]: pytest.approx(s["fd_digitsnet"]) for s in scores}

    report = tmp_path / "report.html"
    r = run_cli("compare", *(p["run_dir"] for p in grid["points"]), "--out", str(report))
    assert r.returncode == 0, r.stderr
    page = report.read_text()
    differing = page.split("Config keys that differ", 1)[1]
    assert "optim.lr" in differing and "train.batch_size" in differing and "train.max_steps" not in differing
    assert all(f'alt="samples of {name}"' in page for name in names)


def test_a_class_conditional_training_grid_runs_scores_class_accuracy_and_exports_for_plain_diffusers(runs, tmp_path):
    """2 label dropouts of a class-conditional model: one array, each run scored class-balanced with its class
    accuracy at the grids' guidance scale, exported with its pipeline code, and compared by guidance scale."""
    grid_runs, _ = submit_training_grid(
        runs, tmp_path, "name=cond", "train.eval_every=20", "train.eval_images=20", "model.num_classes=auto",
        "train.sample_guidance_scale=2", "train.label_dropout=0.1,0.5",
    )  # fmt: skip
    grid = json.loads((grid_runs / "cond-grid" / "grid.json").read_text())
    assert len(grid["points"]) == 2
    for point in grid["points"]:
        run_dir = Path(point["run_dir"])
        [score] = [json.loads(line) for line in (run_dir / "scores.jsonl").read_text().splitlines()]
        assert score["guidance_scale"] == 2.0 and score["labels"] == "balanced" and 0 <= score["class_accuracy"] <= 1
        index = json.loads((run_dir / "pipeline" / "model_index.json").read_text())
        assert index["_class_name"] == ["pipeline", "ClassConditionalDDPMPipeline"] and len(index["id2label"]) == 10
        assert (run_dir / "pipeline" / "pipeline.py").is_file()
    report = tmp_path / "report.html"
    r = run_cli("compare", *(p["run_dir"] for p in grid["points"]), "--out", str(report))
    assert r.returncode == 0, r.stderr
    assert "Class-conditional scores" in report.read_text()

"""Submitting jobs with submitit: training (multi-node), sweeps (an array plus a merge), uploads (after training).

Every submit_* function is handed the job's `run` (such as jobs.train.run, imported on the node from the code
snapshot): this layer decides where and how a job runs, the jobs decide what runs.

Each submission runs from a snapshot of the code: `git stash create` makes a commit of HEAD plus
any uncommitted changes to tracked files without touching the checkout, and `git archive` unpacks
it under `<runs_dir>/.code/<sha>/`; the job's working directory and PYTHONPATH point there and the
SHA goes into the W&B run config, so editing the checkout after submitting changes nothing, and a
requeued job runs the same code. Relative paths in configs are made absolute at submission.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddpm.config import Config
from ddpm.errors import UserError
from ddpm.files import unique_suffix
from slurm.profile import ClusterProfile, check_shared, python_command, sbatch_parameters

REPO = Path(__file__).resolve().parents[1]
Run = Callable[..., Any]  # a job's run(cfg), module-level (e.g. jobs.train.run): pickled by reference
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def code_snapshot(dest_root: Path) -> tuple[Path, str]:
    """(directory, description) of the code as it is in the checkout now, new files included (all but what
    .gitignore ignores): HEAD's SHA, plus "+dirty:<tree>" when the checkout differs from it. The tree is
    written through a temporary index, so the checkout and its index stay untouched; the directory is named
    by the tree, so the same code reuses one snapshot."""

    def git(*args: str, env: dict | None = None) -> str:
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})})
        if r.returncode != 0:
            raise UserError(f"code snapshot: git {' '.join(args)} failed in {REPO}: {r.stderr.strip()}")
        return r.stdout.strip()

    head = git("rev-parse", "HEAD")
    with tempfile.TemporaryDirectory() as tmpdir:
        index = Path(tmpdir) / "index"
        shutil.copy(Path(REPO, git("rev-parse", "--git-path", "index")), index)
        git("add", "-A", env={"GIT_INDEX_FILE": str(index)})
        tree = git("write-tree", env={"GIT_INDEX_FILE": str(index)})
    described = head if tree == git("rev-parse", "HEAD^{tree}") else f"{head}+dirty:{tree[:12]}"
    dest = dest_root / tree[:16]
    if not dest.is_dir():
        dest_root.mkdir(parents=True, exist_ok=True)
        tmp = dest_root / f".tmp-{tree[:16]}-{unique_suffix()}"
        archive = subprocess.run(
            ["git", "archive", "--format=tar", tree], cwd=REPO, capture_output=True, check=True
        ).stdout
        tmp.mkdir()
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        try:
            tmp.rename(dest)
        except OSError:  # another submission made the same snapshot meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    return dest, described


@dataclass
class Submitted:
    kind: str
    job_id: str
    stdout: Path
    stderr: Path

    def describe(self) -> str:
        return f"{self.kind} job {self.job_id}\n  log: {self.stdout}\n  err: {self.stderr}"


def _executor(
    profile: ClusterProfile,
    folder: Path,
    kind: str,
    name: str,
    code: Path,
    sha: str,
    nodes: int | None = None,
    after: str = "",
    binds: list[Path] = (),
):
    """`binds`: what the job reads or writes besides the code and its logs (run and sweep directories, data,
    weights)."""
    import submitit

    cache = Path(os.environ.get("DDPM_CACHE", Path.home() / ".cache" / "ddpm"))
    log_root = folder.parent if "%" in folder.name else folder  # submitit fills in %j per job
    for d in (log_root, cache):
        d.mkdir(parents=True, exist_ok=True)  # apptainer refuses to bind a path that does not exist
    mounts = list(dict.fromkeys(str(p.resolve()) for p in (code, log_root, cache, *binds) if p.exists()))
    ex = submitit.SlurmExecutor(
        folder=folder,
        max_num_timeout=profile.max_requeues,
        python=python_command(profile, REPO / ".venv" / "bin" / "python", [Path(m) for m in mounts], code),
    )
    params = sbatch_parameters(profile, kind, nodes)  # type: ignore[arg-type]
    params["setup"] = [
        *params["setup"],
        f"export PYTHONPATH={code}",
        f"export DDPM_GIT_SHA={sha}",
        "export PYTHONUNBUFFERED=1",
    ]
    params["additional_parameters"] = {**params.get("additional_parameters", {}), "chdir": str(code)}
    if kind == "train":
        params["additional_parameters"]["requeue"] = True  # sites may default to --no-requeue; the job requeues itself
    params["job_name"] = name
    if after:
        params["dependency"] = f"afterok:{after}"
        # If the job it waits on fails, SLURM cancels this one instead of keeping it pending forever.
        params["additional_parameters"]["kill_on_invalid_dep"] = "yes"
    ex.update_parameters(**params)
    return ex


def _absolute(cfg: Config) -> Config:
    """Paths as the submitter meant them: the job runs in the code snapshot, not in the submitter's directory."""
    data = cfg.data
    if data.source == "folder" or (data.source == "hf" and Path(data.path).exists()):
        data = dataclasses.replace(data, path=str(Path(data.path).resolve()))
    if data.cache_dir:
        data = dataclasses.replace(data, cache_dir=str(Path(data.cache_dir).resolve()))
    return dataclasses.replace(cfg, runs_dir=str(Path(cfg.runs_dir).resolve()), data=data)


def submit_train(
    profile: ClusterProfile, run: Run, cfg: Config, nodes: int | None = None, after: str = ""
) -> Submitted:
    """`run`: the training job's run(cfg), e.g. jobs.train.run, on every task of the job."""
    from slurm.entry import TrainTask

    cfg = _absolute(cfg)
    logs = cfg.run_dir / "slurm"
    check_shared(profile, **{"the run directory": cfg.run_dir, "the SLURM log folder": logs})
    code, sha = code_snapshot(Path(cfg.runs_dir) / ".code")
    data = [Path(p) for p in (cfg.data.path if cfg.data.source == "folder" else "", cfg.data.cache_dir) if p]
    ex = _executor(
        profile,
        logs / "%j",
        "train",
        f"train-{cfg.run_name}",
        code,
        sha,
        nodes,
        after=after,
        binds=[Path(cfg.runs_dir), *data],
    )
    job = ex.submit(TrainTask(run, cfg, profile.max_requeues, profile.dist_timeout_min, profile.gpus_per_node))
    return Submitted("train", job.job_id, job.paths.stdout, job.paths.stderr)


def submit_grid(
    profile: ClusterProfile, run: Run, cfgs: list[Config], grid_dir: Path, nodes: int | None = None, after: str = ""
) -> Submitted:
    """A training grid as one SLURM array: element i runs `run(cfgs[i])` (its own run directory, W&B run and requeues).
    The array's logs and grid.json (its points and their run directories) go to `grid_dir`."""
    from slurm.entry import TrainTask

    cfgs = [_absolute(c) for c in cfgs]
    grid_dir = grid_dir.resolve()
    logs = grid_dir / "slurm"
    check_shared(profile, **{"the grid directory": grid_dir, "the SLURM log folder": logs})
    code, sha = code_snapshot(Path(cfgs[0].runs_dir) / ".code")
    data = {Path(p) for c in cfgs for p in (c.data.path if c.data.source == "folder" else "", c.data.cache_dir) if p}
    binds = [*{Path(c.runs_dir) for c in cfgs}, *data]
    ex = _executor(profile, logs / "%j", "train", f"grid-{grid_dir.name}", code, sha, nodes, after=after, binds=binds)
    task = TrainTask(run, None, profile.max_requeues, profile.dist_timeout_min, profile.gpus_per_node)
    jobs = ex.map_array(task, cfgs)
    array_id = jobs[0].job_id.split("_")[0]
    points = [{"task": i, "name": c.run_name, "run_dir": str(c.run_dir)} for i, c in enumerate(cfgs)]
    from ddpm.files import write_json

    write_json(grid_dir / "grid.json", {"array_job": array_id, "points": points})
    return Submitted(f"training grid array ({len(cfgs)} runs)", array_id, jobs[0].paths.stdout, jobs[0].paths.stderr)


def submit_prepare(profile: ClusterProfile, run: Run, cfg, tasks: int) -> Submitted:
    """An array of `tasks` CPU tasks that decode the data into the cache (or write shards) before training;
    `run` is the prepare job's run and `cfg` its config (jobs.prepare.run, jobs.prepare.PrepareConfig). A training
    job submitted with `--after` the array's id starts when every task succeeded. With data.refresh, the source is
    listed once, by the first task, after the submission."""
    from ddpm.data.cache import cache_root
    from slurm.entry import PrepareTask

    data = cfg.data
    if data.source == "folder" or (data.source == "hf" and Path(data.path).exists()):
        data = dataclasses.replace(data, path=str(Path(data.path).resolve()))
    data = dataclasses.replace(data, cache_dir=str(cache_root(data).resolve()), refresh=False)
    out = str(Path(cfg.out).resolve()) if cfg.out else ""
    cfg = dataclasses.replace(cfg, data=data, out=out, listed_after=time.time() if cfg.data.refresh else 0.0)
    target = Path(out) if out else Path(data.cache_dir)
    logs = target / ".slurm"
    check_shared(profile, **{"the prepared data": target, "the SLURM log folder": logs})
    code, sha = code_snapshot(logs / ".code")
    binds = [target, Path(data.cache_dir), *([Path(data.path)] if data.source == "folder" else [])]
    ex = _executor(profile, logs / "%j", "prepare", f"prepare-{target.name}", code, sha, binds=binds)
    jobs = ex.map_array(PrepareTask(run, cfg, tasks), list(range(tasks)))
    array_id = jobs[0].job_id.split("_")[0]
    return Submitted(f"prepare array ({tasks} tasks)", array_id, jobs[0].paths.stdout, jobs[0].paths.stderr)


def submit_sweep(profile: ClusterProfile, run: Run, cfg, shards: int) -> tuple[Submitted, Submitted]:
    """An array of `shards` tasks, then a CPU job that merges their cells once all of them succeeded. `run` is the
    sweep job's run(cfg, cells=...) and `cfg` its config (jobs.sweep.run, jobs.sweep.SweepJobConfig): the tasks call
    it with `shard` set, the merge with `merge` set."""
    from ddpm.evaluation.sweep import plan
    from slurm.entry import SweepMergeTask, SweepShardTask

    cells = plan(cfg)  # resolved once here and sent with the jobs: every task sweeps the same checkpoints
    shards = max(1, min(shards, len(cells)))
    logs = cfg.sweep_dir / "slurm"
    check_shared(profile, **{"the sweep directory": cfg.sweep_dir, "the SLURM log folder": logs})
    code, sha = code_snapshot(Path(cfg.out_dir) / ".code")
    binds = [Path(cfg.out_dir), *{Path(c.path).parent for c in cells}]
    if cfg.reference.startswith("folder:"):
        binds.append(Path(cfg.reference.removeprefix("folder:")))
    if cfg.inception_weights:
        binds.append(Path(cfg.inception_weights).parent)
    ex = _executor(profile, logs / "%j", "sweep", f"sweep-{cfg.name}", code, sha, binds=binds)
    jobs = ex.map_array(SweepShardTask(run, cfg, shards, cells), list(range(shards)))
    array_id = jobs[0].job_id.split("_")[0]
    merge = _executor(profile, logs / "%j", "cpu", f"merge-{cfg.name}", code, sha, after=array_id, binds=binds).submit(
        SweepMergeTask(run, cfg, cells)
    )
    first = jobs[0]
    return (
        Submitted(
            f"sweep array ({shards} tasks, {len(cells)} cells)", array_id, first.paths.stdout, first.paths.stderr
        ),
        Submitted("merge", merge.job_id, merge.paths.stdout, merge.paths.stderr),
    )


def submit_upload(profile: ClusterProfile, run: Run, cfg, after: str = "") -> Submitted:
    """A Hub upload as a small CPU job, after job `after` succeeded if given: `run(cfg)`, the upload job's run and
    config (jobs.upload.run, jobs.upload.UploadConfig; `cfg.pipeline` places the logs and the code snapshot)."""
    from slurm.entry import JobTask

    logs = Path(cfg.pipeline).resolve().parent / "slurm"
    check_shared(profile, **{"the SLURM log folder": logs})
    code, sha = code_snapshot(logs.parent.parent / ".code")  # <runs_dir>/.code, shared with training
    ex = _executor(profile, logs / "%j", "cpu", "upload", code, sha, after=after, binds=[logs.parent])
    job = ex.submit(JobTask(run, cfg))
    return Submitted(
        "upload" + (f" (after job {after} succeeds)" if after else ""), job.job_id, job.paths.stdout, job.paths.stderr
    )


# --------------------------------------------------------------------------------------
# Waiting (the dev cluster and many sites run without accounting, so sacct is not relied on).


def job_state(job_id: str) -> str:
    """The state of a job, or of the worst task of an array: from scontrol while SLURM remembers it, else sacct."""
    r = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    states = []
    for line in r.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        never = fields.get("Reason") == "DependencyNeverSatisfied"  # where kill_on_invalid_dep is not honoured
        states.append("CANCELLED" if never else fields.get("JobState", "UNKNOWN"))
    if not states:
        r = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True)
        if r.returncode == 0:  # one line per job, e.g. "CANCELLED by 1234"
            states = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    if not states:
        return "UNKNOWN"
    live = [s for s in states if s not in FINAL_STATES]
    if live:
        return live[0]
    bad = [s for s in states if s != "COMPLETED"]
    return bad[0] if bad else "COMPLETED"


def wait(job_ids: list[str], poll_s: float = 5.0) -> dict[str, str]:
    """Blocks until every job has ended; returns their final states."""
    last: dict[str, str] = {}
    unknown = {j: 0 for j in job_ids}
    while True:
        states = {j: job_state(j) for j in job_ids}
        for j, s in states.items():
            unknown[j] = unknown[j] + 1 if s == "UNKNOWN" else 0
            if last.get(j) != s:
                print(f"job {j}: {s}", flush=True)
        last = states
        # UNKNOWN once is a busy controller; ten times in a row, SLURM has forgotten the job.
        if all(s in FINAL_STATES or unknown[j] >= 10 for j, s in states.items()):
            return states
        time.sleep(poll_s)


def describe_train(cfg: Config, submitted: Submitted, nodes: int, profile: ClusterProfile) -> str:
    t = cfg.tracking
    wandb = (
        f"{t.entity + '/' if t.entity else ''}{t.project}, run {cfg.run_name} (group {t.group or cfg.run_name})"
        if t.wandb
        else "off"
    )
    tasks = nodes * max(1, profile.gpus_per_node)
    return (
        f"{submitted.describe()}\n  {nodes} node(s) x {max(1, profile.gpus_per_node)} task(s) = world size {tasks} "
        f"on {profile.name}"
        f"\n  run dir: {Path(cfg.runs_dir).resolve() / cfg.run_name}\n  W&B: {wandb}"
    )

"""`ddpm submit <job> --cluster <profile> ...`: a job's own typed config, plus where and how to submit it.

The job's config is built exactly as `ddpm <job>` builds it (same flags, YAML and key=value overrides);
SubmitOptions adds the cluster, the wait and what follows (an upload after training). The SLURM tasks
carry the typed configs and the jobs' run functions (slurm.entry), never a command line.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddpm.errors import ConfigError, UserError

SUBMITTABLE = ("train", "prepare", "sweep", "upload")


@dataclass
class SubmitOptions:
    cluster: str = ""  # profile name under slurm/clusters/ (e.g. local) or a .yaml path
    wait: bool = False  # block until the jobs end; exit 1 if any failed
    nodes: int = 0  # train: nodes (0: the profile's)
    upload: str = ""  # train: also submit an upload of the pipeline to this Hub repo, run if training succeeds
    dry_run_upload: bool = False  # train with --upload: the upload stages and lists only (no network)
    shards: int = 0  # sweep: array tasks (0: one per cell, at most 64)
    tasks: int = 4  # prepare: array tasks, each decoding every tasks-th part of the data
    after: str = ""  # train, upload: start only after this job id succeeded (e.g. the prepare job's)

    def validate(self) -> None:
        if not self.cluster:
            raise ConfigError(
                "--cluster is required: a profile name under slurm/clusters/ (e.g. local) or a .yaml path"
            )
        if self.nodes < 0 or self.shards < 0:
            raise ConfigError("--nodes and --shards must be non-negative")
        if self.tasks < 1:
            raise ConfigError(f"--tasks must be at least 1, got {self.tasks}")


def submit_train_grid(cfgs: list, grid_dir: Path, opts: SubmitOptions) -> int:
    """A training grid (jobs.grid) as one array; with --upload, each point's upload after its own element."""
    from jobs import train, upload
    from jobs.upload import UploadConfig
    from slurm import launch
    from slurm.profile import load_profile

    opts.validate()
    profile = load_profile(opts.cluster)
    for cfg in cfgs:
        _refuse_local_launch(cfg)
    repos = [f"{opts.upload}{cfg.run_name.removeprefix(grid_dir.name.removesuffix('-grid'))}" for cfg in cfgs]
    if opts.upload:  # a Hub name the upload would refuse after training is refused now
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        for repo in repos:
            try:
                validate_repo_id(repo)
            except HFValidationError as e:
                raise UserError(
                    f"--upload: the grid point's repository {repo!r} is not a valid Hub name ({e})"
                ) from None
    array = launch.submit_grid(profile, train.run, cfgs, grid_dir, opts.nodes or profile.nodes, after=opts.after)
    print(array.describe(), flush=True)
    submitted = [array]
    for i, cfg in enumerate(cfgs):
        print(f"  [{i}] {Path(cfg.runs_dir).resolve() / cfg.run_name}", flush=True)
        if opts.upload:
            up = launch.submit_upload(
                profile,
                upload.run,
                UploadConfig(
                    pipeline=str(Path(cfg.runs_dir).resolve() / cfg.run_name / "pipeline"),
                    repo_id=repos[i],
                    dry_run=opts.dry_run_upload,
                ),
                after=f"{array.job_id}_{i}",
            )
            print(up.describe(), flush=True)
            submitted.append(up)
    names = " ".join(shlex.quote(str(Path(c.runs_dir) / c.run_name)) for c in cfgs)
    print(f"  grid: {grid_dir / 'grid.json'}\n  compare: ddpm compare {names}", flush=True)
    return _wait(submitted) if opts.wait else 0


def _refuse_local_launch(cfg: Any) -> None:
    if getattr(cfg, "gpus", "auto") != "auto" or getattr(cfg, "processes", 0):
        raise UserError(
            "--gpus/--processes start processes on this machine; on SLURM the profile's gpus_per_node and "
            "tasks decide (one task per GPU): leave them out, or use --nodes"
        )


def _wait(submitted: list) -> int:
    from slurm import launch

    states = launch.wait([s.job_id for s in submitted])
    failed = {j: s for j, s in states.items() if s != "COMPLETED"}
    for j, s in failed.items():
        print(f"job {j} ended {s}; see its log above", flush=True)
    return 1 if failed else 0


def submit(job: str, cfg: Any, opts: SubmitOptions) -> int:
    """Submit, print the job ids and log paths; with --wait, block and return 1 if any job failed."""
    from jobs import prepare, sweep, train, upload
    from jobs.upload import UploadConfig
    from slurm import launch
    from slurm.profile import load_profile

    opts.validate()
    profile = load_profile(opts.cluster)
    submitted: list[launch.Submitted] = []
    if job == "train":
        _refuse_local_launch(cfg)
        nodes = opts.nodes or profile.nodes
        training = launch.submit_train(profile, train.run, cfg, nodes, after=opts.after)
        print(launch.describe_train(cfg, training, nodes, profile), flush=True)
        submitted.append(training)
        if opts.upload:
            pipeline = Path(cfg.runs_dir).resolve() / cfg.run_name / "pipeline"
            up = launch.submit_upload(
                profile,
                upload.run,
                UploadConfig(pipeline=str(pipeline), repo_id=opts.upload, dry_run=opts.dry_run_upload),
                after=training.job_id,
            )
            print(up.describe(), flush=True)
            submitted.append(up)
    elif job == "prepare":
        array = launch.submit_prepare(profile, prepare.run, cfg, opts.tasks)
        print(f"{array.describe()}\n  then: ddpm submit train ... --after {array.job_id}", flush=True)
        submitted.append(array)
    elif job == "sweep":
        array, merge = launch.submit_sweep(profile, sweep.run, cfg, opts.shards or 64)
        print(f"{array.describe()}\n{merge.describe()}\n  results: {cfg.sweep_dir}", flush=True)
        submitted += [array, merge]
    elif job == "upload":
        cfg = dataclasses.replace(cfg, pipeline=str(Path(cfg.pipeline).resolve()))
        up = launch.submit_upload(profile, upload.run, cfg, after=opts.after)
        print(up.describe(), flush=True)
        submitted.append(up)
    else:
        raise ConfigError(f"ddpm submit: {job!r} cannot be submitted; one of {', '.join(SUBMITTABLE)}")
    return _wait(submitted) if opts.wait else 0

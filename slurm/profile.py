"""Cluster profiles: one YAML file per cluster under slurm/clusters/, turned into sbatch parameters.

Every key is optional except the partition; an unknown key or a wrong type is an error naming it,
as for training configs. `sbatch_parameters` is what a job of each kind asks SLURM for.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ddpm.errors import ConfigError
from ddpm.typed_config import build_config, read_tree

CLUSTERS_DIR = Path(__file__).resolve().parent / "clusters"
NODE_LOCAL = ("/tmp", "/var/tmp", "/dev/shm", "/run")


@dataclass
class Container:
    image: str = ""  # Apptainer image (.sif) on the shared filesystem; "" runs on the host
    binds: tuple[str, ...] = ()  # bind mounts, "src[:dst]"; the run, cache and code directories are added
    runtime: str = "apptainer"  # apptainer or singularity (or a command that takes `exec` the way they do)


@dataclass
class CpuJob:
    """The small CPU-only jobs: uploads and sweep merges."""

    partition: str = ""  # "" uses the profile's partition
    cpus: int = 2
    mem_gb: float = 8
    time_min: int = 60


@dataclass
class ClusterProfile:
    name: str = ""
    partition: str = ""
    account: str = ""
    qos: str = ""
    nodes: int = 1  # training nodes unless NODES= / --nodes says otherwise
    gpus_per_node: int = 0  # 0: CPU nodes, one task per node; else one task per GPU
    cpus_per_task: int = 8
    mem_gb: float = 0  # memory per node; 0 leaves it to the cluster's default
    time_min: int = 240  # time limit per launch; a longer run requeues itself from its checkpoint
    constraint: str = ""
    signal: Literal["USR1", "USR2", "TERM"] = "USR2"  # sent `signal_lead_s` before the time limit: checkpoint, requeue
    signal_lead_s: int = 120
    max_requeues: int = 10  # time-limit and preemption requeues of one job before it gives up
    dist_timeout_min: int = 60  # process-group time-out: covers building a missing data cache; ends hung ranks
    kill_on_bad_exit: bool = True  # a training task that fails or is killed ends all tasks (srun --kill-on-bad-exit)
    sweep_gpus_per_task: int = 1  # sweep array tasks: GPUs each (0 on CPU clusters)
    sweep_cpus_per_task: int = 8
    sweep_parallel: int = 0  # array tasks running at once; 0: no limit of ours
    prepare_cpus_per_task: int = 0  # ddpm submit prepare: CPUs of each decoding task (CPU nodes); 0: cpus_per_task
    sbatch_extra: tuple[
        str, ...
    ] = ()  # extra sbatch options for training and sweeps, e.g. ["--exclusive", "--reservation=big"]
    setup: tuple[str, ...] = ()  # shell lines run before the job (module load ..., export ...)
    python: str = ""  # the python on the nodes; "" is this checkout's .venv/bin/python
    container: Container = field(default_factory=Container)
    cpu_job: CpuJob = field(default_factory=CpuJob)
    node_local_ok: bool = False  # true only where /tmp is shared by all nodes (the one-machine dev cluster)


def load_profile(name_or_path: str) -> ClusterProfile:
    """A profile by name (slurm/clusters/<name>.yaml) or by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CLUSTERS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CLUSTERS_DIR.glob("*.yaml")))
        raise ConfigError(f"cluster profile {name_or_path!r} not found (known: {known}; or give a path to a .yaml)")
    profile = build_config(ClusterProfile, read_tree(path))
    profile.name = profile.name or path.stem
    if not profile.partition:
        raise ConfigError(f"{path}: partition is required")
    for key in ("nodes", "cpus_per_task", "time_min", "signal_lead_s", "dist_timeout_min", "sweep_cpus_per_task"):
        if getattr(profile, key) < 1:
            raise ConfigError(f"{path}: {key} must be at least 1, got {getattr(profile, key)}")
    if profile.signal_lead_s >= profile.time_min * 60:
        raise ConfigError(
            f"{path}: signal_lead_s ({profile.signal_lead_s}) must be shorter than the time limit "
            f"({profile.time_min} min)"
        )
    return profile


def _extra(profile: ClusterProfile) -> dict[str, Any]:
    """sbatch_extra lines as submitit's additional_parameters: "--key=value" -> {key: value},
    "--flag" -> {flag: True}."""
    out: dict[str, Any] = {}
    for item in profile.sbatch_extra:
        key, sep, value = item.strip().removeprefix("--").partition("=")
        if not item.strip().startswith("--") or not key:
            raise ConfigError(f"sbatch_extra: {item!r} is not an sbatch option like --exclusive or --reservation=name")
        out[key.replace("-", "_")] = value if sep else True
    return out


def sbatch_parameters(
    profile: ClusterProfile, kind: Literal["train", "sweep", "prepare", "cpu"], nodes: int | None = None
) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for a job of this kind (see slurm.launch)."""
    common: dict[str, Any] = {
        "partition": profile.partition,
        "signal_delay_s": profile.signal_lead_s,
        "setup": [f"export SUBMITIT_PREEMPT_SIGNAL={profile.signal}", *profile.setup],
    }
    if profile.account:
        common["account"] = profile.account
    if profile.qos:
        common["qos"] = profile.qos
    if profile.constraint and kind in ("train", "sweep"):
        common["constraint"] = profile.constraint
    # --exclusive and the like are for the GPU jobs, not the CPU ones
    extra = _extra(profile) if kind in ("train", "sweep") else {}
    if profile.signal != "USR2":  # submitit writes --signal=USR2@lead; the profile's signal replaces it
        extra["signal"] = f"{profile.signal}@{profile.signal_lead_s}"
    if kind == "train":
        n = nodes or profile.nodes
        gpus = profile.gpus_per_node
        params = {
            **common,
            "nodes": n,
            "ntasks_per_node": max(1, gpus),
            "cpus_per_task": profile.cpus_per_task,
            "time": profile.time_min,
        }
        if gpus:
            params["gpus_per_node"] = gpus
        if profile.kill_on_bad_exit:
            # One task that exits with an error or is killed (a bad image on rank 0, an OOM kill, a lost node) ends
            # the others at once (SIGTERM, then SIGKILL after slurm.conf's KillWait, 30 s by default) instead of
            # leaving them in a collective until the process-group time-out (dist_timeout_min). NCCL needs this;
            # gloo also notices a closed connection by itself.
            params["srun_args"] = ["--kill-on-bad-exit=1"]
        if profile.mem_gb:
            params["mem"] = f"{int(profile.mem_gb)}GB"
    elif kind == "sweep":
        params = {
            **common,
            "nodes": 1,
            "ntasks_per_node": 1,
            "cpus_per_task": profile.sweep_cpus_per_task,
            "time": profile.time_min,
        }
        if profile.sweep_gpus_per_task:
            params["gpus_per_node"] = profile.sweep_gpus_per_task
        if profile.sweep_parallel:
            params["array_parallelism"] = profile.sweep_parallel
    elif kind == "prepare":  # decoding: CPU-bound, no GPU, the partition of the small CPU jobs
        params = {
            **common,
            "partition": profile.cpu_job.partition or profile.partition,
            "nodes": 1,
            "ntasks_per_node": 1,
            "cpus_per_task": profile.prepare_cpus_per_task or profile.cpus_per_task,
            "time": profile.time_min,
        }
        if profile.mem_gb:
            params["mem"] = f"{int(profile.mem_gb)}GB"
    else:
        cpu = profile.cpu_job
        params = {
            **common,
            "partition": cpu.partition or profile.partition,
            "nodes": 1,
            "ntasks_per_node": 1,
            "cpus_per_task": cpu.cpus,
            "time": cpu.time_min,
            "mem": f"{int(cpu.mem_gb)}GB",
        }
    if extra:
        params["additional_parameters"] = extra
    return params


def python_command(profile: ClusterProfile, repo_python: Path, binds: list[Path], code: Path | None = None) -> str:
    """The command submitit runs as python on the nodes: the host's python, or python inside the container,
    started by slurm/container_task.sh of the code snapshot `code` (it requeues from the host side)."""
    if not profile.container.image:
        return shlex.quote(profile.python or str(repo_python))
    c = profile.container
    mounts = [*c.binds, *(str(b) for b in binds)]
    nv = ["--nv"] if profile.gpus_per_node or profile.sweep_gpus_per_task else []
    # No --contain: the container shares the node's /dev, so NCCL's segments go to the node's own /dev/shm (Docker's
    # 64 MB default has no counterpart); jobs/train.py checks its room before any work all the same.
    wrapper = ["sh", str(code / "slurm" / "container_task.sh")] if code else []
    return shlex.join(
        [
            *wrapper,
            c.runtime,
            "exec",
            *nv,
            *(x for m in mounts for x in ("--bind", m)),
            c.image,
            profile.python or "python",
        ]
    )


def check_shared(profile: ClusterProfile, **paths: Path) -> None:
    """Logs and runs on a node-local disk would be invisible to the other nodes and to the submitter: refuse them."""
    if profile.node_local_ok:
        return
    for what, path in paths.items():
        resolved = str(Path(path).resolve())
        if any(resolved == p or resolved.startswith(p + "/") for p in NODE_LOCAL):
            raise ConfigError(
                f"{what} {resolved} is on a node-local disk ({resolved.split('/')[1]}); "
                f"put it on the shared filesystem (or set node_local_ok in the profile if /tmp is shared)"
            )

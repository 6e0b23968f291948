"""What this process runs on, checked before a long job: torch and CUDA, the driver, the GPUs, NCCL, SLURM and
torch.distributed variables, /dev/shm for NCCL, the container, W&B and the Hugging Face cache. Each check is one line
with a verdict.

Secrets are never read into the output: a token is reported as present or absent, never shown.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# CUDA generation of a torch build -> the oldest NVIDIA driver that runs it (CUDA's minor-version compatibility:
# 12.x from driver 525, 13.x from driver 580; NVIDIA's CUDA toolkit release notes, table 3).
MIN_DRIVER = {"12": 525, "13": 580}
SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_JOB_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_GPUS_ON_NODE",
)
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")

# NCCL's processes on one node talk through segments it creates in /dev/shm (NCCL's troubleshooting guide, "Shared
# memory"), and a container gets 64 MB there unless told otherwise (Docker's default). One segment per connection
# holds the buffers of NCCL's three protocols: Simple's NCCL_BUFFSIZE (4 MiB by default) + LL128's 4,915,200 bytes
# (120 elements x 640 threads x 8 steps x 8 bytes) + LL's 524,288 (8 lines x 512 threads x 8 steps x 16 bytes) + a
# 4 KiB header = 9,637,888 bytes, the size NCCL's own errors name ("Error while creating shared memory segment
# /dev/shm/nccl-... (size 9637888)", NVIDIA/nccl #342, #1518). Each process receives from its ring neighbour on each
# channel, and NCCL opens 2 channels between GPUs that go through host memory (the log of #1518): so n processes need
# n x 2 x 9.2 MiB = n x 18.4 MiB, which is what #1518 saw in 64 MB: 2 processes (37 MiB) started, 4 (74 MiB) did not.
# 8 processes need 147 MiB; `--shm-size=1g`, the size NCCL's guide gives for containers, is enough for 55.
NCCL_LL128_BYTES = 4_915_200
NCCL_LL_BYTES = 524_288
NCCL_SHM_CHANNELS = 2
SHM_FIX = "give the container more shared memory: docker run --shm-size=1g (or --ipc=host)"


@dataclass
class Check:
    name: str
    value: str
    status: str = "ok"  # ok, warn or fail
    verdict: str = ""  # what to do about it, when there is something to do

    def line(self) -> str:
        tail = f"  -> {self.verdict}" if self.verdict else ""
        return f"{self.status:<4}  {self.name:<12} {self.value}{tail}"


def driver_version() -> str:
    """The NVIDIA kernel driver's version ("550.54.15"), or "" when there is none."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        for word in text.split():
            if word.count(".") >= 1 and word.split(".")[0].isdigit() and int(word.split(".")[0]) >= 100:
                return word
    except OSError:
        pass
    if shutil.which("nvidia-smi"):
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.split()[0]
    return ""


def driver_verdict(driver: str, cuda: str | None) -> Check:
    """Whether the driver runs this torch build's CUDA generation."""
    if not cuda:
        return Check(
            "driver",
            driver or "none",
            "ok" if not driver else "warn",
            "this torch build has no CUDA: install the project's CUDA build to use the GPUs" if driver else "",
        )
    if not driver:
        return Check("driver", "none", "warn", f"no NVIDIA driver: CUDA {cuda} cannot run, training uses the CPU")
    major, generation = int(driver.split(".")[0]), cuda.split(".")[0]
    needed = MIN_DRIVER.get(generation)
    if needed and major < needed:
        older = [g for g, d in sorted(MIN_DRIVER.items()) if d <= major]
        fix = f"install a torch built for CUDA {older[-1]}" if older else "update the driver"
        return Check(
            "driver", driver, "fail", f"driver {major} is too old for this CUDA {cuda} build (needs {needed}+): {fix}"
        )
    return Check("driver", driver, "ok", f"runs CUDA {cuda}")


def require_gpus(n: int) -> None:
    """Fail in one line, naming the likely cause, when fewer than n GPUs are usable: a job that asked for GPUs must
    not fall back to the CPU and run for days at a hundredth of the speed."""
    import torch

    from ddpm.errors import UserError

    usable = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if usable >= n:
        return
    driver = driver_verdict(driver_version(), torch.version.cuda)
    cause = (
        driver.verdict
        if driver.status != "ok"
        else "check CUDA_VISIBLE_DEVICES, --gpus on docker run, --nv on apptainer"
    )
    raise UserError(
        f"{n} GPU(s) asked for, {usable} usable on {os.uname().nodename}: {cause} (run `ddpm doctor` there)"
    )


def shm_bytes(path: str = "/dev/shm") -> tuple[int, int] | None:
    """(size, free bytes) of the shared-memory filesystem, or None where there is none (macOS)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def shm_needed(processes: int) -> int:
    """Bytes of /dev/shm that `processes` GPU processes of one node need for NCCL (the arithmetic above SHM_FIX)."""
    segment = int(os.environ.get("NCCL_BUFFSIZE", str(4 * 2**20))) + NCCL_LL128_BYTES + NCCL_LL_BYTES + 4096
    return processes * NCCL_SHM_CHANNELS * segment


def _mib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def shm_check(processes: int) -> Check:
    """/dev/shm against what `processes` GPU processes on this node need for NCCL."""
    size = shm_bytes()
    many = f"{processes} GPU processes on this node" if processes > 1 else "at most one GPU process here: no NCCL peers"
    if size is None:
        return Check("/dev/shm", f"none; {many}", "ok" if processes <= 1 else "warn")
    total, free = size
    value = f"{_mib(total)} ({_mib(free)} free); {many}"
    if processes <= 1:
        return Check("/dev/shm", value)
    if os.environ.get("NCCL_SHM_DISABLE") == "1":
        return Check("/dev/shm", value, "ok", "NCCL_SHM_DISABLE=1: NCCL's shared-memory transport is off")
    need = shm_needed(processes)
    if free < need:
        return Check("/dev/shm", value, "fail", f"NCCL needs about {_mib(need)}: {SHM_FIX}, or NCCL_SHM_DISABLE=1")
    return Check("/dev/shm", value, "ok", f"NCCL needs about {_mib(need)}")


def require_shm(processes: int) -> None:
    """Refuse in one line, before any process starts, a launch of `processes` GPU processes on this node whose NCCL
    would fail to create its shared-memory segments minutes later ("unhandled system error")."""
    from ddpm.errors import UserError

    if shm_check(processes).status != "fail":
        return
    _, free = shm_bytes()
    raise UserError(
        f"/dev/shm on {os.uname().nodename} has {_mib(free)} free, NCCL needs about {_mib(shm_needed(processes))} "
        f"for {processes} GPU processes: {SHM_FIX}; if you know better, NCCL_SHM_DISABLE=1 or --no-shm-check "
        "(shm_check=false)"
    )


def container() -> str:
    if os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER"):
        return f"apptainer {os.environ.get('APPTAINER_CONTAINER') or os.environ.get('SINGULARITY_CONTAINER')}"
    if Path("/.dockerenv").exists() or Path("/run/.containerenv").exists():
        return "docker/podman"
    return "none (host)"


def checks(expect_gpus: int = 0) -> list[Check]:
    import torch

    from ddpm.device import resolve_placement
    from ddpm.tracking import wandb_mode

    out = [Check("torch", f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})")]
    out.append(driver_verdict(driver_version(), torch.version.cuda))
    gpus = (
        [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    described = "; ".join(
        f"{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16 {'yes' if p.major >= 8 else 'no'}"
        for i, p in enumerate(gpus)
    )
    gpu_check = Check("GPUs", described or "none usable")
    if expect_gpus and len(gpus) < expect_gpus:
        gpu_check.status = "fail"
        gpu_check.verdict = (
            f"{expect_gpus} GPU(s) asked for, {len(gpus)} usable: check the driver line, "
            "CUDA_VISIBLE_DEVICES, --gpus on docker run or --nv on apptainer"
        )
    out.append(gpu_check)
    if gpus:
        out.append(Check("NCCL", ".".join(map(str, torch.cuda.nccl.version()))))
    placement = resolve_placement("auto", "auto")
    out.append(Check("precision", f"auto -> {placement.precision} on {placement.device}"))
    slurm = ", ".join(f"{k}={os.environ[k]}" for k in SLURM_VARS if k in os.environ)
    out.append(Check("SLURM", slurm or "not in a SLURM job"))
    dist = ", ".join(f"{k}={os.environ[k]}" for k in DIST_VARS if k in os.environ)
    out.append(Check("distributed", dist or "single process"))
    # `ddpm train` starts one process per visible GPU, and a SLURM GPU profile one task per GPU of the node.
    node_gpus = os.environ.get("SLURM_GPUS_ON_NODE", "")
    out.append(shm_check(max(expect_gpus, len(gpus), int(node_gpus) if node_gpus.isdigit() else 0)))
    out.append(Check("container", container()))
    mode = wandb_mode()
    out.append(
        Check("W&B", mode, "ok", "runs are written offline: `wandb sync` them later" if mode == "offline" else "")
    )
    out.append(_hf_cache())
    return out


def _hf_cache() -> Check:
    from huggingface_hub import constants, get_token

    cache = Path(constants.HF_HUB_CACHE)
    offline = constants.HF_HUB_OFFLINE
    token = "a token is set" if get_token() else "no token"
    value = f"{cache} ({'offline' if offline else 'online'}, {token})"
    probe = cache if cache.exists() else cache.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        return Check("HF cache", value, "warn", "not writable: set HF_HOME to a writable, shared directory")
    return Check("HF cache", value)

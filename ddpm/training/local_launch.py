"""One process per GPU on this machine (`ddpm train --gpus N|all`, and `docker run --gpus all ... train`), or N CPU
processes on gloo (`--processes N`, the same launch without GPUs, for tests and laptops).

The processes are started by torch's own launcher (torch.distributed.launcher.elastic_launch, the API behind
`torchrun --standalone`): it sets RANK, LOCAL_RANK, WORLD_SIZE and MASTER_ADDR/PORT the way the training loop
reads them under SLURM, and when one process fails it stops the others at once (it polls every
MONITOR_INTERVAL_S seconds) instead of leaving them in a collective until the process-group time-out. The failing
process's error comes back as one line naming its rank.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Callable
from typing import Any

from ddpm.errors import UserError

MONITOR_INTERVAL_S = 1.0  # how often the launcher looks for a failed process (torchrun's default is 0.1 s)
ALREADY_LAUNCHED = "WORLD_SIZE"  # set by SLURM tasks (slurm/entry.py), torchrun and this launcher


def processes_to_start(gpus: str, processes: int) -> tuple[int, bool]:
    """(processes to start on this machine, whether they run on the CPU) for `--gpus` and `--processes`.

    gpus: "auto" (one process per visible GPU; one process without GPUs), "all", or a count."""
    import torch

    explicit = gpus != "auto" or processes > 0
    if os.environ.get(ALREADY_LAUNCHED):
        if explicit:
            raise UserError(
                "--gpus/--processes start processes on this machine, but a launcher (SLURM, torchrun) started this "
                f"one already (WORLD_SIZE={os.environ[ALREADY_LAUNCHED]}): leave them out"
            )
        return 1, False
    if processes < 0:
        raise UserError(f"--processes must be a positive count, got {processes}")
    if processes:
        if gpus != "auto":
            raise UserError("give --gpus (processes on GPUs) or --processes (processes on the CPU), not both")
        return processes, True
    visible = torch.cuda.device_count()
    if gpus == "auto":
        return max(1, visible), False
    if gpus == "all":
        count = visible
    else:
        try:
            count = int(gpus)
        except ValueError:
            raise UserError(f"--gpus must be 'auto', 'all' or a count, got {gpus!r}") from None
        if count < 1:
            raise UserError(f"--gpus must be 'auto', 'all' or a positive count, got {gpus!r}")
    if visible == 0:
        raise UserError(
            f"--gpus {gpus}: no CUDA GPU is visible here (torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); run `ddpm doctor`, or use --processes N on the CPU"
        )
    if count > visible:
        raise UserError(f"--gpus {gpus}: only {visible} GPU(s) are visible here (CUDA_VISIBLE_DEVICES, --gpus)")
    return count, False


class ProcessUserError(UserError):
    """A user error in one of the launched processes: the launcher reports it by this class name."""


def _worker(fn: Callable[[Any], Any], arg: Any) -> Any:
    """One process; a user error is marked so that the parent shows it as one line, without a traceback."""
    try:
        return fn(arg)
    except UserError as e:
        raise ProcessUserError(str(e)) from None


def _failure_line(rank: int, failure: Any, nproc: int, on_cpu: bool) -> str:
    """One failed process in one line: its user error or bug (with the bug's stack printed first), or its signal."""
    message = failure.message  # the error file's {"message": "Type: text", ...}, or a signal's description
    if isinstance(message, dict):
        if not message.get("message", "").startswith(ProcessUserError.__name__):  # a bug: show where
            print(message.get("extraInfo", {}).get("py_callstack", ""), file=sys.stderr)
        message = message.get("message", str(message)).removeprefix(ProcessUserError.__name__ + ": ")
    elif failure.exitcode == -6 and not on_cpu:  # SIGABRT: how NCCL's watchdog ends a process whose collective hung
        message += (
            "; on GPUs this is often NCCL's watchdog after a collective timed out or lost a peer: "
            "rerun with NCCL_DEBUG=INFO for NCCL's own account (the newest checkpoint is intact: rerun to resume)"
        )
    return f"process {rank} of {nproc} failed (exit code {failure.exitcode}): {message}"


def launch(fn: Callable[[Any], Any], arg: Any, nproc: int, on_cpu: bool) -> Any:
    """Runs fn(arg) in `nproc` processes of one job on this machine; returns rank 0's result."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    env = os.environ
    saved = {k: env.get(k) for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}
    if on_cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the workers see no GPU: gloo on the CPU, as asked
    # N processes sharing the cores: without a cap each would start a thread per core (torchrun sets 1)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port, as `torchrun --standalone` does
        max_restarts=0,  # a failed run is resumed by running it again, from its newest checkpoint
        monitor_interval=MONITOR_INTERVAL_S,
        start_method="spawn",
    )
    # The launcher logs each failure with its traceback; the failure is reported below in one line instead.
    launcher_log = logging.getLogger("torch.distributed.elastic")
    level = launcher_log.level
    launcher_log.setLevel(logging.CRITICAL)
    try:
        results = elastic_launch(config, _worker)(fn, arg)
    except ChildFailedError as e:
        first, _ = e.get_first_failure()
        lines = {rank: _failure_line(rank, failure, nproc, on_cpu) for rank, failure in sorted(e.failures.items())}
        for rank, line in lines.items():  # one line per failed process; the first to fail ends the job's output
            if rank != first:
                print(f"error: {line}", file=sys.stderr, flush=True)
        raise UserError(lines[first]) from None
    finally:
        launcher_log.setLevel(level)
        for k, v in saved.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
    return results[0]

"""The `ddpm` console script: builds a job's typed config from the command line and calls the job's `run(cfg)`.

    ddpm <job> [--config FILE] [--flag VALUE ...] [key=value ...]   train, sample, sweep, evaluate, compare, upload, ...
    ddpm submit <job> --cluster PROFILE [--wait] [job's flags and key=value ...]   train, sweep, upload on SLURM

Every flag and the `--help` of a job are generated from its config dataclass (ddpm.typed_config), so a
field, its default and its comment are written once. A user mistake (bad config, missing data, a run
directory in use, ...) is printed as one line on stderr with exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

from ddpm.errors import RunStopped, UserError
from ddpm.files import no_world_writable_files
from ddpm.typed_config import add_arguments, flag_values, load_job_config

EXIT_USER_ERROR = 2
EXIT_STOPPED = 3  # checkpoint written on SIGTERM/SIGUSR2; rerun (or requeue) to resume
JOBS = ("train", "prepare", "sample", "sweep", "evaluate", "compare", "upload", "generate", "doctor", "nightly", "ema")


def job_module(name: str) -> ModuleType:
    return importlib.import_module(f"jobs.{name}")


def _add_job(sub, name: str, help_prefix: str = "") -> argparse.ArgumentParser:
    module = job_module(name)
    doc = (module.__doc__ or "").strip()
    p = sub.add_parser(name, help=help_prefix + doc.splitlines()[0].split(": ", 1)[-1], description=doc)
    add_arguments(p, module.CONFIG)
    if not any(f.name == "dry_run" for f in dataclasses.fields(module.CONFIG)):
        p.add_argument("--dry-run", dest="print_only", action="store_true", help="print the resolved config, then exit")
    return p


def _parser() -> argparse.ArgumentParser:
    from jobs.submit import SUBMITTABLE, SubmitOptions

    p = argparse.ArgumentParser(prog="ddpm", description="Train, sample, evaluate and publish DDPM image models.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in JOBS:
        _add_job(sub, name)
    sb = sub.add_parser(
        "submit",
        help="submit train, sweep or upload as a SLURM job (submitit)",
        description="Prints the job ids and log paths; --wait blocks until the jobs end and fails if one failed.",
    )
    kinds = sb.add_subparsers(dest="kind", required=True)
    for name in SUBMITTABLE:
        add_arguments(_add_job(kinds, name, "on SLURM: "), SubmitOptions, config_file=False, positional=False)
    return p


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "httpx2", "urllib3", "filelock", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build(name: str, args: argparse.Namespace):
    """The job's config from --config, its flags and key=value overrides, with the job's own loader if it has one."""
    module = job_module(name)
    values = flag_values(module.CONFIG, args)
    if hasattr(module, "load"):
        return module.load(args.config_file or None, args.overrides, values)
    return load_job_config(module.CONFIG, args.config_file or None, args.overrides, values)


def _training_grid(args: argparse.Namespace) -> int | None:
    """`ddpm submit train` with multi-valued overrides (jobs.grid): a run per point, as one SLURM array; None when
    the overrides describe a single run."""
    from jobs.grid import expand
    from jobs.submit import SubmitOptions, submit_train_grid

    points = expand(args.overrides)
    if points is None:
        return None
    base = build("train", argparse.Namespace(**{**vars(args), "overrides": points[0].overrides}))
    group = base.tracking.group or base.run_name  # the grid's name is the W&B group of all its runs
    cfgs = [
        build(
            "train",
            argparse.Namespace(
                **{
                    **vars(args),
                    "overrides": [*p.overrides, f"name={base.run_name}_{p.suffix}", f"tracking.group={group}"],
                }
            ),
        )
        for p in points
    ]
    if getattr(args, "print_only", False):
        for cfg, p in zip(cfgs, points):
            print(f"{cfg.run_name}: {' '.join(p.overrides)}")
        return 0
    opts = load_job_config(SubmitOptions, values=flag_values(SubmitOptions, args))
    return submit_train_grid(cfgs, Path(base.runs_dir) / f"{base.run_name}-grid", opts)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging()
    no_world_writable_files()
    name = args.kind if args.command == "submit" else args.command
    shown = f"{args.command} {name}" if args.command == "submit" else name
    try:
        if args.command == "submit" and name == "train" and (grid := _training_grid(args)) is not None:
            return grid
        cfg = build(name, args)
        module = job_module(name)
        if hasattr(module, "describe"):
            print(module.describe(cfg), flush=True)
        if getattr(args, "print_only", False):
            if not hasattr(module, "describe"):
                from ddpm.typed_config import dump_yaml

                print(dump_yaml(cfg), end="")
            return 0
        if args.command == "submit":
            from jobs.submit import SubmitOptions, submit

            opts = load_job_config(SubmitOptions, values=flag_values(SubmitOptions, args))
            return submit(name, cfg, opts)
        module.run(cfg)
    except UserError as e:
        print(f"ddpm {shown}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RunStopped as e:
        print(f"ddpm {shown}: {e}", file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:
        print(f"ddpm {shown}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

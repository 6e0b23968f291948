"""Submit job: `ddpm submit train|sweep|upload --cluster <profile>` puts a job on SLURM with submitit."""

from __future__ import annotations

import argparse
from pathlib import Path

from ddpm.errors import UserError


def run(args: argparse.Namespace) -> int:
    from slurm import launch
    from slurm.profile import load_profile

    profile = load_profile(args.cluster)
    submitted: list[launch.Submitted] = []
    if args.kind == "train":
        from ddpm.config import load_config

        cfg = load_config(args.config or None, args.overrides)
        nodes = args.nodes or profile.nodes
        train = launch.submit_train(profile, cfg, nodes)
        print(launch.describe_train(cfg, train, nodes, profile), flush=True)
        submitted.append(train)
        if args.upload:
            pipeline = Path(cfg.runs_dir).resolve() / cfg.run_name / "pipeline"
            argv = ["--pipeline", str(pipeline), "--repo-id", args.upload, *(["--dry-run"] if args.dry_run_upload else [])]
            up = launch.submit_upload(profile, argv, pipeline.parent / "slurm", after=train.job_id)
            print(up.describe(), flush=True)
            submitted.append(up)
    elif args.kind == "sweep":
        from ddpm.sweep import load_sweep_config

        if not args.config:
            raise UserError("submit sweep: --config is required (a sweep YAML, e.g. configs/sweeps/digits.yaml)")
        cfg = load_sweep_config(args.config, args.overrides)
        array, merge = launch.submit_sweep(profile, cfg, args.shards or 64)
        print(f"{array.describe()}\n{merge.describe()}\n  results: {Path(cfg.out_dir).resolve() / cfg.name}", flush=True)
        submitted += [array, merge]
    else:
        pipeline = Path(args.pipeline).resolve()
        argv = ["--pipeline", str(pipeline), "--repo-id", args.repo_id, *(["--dry-run"] if args.dry_run_upload else [])]
        up = launch.submit_upload(profile, argv, pipeline.parent / "slurm", after=args.after)
        print(up.describe(), flush=True)
        submitted.append(up)
    if not args.wait:
        return 0
    states = launch.wait([s.job_id for s in submitted])
    failed = {j: s for j, s in states.items() if s != "COMPLETED"}
    for j, s in failed.items():
        print(f"job {j} ended {s}; see its log above", flush=True)
    return 1 if failed else 0

"""The `ddpm` console script: parses a command line and dispatches to a job's `run(cfg)`.

    ddpm train [--config FILE] [--dry-run] [key=value ...]
    ddpm sample --pipeline DIR [--scheduler NAME] [--steps N] [--num-images N] [--seed S] ...
    ddpm sweep --config FILE [--shard I/N | --merge | --plan-only] [key=value ...]
    ddpm evaluate --pipeline DIR [--reference SPEC] [--num-images N] [--metric inception|digitsnet] ...
    ddpm upload --pipeline DIR --repo-id USER/NAME [--private|--public] [--revision BRANCH] [--dry-run]
    ddpm generate --model HUB_ID_OR_DIR [--prompt TEXT]... [--steps N] [--guidance G] [--seed S] [--num-images N] ...
    ddpm submit train|sweep|upload --cluster PROFILE [--config FILE] [--nodes N] [--wait] [key=value ...]
    ddpm bench [--quick] [--out docs/benchmarks.md]

A user mistake (bad config, missing data, a run directory in use, ...) is printed as one line
on stderr with exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ddpm.errors import RunStopped, UserError
from ddpm.files import no_world_writable_files

EXIT_USER_ERROR = 2
EXIT_STOPPED = 3  # checkpoint written on SIGTERM/SIGUSR2; rerun (or requeue) to resume


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddpm", description="Train, sample and publish DDPM image models.")
    sub = p.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train (or resume) a run", description="Train a DDPM; resumes when the run directory has a checkpoint.")
    tr.add_argument("--config", help="YAML config file (see configs/)")
    tr.add_argument("--dry-run", action="store_true", help="print the resolved config and the run directory, then exit")
    tr.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.batch_size=32 data.resolution=32")

    sa = sub.add_parser("sample", help="sample images from an exported pipeline")
    sa.add_argument("--pipeline", required=True, help="pipeline directory, e.g. runs/digits-16px/pipeline")
    sa.add_argument("--scheduler", default="ddim", help="ddim (default), ddpm, dpmsolver++, unipc, euler, ... (see ddpm/sample.py)")
    sa.add_argument("--steps", type=int, default=25)
    sa.add_argument("--num-images", type=int, default=64)
    sa.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    sa.add_argument("--batch-size", type=int, default=64)
    sa.add_argument("--out", default="", help="output directory (default: beside the pipeline, under samples/)")
    sa.add_argument("--device", default="auto")
    sa.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])

    sw = sub.add_parser("sweep", help="sample and score a grid of models x schedulers x steps x seeds",
                        description="Resumable: finished cells are skipped. See configs/sweeps/ and ddpm/sweep.py.")
    sw.add_argument("--config", required=True, help="sweep YAML, e.g. configs/sweeps/digits.yaml")
    mode = sw.add_mutually_exclusive_group()
    mode.add_argument("--shard", default="", metavar="I/N", help="run only cells I, I+N, ... (one task of a SLURM array); no tables")
    mode.add_argument("--merge", action="store_true", help="write the tables, plot and W&B run from the cells the shards wrote")
    mode.add_argument("--plan-only", action="store_true", help="resolve the models, write plan.json and exit")
    sw.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. num_images=500 steps=[10,25]")

    ev = sub.add_parser("evaluate", help="FID/KID of a pipeline against a reference dataset",
                        description="Samples --num-images images and compares them with the reference; prints and writes JSON.")
    ev.add_argument("--pipeline", required=True, help="pipeline or checkpoint directory")
    ev.add_argument("--reference", default="", help="digits, folder:PATH, hf:NAME[:SPLIT] or a config .yaml (default: the run's training data)")
    ev.add_argument("--num-images", type=int, default=1000)
    ev.add_argument("--metric", default="inception", choices=["inception", "digitsnet"],
                    help="inception: FID/KID (downloads checked weights once); digitsnet: offline FD/KD for digit models")
    ev.add_argument("--scheduler", default="ddim")
    ev.add_argument("--steps", type=int, default=25)
    ev.add_argument("--seed", type=int, default=0, help="image k uses seed * 1,000,000 + k, as in sweeps")
    ev.add_argument("--batch-size", type=int, default=128)
    ev.add_argument("--reference-images", type=int, default=0, help="reference images for the statistics (0: all)")
    ev.add_argument("--inception-weights", default="", help="local Inception weights file (default: cached, else downloaded)")
    ev.add_argument("--out", default="", help="JSON file (default: <run>/evaluation/<metric>-<model>-<scheduler>-<steps>steps-<n>img-seed<s>.json)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    ev.add_argument("--no-wandb", action="store_true", help="do not log a W&B evaluate run")

    up = sub.add_parser("upload", help="publish a pipeline with a model card on the Hugging Face Hub",
                        description="Token from HF_TOKEN or `hf auth login`; never from the command line.")
    up.add_argument("--pipeline", required=True, help="runs/<name>/pipeline")
    up.add_argument("--repo-id", "--repo", required=True, dest="repo_id", help="Hub model repository, user/name")
    up.add_argument("--private", action="store_true", help="create the repository private (an existing one keeps its visibility)")
    up.add_argument("--revision", default="", help="branch to commit to (default: main); created when missing")
    up.add_argument("--license", default="mit", help="the model card's license (default: mit)")
    up.add_argument("--dry-run", action="store_true", help="list the files with sizes and print the model card; contacts nothing")
    up.add_argument("--message", default="", help="commit message")

    ge = sub.add_parser("generate", help="images from any pretrained diffusers pipeline (Hub id or directory), prompts included",
                        description="Writes images/*.png, grid.png (a row per prompt) and settings.json to --out.")
    ge.add_argument("--model", required=True, help="Hub id (e.g. johnowhitaker/ddpm-butterflies-32px) or a local pipeline directory")
    ge.add_argument("--prompt", action="append", default=[], dest="prompts", help="text-to-image prompt; repeat for several")
    ge.add_argument("--negative-prompt", default="")
    ge.add_argument("--steps", type=int, default=50)
    ge.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (text-to-image)")
    ge.add_argument("--seed", type=int, default=0, help="image i of every prompt uses seed + i")
    ge.add_argument("--num-images", type=int, default=4, help="images per prompt")
    ge.add_argument("--batch-size", type=int, default=4)
    ge.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"], help="auto: fp16 on CUDA, fp32 on the CPU")
    ge.add_argument("--scheduler", default="", help="swap the pipeline's scheduler: ddim, dpmsolver++, euler, ... (see ddpm/sample.py)")
    ge.add_argument("--device", default="auto")
    ge.add_argument("--out", default="", help="output directory (default: generated/<model>-<time>)")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cluster", required=True, help="profile name under slurm/clusters/ (e.g. local) or a .yaml path")
    common.add_argument("--wait", action="store_true", help="block until the jobs end; exit 1 if any failed")
    sb = sub.add_parser("submit", help="submit train, sweep or upload as a SLURM job (submitit)",
                        description="Prints the job id and log paths; --wait blocks until the job ends and fails if it failed.")
    kinds = sb.add_subparsers(dest="kind", required=True)
    st = kinds.add_parser("train", parents=[common], help="multi-node training")
    st.add_argument("--config", default="", help="training config YAML")
    st.add_argument("--nodes", type=int, default=0, help="nodes (default: the profile's)")
    st.add_argument("--upload", default="", metavar="REPO", help="also submit an upload to REPO that runs if training succeeds")
    st.add_argument("--dry-run-upload", action="store_true", help="with --upload: stage and list only (no network)")
    st.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for ddpm train")
    ss = kinds.add_parser("sweep", parents=[common], help="a sampling sweep as a job array, then a merge job")
    ss.add_argument("--config", required=True, help="sweep YAML, e.g. configs/sweeps/digits.yaml")
    ss.add_argument("--shards", type=int, default=0, help="array tasks (default: one per cell, at most 64)")
    ss.add_argument("overrides", nargs="*", metavar="key=value", help="sweep config overrides")
    su = kinds.add_parser("upload", parents=[common], help="a Hub upload as a small CPU job")
    su.add_argument("--pipeline", required=True, help="pipeline directory")
    su.add_argument("--repo-id", "--repo", required=True, dest="repo_id", help="Hub repository user/name")
    su.add_argument("--after", default="", metavar="JOBID", help="start only after this job succeeded")
    su.add_argument("--dry-run-upload", action="store_true", help="stage and list only (no network)")

    be = sub.add_parser("bench", help="measure training, data and sampling speed against the tutorial's way")
    be.add_argument("--quick", action="store_true", help="tiny sizes: checks that every stage runs (CI), no speed claims")
    be.add_argument("--pipeline", default="runs/digits-16px/pipeline", help="trained digits pipeline for the sampling figures")
    be.add_argument("--out", default="", help="markdown file to append the results to, e.g. docs/benchmarks.md")
    be.add_argument("--workdir", default="", help="scratch directory (default: a new temporary one)")
    be.add_argument("--ablation", action="store_true", help="time the training step one change at a time instead")
    be.add_argument("--compile", action="store_true", help="with --ablation: include torch.compile (slow to compile on a CPU)")
    return p


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpx2", "urllib3", "filelock", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging()
    no_world_writable_files()
    try:
        if args.command == "train":
            from ddpm.config import load_config
            from jobs import train as train_job

            cfg = load_config(args.config, args.overrides)
            print(train_job.describe(cfg), flush=True)
            if args.dry_run:
                return 0
            path = train_job.run(cfg)
            print(f"pipeline: {path}" if path else f"stopped early with a checkpoint in {cfg.run_dir / 'checkpoints'}; rerun to resume")
        elif args.command == "sample":
            from jobs import sample as sample_job

            cfg = sample_job.SampleConfig(pipeline=args.pipeline, scheduler=args.scheduler, steps=args.steps, num_images=args.num_images,
                                          seed=args.seed, batch_size=args.batch_size, out=args.out, device=args.device, precision=args.precision)
            out = sample_job.run(cfg)
            print(f"images: {out / 'images'}\ngrid: {out / 'grid.png'}")
        elif args.command == "sweep":
            from ddpm.sweep import load_sweep_config
            from jobs import sweep as sweep_job

            cfg = load_sweep_config(args.config, args.overrides)
            files = sweep_job.run(cfg, shard=args.shard, merge=args.merge, plan_only=args.plan_only)
            if files:
                print("\n".join(f"{k}: {v}" for k, v in files.items()))
            else:
                print(f"cells: {cfg.sweep_dir / 'cells'}" if not args.plan_only else f"plan: {cfg.sweep_dir / 'plan.json'}")
        elif args.command == "evaluate":
            from jobs import evaluate as evaluate_job

            row = evaluate_job.run(evaluate_job.EvaluateConfig(
                pipeline=args.pipeline, reference=args.reference, num_images=args.num_images, metric=args.metric,
                scheduler=args.scheduler, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                reference_images=args.reference_images, inception_weights=args.inception_weights, out=args.out,
                device=args.device, precision=args.precision, wandb=not args.no_wandb))
            from ddpm.sweep import metric_columns

            shown = [f"{k}: {row[k]:.6g}" for k in metric_columns(args.metric)]
            print(f"{row['num_images']} images ({args.scheduler}, {args.steps} steps, seed {args.seed}) vs {row['reference_images']} "
                  f"reference images ({row['reference_data']})\n" + "\n".join(shown) + f"\njson: {row['out']}")
        elif args.command == "upload":
            from jobs import upload

            upload.run(upload.UploadConfig(pipeline=args.pipeline, repo_id=args.repo_id, private=args.private, revision=args.revision,
                                           license=args.license, dry_run=args.dry_run, message=args.message))
        elif args.command == "generate":
            from jobs import generate

            out = generate.run(generate.GenerateConfig(
                model=args.model, prompts=args.prompts, negative_prompt=args.negative_prompt, steps=args.steps,
                guidance=args.guidance, seed=args.seed, num_images=args.num_images, batch_size=args.batch_size,
                dtype=args.dtype, scheduler=args.scheduler, device=args.device, out=args.out))
            print(f"images: {out / 'images'}\ngrid: {out / 'grid.png'}\nsettings: {out / 'settings.json'}")
        elif args.command == "submit":
            from jobs import submit

            return submit.run(args)
        elif args.command == "bench":
            from jobs import bench

            bench.run(bench.BenchConfig(quick=args.quick, pipeline=args.pipeline, out=args.out, workdir=args.workdir,
                                         ablation=args.ablation, compile=args.compile))
    except UserError as e:
        print(f"ddpm {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RunStopped as e:
        print(f"ddpm {args.command}: {e}", file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:
        print(f"ddpm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One sampler under other diffusers settings: each variant scored like a sweep cell (same seeds, same metric), so a
setting that the named samplers of ddpm.sampling.sample do not expose can be measured before it becomes one of them.

Run: python -m bench.sampler_settings --pipeline runs/digits-lr_lr-1.6e-3/pipeline --steps 10
     [--sampler sde-dpmsolver++] [--only heun,karras] [--num-images 1000] [--seeds 0,1]
Prints a markdown table: each variant's FD-digitsnet per seed, and the metric's real-vs-real floor.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

# name -> settings on top of the sampler's own (ddpm.sampling.sample.sampler_recipe); the table in docs/benchmarks.md
VARIANTS: dict[str, dict] = {
    "as it is": {},
    "midpoint": {"solver_type": "midpoint"},
    "heun": {"solver_type": "heun"},
    "heun, order 3": {"solver_type": "heun", "solver_order": 3},
    "heun, no lambda clipping": {"solver_type": "heun", "lambda_min_clipped": -float("inf")},
    "heun, no thresholding": {"solver_type": "heun", "thresholding": False},
    "heun, trailing": {"solver_type": "heun", "timestep_spacing": "trailing"},
    "heun, linspace": {"solver_type": "heun", "timestep_spacing": "linspace"},
    "lu lambdas": {"use_lu_lambdas": True},
    "first order": {"solver_order": 1},
    "no lower order final": {"lower_order_final": False},
    "euler at final": {"euler_at_final": True},
    "karras sigmas": {"use_karras_sigmas": True},
    "exponential sigmas": {"use_exponential_sigmas": True},
    "beta sigmas": {"use_beta_sigmas": True},
}


def run(
    pipeline: str, sampler: str, steps: int, variants: list[str], num_images: int, seeds: list[int], workdir: Path
) -> list[dict]:
    """A row per variant: {"variant", "fd": [per seed, or the error's first line], "floor"}."""
    from ddpm.evaluation.evaluate import Evaluator, Scoring, image_seeds
    from ddpm.sampling import sample

    cls, own = sample.SAMPLERS[sampler]
    evaluator = Evaluator(Scoring(metric="digitsnet", reference="digits", batch_size=250), "auto", "auto")
    rows = []
    for name in variants:
        sample.SAMPLERS["variant"] = (cls, {**own, **VARIANTS[name]})  # make_sampler adds the schedule's settings
        fd, floor = [], None
        for seed in seeds:
            try:
                row = evaluator.run(
                    pipeline, "variant", steps, image_seeds(seed, num_images), workdir / name / str(seed)
                )
                fd.append(row["fd_digitsnet"])
                floor = row["fd_digitsnet_floor"]
            except Exception as e:  # diffusers rejects some settings on some schedules: that is a result too
                fd.append(f"{type(e).__name__}: {str(e).splitlines()[0][:80]}")
        rows.append({"variant": name, "fd": fd, "floor": floor})
        print(f"{name}: {fd}", flush=True)
    del sample.SAMPLERS["variant"]
    return rows


def table(rows: list[dict], sampler: str, steps: int) -> str:
    cell = lambda v: f"{v:.2f}" if isinstance(v, float) else f"`{v}`"  # noqa: E731
    floors = {r["floor"] for r in rows if r["floor"] is not None}
    lines = [f"| {sampler}, {steps} steps | FD-digitsnet per seed |", "|---|---|"]
    lines += [f"| {r['variant']} | {' / '.join(cell(v) for v in r['fd'])} |" for r in rows]
    if floors:
        lines.append(f"| real vs real (floor) | {min(floors):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sampler_settings", description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", required=True, help="a trained digits pipeline or checkpoint")
    p.add_argument("--sampler", default="sde-dpmsolver++", help="a name of ddpm.sampling.sample.SAMPLERS")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--only", default="", help=f"comma-separated variants; default all: {', '.join(VARIANTS)}")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--seeds", default="0,1", help="comma-separated; image k of seed s uses s * 1,000,000 + k")
    args = p.parse_args(argv)
    from ddpm.sampling.sample import SAMPLERS

    variants = [v.strip() for v in args.only.split(",") if v.strip()] or list(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if args.sampler not in SAMPLERS or unknown:
        what = f"--sampler {args.sampler!r}" if args.sampler not in SAMPLERS else f"--only: unknown {unknown}"
        print(f"bench.sampler_settings: error: {what}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="ddpm-sampler-settings-") as workdir:
        rows = run(args.pipeline, args.sampler, args.steps, variants, args.num_images, seeds, Path(workdir))
    print(table(rows, args.sampler, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())

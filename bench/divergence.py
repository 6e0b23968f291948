"""The divergence table of docs/benchmarks.md: learning rate x model x batch on colour photographs, diverged or not.

    python -m bench.divergence --out runs/divergence                # every row (hours on 2 CPU cores)
    python -m bench.divergence --out runs/divergence --rows 0,1     # some rows

The data is 1,205 colour crops (random position, size and flip, 64 px) of the photographs that scikit-learn and
matplotlib ship, so the table needs no network: the size of the folder the divergence was first reported on. Each
row is a `ddpm train` over that folder at 32 px with the tutorial's UNet, stopped after `steps` optimizer steps of a
run planned for 6,000 (so the learning rate is still near its peak, as in a run of many epochs), with
train.on_divergence=warn so that a divergence is named and the run goes on. A row reads its run's metrics.jsonl
and log: the first step the detector named a divergence, and the loss at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.training import TUTORIAL_MODEL

ROWS = [  # (learning rate, batch, steps)
    (1.6e-3, 16, 500),
    (4e-4, 16, 500),
    (1.6e-3, 64, 200),
    (4e-4, 64, 200),
]


def photo_crops(folder: Path, count: int = 1205, size: int = 64) -> Path:
    """`count` JPEG crops of the photographs shipped with scikit-learn and matplotlib, the same on every machine."""
    import matplotlib
    import numpy as np
    import sklearn.datasets
    from PIL import Image

    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    photos = [Image.open(f).convert("RGB") for f in sklearn.datasets.load_sample_images().filenames]
    photos.append(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB"))
    rng = np.random.default_rng(0)
    for i in range(count):
        im = photos[i % len(photos)]
        s = int(rng.integers(48, min(im.size) // 2))
        x, y = int(rng.integers(0, im.size[0] - s)), int(rng.integers(0, im.size[1] - s))
        crop = im.crop((x, y, x + s, y + s)).resize((size, size), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop.save(folder / f"{i:05d}.jpg", quality=92)
    return folder


def train_args(out: Path, data: Path, lr: float, batch: int, steps: int) -> list[str]:
    return [
        f"name=photos-lr{lr:g}-bs{batch}",
        f"runs_dir={out}",
        "data.source=folder",
        f"data.path={data}",
        "data.resolution=32",
        f"data.cache_dir={out / 'cache'}",
        *TUTORIAL_MODEL,
        f"train.batch_size={batch}",
        f"optim.lr={lr}",
        "train.max_steps=6000",
        f"train.stop_after={steps}",
        "train.log_every=10",
        "train.checkpoint_every=100",
        "train.sample_every=0",
        "train.eval_every=0",
        "train.on_divergence=warn",
        "tracking.wandb=false",
    ]


def row(out: Path, data: Path, lr: float, batch: int, steps: int) -> dict:
    args = train_args(out, data, lr, batch, steps)
    run_dir = out / args[0].removeprefix("name=")
    log = subprocess.run([sys.executable, "-m", "jobs.cli", "train", *args], capture_output=True, text=True,
                         env={**os.environ, "WANDB_MODE": "offline"})  # fmt: skip
    said = log.stderr.replace("\r", "\n")
    diverged = next(
        (ln.split("step ", 1)[1].split(":")[0] for ln in said.splitlines() if "training diverged" in ln), ""
    )
    losses = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in losses if "loss" in r]
    return {"lr": lr, "batch": batch, "steps": losses[-1]["step"], "diverged_at": diverged,
            "final_loss": round(losses[-1]["loss"], 4), "exit": log.returncode}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.divergence", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/divergence"))
    p.add_argument("--rows", default="", help="comma-separated row numbers (default: all)")
    args = p.parse_args(argv)
    data = photo_crops(args.out / "photos")
    chosen = [ROWS[int(i)] for i in args.rows.split(",")] if args.rows else ROWS
    print("| lr | batch | steps | diverged at step | final loss |\n|---|---|---|---|---|")
    for lr, batch, steps in chosen:
        r = row(args.out, data, lr, batch, steps)
        print(
            f"| {r['lr']:g} | {r['batch']} | {r['steps']} | {r['diverged_at'] or 'no'} | {r['final_loss']} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Result tables of a sweep: results.csv and results.json (a row per cell, in plan order) and plot.png.

The plot is quality (or speed, without a metric) against sampling steps, a line per scheduler, a panel per model;
class-conditional models get guidance-plot.png too: quality and class accuracy against the guidance scale.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from ddpm.evaluation.metrics import metric_columns
from ddpm.files import unique_suffix, write_json

COLUMNS = [
    "cell",
    "model",
    "checkpoint_step",
    "ema_length",
    "scheduler",
    "steps",
    "seed",
    "prompt",
    "guidance",
    "labels",
    "class_accuracy",
    "num_images",
    "metric",
    "reference_data",
    "reference_images",
    "kid_subset_size",
    "device",
    "precision",
    "model_path",
]


def write_results(out: Path, title: str, metric: str, rows: list[dict]) -> dict[str, Path]:
    """results.csv, results.json and plot.png in `out`; returns their paths."""
    columns = [c for c in COLUMNS[:9] + metric_columns(metric) + COLUMNS[9:] if any(c in r for r in rows)]
    tmp = out / f".results.csv.{unique_suffix()}"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / "results.csv")
    write_json(out / "results.json", rows)
    plot_results(title, metric, rows, out / "plot.png")
    paths = {"csv": out / "results.csv", "json": out / "results.json", "plot": out / "plot.png"}
    if metric != "none" and plot_guidance(title, metric, rows, out / "guidance-plot.png"):
        paths["guidance_plot"] = out / "guidance-plot.png"
    return paths


def plot_guidance(title: str, metric: str, rows: list[dict], path: Path) -> bool:
    """The score against the classifier-free guidance scale of the class-conditional cells, a line per model,
    sampler and step count, seeds averaged, the floor beside; class accuracy in a second panel where a classifier
    scored it. False (nothing written) without class-conditional cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "guidance_scale" in r and r.get("prompt") is None]
    if not rows:
        return False
    y_key = metric_columns(metric)[0]
    panels = [y_key] + (["class_accuracy"] if any("class_accuracy" in r for r in rows) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, key in zip(axes[0], panels):
        for line in dict.fromkeys((r["model"], r["scheduler"], r["steps"]) for r in rows):
            points: dict[float, list[float]] = {}
            for r in rows:
                if (r["model"], r["scheduler"], r["steps"]) == line and key in r:
                    points.setdefault(r["guidance_scale"], []).append(r[key])
            xs = sorted(points)
            ax.errorbar(xs, [float(np.mean(points[x])) for x in xs], yerr=[float(np.std(points[x])) for x in xs],
                        marker="o", capsize=3, label=f"{line[0]}, {line[1]} {line[2]} steps")  # fmt: skip
        floors = [r[f"{y_key}_floor"] for r in rows if r.get(f"{y_key}_floor") is not None]
        if key == y_key and floors:
            ax.axhline(float(np.mean(floors)), color="grey", linestyle="--", label="real vs real (floor)")
        ax.set_xlabel("guidance scale (1: conditional model alone)")
        ax.set_ylabel(f"{key} ({'lower' if key == y_key else 'higher'} is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    seeds, images = len({r["seed"] for r in rows}), rows[0]["num_images"]
    fig.suptitle(f"{title}: {images} class-balanced images per cell, {seeds} seed{'s' * (seeds > 1)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_results(title: str, metric: str, rows: list[dict], path: Path) -> None:
    """Quality (or speed, without a metric) against sampling steps, a line per scheduler, a panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    y_key = metric_columns(metric)[0]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False, sharey=True)
    for ax, model in zip(axes[0], models):
        # a line per scheduler (and guidance scale, for text-to-image); seeds and prompts are averaged
        lines = list(dict.fromkeys((r["scheduler"], r.get("guidance")) for r in rows if r["model"] == model))
        for sch, guidance in lines:
            points: dict[int, list[float]] = {}
            for r in rows:
                if r["model"] == model and r["scheduler"] == sch and r.get("guidance") == guidance:
                    points.setdefault(r["steps"], []).append(r[y_key])
            xs = sorted(points)
            ys = [float(np.mean(points[x])) for x in xs]
            err = [float(np.std(points[x])) for x in xs]
            label = sch if guidance is None else f"{sch}, guidance {guidance:g}"
            ax.errorbar(
                xs,
                ys,
                yerr=err if max(len(v) for v in points.values()) > 1 else None,
                marker="o",
                capsize=3,
                label=label,
            )
        floors = [r[f"{y_key}_floor"] for r in rows if r["model"] == model and r.get(f"{y_key}_floor") is not None]
        if floors:  # what real images score at this count: differences near it mean nothing
            ax.axhline(float(np.mean(floors)), color="grey", linestyle="--", label="real vs real (floor)")
        ax.set_xscale("log")
        values = [r[y_key] for r in rows if r["model"] == model and r[y_key] > 0]
        if values and max(values) > 5 * min(values):  # one diverging sampler would flatten the others into a line
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        steps = sorted({r["steps"] for r in rows})
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("sampling steps")
        ax.set_title(model, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{y_key} (lower is better)" if metric != "none" else "seconds per image")
    axes[0][-1].legend(fontsize=8)
    seeds, images = len({r["seed"] for r in rows}), rows[0]["num_images"]
    fig.suptitle(f"{title}: {y_key}, {images} images per cell, {seeds} seed{'s' if seeds > 1 else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_history(metric: str, num_images: int, runs: dict[str, list[dict]], path: Path) -> bool:
    """Quality against training step, from every sweep that scored the runs' models (their scores.jsonl): a panel
    per run, a line per sampler and step count, seeds averaged. For nightly sweeps, the curve across nights.
    Returns False (and writes nothing) when no run has scores at two steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = metric_columns(metric)[0]
    runs = {
        name: [
            r for r in rows if r.get("source") == "sweep" and r["metric"] == metric and r["num_images"] == num_images
        ]
        for name, rows in runs.items()
    }
    runs = {name: rows for name, rows in runs.items() if len({r["step"] for r in rows}) >= 2}
    if not runs:
        return False
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False, sharey=True)
    for ax, (name, rows) in zip(axes[0], runs.items()):
        # a line per sampler, step count and post-hoc EMA length (none: the run's own EMA)
        for sampler in dict.fromkeys((r["scheduler"], r["steps"], r.get("ema_length")) for r in rows):
            points: dict[int, list[float]] = {}
            for r in rows:
                if (r["scheduler"], r["steps"], r.get("ema_length")) == sampler:
                    points.setdefault(r["step"], []).append(r[key])
            xs = sorted(points)
            ema = f", sigma_rel {sampler[2]:g}" if sampler[2] is not None else ""
            ax.plot(
                xs, [float(np.mean(points[x])) for x in xs], marker="o", label=f"{sampler[0]} {sampler[1]} steps{ema}"
            )
        ax.set(xlabel="training step", title=name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(f"{key} (lower is better)")
    fig.suptitle(f"{key} against training step, {num_images} images per point, every sweep so far", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

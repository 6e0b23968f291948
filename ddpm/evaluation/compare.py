"""A comparison of training runs as one self-contained HTML page, built from the run directories alone.

One HTML file with its pictures embedded (base64 PNGs): it is a single file to copy off a cluster that has no W&B
access, it opens in any browser with no network and no server, and it cannot lose its pictures on the way. It shows
the runs' loss and quality curves on shared axes, the config keys that differ, each run's best score, the scores of
class-conditional models by guidance scale and labels (with their class accuracy), and the newest sample grid of each
run side by side.
"""

from __future__ import annotations

import base64
import html
import io
import json
import textwrap
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from ddpm.errors import UserError
from ddpm.evaluation.scores import headline, measurement, read_scores


@dataclass
class Run:
    """What the report shows of one run directory."""

    label: str
    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]  # metrics.jsonl: loss, lr, ... per logged step
    scores: list[dict[str, Any]]  # scores.jsonl, newest line per key
    grid: Path | None  # the newest samples/step-*.png


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut short by a kill
                continue
    return rows


def load_run(path: Path, label: str) -> Run:
    if not (path / "config.yaml").is_file():
        raise UserError(f"{path} is not a run directory (no config.yaml; ddpm train writes one at its start)")
    grids = sorted((path / "samples").glob("step-*.png"))
    return Run(
        label=label,
        path=path,
        config=yaml.safe_load((path / "config.yaml").read_text()) or {},
        metrics=_jsonl(path / "metrics.jsonl"),
        scores=read_scores(path),
        grid=grids[-1] if grids else None,
    )


def labels_for(paths: list[Path]) -> list[str]:
    """The run directory names, with the parent folder added where two runs share a name, the whole path where
    that is not enough."""
    names = [p.name for p in paths]
    labels = [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]
    return [str(p) if labels.count(label) > 1 else label for p, label in zip(paths, labels)]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differing_keys(runs: list[Run]) -> list[str]:
    """Config keys whose values are not the same in every run (the run name and directory aside)."""
    flat = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*flat) - {"name", "runs_dir"})
    return [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]


def common_measurement(runs: list[Run]) -> tuple | None:
    """The measurement most runs have scores for (then the one with most scores), so the quality curves compare
    like with like."""
    scored = [[measurement(r) for r in run.scores if headline(r["metric"]) in r] for run in runs]
    every = [m for ms in scored for m in ms]
    if not every:
        return None
    return max(sorted(set(every), key=str), key=lambda m: (sum(m in ms for ms in scored), every.count(m)))


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def fit_titles(fig) -> None:
    """Wraps each axes' title onto as many lines as it takes to be no wider than its axes: a title that runs past
    the panel widens the picture, and a browser cuts it at the window's edge."""
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        title, room = ax.title, ax.get_window_extent(renderer).width
        text = title.get_text()
        chars = len(text)
        while chars > 1 and (width := title.get_window_extent(renderer).width) > room:
            chars = min(chars - 1, int(chars * room / width))  # the first guess from the overflow, then a char less
            title.set_text(textwrap.fill(text, max(chars, 1), break_on_hyphens=False))


def curves_figure(runs: list[Run], how: tuple | None):
    """Loss (and, where there are scores, quality) against training step, a line per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # post-hoc EMA scores (a sweep's ema_lengths) are of other weights than the run's own at the same step: a panel
    # of their own, quality against sigma_rel at the newest step each run has them for
    posthoc = {
        run.label: [r for r in run.scores if how and measurement(r) == how and "ema_length" in r] for run in runs
    }
    panels = (2 if how else 1) + any(posthoc.values())
    fig = Figure(figsize=(6.5 * panels, 4))
    FigureCanvasAgg(fig)  # no pyplot: nothing global to close, and a renderer to measure the titles with
    axes = fig.subplots(1, panels, squeeze=False)
    loss_ax = axes[0][0]
    for run in runs:
        points = [(m["step"], m["loss"]) for m in run.metrics if "loss" in m]
        if points:
            loss_ax.plot(*zip(*points), label=run.label, linewidth=1.2)
    loss_ax.set(xlabel="training step", ylabel="training loss (mean per log interval)", yscale="log", title="Loss")
    if how:
        metric, reference, _, num_images, scheduler, steps, _, precision, scale, labels = how
        key = headline(metric)
        guided = f", guidance {scale:g}, labels {labels}" if scale is not None else ""
        ax = axes[0][1]
        for run in runs:
            points = sorted(
                (r["step"], r[key]) for r in run.scores if measurement(r) == how and key in r and "ema_length" not in r
            )
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=run.label, linewidth=1.2)
        ax.set(
            xlabel="training step",
            ylabel=f"{key} (lower is better)",
            title=f"{key}: {num_images} images, {scheduler} {steps} steps ({precision}){guided}, vs {reference}",
        )
    if any(posthoc.values()):
        ax = axes[0][2]
        for label, rows in posthoc.items():
            newest = max((r["step"] for r in rows if key in r), default=None)
            points = sorted((r["ema_length"], r[key]) for r in rows if r["step"] == newest and key in r)
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=f"{label} (step {newest})", linewidth=1.2)
        ax.set(
            xlabel="post-hoc EMA length sigma_rel", ylabel=f"{key} (lower is better)", title=f"{key} against sigma_rel"
        )
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return fig


CURVES = "loss and quality against training step"


def figures(runs: list[Run], how: tuple | None) -> dict[str, Any]:
    """Every chart of the report by its alt text, each title fitted to its axes."""
    charts = {CURVES: curves_figure(runs, how)}
    for fig in charts.values():
        fit_titles(fig)
    return charts


def _summary(run: Run, how: tuple | None) -> dict[str, str]:
    last = next((m for m in reversed(run.metrics) if "loss" in m), {})
    row = {
        "run": run.label,
        "steps": str(last.get("step", "-")),
        "final loss": f"{last['loss']:.4g}" if "loss" in last else "-",
        "img/s": f"{last['images_per_sec']:.0f}" if "images_per_sec" in last else "-",
    }
    if how:
        key = headline(how[0])
        same = [r for r in run.scores if measurement(r) == how and key in r]
        best = min(same, key=lambda r: r[key]) if same else None
        newest = max(same, key=lambda r: r["step"]) if same else None
        row[f"best {key}"] = f"{best[key]:.4g} at step {best['step']}" if best else "-"
        row[f"newest {key}"] = f"{newest[key]:.4g} at step {newest['step']}" if newest else "-"
    return row


def conditional_rows(runs: list[Run]) -> list[dict[str, str]]:
    """Every score of a class-conditional model, a row each: the guidance scale and labels it was sampled with, its
    headline score beside the metric's floor, and its class accuracy where a classifier measured it."""
    out = []
    for run in runs:
        for r in sorted(
            (r for r in run.scores if "guidance_scale" in r and headline(r["metric"]) in r),
            key=lambda r: (r["step"], r["guidance_scale"], r["seed"]),
        ):
            key = headline(r["metric"])
            floor = r.get(f"{key}_floor")
            out.append({
                "run": run.label, "step": str(r["step"]), "guidance scale": f"{r['guidance_scale']:g}",
                "labels": str(r.get("labels")), "images": str(r["num_images"]), "seed": str(r["seed"]),
                "sampler": f"{r['scheduler']} {r['steps']}", key: f"{r[key]:.4g}",
                "floor": f"{floor:.3g}" if floor is not None else "-",
                "class accuracy": f"{100 * r['class_accuracy']:.1f} %" if "class_accuracy" in r else "-",
            })  # fmt: skip
    return out


def _table(rows: list[dict[str, str]], css: str = "") -> str:
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1em; max-width: 1400px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; }
th { background: #f3f3f3; }
.grids { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0; }
figcaption { font-size: 13px; color: #555; }
img.grid { image-rendering: pixelated; max-width: 420px; }
img.curves { max-width: 100%; height: auto; }
.muted { color: #777; }
"""


def render(runs: list[Run]) -> str:
    """The report as an HTML string (no scripts, no external resources)."""
    how = common_measurement(runs)
    diff = differing_keys(runs)
    flat = [flatten(r.config) for r in runs]
    diff_rows = [{"config key": k, **{r.label: json.dumps(f.get(k)) for r, f in zip(runs, flat)}} for k in diff]
    grids = "".join(
        f'<figure><img class="grid" alt="samples of {html.escape(r.label)}" '
        f'src="data:image/png;base64,{base64.b64encode(r.grid.read_bytes()).decode()}">'
        f"<figcaption>{html.escape(r.label)}: {html.escape(r.grid.stem)}</figcaption></figure>"
        if r.grid
        else f'<p class="muted">{html.escape(r.label)}: no sample grid yet</p>'
        for r in runs
    )
    quality_note = (
        ""
        if how
        else '<p class="muted">No scores yet: turn on train.eval_every, or run ddpm evaluate on a checkpoint.</p>'
    )
    charts = {alt: _png(fig) for alt, fig in figures(runs, how).items()}
    guided = conditional_rows(runs)
    conditional = f"<h2>Class-conditional scores</h2>\n{_table(guided, 'conditional')}" if guided else ""
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ddpm compare: {html.escape(", ".join(r.label for r in runs))}</title>
<style>{STYLE}</style></head><body>
<h1>{len(runs)} runs compared</h1>
<p class="muted">Written {made} from {html.escape(", ".join(str(r.path) for r in runs))}</p>
<h2>Summary</h2>
{_table([_summary(r, how) for r in runs], "summary")}
<h2>Curves</h2>
{quality_note}
<img class="curves" alt="{CURVES}" src="data:image/png;base64,{charts[CURVES]}">
{conditional}
<h2>Config keys that differ</h2>
{_table(diff_rows, "config") if diff_rows else '<p class="muted">None: the runs share every config value.</p>'}
<h2>Newest samples</h2>
<div class="grids">{grids}</div>
</body></html>
"""

"""Compare job: one self-contained HTML report of training runs: loss and quality curves, config differences, grids.

    ddpm compare runs/lr-1e-4 runs/lr-4e-4 [--out compare.html]

Reads only the run directories (config.yaml, metrics.jsonl, scores.jsonl, samples/), so it works on clusters
without W&B access; the page embeds its pictures and needs no network to open.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from ddpm.errors import ConfigError
from ddpm.typed_config import build_config, read_tree


@dataclass
class CompareConfig:
    runs: tuple[str, ...] = ()  # run directories; also given as plain arguments: ddpm compare RUN_DIR...
    out: str = "compare.html"  # the report

    def validate(self) -> None:
        if not self.runs:
            raise ConfigError("no runs to compare: ddpm compare RUN_DIR... (directories written by ddpm train)")


CONFIG = CompareConfig


def load(path: str | None, overrides: list[str] = (), values: dict | None = None) -> CompareConfig:
    """Plain arguments (no '=') are run directories; the rest are key=value overrides."""
    runs = [a for a in overrides if "=" not in a]
    cfg = build_config(CompareConfig, read_tree(path, [a for a in overrides if "=" in a], values))
    cfg.runs = (*cfg.runs, *runs)
    cfg.validate()
    return cfg


def run(cfg: CompareConfig) -> Path:
    from ddpm.evaluation.compare import labels_for, load_run, render
    from ddpm.files import cannot_write, unique_suffix, writable_file

    cfg.validate()
    out = writable_file(cfg.out, "the report")  # before reading the runs
    paths = list(dict.fromkeys(Path(r).resolve() for r in cfg.runs))  # a run named twice is shown once
    runs = [load_run(p, label) for p, label in zip(paths, labels_for(paths))]
    page = render(runs)
    tmp = out.with_name(f".{out.name}.{unique_suffix()}.tmp")
    try:
        tmp.write_text(page)
        tmp.replace(out)  # whole or not at all: an earlier report stays as it was when the write fails
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise cannot_write("the report", out, e) from None
    print(f"report: {out} ({len(runs)} runs)")
    return out

"""ddpm compare: a report of real runs, checked as HTML and, in headless Chromium, as a browser shows it."""

from __future__ import annotations

import base64
import html.parser
import io
import json
import os
import re
import shutil
import subprocess

import pytest
from PIL import Image

from ddpm.config import load_config
from ddpm.evaluation.compare import CURVES, Run, common_measurement, figures, labels_for, load_run, render
from ddpm.training.loop import train
from tests.conftest import ROOT, cli, tiny_overrides

EVAL = ["train.eval_every=3", "train.eval_images=8", "train.eval_metric=digitsnet", "train.sample_every=3"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, shared_cache):
    """Two tiny runs that differ in the learning rate, each with scores at steps 3 and 6 and sample grids."""
    runs = tmp_path_factory.mktemp("compare") / "runs"
    dirs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDPM_CACHE", str(shared_cache / "ddpm"))  # the feature net and reference features, shared
        for name, lr in (("lr-low", "1e-4"), ("lr-high", "1e-3")):
            cfg = load_config(None, tiny_overrides(runs, shared_cache, *EVAL, f"optim.lr={lr}", name=name))
            train(cfg)
            dirs.append(cfg.run_dir)
    return dirs


class Images(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))


def _decoded(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def test_report_shows_curves_grids_best_scores_and_the_differing_keys(two_runs, tmp_path):
    out = tmp_path / "report.html"
    r = cli("compare", *map(str, two_runs), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    page = out.read_text()
    parser = Images()
    parser.feed(page)
    by_alt = {img["alt"]: img for img in parser.images}
    curves = _decoded(by_alt["loss and quality against training step"]["src"])
    assert curves.width > 1000  # two panels: loss, and quality (there are scores)
    for run in two_runs:
        grid = _decoded(by_alt[f"samples of {run.name}"]["src"])
        newest = sorted((run / "samples").glob("step-*.png"))[-1]
        assert grid.tobytes() == Image.open(newest).tobytes()
    # the differing keys: the learning rate, not the shared seed
    config_table = page.split("Config keys that differ", 1)[1]
    assert "optim.lr" in config_table and ">seed<" not in config_table
    # each run's best score, read from its scores.jsonl
    for run in two_runs:
        scores = [json.loads(line) for line in (run / "scores.jsonl").read_text().splitlines()]
        best = min(scores, key=lambda s: s["fd_digitsnet"])
        assert f"{best['fd_digitsnet']:.4g} at step {best['step']}" in page


def assert_titles_fit(charts: dict) -> None:
    """Every title of every chart, once drawn, no wider than its axes (nor outside the figure)."""
    assert charts
    for alt, fig in charts.items():
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            title, box = ax.title.get_window_extent(renderer), ax.get_window_extent(renderer)
            assert title.width <= box.width, (alt, ax.get_title())
            assert box.x0 - 1 <= title.x0 and title.x1 <= box.x1 + 1, (alt, ax.get_title())
            assert title.x1 <= fig.bbox.width, (alt, ax.get_title())


def test_the_report_charts_of_real_runs_keep_their_titles_inside_the_axes(two_runs):
    runs = [load_run(p, label) for p, label in zip(two_runs, labels_for(two_runs))]
    assert_titles_fit(figures(runs, common_measurement(runs)))


@pytest.mark.parametrize("reference", ["digits at 16px", "hf:huggan/smithsonian_butterflies_subset:train at 64px"])
def test_a_long_quality_title_is_wrapped_to_its_axes(tmp_path, reference):
    """The title that ran past the figure (and was cut at a 1280 px browser's edge): wrapped, every word kept."""
    score = {"metric": "digitsnet", "reference_data": reference, "reference_images": 1797, "num_images": 64,
             "scheduler": "sde-dpmsolver++", "steps": 25, "seed": 0, "precision": "bf16"}  # fmt: skip
    runs = [
        Run(label=name, path=tmp_path / name, config={"optim": {"lr": lr}}, grid=None,
            metrics=[{"step": s, "loss": 1 / (s + 1)} for s in range(0, 3000, 100)],
            scores=[{**score, "step": s, "fd_digitsnet": 100 / s} for s in (1000, 2000, 3000)])
        for name, lr in (("digits-16px-lr-1e-4-warmup-500", 1e-4), ("digits-16px-lr-1e-3-warmup-500", 1e-3))
    ]  # fmt: skip
    how = common_measurement(runs)
    charts = figures(runs, how)
    quality = charts[CURVES].axes[1].get_title()
    assert quality.split() == f"fd_digitsnet: 64 images, sde-dpmsolver++ 25 steps (bf16), vs {reference}".split()
    assert "\n" in quality
    assert_titles_fit(charts)
    # the page's picture is the figure's width at most (the wrapped title no longer widens it), and the page lets
    # the browser scale it down to the window
    parser = Images()
    parser.feed(page := render(runs))
    curves = _decoded({img["alt"]: img for img in parser.images}[CURVES]["src"])
    assert curves.width <= 2 * 6.5 * 110
    assert "img.curves { max-width: 100%" in page


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path):
    r = cli("compare", str(tmp_path), "--out", str(tmp_path / "r.html"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"ddpm compare: error: {tmp_path} is not a run directory (no config.yaml; ddpm train writes one at its start)"
    ]
    assert not (tmp_path / "r.html").exists()


def test_report_opens_in_headless_chromium_with_every_picture_decoded(two_runs, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("DDPM_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is missing: make browser installs it")
        pytest.skip("chromium is not installed (make browser)")
    out = tmp_path / "report.html"
    assert cli("compare", *map(str, two_runs), "--out", str(out)).returncode == 0
    # A copy of the page that, once loaded, writes what the browser made of each picture into its title.
    probe = out.read_text().replace(
        "</body>",
        "<script>window.onload = () => { document.title = JSON.stringify([...document.images].map("
        "i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])); };</script></body>",
    )
    (tmp_path / "probe.html").write_text(probe)
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000", "--dump-dom",
         f"file://{tmp_path / 'probe.html'}"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    ).stdout  # fmt: skip
    shown = json.loads(html.unescape(re.search(r"<title>(.*?)</title>", dom, re.S).group(1)))
    assert {alt for alt, *_ in shown} == {"loss and quality against training step"} | {
        f"samples of {run.name}" for run in two_runs
    }
    for alt, complete, width, height in shown:
        assert complete and width > 100 and height > 100, alt

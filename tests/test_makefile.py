"""The Makefile's choice of model: which export `make sample` samples and says it samples, and that `make
submit-upload` uploads only the export it is given.

Each test runs the real Makefile (make -f) in a temporary directory with its own runs/ and a .venv that is already
installed (its stamp newer than uv.lock) and a uv, so make installs nothing; .venv/bin/ddpm there prints its arguments,
except in the one test that runs the real `ddpm sample --dry-run`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")

# What the caller's shell or a make above pytest may have set, and would change the choice.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in {"PIPELINE", "CLUSTER", "REPO", "ARGS", "CONFIG"}}
for key in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"):
    CLEAN_ENV.pop(key, None)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A checkout's files that make looks at, with an installed .venv whose ddpm echoes its arguments."""
    for name in ("uv.lock", "pyproject.toml"):
        (tmp_path / name).write_text("")
        os.utime(tmp_path / name, (time.time() - 3600,) * 2)
    (tmp_path / ".uv-boot" / "bin").mkdir(parents=True)  # where make bootstraps uv when there is none on PATH
    (tmp_path / ".uv-boot" / "bin" / "uv").write_text("#!/bin/sh\nexit 1\n")
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".cuda").write_text("12\n")
    (venv / ".synced-cu12").touch()
    ddpm = venv / "bin" / "ddpm"
    ddpm.write_text('#!/bin/sh\necho "ddpm $*"\n')
    ddpm.chmod(0o755)
    return tmp_path


def export(tree: Path, name: str, age_s: float) -> str:
    """runs/<name>/pipeline with a model_index.json written age_s seconds ago."""
    pipeline = tree / "runs" / name / "pipeline"
    pipeline.mkdir(parents=True)
    (pipeline / "model_index.json").write_text("{}")
    os.utime(pipeline / "model_index.json", (time.time() - age_s,) * 2)
    return f"runs/{name}/pipeline"


def make(tree: Path, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run(
        ["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), *args],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=300,
        env=CLEAN_ENV,
    )
    assert "uv sync" not in r.stdout + r.stderr and ".uv-boot" not in r.stdout + r.stderr, "make installed"
    return r


def own_stderr(r: subprocess.CompletedProcess) -> list[str]:
    """stderr without make's own "make: *** [...] Error 2" line."""
    return [line for line in r.stderr.splitlines() if not line.startswith("make: ***")]


def test_sample_takes_the_readme_default_run_over_a_newer_export(tree):
    export(tree, "digits-16px", age_s=600)
    export(tree, "bars-2node", age_s=60)
    r = make(tree, "sample")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "make sample: sampling runs/digits-16px/pipeline (the default run, make train's; PIPELINE=... to choose)",
        "ddpm sample --pipeline runs/digits-16px/pipeline",
    ]


def test_sample_without_the_default_run_takes_the_newest_export_not_the_first_by_name(tree):
    export(tree, "bars-2node", age_s=600)
    newest = export(tree, "zebra-32px", age_s=60)
    export(tree, "middle", age_s=300)
    (tree / "runs" / "unexported" / "pipeline").mkdir(parents=True)  # newest folder, but no model_index.json
    r = make(tree, "sample", "ARGS=--steps 10")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"make sample: sampling {newest} (the newest export; PIPELINE=... to choose)",
        f"ddpm sample --pipeline {newest} --steps 10",
    ]


def test_sample_uses_pipeline_as_given(tree):
    export(tree, "digits-16px", age_s=60)
    r = make(tree, "sample", "PIPELINE=somewhere/else/pipeline")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "make sample: sampling somewhere/else/pipeline (as given; PIPELINE=... to choose)",
        "ddpm sample --pipeline somewhere/else/pipeline",
    ]


def test_sample_with_no_export_stops_with_one_line_saying_what_to_do(tree):
    (tree / "runs" / "trained-not-exported" / "pipeline").mkdir(parents=True)
    r = make(tree, "sample")
    assert r.returncode != 0
    assert own_stderr(r) == [
        "make sample: no exported pipeline under runs/: run make train, or give PIPELINE=runs/<name>/pipeline"
    ]
    assert "ddpm sample" not in r.stdout


def test_submit_upload_needs_pipeline_and_does_not_guess(tree):
    export(tree, "digits-16px", age_s=60)
    r = make(tree, "submit-upload", "CLUSTER=local", "REPO=user/name")
    assert r.returncode != 0
    assert own_stderr(r) == [
        "make submit-upload: give PIPELINE=<the export to upload>, e.g. PIPELINE=runs/digits-16px/pipeline"
    ]
    assert "ddpm" not in r.stdout
    r = make(tree, "submit-upload", "CLUSTER=local", "REPO=user/name", "PIPELINE=runs/digits-16px/pipeline")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == (
        "ddpm submit upload --cluster local --pipeline runs/digits-16px/pipeline --repo-id user/name"
    )


def test_help_says_where_sample_and_submit_upload_take_their_model(tree):
    lines = make(tree, "help").stdout.splitlines()
    (sample,) = [line for line in lines if line.startswith("make sample ")]
    assert "[PIPELINE=runs/<name>/pipeline]" in sample and "runs/digits-16px, else the newest export" in sample
    (upload,) = [line for line in lines if line.startswith("make submit-upload ")]
    assert " PIPELINE=... " in upload and "[PIPELINE" not in upload


def test_sample_dry_run_with_the_real_ddpm_prints_the_chosen_pipeline(tree):
    real = Path(sys.executable).parent / "ddpm"  # the console script of the environment the tests run in
    (tree / ".venv" / "bin" / "ddpm").unlink()
    (tree / ".venv" / "bin" / "ddpm").symlink_to(real)
    export(tree, "bars-2node", age_s=600)
    newest = export(tree, "zebra-32px", age_s=60)
    r = make(tree, "sample", "ARGS=--dry-run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"make sample: sampling {newest} (the newest export; PIPELINE=... to choose)"
    assert f"pipeline: {newest}" in lines

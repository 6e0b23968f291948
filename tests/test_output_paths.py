"""An output path a job cannot create or write is one line on stderr naming the path and the reason, exit status 2,
before any expensive work; whatever was written before stays as it was.

Tests run as root, which ignores permission bits: "Not a directory" comes from a path under a regular file, "Operation
not permitted" from an immutable folder (chattr +i, where the filesystem has it), "Permission denied" and "No space
left on device" from a write patched to fail as it would.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from PIL import Image

from ddpm.errors import UserError
from ddpm.files import writable_dir, writable_file, writing
from jobs.cli import main
from tests import tiny_pipelines
from tests.conftest import copy_of_tiny_run

NOT_A_DIRECTORY = os.strerror(errno.ENOTDIR)
NO_SPACE = os.strerror(errno.ENOSPC)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """A tiny DDPMPipeline outside any run directory."""
    return tiny_pipelines.unconditional(tmp_path_factory.mktemp("uncond") / "pipeline")


@pytest.fixture
def blocker(tmp_path) -> Path:
    """A regular file: no folder can be made under it."""
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


def one_error_line(capsys, job: str, *fragments: str) -> str:
    """Exactly one line on stderr, the CLI's error line, holding every fragment."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"ddpm {job}: error: cannot write "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the SHA-256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@contextmanager
def immutable(folder: Path):
    """`folder` with the immutable attribute (even root cannot add a file to it), or a skip where chattr fails."""
    if shutil.which("chattr") is None:
        pytest.skip("no chattr here")
    r = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"chattr +i does not work here: {r.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


# The helper itself.


def test_writable_dir_creates_the_folder_and_leaves_nothing_else(tmp_path):
    assert writable_dir(tmp_path / "a" / "b", "the run directory") == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir() and not any((tmp_path / "a" / "b").iterdir())


def test_writable_dir_names_what_the_path_is_and_why(blocker):
    with pytest.raises(UserError) as e:
        writable_dir(blocker, "the run directory")
    assert str(e.value) == f"cannot write the run directory {blocker}: {NOT_A_DIRECTORY}"
    with pytest.raises(UserError, match=f"cannot write the run directory {blocker / 'x'}: {NOT_A_DIRECTORY}"):
        writable_dir(blocker / "x", "the run directory")
    assert blocker.read_text() == "not a folder"


def test_writable_file_refuses_a_folder(tmp_path):
    with pytest.raises(UserError, match=f"cannot write the report {tmp_path}: {os.strerror(errno.EISDIR)}"):
        writable_file(tmp_path, "the report")


def test_writing_names_the_place_of_the_file_that_failed(tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    places = (("the run directory", run), ("the data cache directory", cache))
    with pytest.raises(UserError) as e, writing(*places):
        raise OSError(errno.ENOSPC, NO_SPACE, str(cache / "part-0.npy"))
    assert str(e.value) == f"cannot write the data cache directory {cache} ({cache / 'part-0.npy'}): {NO_SPACE}"
    with pytest.raises(UserError, match=f"cannot write the run directory {run}: {NO_SPACE}"), writing(*places):
        raise OSError(errno.ENOSPC, NO_SPACE)  # a write that fails at flush names no file
    # A dataset that cannot be read is not a write error: it passes unchanged.
    with pytest.raises(PermissionError), writing(*places):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "data" / "0.png"))


# One job each.


def test_train_run_directory_under_a_file(tiny, blocker, capsys):
    assert main(["train", *tiny(f"runs_dir={blocker}")]) == 2
    one_error_line(capsys, "train", f"the run directory {blocker / 'tiny'}", NOT_A_DIRECTORY)
    assert blocker.read_text() == "not a folder"


def test_train_data_cache_under_a_file(tiny, tmp_path, blocker, capsys):
    assert main(["train", *tiny(f"data.cache_dir={blocker / 'cache'}")]) == 2
    one_error_line(capsys, "train", f"the data cache directory {blocker / 'cache'}", NOT_A_DIRECTORY)
    assert not list((tmp_path / "runs").rglob("checkpoints"))


def test_train_existing_run_that_cannot_be_written_is_left_intact(tiny_run, tiny, tmp_path, capsys):
    run = copy_of_tiny_run(tiny_run, tmp_path)
    before = snapshot(run)
    with immutable(run):
        assert main(["train", *tiny("train.max_steps=9")]) == 2
    one_error_line(capsys, "train", f"the run directory {run}", os.strerror(errno.EPERM))
    assert snapshot(run) == before


def test_train_permission_denied(tiny, tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    real_mkdir = os.mkdir

    def refused(path, *args, **kwargs):
        if Path(path) == runs / "tiny":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refused)
    assert main(["train", *tiny()]) == 2
    one_error_line(capsys, "train", f"the run directory {runs / 'tiny'}", os.strerror(errno.EACCES))


def test_train_disk_full_mid_run_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    """After the up-front check: the first file the run writes finds the disk full."""
    real_write_text = Path.write_text

    def full(self, *args, **kwargs):
        if self.name == "config.yaml":
            raise OSError(errno.ENOSPC, NO_SPACE)
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    assert main(["train", *tiny()]) == 2
    one_error_line(capsys, "train", f"the run directory {tmp_path / 'runs' / 'tiny'}", NO_SPACE)


@pytest.mark.parametrize("fmt", ["cache", "webdataset"])
def test_prepare_output_under_a_file(fmt, blocker, capsys):
    target = blocker / "out"
    args = ["--format", "webdataset", "--out", str(target)] if fmt == "webdataset" else [f"data.cache_dir={target}"]
    assert main(["prepare", *args]) == 2
    what = "the shard folder" if fmt == "webdataset" else "the data cache directory"
    one_error_line(capsys, "prepare", f"{what} {target}", NOT_A_DIRECTORY)


def test_sample_folder_under_a_file(pipeline, blocker, capsys):
    out = blocker / "samples"
    assert main(["sample", "--pipeline", str(pipeline), "--steps", "1", "--num-images", "2", "--out", str(out)]) == 2
    one_error_line(capsys, "sample", f"the sample folder {out}", NOT_A_DIRECTORY)


def test_sample_existing_folder_that_cannot_be_written_is_left_intact(pipeline, tmp_path, capsys):
    out = tmp_path / "samples"
    (out / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(out / "images" / "seed-000000.png")
    (out / "settings.json").write_text("{}")
    before = snapshot(out)
    with immutable(out):
        assert (
            main(["sample", "--pipeline", str(pipeline), "--steps", "1", "--num-images", "2", "--out", str(out)]) == 2
        )
    one_error_line(capsys, "sample", f"the sample folder {out}", os.strerror(errno.EPERM))
    assert snapshot(out) == before


def test_sample_disk_full_while_writing_images(pipeline, tmp_path, capsys, monkeypatch):
    def full(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, NO_SPACE)

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "samples"
    assert main(["sample", "--pipeline", str(pipeline), "--steps", "1", "--num-images", "2", "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # the sampling progress bar comes first
    assert lines[-1] == f"ddpm sample: error: cannot write the sample folder {out}: {NO_SPACE}"
    assert sum("error" in line for line in lines) == 1 and "Traceback" not in "".join(lines)


def test_sweep_directory_under_a_file(pipeline, tmp_path, blocker, capsys):
    config = tmp_path / "s.yaml"
    spec = {"name": "s", "models": [{"pipeline": str(pipeline)}], "metric": "none", "out_dir": str(blocker)}
    config.write_text(yaml.safe_dump({**spec, "steps": [1], "num_images": 2, "device": "cpu"}))
    assert main(["sweep", "--config", str(config)]) == 2
    one_error_line(capsys, "sweep", f"the sweep directory {blocker / 's'}", NOT_A_DIRECTORY)


def test_evaluate_output_under_a_file(pipeline, blocker, capsys):
    out = blocker / "e.json"
    args = ["--pipeline", str(pipeline), "--reference", "digits", "--metric", "digitsnet", "--no-wandb"]
    assert main(["evaluate", *args, "--out", str(out)]) == 2
    one_error_line(capsys, "evaluate", f"the evaluation output {out}", NOT_A_DIRECTORY)


def test_evaluate_output_that_is_a_folder(pipeline, tmp_path, capsys):
    out = tmp_path / "e.json"
    out.mkdir()
    args = ["--pipeline", str(pipeline), "--reference", "digits", "--metric", "digitsnet", "--no-wandb"]
    assert main(["evaluate", *args, "--out", str(out)]) == 2
    one_error_line(capsys, "evaluate", f"the evaluation output {out}", os.strerror(errno.EISDIR))


def test_compare_report_under_a_file(tiny_run, blocker, capsys):
    out = blocker / "r.html"
    assert main(["compare", str(tiny_run), "--out", str(out)]) == 2
    one_error_line(capsys, "compare", f"the report {out}", NOT_A_DIRECTORY)


def test_compare_disk_full_keeps_the_earlier_report(tiny_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.html"
    out.write_text("<html>the earlier report</html>")
    real_write_text = Path.write_text

    def full(self, *args, **kwargs):
        if self.parent == tmp_path:
            raise OSError(errno.ENOSPC, NO_SPACE)
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    assert main(["compare", str(tiny_run), "--out", str(out)]) == 2
    one_error_line(capsys, "compare", f"the report {out}", NO_SPACE)
    assert out.read_text() == "<html>the earlier report</html>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]  # no temporary file left beside it


def test_generate_output_under_a_file(pipeline, blocker, capsys):
    out = blocker / "g"
    assert main(["generate", "--model", str(pipeline), "--steps", "1", "--num-images", "1", "--out", str(out)]) == 2
    one_error_line(capsys, "generate", f"the output folder {out}", NOT_A_DIRECTORY)

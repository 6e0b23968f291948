"""The `ddpm` command as a user meets it: a mistake is one line on stderr and exit status 2, and nothing is written."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.conftest import cli, run_cli


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in errors[0]


def test_dry_run_prints_the_resolved_config_and_writes_nothing(tiny, tmp_path):
    proc = cli("train", "--dry-run", *tiny("train.batch_size=4"))
    assert proc.returncode == 0, proc.stderr
    assert "batch_size: 4" in proc.stdout and f"run directory: {tmp_path / 'runs' / 'tiny'}" in proc.stdout
    assert not (tmp_path / "runs").exists()


def test_unknown_key(tiny):
    assert_one_line_error(cli("train", *tiny("train.bach_size=4")), "unknown key 'train.bach_size'", "valid keys")


def test_missing_config_file(tmp_path):
    assert_one_line_error(cli("train", "--config", str(tmp_path / "nope.yaml")), "nope.yaml")


@pytest.mark.parametrize(
    "make_folder, fragment",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: p.joinpath("empty").mkdir() or p / "empty", "has no image files"),
    ],
    ids=["missing-folder", "empty-folder"],
)
def test_bad_dataset_folder(tiny, tmp_path, make_folder, fragment):
    folder = make_folder(tmp_path)
    proc = cli("train", *tiny("data.source=folder", f"data.path={folder}", f"data.cache_dir={tmp_path / 'cache'}"))
    assert_one_line_error(proc, str(folder), fragment)
    assert not list((tmp_path / "runs").glob("*/checkpoints"))


def test_corrupt_image_is_named_or_skipped(tiny, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(20):
        Image.new("RGB", (8, 8), (i * 10, 0, 0)).save(folder / f"{i:02d}.png")
    (folder / "broken.png").write_bytes(b"not an image at all")
    common = tiny(
        "data.source=folder",
        f"data.path={folder}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.batch_size=4",
        "train.max_steps=2",
        "train.checkpoint_every=2",
    )
    assert_one_line_error(cli("train", *common), str(folder / "broken.png"), "on_bad_image=skip")
    proc = cli("train", *common, "data.on_bad_image=skip")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped 1 bad images" in proc.stderr


def test_missing_hub_dataset_offline(tiny, tmp_path):
    # a child process: huggingface_hub and datasets read HF_HUB_OFFLINE and HF_HOME when they are imported
    proc = run_cli(
        "train",
        *tiny("data.source=hf", "data.path=nobody/no-such-dataset", f"data.cache_dir={tmp_path / 'cache'}"),
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert_one_line_error(proc, "nobody/no-such-dataset")

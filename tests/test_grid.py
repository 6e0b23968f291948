"""Training grids: multi-valued overrides expand into named points; bad grids fail in one line before any job."""

from __future__ import annotations

import pytest

from ddpm.errors import ConfigError
from jobs.grid import expand, split_values
from tests.conftest import cli


def test_commas_inside_brackets_belong_to_one_value():
    assert split_values("1e-4,4e-4") == ["1e-4", "4e-4"]
    assert split_values("[16,32],[32,64]") == ["[16,32]", "[32,64]"]
    assert expand(["model.block_out_channels=[16,32]", "train.batch_size=32"]) is None  # one run, not a grid


def test_points_are_the_product_of_the_axes_named_by_their_values():
    points = expand(["data.resolution=8", "optim.lr=1e-4,4e-4", "model.block_out_channels=[16,32],[32,64]"])
    assert [p.suffix for p in points] == [
        "lr-1e-4_block_out_channels-16-32",
        "lr-1e-4_block_out_channels-32-64",
        "lr-4e-4_block_out_channels-16-32",
        "lr-4e-4_block_out_channels-32-64",
    ]
    assert points[1].overrides == ["data.resolution=8", "optim.lr=1e-4", "model.block_out_channels=[32,64]"]


def test_two_axes_with_the_same_last_name_are_told_apart_by_their_full_keys():
    points = expand(["optim.lr=1,2", "other.lr=3,4"])
    assert points[0].suffix == "optim-lr-1_other-lr-3"


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=1e-4,", "grid axis 'optim.lr=1e-4,': an empty value"),
        ("optim.lr=1e-4,1e-4", "grid axis 'optim.lr=1e-4,1e-4': a value is repeated"),
    ],
)
def test_bad_axes_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        expand([override])


def test_dry_run_lists_every_run_of_the_grid_and_a_bad_value_fails_in_one_line(tmp_path):
    args = ["submit", "train", "--cluster", "local", "--dry-run", f"runs_dir={tmp_path}", "name=g"]
    r = cli(*args, "optim.lr=1e-4,4e-4", "train.batch_size=16,32")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"g_lr-{lr}_batch_size-{b}: runs_dir={tmp_path} name=g optim.lr={lr} train.batch_size={b}"
        for lr in ("1e-4", "4e-4")
        for b in (16, 32)
    ]
    assert not list(tmp_path.iterdir())  # nothing submitted, nothing written
    r = cli(*args, "optim.lr=1e-4,fast")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["ddpm submit train: error: optim.lr: expected a number, got 'fast'"]

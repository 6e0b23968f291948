"""Cluster profiles: the sbatch script each profile produces for each job kind, and bad profiles refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
from submitit.slurm.slurm import _make_sbatch_string

from ddpm.errors import ConfigError
from slurm.profile import check_shared, load_profile, python_command, sbatch_parameters


def sbatch(profile, kind: str, nodes: int | None = None) -> list[str]:
    params = sbatch_parameters(profile, kind, nodes)
    return _make_sbatch_string(command="python -m x", folder="/shared/logs/%j", **params).splitlines()


def test_local_profile_trains_on_two_cpu_nodes_one_task_each():
    lines = sbatch(load_profile("local"), "train")
    for flag in (
        "--nodes=2",
        "--ntasks-per-node=1",
        "--cpus-per-task=1",
        "--partition=debug",
        "--time=30",
        "--signal=USR2@60",
    ):
        assert f"#SBATCH {flag}" in lines
    assert not any("gpus" in line for line in lines)
    assert "export SUBMITIT_PREEMPT_SIGNAL=USR2" in lines and "export OMP_NUM_THREADS=1" in lines


def test_gpu_profile_runs_one_task_per_gpu_and_keeps_the_big_options_off_cpu_jobs():
    profile = load_profile("example-gpu")
    train = sbatch(profile, "train", nodes=2)
    for flag in (
        "--nodes=2",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--cpus-per-task=12",
        "--mem=480GB",
        "--account=my-project",
        "--qos=normal",
        "--constraint=h100",
        "--exclusive",
        "--time=1440",
        "--signal=USR2@300",
    ):
        assert f"#SBATCH {flag}" in train, flag
    sweep = sbatch(profile, "sweep")
    assert (
        "#SBATCH --gpus-per-node=1" in sweep
        and "#SBATCH --ntasks-per-node=1" in sweep
        and "#SBATCH --cpus-per-task=8" in sweep
    )
    cpu = sbatch(profile, "cpu")
    assert "#SBATCH --partition=cpu" in cpu and "#SBATCH --cpus-per-task=4" in cpu and "#SBATCH --mem=16GB" in cpu
    prepare = sbatch(profile, "prepare")
    assert "#SBATCH --partition=cpu" in prepare and "#SBATCH --cpus-per-task=32" in prepare
    for script in (cpu, prepare):
        assert "#SBATCH --nodes=1" in script
        assert not any(word in script for word in ("gpus", "exclusive", "constraint")), script
    python = python_command(profile, Path("/repo/.venv/bin/python"), [Path("/runs/.code/abc")])
    assert (
        python == "apptainer exec --nv --bind /shared/datasets --bind /shared/cache/ddpm:/cache --bind /runs/.code/abc "
        "/shared/images/ddpm.sif python"
    )
    assert python_command(load_profile("local"), Path("/repo/.venv/bin/python"), []) == "/repo/.venv/bin/python"
    # with the code snapshot: the container runs under the wrapper that requeues from the host side
    wrapped = python_command(profile, Path("/repo/.venv/bin/python"), [], Path("/runs/.code/abc"))
    assert wrapped.startswith("sh /runs/.code/abc/slurm/container_task.sh apptainer exec --nv ")


def test_the_profile_signal_replaces_submitits_usr2(tmp_path):
    path = tmp_path / "usr1.yaml"
    path.write_text(
        "partition: p\nsignal: USR1\nsignal_lead_s: 200\ntime_min: 60\nsbatch_extra: ['--reservation=big']\n"
    )
    lines = sbatch(load_profile(str(path)), "train")
    assert "#SBATCH --signal=USR1@200" in lines and not any("USR2" in line for line in lines)
    assert "export SUBMITIT_PREEMPT_SIGNAL=USR1" in lines and "#SBATCH --reservation=big" in lines


@pytest.mark.parametrize(
    "text, message",
    [
        ("partition: p\nnodez: 2\n", "unknown key 'nodez'"),
        ("nodes: 2\n", "partition is required"),
        ("partition: p\nsignal: KILL\n", "signal: 'KILL' is not one of"),
        (
            "partition: p\ntime_min: 1\nsignal_lead_s: 90\n",
            "signal_lead_s (90) must be shorter than the time limit (1 min)",
        ),
        ("partition: p\ncontainer: {image: x.sif, bindz: []}\n", "unknown key 'container.bindz'"),
        ("partition: p\nsbatch_extra: [exclusive]\n", "'exclusive' is not an sbatch option"),
    ],
)
def test_bad_profiles_are_refused_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        sbatch_parameters(load_profile(str(path)), "train")
    assert message in str(e.value)


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ConfigError, match="cluster profile 'nope' not found .*example-gpu, local"):
        load_profile("nope")


def test_logs_on_a_node_local_disk_are_refused_unless_the_profile_allows_it(tmp_path):
    gpu = load_profile("example-gpu")
    with pytest.raises(ConfigError, match="the SLURM log folder /tmp/x/slurm is on a node-local disk"):
        check_shared(gpu, **{"the SLURM log folder": Path("/tmp/x/slurm")})
    check_shared(gpu, **{"the run directory": Path("/shared/runs/x")})
    check_shared(load_profile("local"), **{"the run directory": Path("/tmp/x")})


def test_nightly_file_becomes_a_dated_sweep_over_the_newest_checkpoints(tmp_path):
    import datetime

    from jobs.nightly import sweep_config

    (tmp_path / "nightly.yaml").write_text(
        "runs: [runs/a, /abs/b]\nnewest: 3\nsweep: {schedulers: [ddim], steps: [10], metric: digitsnet}\n"
    )
    cfg = sweep_config(tmp_path / "nightly.yaml", today=datetime.date(2026, 11, 25))
    assert cfg.name == "nightly-2026-11-25" and cfg.schedulers == ("ddim",) and cfg.metric == "digitsnet"
    assert [(m.run, m.newest) for m in cfg.models] == [(str(tmp_path / "runs" / "a"), 3), ("/abs/b", 3)]
    (tmp_path / "bad.yaml").write_text("runs: [a]\nsweep: {name: x}\n")
    with pytest.raises(ConfigError, match="sweep.name is set by the nightly job"):
        sweep_config(tmp_path / "bad.yaml")


def test_nightly_install_without_scrontab_prints_the_crontab_line(tmp_path):
    import sys

    from tests.conftest import cli

    (tmp_path / "nightly.yaml").write_text("runs: [runs/a]\nschedule: '30 3 * * *'\n")
    r = cli(
        "nightly",
        "install",
        "--cluster",
        "local",
        "--runs",
        str(tmp_path / "nightly.yaml"),
        env={"PATH": str(Path(sys.executable).parent)},  # no scrontab on this PATH
    )
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("30 3 * * * cd ") and ".venv/bin/ddpm nightly submit --cluster local --runs" in line


def test_code_snapshot_takes_uncommitted_and_new_files_and_leaves_the_checkout_alone(tmp_path, monkeypatch):
    import subprocess

    from slurm import launch

    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    (repo / ".gitignore").write_text("runs/\n")
    (repo / "a.py").write_text("A = 1\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    (repo / "a.py").write_text("A = 2\n")  # modified, not staged
    (repo / "b.py").write_text("B = 1\n")  # new, not added
    (repo / "runs").mkdir()
    (repo / "runs" / "big.bin").write_text("ignored")
    before = git("status", "--porcelain")
    monkeypatch.setattr(launch, "REPO", repo)
    snap, described = launch.code_snapshot(tmp_path / "code")
    assert (
        (snap / "a.py").read_text() == "A = 2\n"
        and (snap / "b.py").read_text() == "B = 1\n"
        and not (snap / "runs").exists()
    )
    assert described.startswith(git("rev-parse", "HEAD").strip() + "+dirty:")
    assert git("status", "--porcelain") == before, "the checkout and its index are untouched"
    assert launch.code_snapshot(tmp_path / "code")[0] == snap  # the same code, the same snapshot


def test_a_failed_or_killed_training_task_ends_the_whole_step(tmp_path):
    srun = [line for line in sbatch(load_profile("local"), "train") if line.startswith("srun")]
    assert len(srun) == 1 and "--kill-on-bad-exit=1" in srun[0].split()
    profile = tmp_path / "p.yaml"
    profile.write_text("partition: gpu\nkill_on_bad_exit: false\n")
    srun = [line for line in sbatch(load_profile(str(profile)), "train") if line.startswith("srun")]
    assert "--kill-on-bad-exit=1" not in srun[0]
    assert not any("kill-on-bad-exit" in line for line in sbatch(load_profile("local"), "sweep"))

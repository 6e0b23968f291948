"""Every `ddpm` command in the README's and the docs' code blocks parses and builds its config, as printed.

Placeholders are filled in the way a reader would: `[--flag VALUE]` is taken as given, `<name>` and `...`
(an elided part) are dropped, and an elided sweep config is the shipped example. Nothing runs: the test is
that a flag or key renamed in the code cannot leave a command in the docs that fails on the first try.
"""

from __future__ import annotations

import argparse
import re
import shlex

import pytest

from jobs.cli import _parser, build
from jobs.grid import expand
from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def joined_lines(lines: list[str]):
    """(number of its first line, the line) for each line with the shell's backslash continuations joined."""
    pending, start = "", 0
    for n, line in enumerate(lines, 1):
        if pending:
            line, pending = pending + " " + line.strip(), ""
        else:
            start = n
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1]
            continue
        yield start, line


def code_block_lines(text: str) -> list[str]:
    """The lines inside fenced code blocks; every other line (the fences too) blank, so the numbers stay the file's."""
    out, in_block = [], False
    for line in text.splitlines():
        fence = line.startswith("```")
        in_block ^= fence
        out.append(line if in_block and not fence else "")
    return out


def doc_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `ddpm`) for each ddpm command line in a fenced code block."""
    found = []
    for path in DOCS:
        for start, line in joined_lines(code_block_lines(path.read_text())):
            m = re.match(r"^(?:\.venv/bin/)?ddpm (.*)$", line.strip())
            if not m:
                continue
            text = re.sub(r"\s+#.*$", "", m.group(1))  # a trailing comment
            text = text.replace("sweep --config ...", "sweep --config configs/sweeps/digits.yaml")  # the example
            text = re.sub(r"\[([^\]]*)\]", r"\1", text) if "[--" in text else text  # [--private] -> --private
            argv = [a for a in shlex.split(text) if a != "..." and not re.fullmatch(r"<[^>]+>", a)]
            found.append((f"{path.name}:{start}", argv))
    return found


COMMANDS = doc_commands()


def test_the_docs_have_commands_to_check():
    assert len(COMMANDS) >= 15, COMMANDS


@pytest.mark.parametrize("argv", [c[1] for c in COMMANDS], ids=[c[0] for c in COMMANDS])
def test_a_documented_command_parses_and_builds_its_config(argv, monkeypatch):
    monkeypatch.chdir(ROOT)  # the docs' paths are relative to the checkout
    args = _parser().parse_args(argv)
    points = expand(args.overrides) if args.command == "submit" and args.kind == "train" else None
    for overrides in [p.overrides for p in points] if points else [args.overrides]:  # a training grid: each point
        build(
            args.kind if args.command == "submit" else args.command,
            argparse.Namespace(**{**vars(args), "overrides": overrides}),
        )


def docker_runs_with_gpus() -> list[tuple[str, str]]:
    """(where, the whole command) for each `docker run` line with `--gpus` in the README's and the docs' code blocks
    and in the Dockerfile's usage comment, continuation lines joined."""
    found = []
    for path in [*DOCS, ROOT / "containers" / "Dockerfile"]:
        lines = path.read_text().splitlines()
        if path.name == "Dockerfile":
            lines = [line.removeprefix("#") for line in lines]
        for start, line in joined_lines(lines):
            if re.search(r"\bdocker run\b", line) and "--gpus" in line:
                found.append((f"{path.name}:{start}", line.strip()))
    return found


DOCKER_RUNS = docker_runs_with_gpus()


def test_the_docs_have_docker_runs_with_gpus():
    assert {where.split(":")[0] for where, _ in DOCKER_RUNS} >= {"README.md", "Dockerfile"}, DOCKER_RUNS


@pytest.mark.parametrize("command", [c[1] for c in DOCKER_RUNS], ids=[c[0] for c in DOCKER_RUNS])
def test_every_docker_run_with_gpus_gives_nccl_its_shared_memory(command):
    """Several GPUs are several processes talking through NCCL's buffers in /dev/shm: Docker's 64 MB are too few."""
    assert re.search(r"--shm-size=\d+[gG]\b|--ipc=host", command), command

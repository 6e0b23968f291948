"""The shape of the code: layers that point one way, every job built the same way, every config key documented."""

from __future__ import annotations

import ast
import dataclasses
import importlib

import pytest

from ddpm.typed_config import describe_keys, field_comments
from jobs.cli import JOBS, main
from tests.conftest import ROOT

PACKAGES = ("ddpm", "jobs", "slurm", "bench")


def layer(module: str) -> int:
    """ddpm (the library) < bench, jobs.<job> < slurm < jobs.cli (the `ddpm` command): imports only point down."""
    if module == "jobs.cli":
        return 3
    return {"ddpm": 0, "jobs": 1, "bench": 1, "slurm": 2}[module.split(".")[0]]


def project_imports() -> dict[str, set[str]]:
    """{module: the project modules it imports}, read from the source (imports inside functions too)."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found = set()
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                found |= {n for n in names if n.split(".")[0] in PACKAGES and _is_module(n)}
            graph[module] = found - {module}
    return graph


def _is_module(name: str) -> bool:
    parts = name.split(".")
    return (ROOT.joinpath(*parts).with_suffix(".py")).is_file() or (ROOT.joinpath(*parts) / "__init__.py").is_file()


def test_imports_point_one_way():
    wrong = [
        f"{m} imports {n}"
        for m, deps in project_imports().items()
        for n in deps
        if layer(n) > layer(m) or (m.startswith("bench") and n.startswith("jobs"))
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = project_imports()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(n) :], n]) if n in path else n)
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_module_is_long_without_saying_why():
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            lines = path.read_text().splitlines()
            if len(lines) > 330:
                head = "\n".join(lines[:15]).lower()
                assert "long because" in head, (
                    f"{path.relative_to(ROOT)} has {len(lines)} lines and no reason at its top"
                )


@pytest.mark.parametrize("job", JOBS)
def test_every_job_is_a_typed_config_and_a_run(job):
    module = importlib.import_module(f"jobs.{job}")
    assert dataclasses.is_dataclass(module.CONFIG) and callable(module.run)
    module.CONFIG()  # every field has a default


@pytest.mark.parametrize("job", JOBS)
def test_every_config_key_has_a_comment(job):
    config = importlib.import_module(f"jobs.{job}").CONFIG
    missing = [key for key, _, comment in describe_keys(config) if not comment]
    assert not missing, f"{config.__name__}: keys without a comment: {', '.join(missing)}"


@pytest.mark.parametrize("job", JOBS)
def test_help_lists_every_key_with_its_default_and_comment(job, capsys):
    with pytest.raises(SystemExit) as e:
        main([job, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out.split("keys (key=value), defaults, meaning:")[1]
    for key, default, comment in describe_keys(importlib.import_module(f"jobs.{job}").CONFIG):
        line = next((ln for ln in text.splitlines() if ln.split()[:1] == [key]), None)
        assert line is not None, f"ddpm {job} --help does not list {key}"
        assert default in line and comment[:40] in line


def test_comments_are_read_from_the_source():
    @dataclasses.dataclass
    class Example:
        steps: int = 25  # sampler steps
        out: str = ""  # output directory;
        # continued on the next line
        plain: bool = False

    assert field_comments(Example) == {"steps": "sampler steps", "out": "output directory; continued on the next line"}


def test_flags_and_overrides_build_the_same_config(tmp_path):
    from jobs import sample
    from jobs.cli import _parser, build

    by_flags = build("sample", _parser().parse_args(["sample", "--pipeline", "p", "--steps", "7", "--num-images", "3"]))
    by_keys = build("sample", _parser().parse_args(["sample", "pipeline=p", "steps=7", "num_images=3"]))
    assert by_flags == by_keys == sample.SampleConfig(pipeline="p", steps=7, num_images=3)


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "--pipeline", "p", "--steps", "many"], "steps: expected an integer, got 'many'"),
        (["sample", "--pipeline", "p", "stepz=3"], "unknown key 'stepz'"),
        (["evaluate", "--pipeline", "p", "--num-images", "1"], "--num-images: FID/KID need at least 2 images"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err

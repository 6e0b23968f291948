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


# The packages, bottom to top: the library knows nothing of clusters or jobs; the cluster layer runs whatever picklable
# callable it is handed; the jobs decide what to run and where. bench/ sits beside, on the library (and jobs, if it
# must), and nothing imports it.
PACKAGE_LAYER = {"ddpm": 0, "slurm": 1, "jobs": 2, "bench": 3}
# Inside ddpm: the top-level modules every layer uses, then its folders, bottom to top; folders on one level do not
# import each other.
DDPM_LAYERS = ((None,), ("data",), ("models",), ("sampling",), ("evaluation",), ("training", "publishing"))


def ddpm_folder(module: str) -> str | None:
    parts = module.split(".")  # ddpm.config -> None (top level); ddpm.data, ddpm.data.cache -> "data"
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (ROOT / "ddpm" / parts[1]).is_dir()) else None


def ddpm_layer(module: str) -> int:
    return next(i for i, level in enumerate(DDPM_LAYERS) if ddpm_folder(module) in level)


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


def test_packages_point_one_way():
    """ddpm <- slurm <- jobs, bench beside (on ddpm and jobs, never slurm): no import points up or sideways."""
    graph = project_imports()
    wrong = []
    for m, deps in graph.items():
        for n in deps:
            mine, theirs = m.split(".")[0], n.split(".")[0]
            if mine == "bench":
                bad = theirs == "slurm"
            else:
                bad = PACKAGE_LAYER[theirs] > PACKAGE_LAYER[mine]
            if bad:
                wrong.append(f"{m} imports {n}")
    assert not wrong, "\n".join(wrong)


def test_ddpm_folders_point_one_way():
    """Top-level modules <- data <- models <- sampling <- evaluation <- training, publishing: each folder imports only
    the ones below it (and its own modules)."""
    wrong = [
        f"{m} imports {n}"
        for m, deps in project_imports().items()
        if m.startswith("ddpm.")
        for n in deps
        if n.startswith("ddpm.") and ddpm_folder(n) != ddpm_folder(m) and ddpm_layer(n) >= ddpm_layer(m)
    ]
    assert not wrong, "\n".join(wrong)


def test_every_ddpm_folder_says_what_it_owns():
    for init in sorted((ROOT / "ddpm").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert 2 <= len(doc.splitlines()) <= 4, f"{init.relative_to(ROOT)}: a docstring of two or three lines"
        body = [n for n in ast.parse(init.read_text()).body if not isinstance(n, ast.Expr)]
        assert not body, f"{init.relative_to(ROOT)} re-exports or runs code; import from the modules instead"
    assert {p.parent.name for p in (ROOT / "ddpm").glob("*/__init__.py")} == {
        name for level in DDPM_LAYERS for name in level if name
    }


def test_the_sampler_names_of_the_config_are_the_samplers():
    from ddpm.config import SAMPLER_NAMES
    from ddpm.sampling.sample import SAMPLERS

    assert tuple(SAMPLERS) == SAMPLER_NAMES


def test_no_function_in_the_library_is_longer_than_the_training_loop_budget():
    """EDM's loop is about 190 lines; nothing in ddpm/ reads longer than 200."""
    long = []
    for path in sorted((ROOT / "ddpm").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 200:
                long.append(f"{path.relative_to(ROOT)}:{node.name} has {node.end_lineno - node.lineno + 1} lines")
    assert not long, "\n".join(long)


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

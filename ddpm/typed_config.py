"""Typed dataclass configs from YAML, dotted `key=value` overrides and command-line flags: one mechanism for every job.

Precedence: command line > YAML > the dataclass defaults. An unknown key, a wrong type or a value outside a
Literal's choices raises ConfigError naming the full dotted key, before any work starts.

The comment after each field is its documentation: `field_comments` reads it from the source, and
`add_arguments` turns a config class into argparse flags and a `--help` that lists every key with its
default and comment, so the command line never holds a second copy of a field, a default or a help text.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ddpm.errors import ConfigError

# --------------------------------------------------------------------------------------
# YAML + overrides -> nested dict -> typed dataclass.


def read_tree(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), values: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The nested dict of an optional YAML file, then dotted `key=value` overrides (values read as YAML), then
    `values` (dotted key -> value already typed, from command-line flags)."""
    tree: dict[str, Any] = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.batch_size=32)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set(tree, key, value, item)
    for key, value in (values or {}).items():
        _set(tree, key, value, key)
    return tree


def _set(tree: dict[str, Any], key: str, value: Any, shown: str) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {shown!r}: {part} is a value, not a section")
    node[parts[-1]] = value


def build_config(cls: type, tree: dict[str, Any], prefix: str = "") -> Any:
    """A config dataclass of any kind (training, sweep, job, cluster profile) from a nested dict, strictly."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in tree:
        if key not in fields:
            raise ConfigError(f"unknown key '{prefix}{key}'; valid keys: {', '.join(fields)}")
    kwargs = {}
    for name, value in tree.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                first = dataclasses.fields(kind)[0].name
                raise ConfigError(f"{prefix}{name} is a section; give its keys, e.g. {prefix}{name}.{first}=...")
            kwargs[name] = build_config(kind, value, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, kind, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, kind: Any, key: str) -> Any:
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):  # an item of a list of sections
        if not isinstance(value, dict):
            names = ", ".join(f.name for f in dataclasses.fields(kind))
            raise ConfigError(f"{key}: expected a mapping with keys {names}, got {value!r}")
        return build_config(kind, value, prefix=f"{key}.")
    if origin is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(kind):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not fit {kind}")
    if origin in (tuple, list):
        args = typing.get_args(kind)
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("()[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            items = tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
            return list(items) if origin is list else items
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {kind}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict with lists for tuples: what YAML, JSON and W&B store."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------------------
# Documentation from the source: the comment after each field.


def field_comments(cls: type) -> dict[str, str]:
    """{field: its comment}: the comments inside the field's statement (after it, or inside the parentheses a
    formatter wraps a long one in), then the comment-only lines right below it, joined."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's comment wins over its base's
        if not dataclasses.is_dataclass(klass):
            continue
        src = textwrap.dedent(inspect.getsource(klass))
        lines = src.splitlines()
        comments = {
            tok.start[0]: tok.string.lstrip("#").strip()
            for tok in tokenize.generate_tokens(io.StringIO(src).readline)
            if tok.type == tokenize.COMMENT
        }
        names = {f.name for f in dataclasses.fields(klass)}
        body = ast.parse(src).body[0].body  # the class's statements
        for node in body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in names):
                continue
            text = [comments[i] for i in range(node.lineno, node.end_lineno + 1) if i in comments]
            j = node.end_lineno + 1
            while j <= len(lines) and lines[j - 1].strip().startswith("#"):
                text.append(comments[j])  # a comment-only line right below continues it
                j += 1
            if text:
                out[node.target.id] = " ".join(text)
    return out


def describe_keys(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default as YAML, comment) for every leaf of a config class, sections expanded."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    rows = []
    defaults = to_dict(cls())
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            rows += describe_keys(kind, f"{prefix}{f.name}.")
            continue
        default = yaml.safe_dump(defaults[f.name], default_flow_style=True, width=10_000).strip()
        default = default.removesuffix("\n...").removesuffix("...").strip()
        rows.append((f"{prefix}{f.name}", default, comments.get(f.name, "")))
    return rows


# --------------------------------------------------------------------------------------
# Command-line flags generated from the fields.


def _flag_kind(kind: Any) -> str | None:
    """The flag a field gets: "scalar", "bool", "strings" (a repeatable flag for a list of strings), or None
    (sections and lists of other things are set as key=value only)."""
    origin = typing.get_origin(kind)
    if kind is bool:
        return "bool"
    if kind in (str, int, float) or origin is Literal:
        return "scalar"
    if origin in (tuple, list):
        args = typing.get_args(kind)
        if args and args[0] is str and (origin is list or (len(args) == 2 and args[1] is Ellipsis)):
            return "strings"
    return None


def add_arguments(
    parser: argparse.ArgumentParser, cls: type, *, config_file: bool = True, positional: bool = True
) -> None:
    """Flags for the top-level fields of `cls` (`--num-images 8`, `--no-wandb`, a repeatable `--prompt` for
    `prompts`), `--config FILE` and positional `key=value` overrides for every key, sections included."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    defaults = cls()
    group = parser.add_argument_group(f"{cls.__name__} (each also as key=value)" if positional else cls.__name__)
    for f in dataclasses.fields(cls):
        kind = _flag_kind(hints[f.name])
        if kind is None:
            continue
        name = f.name.replace("_", "-")
        aliases = list(f.metadata.get("aliases", ()))
        comment = comments.get(f.name, "")
        default = getattr(defaults, f.name)
        if kind == "bool":
            flag = f"--{name}" if not default else f"--no-{name}"
            group.add_argument(
                flag, *aliases, dest=f.name, action="store_const", const=not default, default=None, help=comment
            )
        elif kind == "strings":
            singular = name[:-1] if name.endswith("s") else name
            group.add_argument(
                f"--{singular}",
                *aliases,
                dest=f.name,
                action="append",
                default=None,
                metavar="TEXT",
                help=f"{comment} (repeat for several)",
            )
        else:
            choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else None
            shown = f" (default: {default!r})" if default not in ("", None) else ""
            group.add_argument(
                f"--{name}",
                *aliases,
                dest=f.name,
                default=None,
                choices=choices,
                metavar=None if choices else f.name.upper(),
                help=f"{comment}{shown}",
            )
    if config_file:
        parser.add_argument("--config", dest="config_file", default="", metavar="FILE", help="YAML config file")
    if not positional:
        return
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides; every key is listed below")
    rows = describe_keys(cls)
    width = max(len(k) for k, _, _ in rows)
    listing = "\n".join(f"  {k:<{width}}  {d:<14}  {c}" for k, d, c in rows)
    parser.epilog = (
        f"{parser.epilog + chr(10) + chr(10) if parser.epilog else ''}keys (key=value), defaults, meaning:\n{listing}"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def flag_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The flags given on the command line (those left at None were not), as values for read_tree: numbers are
    read as YAML ("25" -> 25, and "x" stays a string that the int field then refuses, naming the key)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            out[f.name] = yaml.safe_load(value) if hints[f.name] in (int, float) else value
    return out


def load_job_config(
    cls: type,
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    values: dict[str, Any] | None = None,
) -> Any:
    """A job's config from YAML, overrides and flag values, checked by its `validate()` when it has one."""
    cfg = build_config(cls, read_tree(path, overrides, values))
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg

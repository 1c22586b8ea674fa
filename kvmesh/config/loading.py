"""Reading cluster.toml, KEY=VALUE overrides, and writing cluster.toml back as text with
every key's comment (see kvmesh.config)."""

from __future__ import annotations

import difflib
import re
import textwrap
import tomllib
from collections.abc import Sequence
from pathlib import Path

import msgspec
import msgspec.inspect as mi
from msgspec import Struct

from kvmesh.config.book import check
from kvmesh.config.schema import ClusterConfig, ConfigError, dotted, shown

HEADER = """\
# kvmesh cluster configuration: every key, with what it means.
# `python -m kvmesh.config` prints the default cluster: one machine, CPU, the bundled tiny
# model, listening on 127.0.0.1 only. Override any key as KEY=VALUE, for example
# router.policy=round_robin or nodes.0.actors.3.count=4.
"""


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ClusterConfig:
    """Read cluster.toml at `path` (None: the default cluster), apply KEY=VALUE overrides
    in order, check the whole; every mistake raises ConfigError."""
    where = f"{path}: " if path is not None else ""
    cfg = convert(read_toml(Path(path)) if path is not None else {}, where)
    for text in overrides:
        cfg = apply_override(cfg, text)
    check(cfg, where)
    return cfg


def parse_override(text: str) -> tuple[list[str], object]:
    """ "nodes.0.actors.1.count=3" -> (["nodes", "0", "actors", "1", "count"], 3). The
    value is a TOML scalar (integer, float, boolean, quoted string); any other text,
    such as round_robin or /data/model, is taken as a string."""
    key, sep, value = text.partition("=")
    path = key.strip().split(".")
    if not sep or not all(path):
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. router.policy=round_robin")
    value = value.strip()
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return path, value
    scalar = isinstance(parsed, (bool, int, float, str))
    return path, parsed if scalar else value  # dates, arrays and tables stay text


def apply_override(cfg: ClusterConfig, text: str) -> ClusterConfig:
    path, value = parse_override(text)
    node = thaw(msgspec.to_builtins(cfg))  # every key present, so absent means unknown
    tree = node
    for i, part in enumerate(path):
        here, key = dotted(path[:i]), dotted(path[: i + 1])
        if isinstance(node, dict):
            # a free-form table ([model.vllm]) takes any key; its owner checks them
            if part not in node and not free_form(path[:i]):
                raise unknown_key("override ", path[:i], part, list(node))
        elif isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                count = f"{len(node)} entr{'y' if len(node) == 1 else 'ies'}"
                raise ConfigError(
                    f"override {key}: no such entry; {here} has {count} (indices from 0)", key
                )
            part = int(part)
        else:
            raise ConfigError(f"override {dotted(path)}: {here} is a value, not a table", key)
        if i == len(path) - 1:
            node[part] = value
        node = node[part]
    return convert(tree, "override ")


def config_to_toml(cfg: ClusterConfig, comments: bool = True) -> str:
    """cfg as cluster.toml text that load_config reads back equal; with every key's
    comment (on the first entry of each array of tables) when `comments`."""
    lines = [HEADER.rstrip()] if comments else []
    render(lines, cfg, [], comments)
    return "\n".join(lines).lstrip("\n") + "\n"


# -- reading and converting ----------------------------------------------------------


def read_toml(path: Path) -> dict:
    try:
        text = path.read_bytes().decode()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message, _, at = str(exc).rpartition(" (at ")
        place = re.fullmatch(r"line (\d+), column (\d+)\)", at)
        if place:
            raise ConfigError(f"{path}:{place[1]}:{place[2]}: invalid TOML: {message}") from None
        last = text.count("\n") + 1  # "(at end of document)"
        raise ConfigError(f"{path}:{last}: invalid TOML: {exc}") from None


def convert(raw: dict, where: str) -> ClusterConfig:
    """raw as a ClusterConfig; msgspec finds the first mistake, this names it."""
    try:
        return msgspec.convert(raw, ClusterConfig)
    except msgspec.ValidationError as exc:
        message, _, at = str(exc).partition(" - at `")
        path = [int(i) if i else name for name, i in re.findall(r"\.(\w+)|\[(\d+)\]", at)]
        unknown = re.fullmatch(r"Object contains unknown field `(.*)`", message)
        if unknown:
            names = [f.name for f in type_at(path).fields]
            raise unknown_key(where, path, unknown[1], names) from None
        missing = re.fullmatch(r"Object missing required field `(.*)`", message)
        if missing:
            path.append(missing[1])
            raise ConfigError(
                f"{where}{dotted(path)}: missing; expected {describe(type_at(path))}", dotted(path)
            ) from None
        given = raw
        for part in path:
            given = given[part]
        raise ConfigError(
            f"{where}{dotted(path)}: expected {describe(type_at(path))}, got {shown(given)}",
            dotted(path),
        ) from None


def unknown_key(where: str, parent: list, name: str, names: list[str]) -> ConfigError:
    key = dotted([*parent, name])
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {dotted([*parent, close[0]])}?)" if close else ""
    return ConfigError(f"{where}{key}: unknown key{hint}; allowed: {', '.join(names)}", key)


def free_form(path: list[str]) -> bool:
    """Whether the table at an override's path takes any key (a dict, not a Struct)."""
    parts = [int(part) if part.isdigit() else part for part in path]
    return isinstance(type_at(parts), mi.DictType)


def type_at(path: list) -> mi.Type:
    info = mi.type_info(ClusterConfig)
    for part in path:
        info = bare(info)
        info = (
            info.item_type
            if isinstance(part, int)
            else next(f.type for f in info.fields if f.name == part)
        )
    return bare(info)


def bare(info: mi.Type) -> mi.Type:
    return info.type if isinstance(info, mi.Metadata) else info


def describe(info: mi.Type) -> str:
    """What a key allows, in words."""
    if isinstance(info, mi.LiteralType):
        return "one of " + ", ".join(shown(value) for value in info.values)
    if isinstance(info, mi.BoolType):
        return "true or false"
    if isinstance(info, mi.StrType):
        return "a non-empty string" if info.min_length else "a string"
    if isinstance(info, (mi.IntType, mi.FloatType)):
        noun = "an integer" if isinstance(info, mi.IntType) else "a number"
        if info.ge is not None and info.le is not None:
            return f"{noun} from {info.ge} to {info.le}"
        if info.ge is not None:
            return f"{noun} >= {info.ge}"
        return f"{noun} > {info.gt}" if info.gt is not None else noun
    if isinstance(info, mi.StructType):
        return "a table"
    assert isinstance(info, mi.VarTupleType), f"no description for {info}"
    return "an array of tables"


def thaw(value: object) -> object:
    """to_builtins output with lists for tuples, so an override can set an entry."""
    if isinstance(value, dict):
        return {key: thaw(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(item) for item in value]
    return value


# -- cluster.toml text ---------------------------------------------------------------


def render(lines: list[str], table: Struct, path: list[str], comments: bool) -> None:
    """Scalars first, then sub-tables, then arrays of tables: the order TOML needs."""
    fields = mi.type_info(type(table)).fields
    nested = []
    for f in fields:
        value = getattr(table, f.name)
        if isinstance(value, (Struct, tuple, dict)):
            nested.append((f, value))
            continue
        if comments:
            lines.extend(comment(f))
        lines.append(f"{f.name} = {shown(value)}")
    for f, value in nested:
        key = dotted([*path, f.name])
        if value == () and comments:  # an empty array of tables: its comment, none given
            lines.extend(["", *comment(f), f"# [[{key}]] (none)"])
        for i, item in enumerate(value if isinstance(value, tuple) else [value]):
            lines.append("")
            if comments and i == 0:
                lines.extend(comment(f))
            lines.append(f"[[{key}]]" if isinstance(value, tuple) else f"[{key}]")
            if isinstance(item, dict):
                lines.extend(f"{name} = {toml_value(v)}" for name, v in item.items())
            else:
                render(lines, item, [*path, f.name], comments and i == 0)


def toml_value(value: object) -> str:
    """A free-form table's value as TOML text (strings, numbers, booleans, arrays and
    inline tables of those)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return shown(value)


def comment(f: mi.Field) -> list[str]:
    text = f.type.extra_json_schema["description"]
    return textwrap.wrap(text, 90, initial_indent="# ", subsequent_indent="# ")

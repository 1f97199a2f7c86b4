"""Typed configs: dataclasses, TOML experiment files, dotted overrides, validation.

A run is described by one `JobConfig`, a tree of dataclasses that each component owns (the model family
owns its `Config`, the optimizer section its learning rate, ...). It is loaded in three layers:

    dataclass defaults  <  TOML file (configs/...)  <  dotted overrides (--optim.lr 3e-4)

and validated before any work starts: an unknown key, a value of the wrong type or a value out of range
raises `ConfigError` naming the dotted key and what was expected, e.g.

    config key 'optim.lr': expected a number > 0, got -0.1

Design choices
- Types come from the annotations (int, float, bool, str, Literal[...], X | None, list[X], tuple[X, ...],
  nested dataclasses). There is no `type=bool` trap: "false" on the command line is False. A list of
  strings may be given bare on the command line (`--reasoning.kinds add,mod`); other lists as TOML ([1, 2]).
- Ranges live next to the field: `lr: float = field_(3e-4, gt=0)`.
- Cross-field rules live in an optional `validate(self)` method on the dataclass; it raises
  `ConfigError` through `fail(key, message)` and the loader prefixes the section path.
- A section whose shape depends on another value (the model section: its fields depend on `family`)
  implements `from_config_dict(cls, data, path)` and `to_config_dict(self)`; everything else is generic.
- Ray Tune sweeps mutate the same dotted paths through `apply_overrides`.
- The resolved config is written back as TOML (`dumps_toml`) and loads to an equal object. TOML has
  no null, so a field whose value is None is left out; fields that may be None default to None.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import MISSING, field
from pathlib import Path
from typing import Any, Literal

from workbench.errors import ConfigError

__all__ = [
    "ConfigError", "field_", "fail", "from_dict", "to_dict", "load_toml", "parse_overrides",
    "apply_overrides", "load_config", "dumps_toml", "save_config", "CLIValue", "flatten",
]


# ----------------------------------------------------------------------------------------------------
# Field helpers


def field_(default: Any = MISSING, *, ge=None, gt=None, le=None, lt=None, doc: str = "", **kw) -> Any:
    """A dataclass field with an optional numeric range (inclusive ge/le, exclusive gt/lt) and a doc."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "doc": doc}
    if isinstance(default, (list, dict, set)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def fail(key: str, message: str) -> typing.NoReturn:
    """Raise a ConfigError for `key` (relative to the section being validated)."""
    raise ConfigError(f"config key '{key}': {message}")


class CLIValue(str):
    """A value typed on the command line: parsed according to the target field's type."""


def _prefix(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is bool:
        return "a boolean (true/false)"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join("none" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict or tp is dict:
        return "a table"
    if dataclasses.is_dataclass(tp):
        return f"a table [{tp.__name__}]"
    return getattr(tp, "__name__", str(tp))


def _fmt(value: Any) -> str:
    return repr(str(value)) if isinstance(value, CLIValue) else repr(value)


# ----------------------------------------------------------------------------------------------------
# Coercion: raw TOML / CLI values -> typed values


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    bad = lambda: fail(key, f"expected {_describe(tp)}, got {_fmt(value)}")  # noqa: E731

    if tp is Any:
        return value
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, CLIValue) and value.lower() in ("none", "null"))):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        bad()
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            probe = _coerce(value, type(choice), key) if isinstance(value, CLIValue) else value
            if probe == choice and type(probe) is type(choice):
                return choice
        bad()
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            bad()
        return from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, CLIValue):
            low = value.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            bad()
        if isinstance(value, bool):
            return value
        bad()
    if tp is int:
        if isinstance(value, CLIValue):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                bad()
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        bad()
    if tp is float:
        if isinstance(value, CLIValue):
            try:
                value = float(value)
            except ValueError:
                bad()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                fail(key, f"expected a finite number, got {value!r}")
            return float(value)
        bad()
    if tp is str:
        if isinstance(value, str):
            return str(value)
        bad()
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, CLIValue):
            words = typing.get_args(tp) in ((str,), (str, Ellipsis))
            # a list of strings may also be given bare: `--reasoning.kinds add,mod` or `[add, mod]`
            value = _parse_cli_literal(value, key) if not words or _is_toml(value) else _split_words(value)
        if not isinstance(value, (list, tuple)):
            bad()
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                fail(key, f"expected {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if isinstance(value, CLIValue):
            value = _parse_cli_literal(value, key)
        if not isinstance(value, dict):
            bad()
        return dict(value)
    raise TypeError(f"config field {key}: unsupported annotation {tp!r}")


def _is_toml(text: str) -> bool:
    try:
        tomllib.loads(f"v = {text}")
        return True
    except tomllib.TOMLDecodeError:
        return False


def _split_words(text: str) -> list[str]:
    """'a,b' or '[a, b]' -> ['a', 'b'] (an empty text or '[]' -> [])."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return [w.strip() for w in text.split(",") if w.strip()]


def _parse_cli_literal(text: str, key: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        fail(key, f"could not parse {text!r} as a TOML value (lists look like [1, 2])")


def _check_range(value: Any, meta: typing.Mapping, key: str) -> None:
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    ge, gt, le, lt = meta.get("ge"), meta.get("gt"), meta.get("le"), meta.get("lt")
    conds = []
    if ge is not None:
        conds.append((value >= ge, f">= {ge}"))
    if gt is not None:
        conds.append((value > gt, f"> {gt}"))
    if le is not None:
        conds.append((value <= le, f"<= {le}"))
    if lt is not None:
        conds.append((value < lt, f"< {lt}"))
    if not all(ok for ok, _ in conds):
        kind = "an integer" if isinstance(value, int) else "a number"
        fail(key, f"expected {kind} {' and '.join(text for _, text in conds)}, got {value!r}")


# ----------------------------------------------------------------------------------------------------
# Dataclass <-> dict


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, strictly: unknown keys and bad values raise ConfigError."""
    if hasattr(cls, "from_config_dict"):
        return cls.from_config_dict(data, path)
    if not isinstance(data, dict):
        fail(path or "<root>", f"expected a table, got {_fmt(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        fail(_prefix(path, unknown[0]), f"unknown key (known keys here: {known})")
    kwargs = {}
    for name, f in fields.items():
        key = _prefix(path, name)
        if name in data:
            value = _coerce(data[name], hints[name], key)
        elif f.default is not MISSING:
            value = f.default
        elif f.default_factory is not MISSING:
            value = f.default_factory()
        else:
            fail(key, f"required, expected {_describe(hints[name])}")
        _check_range(value, f.metadata, key)
        kwargs[name] = value
    obj = cls(**kwargs)
    _validate(obj, path)
    return obj


def _validate(obj: Any, path: str) -> None:
    validate = getattr(obj, "validate", None)
    if validate is None:
        return
    try:
        validate()
    except ConfigError as e:
        msg = str(e)
        if path and msg.startswith("config key '"):
            msg = f"config key '{path}." + msg[len("config key '"):]
        raise ConfigError(msg) from None


def to_dict(obj: Any) -> Any:
    """A plain (TOML-ready) dict of a config dataclass; None values are dropped (TOML has no null)."""
    if hasattr(obj, "to_config_dict"):
        return obj.to_config_dict()
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            value = to_dict(getattr(obj, f.name))
            if value is not None:
                out[f.name] = value
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items() if v is not None}
    return obj


# ----------------------------------------------------------------------------------------------------
# Files and overrides


def load_toml(path: str | Path) -> dict:
    """Read a TOML file; a missing file or a syntax error raises ConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p}: not found")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p}: invalid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p}: not UTF-8 text") from None


def parse_overrides(args: list[str]) -> dict[str, CLIValue]:
    """`["--optim.lr", "3e-4", "--train.steps=10", "model.flavor=debug"]` -> {dotted key: CLIValue}."""
    out: dict[str, CLIValue] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        body = arg[2:] if arg.startswith("--") else arg
        if "=" in body:
            key, value = body.split("=", 1)
            i += 1
        elif arg.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = body, args[i + 1]
            i += 2
        else:
            raise ConfigError(f"override {arg!r}: expected '--section.key value' or 'section.key=value'"
                              + (" (the value is missing)" if arg.startswith("--") else ""))
        if "." not in key or not all(key.split(".")):
            raise ConfigError(f"override {arg!r}: expected a dotted key such as optim.lr")
        out[key] = CLIValue(value)
    return out


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys in a nested dict (a copy); a path through a non-table is an error."""
    result = _deepcopy(raw)
    for dotted, value in overrides.items():
        node = result
        parts = dotted.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                fail(".".join(parts[: i + 1]), f"is a value, not a table, so '{dotted}' cannot be set")
            node = nxt
        node[parts[-1]] = value
    return result


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the dotted keys of a nested dict."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = _prefix(prefix, k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Any:
    """defaults < TOML file < overrides, validated. `overrides` is argv-style or a dotted-key dict."""
    raw = load_toml(path) if path is not None else {}
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    raw = apply_overrides(raw, overrides or {})
    return from_dict(cls, raw)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        escaped = v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        # other control characters are not allowed raw in a TOML string
        escaped = "".join(f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c for c in escaped)
        return f'"{escaped}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def dumps_toml(obj: Any) -> str:
    """TOML text of a config dataclass (or dict): scalars first, then one [section] per table."""
    data = to_dict(obj)
    lines: list[str] = []

    def emit(table: dict, prefix: str) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in table.items() if k not in scalars}
        if prefix and (scalars or not tables):
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        if scalars:
            lines.append("")
        for k, v in tables.items():
            emit(v, _prefix(prefix, _toml_key(k)))

    emit(data, "")
    return "\n".join(lines).rstrip() + "\n"


def save_config(obj: Any, path: str | Path) -> None:
    Path(path).write_text(dumps_toml(obj), encoding="utf-8")

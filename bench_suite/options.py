"""Typed options: a dataclass per method (or config section) and one coercion helper with clear errors.

    @dataclass
    class Options:
        niter: int = opt(25, minimum=1)
        init: str = opt("random", choices=("random", "kmeans++"))
        device: str = "auto"

    options = coerce(Options, {"niter": "30"}, where="kmeans")   # -> Options(niter=30, ...)

Rules: an unknown key is an error that lists the known ones; ints accept integral floats and numeric
strings, floats accept ints and numeric strings, bools accept true/false/yes/no/1/0; ``X | None`` accepts
None; ``tuple[int, ...]`` accepts a list, a tuple, one number, or "a,b,c"; ``minimum`` / ``maximum`` /
``choices`` / ``check`` (metadata set by ``opt``) are checked after the type. Nested settings work too
(profiles): a field typed as another dataclass takes a mapping, ``list[X]`` a list, ``dict[str, X]`` a
mapping, and an error names the dotted path of the key. Every error is one line:
``<where>: option <key> must be ..., got <value>``.

``parse_set`` is the one parser of ``--set key=value`` pairs for every CLI: each value is read as a YAML
scalar or list (``300``, ``0.07``, ``1e-3``, ``true``, ``null``, ``[0.08, 1.0]``), else kept as a string.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Callable

import numpy as np
import yaml

from bench_suite.errors import BadInputError


ROLES = ("setting", "protocol", "runtime")


def opt(default=dataclasses.MISSING, *, minimum=None, maximum=None, choices=None, check: Callable | None = None,
        doc: str = "", default_factory=dataclasses.MISSING, role: str = "setting", original=dataclasses.MISSING):
    """A dataclass field with its checks (``minimum``/``maximum`` inclusive, ``choices``, ``check(value) -> error
    or None``).

    ``role``: ``setting`` (part of the method: a value other than ``original``, which is the default unless
    given, is a departure the reports list, ``departures``), ``protocol`` (set by the table's protocol, e.g.
    the active-learning schedule) or ``runtime`` (how it runs, not what it computes: device, threads, blocks).
    """
    assert role in ROLES, role
    meta = {"minimum": minimum, "maximum": maximum, "choices": choices, "check": check, "doc": doc, "role": role,
            "original": original}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _fail(where: str, key: str, what: str, value) -> BadInputError:
    """``where`` is "<context>: <noun>" up to the key (e.g. "kmeans: option ", "profile cpu: tables.1.")."""
    text = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return BadInputError(f"{where}{key} must be {what}, got {text}")


def _as_int(where, key, v) -> int:
    if isinstance(v, str):
        try:
            v = float(v) if any(c in v for c in ".eE") else int(v)
        except ValueError:
            raise _fail(where, key, "an integer", v) from None
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise _fail(where, key, "an integer", v)
    if isinstance(v, (float, np.floating)) and (not math.isfinite(v) or v != int(v)):
        raise _fail(where, key, "an integer", v)
    return int(v)


def _as_float(where, key, v) -> float:
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise _fail(where, key, "a number", v) from None
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or math.isnan(float(v)):
        raise _fail(where, key, "a number", v)
    return float(v)


def _as_bool(where, key, v) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "1", "0"):
        return v.lower() in ("true", "yes", "1")
    raise _fail(where, key, "true or false", v)


def _as_str(where, key, v) -> str:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise _fail(where, key, "a string", v)
    return str(v)


def _as_int_tuple(where, key, v) -> tuple:
    if v is None or v == "" or (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v == 0):
        return ()
    if isinstance(v, str):
        v = [p for p in v.replace(" ", "").split(",") if p]
    elif not isinstance(v, (list, tuple)):
        v = [v]
    return tuple(_as_int(where, key, x) for x in v)


def _as_float_tuple(where, key, v) -> tuple:
    if isinstance(v, str):
        v = [p for p in v.replace(" ", "").split(",") if p]
    elif not isinstance(v, (list, tuple)):
        v = [v]
    return tuple(_as_float(where, key, x) for x in v)


_SCALARS = {int: _as_int, float: _as_float, bool: _as_bool, str: _as_str}


def _convert(where: str, key: str, tp, value):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _convert(where, key, a, value)
            except BadInputError as exc:
                errors.append(exc)
        if len(inner) == 1:
            raise errors[0]
        raise _fail(where, key, " or ".join(getattr(a, "__name__", str(a)) for a in inner), value)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise _fail(where, key, "one of " + ", ".join(map(repr, allowed)), value)
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        return _as_float_tuple(where, key, value) if args and args[0] is float else _as_int_tuple(where, key, value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _fail(where, key, "a mapping", value)
        return _coerce(tp, value, f"{where}{key}.")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _fail(where, key, "a list", value)
        (inner,) = typing.get_args(tp) or (Any,)
        return [_convert(where, f"{key}[{i}]", inner, v) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _fail(where, key, "a mapping", value)
        args = typing.get_args(tp)
        if len(args) != 2 or args[1] is Any:
            return dict(value)
        return {str(k): _convert(where, f"{key}.{k}", args[1], v) for k, v in value.items()}
    if tp is Any:
        return value
    if tp in _SCALARS:
        return _SCALARS[tp](where, key, value)
    raise TypeError(f"{where}: option {key} has an unsupported type {tp!r}")


def _check_field(where: str, f: dataclasses.Field, value):  # where: as in _fail
    if value is None:
        return
    meta = f.metadata
    lo, hi, choices, check = meta.get("minimum"), meta.get("maximum"), meta.get("choices"), meta.get("check")
    if choices is not None and value not in choices:
        raise _fail(where, f.name, "one of " + ", ".join(map(str, choices)), value)
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if lo is not None and hi is not None and not lo <= v <= hi:
            raise _fail(where, f.name, f"in [{lo}, {hi}]", value)
        if lo is not None and v < lo:
            raise _fail(where, f.name, f">= {lo}", value)
        if hi is not None and v > hi:
            raise _fail(where, f.name, f"<= {hi}", value)
    if check is not None:
        err = check(value)
        if err:
            raise _fail(where, f.name, err, value)


def coerce(cls, given: dict | None, where: str, *, aliases: dict | None = None, noun: str = "option "):
    """``cls(**given)`` with every value converted to its field's type and checked; errors name ``where``
    (e.g. the method) and the key (``noun`` + the key's dotted path)."""
    given = dict(given or {})
    for old, new in (aliases or {}).items():
        if old in given:
            given.setdefault(new, given.pop(old))
    return _coerce(cls, given, f"{where}: {noun}")


def _coerce(cls, given: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(given) - set(fields))
    ctx, _, path = where.rpartition(": ")  # "kmeans", "option " | "profile cpu", "tables.1."
    if unknown:
        what = f"{path.strip()}(s)" if path.strip() else "key(s)"
        names = ", ".join(f"{path if path.endswith('.') else ''}{k}" for k in unknown)
        raise BadInputError(f"{ctx}: unknown {what if not path.endswith('.') else 'key(s)'} {names}; "
                            f"known: {', '.join(sorted(fields))}")
    missing = sorted(name for name, f in fields.items() if name not in given
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise BadInputError(f"{where}{missing[0]} is required")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name not in given:
            continue
        values[name] = _convert(where, name, hints[name], given[name])
        _check_field(where, f, values[name])
    out = cls(**values)
    for name, f in fields.items():  # defaults are checked too (a subclass may tighten a field)
        if name not in given:
            _check_field(where, f, getattr(out, name))
    post = getattr(out, "validate", None)
    if post is not None:
        err = post()
        if err:
            raise BadInputError(f"{ctx}: {path[:-1] + ': ' if path.endswith('.') else ''}{err}")
    return out


def departures(options) -> list[tuple[str, Any, Any]]:
    """(name, value, original) of every ``setting`` option of a resolved options dataclass whose value is not
    the method's original (``opt(original=...)``, else its default): what a profile scaled down or changed."""
    out = []
    for f in dataclasses.fields(options):
        meta = f.metadata or {}
        if meta.get("role", "setting") != "setting":
            continue
        original = meta.get("original", dataclasses.MISSING)
        if original is dataclasses.MISSING:
            original = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        value = getattr(options, f.name)
        if original is not dataclasses.MISSING and value != original:
            out.append((f.name, value, original))
    return out


def as_dict(options) -> dict:
    """The options as plain JSON-able data (tuples become lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(options).items()}


def parse_value(text: str):
    """One ``--set`` value: a YAML scalar or list; ``1e-3`` is a number (YAML 1.1 would keep it a string)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") and value.lower() not in ("nan", "inf") else value
        except ValueError:
            return value
    return value


def parse_set(pairs: list[str] | None, flag: str = "--set") -> dict:
    """``["iters=300", "crop_scale=[0.08, 1.0]"]`` -> ``{"iters": 300, "crop_scale": [0.08, 1.0]}``; dashes -> underscores."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise BadInputError(f"{flag} expects key=value, got {pair!r}")
        key, text = pair.split("=", 1)
        if not key:
            raise BadInputError(f"{flag} expects key=value, got {pair!r}")
        out[key.strip().replace("-", "_")] = parse_value(text.strip())
    return out

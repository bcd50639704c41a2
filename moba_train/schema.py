"""Strict conversion of plain dicts (a composed Hydra config) into dataclasses.

Unknown keys, missing required keys and wrong types fail with the config path and the allowed
keys (and the nearest one, for a typo), so a mistake in a recipe is caught before any model is built.
A field restricted to a few strings is declared with `one_of(...)` rather than `Literal`, which
OmegaConf (Hydra's structured configs) cannot hold.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Mapping


from moba_train.errors import UserError


class ConfigError(UserError):
    """A configuration problem; the message says where and how to fix it."""


def one_of(*choices: str | None, default: str | None):
    """A dataclass field that takes one of `choices` (checked by from_dict), for Hydra-compatible schemas."""
    return dataclasses.field(default=default, metadata={"choices": choices})


def did_you_mean(key: str, allowed) -> str:
    near = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    return f" (did you mean {near[0]!r}?)" if near else ""


def from_dict(cls, data: Any, where: str = "config"):
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}: {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        hints = "".join(did_you_mean(k, fields) for k in unknown[:1])
        raise ConfigError(f"{where}: unknown key(s) {unknown}{hints}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], f"{where}.{name}")
            choices = field.metadata.get("choices")
            if choices is not None and kwargs[name] not in choices:
                raise ConfigError(f"{where}.{name}: {kwargs[name]!r} is not one of {list(choices)}"
                                  f"{did_you_mean(str(kwargs[name]), [c for c in choices if c])}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {name!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: {e}") from e


def _convert(tp, value, where):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {args}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        val_t = args[1] if len(args) == 2 else Any
        return {k: _convert(val_t, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)   # YAML writes 1e6 as a float
    if isinstance(tp, type) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value

"""Typed configs: dataclasses with named presets and strict overrides.

Every config in tessera (codecs, decoder, trainer) is a dataclass. A run starts from a named preset and
applies `key=value` overrides from the command line. An override of a key the dataclass does not have
is an error that lists the valid keys, never silently ignored (torchtitan's rule). Configs round-trip
through JSON, and loading a JSON with unknown keys is an error too.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

from tessera.errors import TesseraError

T = TypeVar("T")


class ConfigError(TesseraError):
    """A config key or value that cannot be used."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` (a JSON value or a CLI string) to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except (ConfigError, ValueError, TypeError) as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: cannot read {value!r} as {tp}: {'; '.join(errors)}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = value.strip()
            value = json.loads(value) if value.startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, key) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        return str(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str):
            value = json.loads(value)
        return from_dict(tp, value)
    return value


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass `cls` from a dict; unknown keys are an error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    ftypes = _field_types(cls)
    unknown = sorted(set(data) - set(ftypes))
    if unknown:
        raise ConfigError(
            f"{cls.__name__}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(ftypes))}"
        )
    kwargs = {k: _coerce(v, ftypes[k], k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def apply_overrides(cfg: T, overrides: list[str] | dict[str, Any] | None) -> T:
    """Return a copy of `cfg` with `key=value` overrides applied.

    Values are parsed according to the field's annotation: `lr=3e-4`, `strides=8,5,4,2` or
    `strides=[8,5,4,2]`, `qk_norm=true`. Unknown keys raise `ConfigError` naming the valid keys.
    """
    if not overrides:
        return cfg
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            k, v = item.split("=", 1)
            items.append((k.strip().replace("-", "_"), v))
    ftypes = _field_types(type(cfg))
    changes = {}
    for k, v in items:
        if k not in ftypes:
            raise ConfigError(
                f"{type(cfg).__name__} has no key {k!r}; valid keys: {', '.join(sorted(ftypes))}"
            )
        changes[k] = _coerce(v, ftypes[k], k)
    return dataclasses.replace(cfg, **changes)


def split_overrides(overrides: list[str] | None, model_cls: type, train_cls: type,
                    unknown: str) -> tuple[list[str], list[str]]:
    """Route `key=value` overrides to a model config (`model_cls`) or a training config (`train_cls`).

    A key in neither is an error: `unknown` is its message, with `{key}` for the key; the valid keys of both
    are appended."""
    mkeys = {f.name for f in dataclasses.fields(model_cls)}
    tkeys = {f.name for f in dataclasses.fields(train_cls)}
    model, train = [], []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        k = item.split("=", 1)[0].strip().replace("-", "_")
        if k in mkeys:
            model.append(item)
        elif k in tkeys:
            train.append(item)
        else:
            raise ConfigError(f"{unknown.format(key=repr(k))}; model keys: {', '.join(sorted(mkeys))}; "
                              f"training keys: {', '.join(sorted(tkeys))}")
    return model, train


def preset(presets: dict[str, Any], name: str, kind: str) -> Any:
    """Look up a named preset; an unknown name lists the known ones."""
    if name not in presets:
        raise ConfigError(f"unknown {kind} preset {name!r}; known presets: {', '.join(presets)}")
    return dataclasses.replace(presets[name])

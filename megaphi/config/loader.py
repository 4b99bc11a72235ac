"""Build a :class:`MegaphiConfig` from a preset, a YAML file and ``key=value`` overrides.

Resolution order (later wins): the preset named by ``--preset`` or by the YAML file's top-level
``preset:`` key, then the YAML file's values, then the overrides. Values are checked against the
dataclass field types (no silent coercion of ``"two"`` into an int), unknown keys are refused with
the closest valid names, and the result is validated by the dataclasses themselves.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Optional, Union

import yaml

from megaphi.config.schema import ConfigError, MegaphiConfig

_PRESET_PACKAGE = "megaphi.config.presets"


def list_presets() -> list:
    """Names of the presets shipped with megaphi."""
    files = resources.files(_PRESET_PACKAGE).iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def preset_dict(name: str) -> dict:
    """The raw values of a preset (fully resolved, including the presets it builds on)."""
    names = list_presets()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError("preset", f"unknown preset '{name}'",
                          f"{hint}choose one of {names}")
    text = resources.files(_PRESET_PACKAGE).joinpath(f"{name}.yaml").read_text()
    return _resolve_base(yaml.safe_load(text) or {}, f"preset '{name}'")


def _resolve_base(raw: dict, origin: str) -> dict:
    """Merge ``raw`` over the preset it names in its ``preset:`` key, if any."""
    if not isinstance(raw, dict):
        raise ConfigError(origin, f"must be a mapping of sections, got {type(raw).__name__}",
                          "write the config as `section:` blocks of `key: value` lines")
    raw = dict(raw)
    base = raw.pop("preset", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError("preset", f"must be a preset name, got {base!r}",
                          f"use one of {list_presets()}")
    return deep_merge(preset_dict(base), raw)


def deep_merge(base: Mapping, update: Mapping) -> dict:
    """Recursively merge ``update`` into a copy of ``base``."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple:
    """``'optimizer.lr=3e-5'`` -> ``(['optimizer', 'lr'], 3e-05)``; the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError("override", f"'{text}' is not of the form section.key=value",
                          "write overrides like parallel.tp=2 or optimizer.lr=3e-5")
    parsed = yaml.safe_load(value) if value.strip() else None
    return key.strip().split("."), parsed


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    """Set each ``dotted.key=value`` in a copy of the nested dict ``raw``."""
    out = deep_merge({}, raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return out


def load_config(preset: Optional[str] = None, config_file: Optional[str] = None,
                overrides: Iterable[str] = ()) -> MegaphiConfig:
    """Resolve and validate a config.

    Args:
        preset: name of a shipped preset (see :func:`list_presets`).
        config_file: YAML file; it may name its own base with a top-level ``preset:`` key.
        overrides: ``section.key=value`` strings, applied last.
    """
    raw: dict = preset_dict(preset) if preset else {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError("--config", f"file '{config_file}' does not exist",
                              "pass the path of a YAML config file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(str(path), f"is not valid YAML ({exc})", "fix the YAML syntax") from None
        raw = deep_merge(raw, _resolve_base(data, str(path)))
    raw = apply_overrides(raw, overrides)
    if "model" not in raw:
        raise ConfigError("model", "no model section was given",
                          f"start from a preset (--preset or `preset:` in the YAML): {list_presets()}")
    return from_dict(MegaphiConfig, raw)


def from_dict(cls: type, raw: Any, prefix: str = ""):
    """Build dataclass ``cls`` from a nested dict, checking keys and value types."""
    where = prefix or cls.__name__
    if not isinstance(raw, Mapping):
        raise ConfigError(where, f"must be a mapping, got {raw!r}",
                          f"write {where} as a block of key: value lines")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = unknown[0]
        name = f"{prefix}.{key}" if prefix else str(key)
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(name, "unknown key",
                          f"{hint}valid keys{' of ' + prefix if prefix else ''}: {sorted(fields)}")
    kwargs = {key: _coerce(hints[key], value, f"{prefix}.{key}" if prefix else key)
              for key, value in raw.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, name: str) -> Any:
    """Check ``value`` against the type annotation ``tp``, converting only lossless cases."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, name)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, name)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(name, f"{value!r} is not allowed", f"use one of {list(choices)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(name, f"expected true or false, got {value!r}", f"set {name}=true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(name, f"expected an integer, got {value!r}", f"set {name} to an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(name, f"expected a number, got {value!r}", f"set {name} to a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(name, f"expected a string, got {value!r}", f"quote the value of {name}")
    raise TypeError(f"unsupported config annotation {tp!r} for {name}")


def to_yaml(cfg: MegaphiConfig) -> str:
    """The resolved config as YAML (loadable again with ``--config``)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

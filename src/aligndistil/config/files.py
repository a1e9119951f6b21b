"""Run configs from YAML files and ``key=value`` overrides, and back to YAML.

YAML files are read with ``yaml.safe_load``; unknown keys are errors that name the file and
the key (a typo such as ``betta: 0.2`` must not silently train with the default).
Command-line overrides use dotted paths (``train.learning_rate=1e-5``) and are parsed with
the field's type, so ``method.beta=0.2`` becomes a float and ``train.report_to=[]`` a list.
Field types are resolved with ``typing.get_type_hints``, never by evaluating strings.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

import yaml

from aligndistil.config.schema import (
    SECTIONS,
    ConfigError,
    DataConfig,
    MethodConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)

def _section_class(name: str):
    return {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "method": MethodConfig}[name]


@functools.lru_cache(maxsize=None)
def _types(cls) -> dict:
    """Field name -> resolved type of a config dataclass (its annotations are strings under
    ``from __future__ import annotations``; ``get_type_hints`` evaluates them safely)."""
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML or command-line value to a field type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        return _nested(value, tp, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is list or origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _nested(value: Any, cls, where: str):
    """A nested section (``model.lora``) from a mapping (unknown keys refused), ``true`` (the
    defaults), ``false`` (off: None) or an instance."""
    if isinstance(value, cls):
        return value
    if isinstance(value, bool) or (isinstance(value, str) and value.lower() in ("true", "false")):
        return cls() if value in (True, "true", "True") else None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of {', '.join(f.name for f in fields(cls))}, got {value!r}")
    known = _types(cls)
    obj = cls()
    for k, v in value.items():
        if k not in known:
            raise ConfigError(f"{where}: unknown key {k!r} (known: {', '.join(sorted(known))})")
        setattr(obj, k, _coerce(v, known[k], f"{where}.{k}"))
    return obj


def from_dict(d: dict, source: str = "<dict>") -> RunConfig:
    """Build a RunConfig from a nested dict, refusing unknown sections and keys."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections {list(SECTIONS)}")
    cfg = RunConfig()
    for sec, values in d.items():
        if sec not in SECTIONS:
            raise ConfigError(f"{source}: unknown section {sec!r} (expected one of {list(SECTIONS)})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {sec!r} must be a mapping")
        obj = getattr(cfg, sec)
        known = _types(type(obj))
        for k, v in values.items():
            if k not in known:
                raise ConfigError(f"{source}: unknown key {sec}.{k} (known: {', '.join(sorted(known))})")
            setattr(obj, k, _coerce(v, known[k], f"{source}: {sec}.{k}"))
    return cfg


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with ``safe_load``; errors name the file (and line, when YAML knows it)."""
    path = Path(path)
    if path.is_dir():
        examples = sorted(p.name for p in path.glob("*.yaml"))[:3]
        hint = f" such as {path / examples[0]}" if examples else ""
        raise ConfigError(f"{path} is a folder; give a YAML config file{hint}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    return data or {}


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``section.key=value`` strings (values parsed as YAML scalars, then typed)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        path, raw = item.split("=", 1)
        parts = path.strip().split(".")
        if len(parts) not in (2, 3) or parts[0] not in SECTIONS:
            raise ConfigError(f"override {item!r}: key must be one of {list(SECTIONS)} followed by .name")
        sec, key = parts[:2]
        obj = getattr(cfg, sec)
        known = _types(type(obj))
        if len(parts) == 3:  # section.nested.key, e.g. model.lora.r=8 (creates the nested section)
            nested = typing.get_args(known.get(key)) or (known.get(key),)
            cls = next((c for c in nested if dataclasses.is_dataclass(c)), None)
            if cls is None:
                raise ConfigError(f"override {item!r}: {sec}.{key} has no keys of its own")
            if getattr(obj, key) is None:
                setattr(obj, key, cls())
            sec, obj, key, known = f"{sec}.{key}", getattr(obj, key), parts[2], _types(cls)
        if key not in known:
            raise ConfigError(f"override {item!r}: unknown key {sec}.{key} (known: {', '.join(sorted(known))})")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if known[key] in (str, Optional[str]) and value is not None and not isinstance(value, str):
            value = raw  # keep "1e-3"-like strings for string fields as typed
        setattr(obj, key, _coerce(value, known[key], f"override {item!r}"))
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config, apply command-line overrides and check every value's range."""
    cfg = from_dict(load_yaml(path), str(path)) if path else RunConfig()
    return apply_overrides(cfg, overrides or []).validate()


def dump_config(cfg: RunConfig) -> str:
    """The config as YAML text (what is saved beside every output)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def help_text() -> str:
    """Every config key with its default, help string and allowed range, for ``aligndistil config-help``."""
    lines = []
    for sec in SECTIONS:
        cls = _section_class(sec)
        lines.append(f"[{sec}]  {cls.__doc__.strip()}")
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            check = f.metadata.get("check")
            allowed = f" (allowed: {check.says})" if check else ""
            lines.append(f"  {sec}.{f.name} = {default!r}\n      {f.metadata.get('help', '')}{allowed}")
            sub = next((c for c in typing.get_args(_types(cls)[f.name]) if dataclasses.is_dataclass(c)), None)
            for g in fields(sub) if sub else ():
                gd = g.default if g.default is not dataclasses.MISSING else g.default_factory()
                gc = g.metadata.get("check")
                lines.append(f"  {sec}.{f.name}.{g.name} = {gd!r}\n      {g.metadata.get('help', '')}"
                             + (f" (allowed: {gc.says})" if gc else ""))
    return "\n".join(lines)

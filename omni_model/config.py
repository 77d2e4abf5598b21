"""Job and serving configuration: frozen dataclasses loaded from one YAML file plus dotted overrides.

    cfg = load_config(DemoConfig, "configs/tiny/demo.yaml", ["fit.steps=50", "out_dir=/tmp/x"])

Every key must name a field (a typo is an error, not a silently ignored setting), values
are parsed as YAML scalars (`true`, `1e-4`, `[1, 2]`, `null`), and the fully resolved
config is written next to what the job produces (`save_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

T = TypeVar("T")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a (nested) mapping, rejecting unknown keys."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise TypeError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(f"{where}.{k}" if where else k for k in set(data) - set(fields))
    if unknown:
        raise KeyError(f"unknown config keys {unknown}; {where or cls.__name__} has "
                       f"{sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        tp = _dataclass_in(hints[name])
        path = f"{where}.{name}" if where else name
        if tp is not None and value is not None:
            kwargs[name] = from_dict(tp, value, path)
        else:
            kwargs[name] = _coerce(hints[name], value, path)
    return cls(**kwargs)


def with_extra(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build dataclass `cls` from a foreign config file's mapping (a checkpoint's
    `config.json`, SenseVoice's `config.yaml`): the keys that name fields set them, the
    rest go into the field `extra` unread (kept so the file can be written back)."""
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known = {k: v for k, v in data.items() if k in names}
    return cls(**known, extra={k: v for k, v in data.items() if k not in names})


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Scalars and sequences to the annotated type.

    YAML 1.1 reads `2e-5` as a string and `[a, b]` as a list; a float field must hold a
    float and a frozen config a tuple.
    """
    if value is None:
        return None
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next((a for a in args if a is not type(None)), tp)
    origin = typing.get_origin(tp) or tp
    try:
        if origin is float and isinstance(value, (str, int)) and not isinstance(value, bool):
            return float(value)
        if origin is int and isinstance(value, str):
            return int(value)
        if origin in (tuple, list) and isinstance(value, (list, tuple)):
            item = _dataclass_in(args[0]) if args else None
            items = [from_dict(item, v, f"{path}[{i}]") if item is not None and isinstance(v, dict)
                     else v for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
    except ValueError:
        raise ValueError(f"config key {path}: cannot read {value!r} as {origin.__name__}") from None
    return value


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass type in `tp` (also inside `X | None`), else None."""
    if _is_dataclass_type(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if _is_dataclass_type(a)]
        return found[0] if found else None
    return None


def to_dict(obj: Any) -> Any:
    """A plain (YAML-writable) version of a config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a nested dict (values parsed as YAML)."""
    data = {k: v for k, v in data.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key.path=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, Mapping) else {}
            node = node[part]
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


BASE_KEY = "base"  #: a config file's key naming the file it changes


def read_config_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config file as a dict. A file whose top level has `base: OTHER.yaml` (a path
    relative to the file) is that file with this one's values over it: mappings merged key
    by key, lists and scalars replaced. `configs/ci/` holds the ci profile this way, each
    file only what differs from `configs/tiny/`."""
    path = Path(path)
    if path.resolve() in _seen:
        raise ValueError(f"config {path}: its bases loop back to it")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, Mapping):
        raise ValueError(f"config {path}: expected a mapping at the top level")
    data = dict(loaded)
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    return _merged(read_config_file(path.parent / base, (*_seen, path.resolve())), data)


def _merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """`cls` from YAML file `path` (None: the dataclass defaults; `base:` followed, see
    `read_config_file`) and dotted overrides."""
    data = read_config_file(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides))


def save_config(config: Any, path: str | Path) -> Path:
    """Write the fully resolved config as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return path


def parse_job_args(cls: type[T], description: str, default_config: str | None,
                   argv: Sequence[str] | None = None) -> T:
    """The command line every job shares: `--config FILE` then `key.path=value` overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config,
                        help=f"YAML config (default: {default_config})")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="dotted overrides of config fields, e.g. fit.steps=100")
    args = parser.parse_args(argv)
    return load_config(cls, args.config, args.overrides)

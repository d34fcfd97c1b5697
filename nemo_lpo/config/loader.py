"""Training configuration: layered YAML validated into dataclasses, with ``key=value`` overrides.

A config file may start with a Hydra-style ``defaults:`` list naming other YAML files (``base``,
``model/tiny``, ``parallel/tp2`` ...), resolved first beside the file and then in the repository's
``conf/`` folder; they are merged in order, then the file's own keys, then the command-line
overrides. ``group=name`` on the command line (e.g. ``parallel=tp2``) swaps the ``defaults`` entry of
that group. Every layer is checked against the dataclasses of ``schema``: an unknown or mistyped key is an
error naming the file (or the override) and suggesting the closest valid key.

This module only imports the standard library, PyYAML and omegaconf (cheap for ``nemo-lpo --help``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from nemo_lpo.config.schema import Config, ConfigError
from nemo_lpo.io import atomic_write

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ("model", "data", "parallel", "loss")


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _suggest(key: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(options))}"


def _convert(value: Any, tp: Any, where: str, meta: typing.Mapping) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widened to float where declared)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for arg in args[:-1]:  # ``str | list``: the first type that fits
            try:
                return _convert(value, arg, where, meta)
            except ConfigError:
                continue
        return _convert(value, args[-1], where, meta)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
        list: isinstance(value, list),
    }.get(tp, True)
    if not ok:
        raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r} ({type(value).__name__})")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{where}: {value!r} is not one of {list(meta['choices'])}"
                          + _suggest(str(value), meta["choices"]).replace("valid keys", "choices"))
    return float(value) if tp is float else value


def check_keys(data: dict, source: str, cls: type = Config, prefix: str = "") -> None:
    """Raise ConfigError naming ``source`` for a key of ``data`` that ``cls`` lacks or a value of the wrong type."""
    fields = _fields(cls)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{source}: unknown key '{dotted}'" + _suggest(
                dotted, [f"{prefix}{k}" for k in fields]))
        _, tp = fields[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{dotted}' must be a mapping, got {value!r}")
            check_keys(value, source, tp, f"{dotted}.")
        else:
            _convert(value, tp, f"{source}: {dotted}", fields[key][0].metadata)


def from_dict(data: dict, cls: type = Config, prefix: str = "", source: str = "config") -> Any:
    """Build the dataclass ``cls`` from nested dicts, checking keys and types."""
    check_keys(data, source, cls, prefix)
    kwargs = {}
    for key, value in data.items():
        f, tp = _fields(cls)[key]
        where = f"{source}: {prefix}{key}"
        kwargs[key] = from_dict(value, tp, f"{prefix}{key}.", source) if dataclasses.is_dataclass(tp) \
            else _convert(value, tp, where, f.metadata)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _load_yaml(path: Path) -> dict:

    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # yaml.YAMLError and omegaconf errors carry line numbers
        raise ConfigError(f"{path}: cannot parse YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _resolve(name: str, beside: Path) -> Path:
    for base in (beside, CONF_DIR):
        candidate = base / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
        if candidate.is_file():
            return candidate
    raise ConfigError(f"defaults entry '{name}' not found beside {beside} or in {CONF_DIR}")


def _layers(path: Path, groups: dict[str, str], seen: tuple = ()) -> list[tuple[Path, dict]]:
    """Return [(file, its keys)] in merge order: the defaults (recursively) first, then the file itself."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular defaults via {' -> '.join(map(str, seen))}")
    data = _load_yaml(path)
    defaults = data.pop("defaults", [])
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise ConfigError(f"{path}: 'defaults' must be a list of file names, got {defaults!r}")
    layers: list[tuple[Path, dict]] = []
    for entry in defaults:
        group = entry.split("/", 1)[0]
        if "/" in entry and group in groups:
            entry = f"{group}/{groups.pop(group)}"
        layers += _layers(_resolve(entry, path.parent), groups, (*seen, path))
    layers.append((path, data))
    return layers


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "options":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: typing.Sequence[str]) -> tuple[dict, dict[str, str]]:
    """Split ``key=value`` overrides into a nested dict and ``group=name`` selections."""
    nested: dict = {}
    groups: dict[str, str] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected key=value")
        if key in GROUPS and "." not in key and (CONF_DIR / key / f"{raw}.yaml").is_file():
            groups[key] = raw
            continue
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': cannot parse value: {err}") from None
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a mapping")
        node[parts[-1]] = value
        check_keys(nested, f"override '{item}'")
    return nested, groups


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load ``path`` with its defaults, apply ``overrides`` (``key=value`` / ``group=name``), validate.

    Raises:
        ConfigError: an unknown key, a wrong type or value, naming the file or override.
    """
    nested, groups = parse_overrides(overrides)
    merged: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        for layer_path, data in _layers(path, dict(groups)):
            check_keys(data, str(layer_path))  # errors name the layer that set the key
            merged = _merge(merged, data)
    merged = _merge(merged, nested)
    return from_dict(merged, source=str(path) if path else "overrides")


def dump_config(config: Config, path: str | Path) -> None:
    """Write ``config`` as YAML to ``path`` atomically (temp name + rename)."""
    atomic_write(path, yaml.safe_dump(config.to_dict(), sort_keys=False))

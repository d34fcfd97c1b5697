"""The dataset prefixes of a config: one train prefix or a weighted blend, and the validation prefixes.

Standard library only: the config schema validates these notations at load time (``nemo-lpo --help`` stays
cheap). The blend notation is Megatron-LM's ``--data-path``: ``[w1, prefix1, w2, prefix2, ...]``.
"""

from __future__ import annotations

import numbers
import os

from nemo_lpo.config.errors import ConfigError


def parse_blend(value, field: str = "data.train_prefix") -> list[tuple[float, str]]:
    """Return ``[(weight, prefix), ...]`` of a prefix (weight 1) or a ``[w1, p1, w2, p2, ...]`` blend.

    Weights are returned as given (not normalised); a single prefix in a list (``[p]``) is weight 1.

    Raises:
        ConfigError: naming ``field``: not a string or list, an odd-length list, a weight that is not a
            positive number, a prefix that is not a non-empty string, or a prefix given twice.
    """
    if isinstance(value, str | os.PathLike):
        return [(1.0, os.fspath(value))]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{field}: expected a prefix or [weight, prefix, ...], got {value!r}")
    if len(value) == 1:
        return parse_blend(value[0], field)
    if len(value) % 2:
        raise ConfigError(f"{field}: a blend is [weight1, prefix1, weight2, prefix2, ...]; got {len(value)} items")
    pairs = []
    for i in range(0, len(value), 2):
        weight, prefix = value[i], value[i + 1]
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not weight > 0:
            raise ConfigError(f"{field}[{i}]: weight must be a positive number, got {weight!r}")
        if not isinstance(prefix, str) or not prefix:
            raise ConfigError(f"{field}[{i + 1}]: expected a dataset prefix (string), got {prefix!r}")
        pairs.append((float(weight), prefix))
    prefixes = [p for _, p in pairs]
    repeated = sorted({p for p in prefixes if prefixes.count(p) > 1})
    if repeated:
        raise ConfigError(f"{field}: prefix {repeated[0]!r} appears twice; give it one weight")
    return pairs


def valid_prefixes(value, field: str = "data.valid_prefix") -> list[str]:
    """The validation prefixes of ``data.valid_prefix`` (a prefix, a list of them, or None: [])."""
    if value is None:
        return []
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list) and value and all(isinstance(p, str) and p for p in value):
        if len(set(value)) != len(value):
            raise ConfigError(f"{field}: a prefix appears twice in {value}")
        return list(value)
    raise ConfigError(f"{field}: expected a dataset prefix or a list of prefixes, got {value!r}")


def source_names(prefixes: list[str]) -> list[str]:
    """Short unique names of ``prefixes`` for metric keys: the base name, with its folder when two share one."""
    names = [os.path.basename(os.path.normpath(p)) or p for p in prefixes]
    if len(set(names)) == len(names):
        return names
    return [os.path.normpath(p).strip(os.sep).replace(os.sep, "_") for p in prefixes]


def train_prefixes(value) -> list[str]:
    """Every dataset prefix of ``data.train_prefix`` (one, or the sources of a blend)."""
    return [] if value is None else [p for _, p in parse_blend(value)]

"""Validation of ``loss.type`` and the typed per-loss ``loss.options`` when a config loads.

The accepted options come from the loss registry's one table (``nemo_lpo.losses.LOSS_SPECS``) and the option types
from the ``LossOptions`` annotations, so nothing here repeats what a loss reads.
"""

from __future__ import annotations

import difflib
import types
import typing

from nemo_lpo.config.errors import ConfigError


def check_loss(loss) -> None:
    """Check ``loss.type`` (a ``LossConfig``) against the registry and ``loss.options`` against what that loss reads.

    Ints are widened to float where the option is a float; ``loss.options`` is replaced by the checked values.
    """
    from nemo_lpo import losses  # imports torch: only when a config is validated, not when the CLI starts

    if loss.type not in losses.LOSS_SPECS:
        closest = difflib.get_close_matches(loss.type, list(losses.LOSS_SPECS), n=1, cutoff=0.0)
        raise ConfigError(f"loss.type: unknown loss {loss.type!r}; the closest is {closest[0]!r}; choose one of: "
                          f"{', '.join(losses.LOSS_SPECS)}")
    if not isinstance(loss.options, dict):
        raise ConfigError(f"loss.options must be a mapping, got {loss.options!r}")
    accepted = _loss_option_types(losses, loss.type)
    checked = {}
    for name, value in loss.options.items():
        if name not in accepted:
            readers = [t for t, spec in losses.LOSS_SPECS.items() if name in spec.options]
            hint = f" (read by: {', '.join(readers)})" if readers else ""
            close = difflib.get_close_matches(str(name), list(accepted), n=1, cutoff=0.5)
            hint += f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"loss.options.{name}: loss.type={loss.type} takes no option {name!r}{hint}; it takes: "
                              f"{', '.join(accepted)}")
        checked[name] = _option_value(value, accepted[name], f"loss.options.{name}")
    try:
        losses.LossOptions(**checked)
    except losses.OptionError as err:
        raise ConfigError(f"loss.options.{err.option}: {err}") from None
    loss.options = checked


def _loss_option_types(losses, loss_type: str) -> dict[str, tuple[type, ...]]:
    """Options a config may set for ``loss_type`` -> the plain types its LossOptions annotation allows."""
    hints = typing.get_type_hints(losses.LossOptions)
    out = {}
    for name in (*losses.COMMON_OPTIONS, *losses.LOSS_SPECS[loss_type].options):
        if name in losses.RUNTIME_OPTIONS:
            continue
        hint = hints[name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        out[name] = tuple(t for t in (typing.get_args(hint) if union else (hint,))
                          if t in (bool, int, float, str, type(None)))  # a tensor cannot come from YAML
    return out


def _option_value(value, allowed: tuple[type, ...], where: str):
    """``value`` if one of ``allowed`` takes it (an int widened to float where only float is), else ConfigError."""
    if value is None:
        if type(None) in allowed:
            return None
    elif isinstance(value, bool):  # bool is an int subclass: only where bool itself is allowed
        if bool in allowed:
            return value
    elif isinstance(value, int) and int in allowed:
        return value
    elif isinstance(value, int | float) and float in allowed:
        return float(value)
    elif isinstance(value, str) and str in allowed:
        return value
    expected = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"{where}: expected {expected}, got {value!r} ({type(value).__name__})")

"""LPO as a Megatron-Bridge (NeMo Framework) training recipe.

``task`` (the forward step and loss function megatron's schedules call) needs only megatron-core;
``provider``, ``data`` and ``recipes`` subclass Megatron-Bridge classes and import it at module top, so import
them only where Megatron-Bridge is installed (``bridge_available()``); ``import nemo_lpo`` never imports them.
"""

from __future__ import annotations

NEMO_IMAGE = "nvcr.io/nvidia/nemo:26.08"
"""The NGC NeMo Framework container whose Megatron-Bridge (0.6.x on megatron-core 0.19) the recipes target."""
INSTALL_COMMAND = "make bridge-env"
"""The tested way to get Megatron-Bridge beside nemo-lpo's environment, from its source tree: ``.venv-bridge``,
``pip install --no-deps -r constraints-bridge.txt`` over the main venv's torch and megatron-core. A plain
``pip install megatron-bridge`` resolves transformers down to <= 5.12.1 and pulls nvidia-resiliency-ext from PyPI, which breaks ``import megatron.core.dist_checkpointing``."""


def bridge_import_error() -> str | None:
    """None when Megatron-Bridge's training entry point imports here, else why not (absent or broken install)."""
    try:
        import megatron.bridge.training.finetune  # noqa: F401
    except (ImportError, RuntimeError, OSError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def bridge_available() -> bool:
    """Whether Megatron-Bridge's training entry point imports here."""
    return bridge_import_error() is None


def missing_bridge_message(error: str | None = None) -> str:
    """What to do when Megatron-Bridge does not import (``error``: why, from ``bridge_import_error``)."""
    why = f" ({error})" if error else ""
    return (f"Megatron-Bridge does not import here{why}. Run this inside the NeMo Framework container "
            f"{NEMO_IMAGE} (it ships Megatron-Bridge with Transformer Engine; see Dockerfile.nemo and docs/nemo.md), "
            f"or, from nemo-lpo's source tree, `{INSTALL_COMMAND}` (.venv-bridge beside .venv, the set CI tests: "
            "no Transformer Engine; see docs/nemo.md)")

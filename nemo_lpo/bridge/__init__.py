"""LPO as a Megatron-Bridge (NeMo Framework) training recipe.

``task`` (the forward step and loss function megatron's schedules call) needs only megatron-core;
``provider``, ``data`` and ``recipes`` subclass Megatron-Bridge classes and import it at module top, so import
them only where Megatron-Bridge is installed (``bridge_available()``); ``import nemo_lpo`` never imports them.
"""

from __future__ import annotations

NEMO_IMAGE = "nvcr.io/nvidia/nemo:26.08"
"""The NGC NeMo Framework container whose Megatron-Bridge (0.6.x on megatron-core 0.19) the recipes target."""
INSTALL_COMMAND = "pip install 'megatron-bridge>=0.6,<0.7'"
"""How to add Megatron-Bridge to an environment that lacks it (the NeMo image already has it)."""


def bridge_available() -> bool:
    """Whether Megatron-Bridge's training entry point imports here (its absence or a broken install: False)."""
    try:
        import megatron.bridge.training.finetune  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    return True


def missing_bridge_message() -> str:
    """What to do when Megatron-Bridge is absent."""
    return (f"Megatron-Bridge is not installed here. Run this inside the NeMo Framework container {NEMO_IMAGE} "
            f"(it ships Megatron-Bridge; see Dockerfile.nemo and docs/nemo.md), or install it: {INSTALL_COMMAND}")

"""Test-only shim: Megatron-Bridge 0.6 imports Transformer Engine unguarded in ``megatron/bridge/peft/lora_layers.py``.

On a machine without TE that one line stops every Megatron-Bridge entry point from importing
(``training.pretrain`` reaches it through ``megatron.bridge.peft``). The shim answers that single import
statement, and no other, with a placeholder module: ``builtins.__import__`` is wrapped so that only code whose
module is ``megatron.bridge.peft.lora_layers`` gets it, and the placeholder never enters ``sys.modules``, so
megatron-core's own TE checks (``HAVE_TE``) and nemo-lpo's ``transformer_engine_available()`` still see no TE.
LPO does not use LoRA on TE layers (the only use of that name).
"""

from __future__ import annotations

import builtins
import types

_ORIGINAL_IMPORT = builtins.__import__
# importing module -> the package it imports unguarded that cannot be installed alongside on this machine
_SHIMMED = {
    "megatron.bridge.peft.lora_layers": "transformer_engine",
    # pretrain.py imports nvrx only to annotate a parameter (its in-process restart is off); PyPI's newest
    # nvidia-resiliency-ext (0.4.1) breaks `import megatron.core.dist_checkpointing` (0.19.2 asserts >= 0.6.0)
    "megatron.bridge.training.pretrain": "nvidia_resiliency_ext",
}


class _Placeholder(types.ModuleType):
    """A module whose every attribute is a further placeholder; calling one raises.

    lora_layers names ``te.ops.Sequential`` in annotations at class-definition time, and pretrain.py writes
    ``CallWrapper | None``; a real use of the missing package still fails loudly.
    """

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self.__name__}.{name}")

    def __or__(self, other):  # ``CallWrapper | None`` in a signature annotation
        return object

    __ror__ = __or__

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.__name__}: Transformer Engine is not installed (test shim placeholder)")


def _placeholder(package: str) -> types.ModuleType:
    return _Placeholder(package)


def _import(name, globals=None, locals=None, fromlist=(), level=0):  # noqa: A002 - builtins.__import__'s signature
    if level == 0 and _SHIMMED.get((globals or {}).get("__name__")) == name.split(".")[0]:
        return _placeholder(name.split(".")[0])
    return _ORIGINAL_IMPORT(name, globals, locals, fromlist, level)


def install() -> None:
    """Wrap ``builtins.__import__`` (idempotent); a no-op when Transformer Engine imports for real."""
    if builtins.__import__ is _import:
        return
    try:
        import transformer_engine.pytorch  # noqa: F401
        return
    except (ImportError, RuntimeError, OSError):
        pass
    builtins.__import__ = _import


def bridge_peft_without_te() -> None:
    """Tell Bridge's PEFT that TE is absent where it is (test environment only; the container has TE).

    megatron-core 0.19.2 without TE still defines ``TEColumnParallelLinear`` & co. in
    ``megatron.core.extensions.transformer_engine`` (MagicMock placeholders, ``None`` for the grouped ones), so
    Bridge 0.6.2's ``safe_import_from`` succeeds and ``megatron/bridge/peft/utils.py:86`` sets ``HAVE_TE = True``;
    ``get_adapter_attributes_from_linear`` then calls ``isinstance(m, None)`` (utils.py:591) and raises.
    """
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        import megatron.bridge.peft.utils as peft_utils

        peft_utils.HAVE_TE = False

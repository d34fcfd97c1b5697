"""Run Megatron-Bridge 0.6's set-up and checkpoint code on a machine without CUDA: one patch per CUDA spot.

The style of ``nemo_lpo.model.cpu_compat`` (which handles megatron-core): each ``patch_*`` removes one assumption,
its docstring says where Megatron-Bridge makes it and why the replacement is faithful on CPU;
``apply_bridge_cpu_compat()`` applies them all, once, only when CUDA is absent (on a GPU nothing changes), after
megatron-core's layer. tests/test_bridge_cpu_compat.py shows, per patch, the Bridge call that fails without it.
Import only where Megatron-Bridge is installed.

Not patched: ``initialize_megatron`` (asserts CUDA; CPU runs initialise the process groups as nemo-lpo's trainer
does) and ``setup()``'s start-time all-reduce on a CUDA tensor, so ``setup()`` itself does not run on CPU.
"""

from __future__ import annotations

import types

import torch
from megatron.bridge.data import loaders
from megatron.bridge.training import checkpointing
from megatron.bridge.training.utils import train_utils
from megatron.training.models import dist_utils

from nemo_lpo.model.cpu_compat import _HOST_STREAM, _cpu_get_rng_state, _HostTorch, apply_cpu_compat

_APPLIED = False


def _host_torch(**cuda: object) -> _HostTorch:
    """The host ``torch`` proxy (``device="cuda"`` factories on the CPU) with ``torch.cuda`` names replaced.

    Every other ``torch.cuda`` name is torch.cuda's own.
    """
    proxy = _HostTorch()
    proxy.cuda = types.SimpleNamespace(**{name: getattr(torch.cuda, name) for name in dir(torch.cuda)
                                          if not name.startswith("__")} | cuda)
    return proxy


def patch_loader_flags() -> None:
    """``data/loaders.py``: the do-train/valid/test flags broadcast in ``build_train_valid_test_data_loaders``.

    They are created with ``device="cuda"``; the module's ``torch`` becomes the host proxy (only literal
    ``device="cuda"`` factories go to the CPU), so gloo broadcasts the same three integers.
    """
    loaders.torch = _host_torch()


def patch_checkpoint_cuda_state() -> None:
    """``training/checkpointing.py``: ``read_metadata``'s CUDA iteration tensor and ``get_rng_state``'s CUDA RNG.

    The iteration is all-reduced (MAX) in a ``device="cuda"`` tensor, and the saved RNG state includes
    ``torch.cuda.get_rng_state()``. On CPU every random op draws from the CPU generator (as megatron-core's RNG
    tracker does under nemo-lpo's compat layer), so its state stands in for the CUDA one.
    """
    checkpointing.torch = _host_torch(get_rng_state=_cpu_get_rng_state)


def patch_ddp_init_stream() -> None:
    """``megatron.training.models.dist_utils._ddp_wrap``: DDP built under ``torch.cuda.stream(torch.cuda.Stream())``.

    Bridge's ``provide_distributed_model`` wraps the model there. CPU work is synchronous, so a host stream whose
    waits are no-ops (megatron-core's layer already answers ``current_stream`` with it) is faithful.
    """
    dist_utils.torch = _host_torch(Stream=lambda *args, **kwargs: _HOST_STREAM)


def patch_train_log_accumulators() -> None:
    """``training/utils/train_utils.py``: ``training_log``'s loss accumulators, created with ``device="cuda"``.

    ``train()`` calls ``training_log`` after every ``train_step``; it sums each step's reduced losses into
    ``torch.tensor([0.0], device="cuda")`` start values (and ``report_memory``-free helpers of the same module
    build their all-reduce buffers the same way). The module's ``torch`` becomes the host proxy, so those sums
    are the same float32 additions on the CPU.
    """
    train_utils.torch = _host_torch()


PATCHES = {"loader_flags": patch_loader_flags, "checkpoint_cuda_state": patch_checkpoint_cuda_state,
           "ddp_init_stream": patch_ddp_init_stream, "train_log_accumulators": patch_train_log_accumulators}
"""name -> patch; applied in this order."""


def apply_bridge_cpu_compat() -> bool:
    """megatron-core's CPU layer, then every patch of PATCHES, when CUDA is absent; whether the layer is active."""
    global _APPLIED
    if not apply_cpu_compat():
        return False
    if not _APPLIED:
        for patch in PATCHES.values():
            patch()
        _APPLIED = True
    return True

"""Run megatron-core 0.19.2 on a machine without CUDA: one small patch per CUDA assumption.

Each ``patch_*`` function below removes one assumption measured in docs/megatron-notes.md §1;
its docstring says where megatron makes it and why the replacement is faithful on CPU.
``apply_cpu_compat()`` applies them all, once, and only when CUDA is absent, before megatron builds
models or process groups. tests/test_cpu_compat.py shows, per patch, the megatron call that fails
without it and succeeds with it.

Not patched (no CPU path is needed by nemo-lpo, or gloo itself cannot do it):
- gloo cannot all-gather / reduce-scatter unequal sizes, so the alltoall MoE dispatcher with
  expert-tensor-parallel > 1 does not run on CPU (use etp=1 there);
- TE-only features (TE specs, FP8, fused kernels, ``moe_permute_fusion``, grouped GEMM);
- ``tensor.cuda()`` calls on paths nemo-lpo does not take (``tensor_parallel.broadcast_data``,
  grad-scaler state loading, dist-checkpoint exchange of fully-parallel loading).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
from collections.abc import Callable, Collection

import torch
from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
from megatron.core.tensor_parallel import random as mrandom
from megatron.core.transformer import torch_norm
from megatron.core.transformer.moe import moe_utils, token_dispatcher
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

_APPLIED = False
_CPU = torch.device("cpu")


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.split(":")[0] == "cuda"


class _HostStream:
    """Stand-in for ``torch.cuda.Stream`` / ``Event``: CPU ops are synchronous, so all waits are no-ops."""

    def wait_stream(self, stream) -> None:  # noqa: D102
        pass

    def wait_event(self, event) -> None:  # noqa: D102
        pass

    def record_event(self, event=None) -> _HostStream:  # noqa: D102
        return self

    def record(self, stream=None) -> None:  # noqa: D102
        pass

    def synchronize(self) -> None:  # noqa: D102
        pass

    def query(self) -> bool:  # noqa: D102
        return True


_HOST_STREAM = _HostStream()


def patch_cuda_device_queries() -> None:
    """``torch.cuda.current_device()`` -> the CPU device; ``torch.cuda.synchronize()`` -> no-op.

    megatron passes ``device=torch.cuda.current_device()`` to tensor factories in many places (RoPE
    ``inv_freq``, MoE router, TP gather buffers, p2p buffers, DDP grad buffers) and synchronises in
    dist-checkpoint save and p2p. Without CUDA both raise; on CPU every op is synchronous and the
    only device is the CPU, so these answers are exact.
    """
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda device=None: None


def patch_cuda_current_stream() -> None:
    """``torch.cuda.current_stream()`` -> a host stream whose waits are no-ops.

    megatron 0.19 calls it unconditionally in DDP ``start_grad_sync`` (to wait on CUDA-graph events)
    and in the MoE dispatchers; ``torch.cuda.stream(host_stream)`` is already a no-op without CUDA.
    """
    torch.cuda.current_stream = lambda device=None: _HOST_STREAM


def _cpu_get_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _cpu_tracker_add(self, name: str, seed: int) -> None:
    """CudaRNGStatesTracker.add on the CPU default generator (same bookkeeping as megatron's)."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"rng state {name} already exists")
    orig_state = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(orig_state)


def patch_rng_tracker() -> None:
    """Make megatron's RNG tracker fork the CPU default generator instead of the CUDA one.

    ``model_parallel_cuda_manual_seed``, TP/expert weight init under ``get_cuda_rng_tracker().fork()``,
    dropout in TP regions and activation recompute all save/restore the CUDA RNG state, which does not
    exist without CUDA. On CPU every random op draws from the CPU default generator, so tracking
    *that* generator keeps megatron's semantics (named, independently seeded streams).
    """
    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state
    mrandom.CudaRNGStatesTracker.add = _cpu_tracker_add


class _HostTorch:
    """The ``torch`` module as seen by one megatron module, with ``device="cuda"`` mapped to the CPU."""

    _FACTORIES = (
        "tensor", "zeros", "ones", "empty", "full", "arange", "randn", "rand",
        "zeros_like", "ones_like", "empty_like", "full_like",
    )

    def __init__(self) -> None:
        for name in self._FACTORIES:
            setattr(self, name, self._host_factory(getattr(torch, name)))

    @staticmethod
    def _host_factory(factory: Callable) -> Callable:
        @functools.wraps(factory)
        def wrapper(*args, **kwargs):
            if _is_cuda_device(kwargs.get("device")):
                kwargs["device"] = _CPU
            return factory(*args, **kwargs)

        return wrapper

    def __getattr__(self, name: str):
        return getattr(torch, name)


CUDA_LITERAL_MODULES = (
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.rerun_state_machine",
    "megatron.core.tensor_parallel.data",
    "megatron.core.utils",
)


def patch_cuda_literal_factories() -> None:
    """Map literal ``device="cuda"`` tensor factories in the modules of CUDA_LITERAL_MODULES to the CPU.

    Those modules create small bookkeeping tensors (found-inf flags, loss scales, token counts in the
    schedules, the default causal mask, norms in clip_grads, dist-checkpoint verification flags, rerun
    state) with a hard-coded ``device="cuda"``. Only those modules' ``torch`` name is replaced (by a
    proxy that forwards everything else to torch), so no other code sees a changed torch.
    """
    host_torch = _HostTorch()
    for module_name in CUDA_LITERAL_MODULES:
        module = importlib.import_module(module_name)
        if getattr(module, "torch", None) is torch:
            module.torch = host_torch


_TENSOR_TYPE = torch.Tensor.type


def _cuda_type(self, dtype=None, non_blocking=False, **kwargs):
    if dtype is None and not self.is_cuda:
        return _TENSOR_TYPE(self).replace("torch.", "torch.cuda.", 1)
    return _TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


@contextlib.contextmanager
def _cuda_type_names():
    """While active, ``Tensor.type()`` (no argument) answers ``torch.cuda.*Tensor`` for CPU tensors."""
    previous = torch.Tensor.type
    torch.Tensor.type = _cuda_type
    try:
        yield
    finally:
        torch.Tensor.type = previous


def _with_cuda_type_names(fn: Callable) -> Callable:
    if getattr(fn, "_nemo_lpo_cuda_type_names", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    wrapper._nemo_lpo_cuda_type_names = True
    return wrapper


def patch_clip_grads_type_check() -> None:
    """Let ``clip_grad_by_total_norm_fp32`` accept fp32 CPU gradients.

    It asserts ``grad.type() == 'torch.cuda.FloatTensor'`` (meant: "fp32 grads"); on CPU the type string
    is ``torch.FloatTensor``. The call runs with ``Tensor.type()`` reporting CUDA names, so the dtype
    check keeps its meaning (a bf16 grad still fails it). optimizer.optimizer imported the function by
    name, so both references are replaced.
    """
    clip_grads.clip_grad_by_total_norm_fp32 = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    optimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32


def patch_optimizer_param_type() -> None:
    """Let the mixed-precision optimizers classify CPU params by dtype.

    ``Float16OptimizerWithFloat16Params.__init__``, ``DistributedOptimizer.__init__`` and its
    ``_build_model_and_main_param_groups`` dispatch on ``param.type()`` in {'torch.cuda.HalfTensor',
    'torch.cuda.BFloat16Tensor', 'torch.cuda.FloatTensor'} and raise for anything else, i.e. for every CPU param. They run with
    ``Tensor.type()`` reporting CUDA names, which keeps the dtype dispatch they mean.
    """
    cls = optimizer.Float16OptimizerWithFloat16Params
    cls.__init__ = _with_cuda_type_names(cls.__init__)
    dist_cls = distrib_optimizer.DistributedOptimizer
    dist_cls.__init__ = _with_cuda_type_names(dist_cls.__init__)
    build = dist_cls.__dict__["_build_model_and_main_param_groups"]
    dist_cls._build_model_and_main_param_groups = classmethod(_with_cuda_type_names(build.__func__))


def patch_torch_norm_sequence_parallel() -> None:
    """Allow ``WrappedTorchNorm`` (the local spec's RMSNorm) under sequence parallelism.

    megatron asserts ``not config.sequence_parallel`` there. RMSNorm works per token, so it is exact on
    a sequence shard; only its weight gradient is partial per TP rank. The norm's params are tagged
    ``.sequence_parallel = True`` exactly as TE/Apex norms are, so ``finalize_model_grads`` all-reduces
    their gradients over the TP group (callers must run it after backward, as megatron training does).
    """
    cls = torch_norm.WrappedTorchNorm
    if getattr(cls.__new__, "_nemo_lpo_sp", False):
        return
    original_new = cls.__new__

    def new(klass, config, hidden_size, eps=1e-5, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(klass, config, hidden_size, eps, *args, **kwargs)
        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = original_new(klass, plain, hidden_size, eps, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    new._nemo_lpo_sp = True
    cls.__new__ = staticmethod(new)


def patch_moe_alltoall_stream() -> None:
    """Give ``MoEAlltoAllTokenDispatcher`` a host stream for its device-to-host split copies.

    Its constructor creates ``torch.cuda.Stream()`` once (class attribute ``cuda_dtoh_stream``) to copy
    the all-to-all split sizes to the host asynchronously. On CPU the splits already live on the host;
    presetting the class attribute to the same host stream that ``current_stream()`` returns makes
    the copy run inline without recording streams.
    """
    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _HOST_STREAM


def patch_moe_alltoall_split_sizes() -> None:
    """Hand the alltoall dispatcher its split sizes as host numpy arrays, as its CUDA D2H copy does.

    ``MoEAlltoAllTokenDispatcher`` turns ``input_splits`` / ``output_splits`` into numpy arrays only inside
    ``maybe_move_tensor_to_cpu``, which skips tensors that are not on CUDA; CPU tensors then reach
    ``torch.distributed.all_to_all_single`` as split sizes, which it rejects (TypeError) as soon as EP > 1.
    The replacement converts host tensors too when ``as_numpy`` is asked for.
    """
    original = moe_utils.maybe_move_tensor_to_cpu

    def to_host(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = to_host


PATCHES: dict[str, Callable[[], None]] = {
    "cuda_device_queries": patch_cuda_device_queries,
    "cuda_current_stream": patch_cuda_current_stream,
    "rng_tracker": patch_rng_tracker,
    "cuda_literal_factories": patch_cuda_literal_factories,
    "clip_grads_type_check": patch_clip_grads_type_check,
    "optimizer_param_type": patch_optimizer_param_type,
    "torch_norm_sequence_parallel": patch_torch_norm_sequence_parallel,
    "moe_alltoall_stream": patch_moe_alltoall_stream,
    "moe_alltoall_split_sizes": patch_moe_alltoall_split_sizes,
}


def apply_cpu_compat(*, exclude: Collection[str] = ()) -> bool:
    """Apply every patch of PATCHES when CUDA is absent; return whether the layer is active.

    Idempotent: only the first call patches, later calls (``initialize_parallel`` makes one) return at once.

    Args:
        exclude: names of PATCHES to leave out. Only for tests that show a patch is necessary: the first
            call decides, so such a test must call this before anything else applies the layer.
    """
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    unknown = set(exclude) - set(PATCHES)
    if unknown:
        raise ValueError(f"unknown cpu-compat patches {sorted(unknown)}; known: {sorted(PATCHES)}")
    for name, patch in PATCHES.items():
        if name not in exclude:
            patch()
    _APPLIED = True
    return True

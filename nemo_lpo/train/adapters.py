"""LoRA / DoRA adapters on the policy through Megatron-Bridge's PEFT (``megatron.bridge.peft``, read in 0.6.2).

Bridge's ``LoRA`` / ``DoRA`` wrap megatron's linears (local and TE, expert linears included, tensor and expert
parallel) in ``LoRALinear`` / ``DoRALinear``; nemo-lpo only builds them from the ``peft`` section, applies them
after the base weights are loaded, and uses their ``disable_adapter`` for ``reference.mode=base``. Bridge's
``lora_layers.py`` imports Transformer Engine at module top, so it imports only where TE does (the NeMo
container) or, in tests, under the test-only TE import shim; it is imported here only when ``peft.type`` is set.

Adapter checkpoints hold the adapter tensors (``adapter_sharded_state``) and the optimizer state, plus a
pointer to the base checkpoint with a checksum of its weights (``base_pointer``), checked on resume.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from nemo_lpo.config import Config, ConfigError
from nemo_lpo.config.peft import PeftConfig
from nemo_lpo.io import resolve_checkpoint

NEMO_IMAGE = "nvcr.io/nvidia/nemo:26.08"
INSTALL_HINT = (f"run in the NeMo Framework container {NEMO_IMAGE} (Megatron-Bridge 0.6 with Transformer Engine), or "
                "install both into this environment: pip install 'megatron-bridge>=0.6,<0.7' "
                "'transformer-engine[pytorch]' (see docs/nemo.md for the versions that work together)")


def peft_import_error() -> str | None:
    """None when Megatron-Bridge's LoRA and DoRA import here, else why not."""
    try:
        import megatron.bridge.peft.dora  # noqa: F401
        import megatron.bridge.peft.lora  # noqa: F401
    except (ImportError, RuntimeError, OSError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def require_peft(peft: PeftConfig, init_checkpoint: str | None) -> None:
    """The start-up check of an adapter run: a base checkpoint, and Megatron-Bridge's PEFT importing here.

    Raises:
        ConfigError: adapters without ``model.init_checkpoint``, or ``megatron.bridge.peft`` does not import (the
            message says what to install).
    """
    if not peft.enabled:
        return
    if not init_checkpoint:
        raise ConfigError(f"peft.type={peft.type} trains adapters on a frozen base model: set model.init_checkpoint "
                          "(a converted checkpoint, nemo-lpo convert hf-to-mcore); a random base is not a model")
    error = peft_import_error()
    if error is not None:
        raise ConfigError(f"peft.type={peft.type} trains adapters with Megatron-Bridge's PEFT (megatron.bridge.peft), "
                          f"which does not import here ({error}): {INSTALL_HINT}; or set peft.type=none")


def build_peft(peft: PeftConfig, seed: int):
    """Bridge's ``LoRA`` / ``DoRA`` for the ``peft`` section, with ``lora_experts`` / ``dora_experts`` fixes.

    ``seed`` (``train.seed``): the adapter init's own seed (``adapter_init.SeededAdapterInit``), so that
    ``nemo-lpo train`` and Megatron-Bridge's PEFT hook in ``bridge-train`` draw the same adapters.
    """
    from nemo_lpo.train.dora_experts import ExpertsDoRA
    from nemo_lpo.train.lora_experts import ExpertsLoRA

    cls = {"lora": ExpertsLoRA, "dora": ExpertsDoRA}[peft.type]
    built = cls(target_modules=list(peft.target_modules), dim=peft.dim, alpha=peft.alpha, dropout=peft.dropout)
    built.init_seed = seed
    return built


def add_adapters(peft, modules: list) -> None:
    """Freeze ``modules`` (the model chunks, base weights loaded) and wrap the targeted linears with adapters.

    Only the adapter parameters require grad afterwards, so megatron's DDP buckets and its optimizer (plain or
    distributed) see only them. The adapter init (A: xavier, B: zero) draws from ``peft``'s own seed
    (``build_peft``), so it does not depend on what ran before in the process (a reference pass, another model).
    """
    peft(modules, training=True)
    peft.set_params_to_save(modules)
    if not any(p.requires_grad for m in modules for p in m.parameters()):
        raise ConfigError(f"peft.target_modules={peft.target_modules} matched no linear layer of the model")


@contextlib.contextmanager
def adapters_disabled(peft, modules: list):
    """The base model: Bridge's ``disable_adapter`` with the chunks in eval mode (no adapter dropout)."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with peft.disable_adapter(modules):
            yield modules
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


def _replica_share(param: torch.nn.Parameter) -> float:
    """The fraction of ``param`` this rank owns when all ranks' parameters are summed (1 / copies)."""
    if not param_is_not_tensor_parallel_duplicate(param):
        return 0.0  # counted on tensor-parallel rank 0 only
    if getattr(param, "allreduce", True):  # dense: one copy per data-parallel rank
        return 1.0 / ps.get_data_parallel_world_size()
    return 1.0 / ps.get_expert_data_parallel_world_size()  # expert: one copy per expert-data-parallel rank


def _global_sums(modules: list, values) -> list[float]:
    """Per-parameter ``values(param)`` summed over the whole model, every parameter once (any layout)."""
    params = [p for m in modules for p in m.parameters()]
    device = params[0].device if params else torch.device("cpu")
    totals = torch.zeros(len(values(params[0])) if params else 1, dtype=torch.float64, device=device)
    for p in params:
        share = _replica_share(p)
        if share:
            totals += share * torch.tensor(values(p), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(totals)
    return totals.tolist()


def parameter_counts(modules: list) -> dict[str, int]:
    """``params/trainable`` and ``params/total`` of the whole model (every layout counts each parameter once)."""
    trainable, total = _global_sums(modules, lambda p: (p.numel() if p.requires_grad else 0, p.numel()))
    return {"params/trainable": round(trainable), "params/total": round(total)}


def base_checksum(modules: list) -> float:
    """A layout-independent checksum of the frozen base weights: the sum of |w| over the whole model (float64)."""
    (value,) = _global_sums(modules,
                            lambda p: (0.0 if p.requires_grad else p.detach().double().abs().sum().item(),))
    return value


def base_pointer(cfg: Config, modules: list) -> dict:
    """What an adapter checkpoint records about its base: the checkpoint path and a checksum of its weights."""
    return {"type": cfg.peft.type, "base_checkpoint": str(resolve_checkpoint(cfg.model.init_checkpoint).resolve()),
            "base_checksum": base_checksum(modules)}


def check_base_pointer(saved: dict | None, now: dict, path: Path) -> None:
    """Refuse to resume adapters onto another base (or a full checkpoint as adapters, or the reverse).

    Raises:
        ValueError: names the saved base and this run's ``model.init_checkpoint``.
    """
    if saved is None or now is None:
        kind = "full-parameter" if saved is None else f"{saved['type']} adapter"
        raise ValueError(f"{path} is a {kind} checkpoint; this run has peft.type="
                         f"{now['type'] if now else 'none'}: resume with the same peft section")
    if saved["type"] != now["type"]:
        raise ValueError(f"{path} holds {saved['type']} adapters; this run has peft.type={now['type']}")
    if not math.isclose(saved["base_checksum"], now["base_checksum"], rel_tol=1e-9):
        raise ValueError(f"{path}: its adapters were trained on the base {saved['base_checkpoint']} (weight checksum "
                         f"{saved['base_checksum']:.10g}), but model.init_checkpoint={now['base_checkpoint']} has "
                         f"checksum {now['base_checksum']:.10g}: set model.init_checkpoint to the run's base")


def adapter_sharded_state(peft, sharded: dict) -> dict:
    """The adapter entries of a model sharded state dict (``model_sharded_state_dict``; chunks under ``modelN``)."""
    if all(key.startswith("model") and isinstance(value, dict) for key, value in sharded.items()) and sharded:
        return {key: adapter_sharded_state(peft, value) for key, value in sharded.items()}
    return {key: value for key, value in sharded.items()
            if peft.adapter_key_filter(key) and "_extra_state" not in key}


def load_adapter_state(module, loaded: dict) -> None:
    """Put loaded adapter tensors into the model (or its chunks); every adapter must be in the checkpoint."""
    chunks = module if isinstance(module, list) else [module]
    parts = [loaded[f"model{i}"] for i in range(len(chunks))] if len(chunks) > 1 else [loaded]
    for chunk, part in zip(chunks, parts, strict=True):
        result = chunk.load_state_dict(part, strict=False)
        adapters_missing = [key for key in result.missing_keys if ".adapter." in key]
        if adapters_missing or result.unexpected_keys:
            raise RuntimeError(f"adapter checkpoint does not match the model: missing {adapters_missing[:5]}, "
                               f"unexpected {result.unexpected_keys[:5]}")


def _merged_weight(wrapper) -> torch.Tensor:
    """The base weight with the adapter folded in (the weight that gives the wrapper's output, dropout off)."""
    if hasattr(wrapper.adapter, "get_weight_magnitude"):  # DoRA: m * (W0 + s B A) / ||W0 + s B A|| per row
        adapter = wrapper.adapter
        direction = wrapper.to_wrap.weight + wrapper.scaling * adapter.linear_out.weight @ adapter.linear_in.weight
        scale = adapter.get_weight_magnitude() / wrapper._get_weight_norm()
        return scale.view(-1, 1) * direction
    return wrapper.weight  # Bridge's LoRALinear.weight: LoRAMerge of W0 + alpha/dim * B A


@torch.no_grad()
def merge_adapters(modules: list) -> None:
    """Fold every adapter into its base linear and put the bare linear back: an ordinary GPTModel again.

    Single process only (TP=1: Bridge's ``LoRAMerge`` gathers the shards otherwise, not done here).
    """
    from megatron.bridge.peft.adapter_wrapper import AdapterWrapper

    for module in modules:
        wrappers = [(name, m) for name, m in module.named_modules() if isinstance(m, AdapterWrapper)]
        for name, wrapper in wrappers:
            wrapper.to_wrap.weight.copy_(_merged_weight(wrapper))
            parent_name, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, child, wrapper.to_wrap)

"""LPOModel: this rank's policy (its chunks under virtual pipeline), the optional online reference, and the task.

What a NeMo model class is to NeMo: it builds the policy (megatron DDP around a GPTModel, a Float16Module in
between for bf16), the optional online reference (a frozen copy of the starting policy, optionally offloaded to
CPU between uses), the run's ``BatchLayout`` (checked against the model's attention backend here, at start-up)
and the ``LPOTask`` whose callbacks megatron's schedules call. Precomputed reference log-probs (``nemo-lpo
ref-logps``) arrive in the batch as ``ref_logps``; then training holds no reference model.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

from nemo_lpo.batch.layouts import BatchLayout, select_layout
from nemo_lpo.config import Config
from nemo_lpo.io import checkpoint_sidecar
from nemo_lpo.model.build import resolve_use_te
from nemo_lpo.model.resolve import build_model_chunks
from nemo_lpo.train.adapters import (
    adapters_disabled,
    add_adapters,
    base_pointer,
    build_peft,
    parameter_counts,
    require_peft,
)
from nemo_lpo.train.checkpoint import load_model_weights
from nemo_lpo.train.task import LPOTask


def layout_of(cfg: Config, *, dense_masks: bool = False) -> BatchLayout:
    """The batch layout of a run config (``data.shared_prompt``, ``data.packed``)."""
    return select_layout(shared_prompt=cfg.data.shared_prompt, packed=cfg.data.packed, dense_masks=dense_masks,
                         te_varlen=cfg.model.te_varlen_attention)


def checked_layout(cfg: Config, use_te: bool) -> BatchLayout:
    """The run's layout after checking that the attention backend the builder will use serves it.

    Called before any model is built (``LPOModel``) and before ``nemo-lpo train`` launches its workers.

    Raises:
        UnsupportedLayoutError: the combination would give wrong log-probs; the message says what to use instead.
    """
    layout = layout_of(cfg)
    layout.check_backend(layout.backend_for(use_te))
    return layout


def _one_or_list(chunks: list):
    return chunks[0] if len(chunks) == 1 else chunks


class LPOModel:
    """Policy, reference, layout and task for one rank; needs ``initialize_parallel`` first.

    Args:
        cfg: the validated run configuration.
        train: wrap the policy in megatron DDP and build the online reference (when configured); with
            ``train=False`` only the bare module is built (the reference pass, evaluation).
        layout: the batch layout (default: the config's, ``layout_of``).

    Raises:
        UnsupportedLayoutError: the layout cannot run on the model's attention backend (before any step).
    """

    def __init__(self, cfg: Config, *, train: bool = True, layout: BatchLayout | None = None) -> None:
        self.cfg = cfg
        require_peft(cfg.peft, cfg.model.init_checkpoint)  # a clear refusal where Megatron-Bridge's PEFT does not import
        self.use_te = resolve_use_te(cfg.model.transformer_impl)
        self.layout = layout or layout_of(cfg)
        self.layout.check_backend(self.layout.backend_for(self.use_te))  # before anything is built
        # ``modules`` / ``models`` / ``references``: always lists, one chunk per virtual pipeline stage;
        # ``module`` / ``model`` / ``reference``: the single chunk without VPP, the list with it.
        self.preset, self.config, self.modules = build_model_chunks(cfg, use_te=self.use_te)
        self.module = _one_or_list(self.modules)
        # the converted model's description, copied into each training checkpoint (export, later runs)
        self.model_sidecar = checkpoint_sidecar(cfg.model.init_checkpoint)
        if cfg.model.init_checkpoint:
            load_model_weights(self.module, cfg.model.init_checkpoint)
        self.is_last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        self.dp_group = parallel_state.get_data_parallel_group()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.task = LPOTask(cfg, self.layout, self.dp_size)
        self.references = None
        if train and cfg.reference.mode == "online":
            self.references = self._build_reference()
        self.reference = None if self.references is None else _one_or_list(self.references)
        # adapters after the base weights (and after the online reference copied them): Bridge's LoRA / DoRA
        self.peft = build_peft(cfg.peft, cfg.train.seed) if cfg.peft.enabled else None
        self.base = None  # adapter runs: the base checkpoint's path and weight checksum (checkpoints record it)
        if self.peft is not None:
            add_adapters(self.peft, self.modules)
            self.base = base_pointer(cfg, self.modules)
        self.param_counts = parameter_counts(self.modules)
        self.models = self.modules
        if train:
            self.models = self._wrap_ddp()
        self.model = _one_or_list(self.models)

    def _build_reference(self) -> list:
        _, _, references = build_model_chunks(self.cfg, use_te=self.use_te)
        ref_ckpt = self.cfg.reference.checkpoint
        if ref_ckpt and ref_ckpt != self.cfg.model.init_checkpoint:
            load_model_weights(_one_or_list(references), ref_ckpt)
        else:  # same layout, same stage: the policy's starting weights, tensor for tensor
            for reference, module in zip(references, self.modules, strict=True):
                reference.load_state_dict(module.state_dict(), strict=True)
        for reference in references:
            reference.eval()
            for param in reference.parameters():
                param.requires_grad_(False)
            if self.cfg.reference.offload and torch.cuda.is_available():
                reference.cpu()
        return references

    def _wrap_ddp(self):
        p = self.cfg.parallel
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=p.overlap_grad_reduce,
            overlap_param_gather=p.overlap_param_gather,
            use_distributed_optimizer=p.distributed_optimizer,
            check_for_nan_in_grad=False,
            bucket_size=None if not p.overlap_grad_reduce else 40_000_000,
        )
        # one DDP per chunk, as Megatron-LM; only the first chunk's buffers overlap with the first
        # forward (megatron's disable_bucketing for the other chunks)
        ddps = [DistributedDataParallel(self.config, ddp_config, module, disable_bucketing=i > 0)
                for i, module in enumerate(self.modules)]
        self.config.no_sync_func = _one_or_list([ddp.no_sync for ddp in ddps])
        self.config.finalize_model_grads_func = finalize_model_grads
        if p.overlap_grad_reduce:
            self.config.grad_sync_func = _one_or_list([ddp.start_grad_sync for ddp in ddps])
        if p.overlap_param_gather:
            self.config.param_sync_func = _one_or_list([ddp.start_param_sync for ddp in ddps])
        return ddps

    # ------------------------------------------------------------------ reference
    @property
    def computes_reference(self) -> bool:
        """Whether the step computes the reference log-probs (online copy, or the base under the adapters)."""
        return self.reference is not None or self.cfg.reference.mode == "base"

    @contextlib.contextmanager
    def _reference_on_device(self):
        offload = self.cfg.reference.offload and torch.cuda.is_available()
        if offload:
            for reference in self.references:
                reference.cuda(torch.cuda.current_device())
        try:
            yield self.references
        finally:
            if offload:
                for reference in self.references:
                    reference.cpu()
                torch.cuda.empty_cache()

    def attach_online_reference(self, microbatches: list[dict]) -> None:
        """Fill ``ref_logps`` of every micro-batch with the frozen reference (forward only, same schedule).

        ``reference.mode=base``: the policy's own chunks with their adapters switched off (Bridge's
        ``disable_adapter``), a no-grad forward before the step's forward-backward.
        """
        if self.cfg.reference.mode == "base":
            with adapters_disabled(self.peft, self.modules) as base:
                logps = self.task.run_forward_only(base, microbatches, self.cfg.loss.length_average)
            for batch, value in zip(microbatches, logps, strict=False):
                batch["ref_logps"] = value
            return
        if self.reference is None:
            raise RuntimeError("reference.mode is precomputed but the batch has no ref_logps "
                               "(run `nemo-lpo ref-logps` on the dataset first, or set reference.mode=online)")
        with self._reference_on_device() as references:
            logps = self.task.run_forward_only(references, microbatches, self.cfg.loss.length_average)
        for batch, value in zip(microbatches, logps, strict=False):
            batch["ref_logps"] = value

"""LPOModel: the megatron GPTModel of this pipeline stage (its chunks under virtual pipeline), its reference handling and the listwise loss.

What a NeMo model class is to NeMo: it builds the policy (megatron DDP around a GPTModel, a Float16Module
in between for bf16), the optional online reference (a frozen copy of the starting policy, optionally
offloaded to CPU between uses), and the ``forward_step`` / loss function that megatron's
``get_forward_backward_func`` schedules call. Precomputed reference log-probs (``nemo-lpo ref-logps``)
arrive in the batch as ``ref_logps``; then training holds no reference model.

Loss reduction (DESIGN §1): the loss is the sum of per-list losses over the GLOBAL batch divided by the
global number of valid lists. Megatron's schedule divides each micro-batch loss by ``num_microbatches``
and DDP averages gradients over data-parallel ranks, so each micro-batch returns
``sum(per_list_loss) * num_microbatches * dp_size / global_valid`` and the gradient is exactly that of
the global mean, for every layout and micro-batch split.
"""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path

import torch

from nemo_lpo.config import Config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


FROM_CHECKPOINT = "from_checkpoint"
# ModelPreset fields that do not describe the weights' architecture (a name; the random-init scale)
_NOT_ARCHITECTURE = ("name", "init_method_std")


def checkpoint_sidecar(path: str | Path | None) -> Path | None:
    """The converted-model description (``nemo_lpo_model.json``) of checkpoint ``path``, if it has one."""
    from nemo_lpo.convert.mcore_side import SIDECAR_NAME
    from nemo_lpo.train.checkpoint import LATEST, latest_checkpoint

    if not path:
        return None
    path = Path(path)
    if (path / LATEST).is_file():  # a training run's checkpoints/ folder (its sidecar is copied per save)
        path = latest_checkpoint(path) or path
    sidecar = path / SIDECAR_NAME
    return sidecar if sidecar.is_file() else None


def _architecture_diff(named, recorded) -> list[str]:
    import dataclasses

    return [f"{f.name}: preset {getattr(named, f.name)!r} vs checkpoint {getattr(recorded, f.name)!r}"
            for f in dataclasses.fields(named)
            if f.name not in _NOT_ARCHITECTURE and getattr(named, f.name) != getattr(recorded, f.name)]


def resolve_preset(cfg: Config):
    """The ModelPreset to build: ``model.preset`` by name, or the one a converted checkpoint records.

    ``model.preset: from_checkpoint`` takes the architecture from the ``nemo_lpo_model.json`` of
    ``model.init_checkpoint`` (else ``reference.checkpoint``), so a model that matches no named preset (a custom
    SFT Llama-layout model) trains after ``nemo-lpo convert hf-to-mcore``. With a named preset, every converted
    checkpoint given (init and reference) must record the same architecture.

    Raises:
        ConfigError: no converted checkpoint for ``from_checkpoint``, an unknown name, or a disagreement.
    """
    from nemo_lpo.config import ConfigError
    from nemo_lpo.convert.mcore_side import ConversionError, read_checkpoint_preset
    from nemo_lpo.model.presets import get_preset

    recorded = []
    for key in ("model.init_checkpoint", "reference.checkpoint"):
        path = getattr(cfg.model if key.startswith("model") else cfg.reference, key.split(".")[1])
        sidecar = checkpoint_sidecar(path)
        if sidecar is not None:
            try:
                recorded.append((key, path, read_checkpoint_preset(sidecar.parent)))
            except ConversionError as err:
                raise ConfigError(f"{key}: {err}") from None
    if cfg.model.preset == FROM_CHECKPOINT:
        if not recorded:
            raise ConfigError(
                f"model.preset=from_checkpoint: no converted checkpoint description (nemo_lpo_model.json) in "
                f"model.init_checkpoint={cfg.model.init_checkpoint!r} or reference.checkpoint="
                f"{cfg.reference.checkpoint!r}; convert the HF model with `nemo-lpo convert hf-to-mcore` or name a preset")
        preset, source = recorded[0][2], f"{recorded[0][0]}={recorded[0][1]}"
    else:
        try:
            preset = get_preset(cfg.model.preset)
        except KeyError as err:
            raise ConfigError(f"model.preset: {err.args[0]} (or {FROM_CHECKPOINT})") from None
        source = f"model.preset={cfg.model.preset}"
    for key, path, other in recorded:
        diff = _architecture_diff(preset, other)
        if diff:
            raise ConfigError(f"{source} and {key}={path} (nemo_lpo_model.json) describe different models: "
                              + "; ".join(diff) + f". Set model.preset={FROM_CHECKPOINT} or convert a matching model")
    return preset


def build_transformer_config(cfg: Config):
    """Return (preset, TransformerConfig) for ``cfg.model`` under ``cfg.parallel``."""
    from nemo_lpo.model.presets import transformer_config

    preset = resolve_preset(cfg)
    p, m = cfg.parallel, cfg.model
    dtype = DTYPES[m.params_dtype]
    extra = {} if m.moe_aux_loss_coeff is None else {"moe_aux_loss_coeff": m.moe_aux_loss_coeff}
    if p.vpp > 1:
        from nemo_lpo.config import ConfigError

        if preset.num_layers % (p.pp * p.vpp):
            raise ConfigError(f"parallel.vpp: {preset.name} has {preset.num_layers} layers, not divisible by "
                              f"pp*vpp = {p.pp}*{p.vpp}")
        extra.update(virtual_pipeline_model_parallel_size=p.vpp, **VIRTUAL_PIPELINE_P2P)
    grouped_gemm = m.moe_grouped_gemm
    if grouped_gemm is None:  # auto: TE's layer spec is used exactly when TE imports (build.layer_spec)
        from nemo_lpo.model.build import transformer_engine_available

        grouped_gemm = preset.is_moe and transformer_engine_available()
    if m.fp8_recipe is not None:
        extra["fp8_recipe"] = m.fp8_recipe
    config = transformer_config(
        preset, tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, sequence_parallel=p.sequence_parallel,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp8=m.fp8, moe_grouped_gemm=grouped_gemm,
        recompute=None if m.recompute == "none" else m.recompute,
        moe_token_dispatcher_type=m.moe_token_dispatcher, **extra,
    )
    return preset, config


# Pipeline p2p settings of the interleaved (virtual pipeline) schedule; why (megatron-core 0.19.2, on any
# backend, not a gloo artefact):
# - batch_p2p_comm=False: the interleaved schedule's combined exchange posts [send_prev, recv_prev, send_next,
#   recv_next] in ONE batch_isend_irecv. At pp=2 the previous and the next rank are the same peer, and
#   point-to-point messages between one pair of ranks are matched in posting order, untagged (NCCL and gloo
#   alike), so each rank's recv_prev receives the peer's send_prev (a gradient instead of an activation):
#   same sizes, no error, wrong numbers (measured: losses off by 2e-2 from the 3rd micro-batch). Megatron-LM
#   itself never batches here: its VPP default is overlap_p2p_comm=True, batch_p2p_comm=False, used here too
#   (the unbatched path orders sends and receives by even/odd rank, so they pair correctly; measured exact
#   on CPU with and without overlap). Upstream reports: NVIDIA/Megatron-LM issue 1450, PR 5271.
# - variable_seq_lengths=False: megatron's shape exchange (_communicate_shapes) is batched the same way
#   regardless of batch_p2p_comm, so at pp=2 the shapes cross too; every micro-batch of a step therefore has
#   ONE shape (the feeder pads them to the step's longest), sent without a shape exchange.
VIRTUAL_PIPELINE_P2P = {"batch_p2p_comm": False, "overlap_p2p_comm": True, "variable_seq_lengths": False}


def _build_module(cfg: Config):
    """(preset, config, chunks): this rank's model chunks, one per virtual pipeline stage (one without VPP)."""
    from nemo_lpo.model.build import build_gpt_model

    preset, config = build_transformer_config(cfg)
    vpp = cfg.parallel.vpp
    chunks = []
    for vp_stage in range(vpp) if vpp > 1 else [None]:
        module = build_gpt_model(preset, config, vp_stage=vp_stage)
        if torch.cuda.is_available():
            module.cuda(torch.cuda.current_device())
        if config.bf16:
            from megatron.core.transformer.module import Float16Module

            module = Float16Module(config, module)
        chunks.append(module)
    return preset, config, chunks


def _one_or_list(chunks: list):
    return chunks[0] if len(chunks) == 1 else chunks


def chunk_iterators(microbatches: list[dict], chunks: int):
    """The data iterator(s) for megatron's schedule: one per virtual-pipeline chunk (each reads every micro-batch)."""
    return [iter(microbatches) for _ in range(chunks)] if chunks > 1 else iter(microbatches)


def count_valid_lists(batch: dict) -> torch.Tensor:
    """Lists with at least two valid responses (the loss module's notion of a valid list), as a 0-dim tensor."""
    return (batch["response_mask"].sum(dim=1) >= 2).sum()


def build_lpo_model(cfg: Config, *, train: bool = True) -> LPOModel:
    """``LPOModel``, or its shared-prompt variant (``nemo_lpo.packing``) when ``data.shared_prompt``."""
    if cfg.data.shared_prompt:
        from nemo_lpo.packing.lpo_model import SharedPromptLPOModel

        return SharedPromptLPOModel(cfg, train=train)
    return LPOModel(cfg, train=train)


class LPOModel:
    """Policy, reference and loss for one rank; needs ``initialize_parallel`` first.

    Args:
        cfg: the validated run configuration.
        train: wrap the policy in megatron DDP and build the online reference (when configured); with
            ``train=False`` only the bare module is built (the reference pass).
    """

    def __init__(self, cfg: Config, *, train: bool = True) -> None:
        from megatron.core import parallel_state

        from nemo_lpo.losses import LOSSES
        from nemo_lpo.train.checkpoint import load_model_weights

        if cfg.loss.type not in LOSSES:
            import difflib

            close = difflib.get_close_matches(cfg.loss.type, list(LOSSES), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; choose one of {sorted(LOSSES)}"
            raise ValueError(f"loss.type: unknown loss {cfg.loss.type!r}{hint}")
        self.cfg = cfg
        # ``modules`` / ``models`` / ``references``: always lists, one chunk per virtual pipeline stage;
        # ``module`` / ``model`` / ``reference``: the single chunk without VPP, the list with it.
        self.preset, self.config, self.modules = _build_module(cfg)
        self.module = _one_or_list(self.modules)
        # the converted model's description, copied into each training checkpoint (export, later runs)
        self.model_sidecar = checkpoint_sidecar(cfg.model.init_checkpoint)
        if cfg.model.init_checkpoint:
            load_model_weights(self.module, cfg.model.init_checkpoint)
        self.is_last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        self.dp_group = parallel_state.get_data_parallel_group()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.references = None
        if train and cfg.reference.mode == "online":
            self.references = self._build_reference()
        self.reference = None if self.references is None else _one_or_list(self.references)
        self.models = self.modules
        if train:
            self.models = self._wrap_ddp()
        self.model = _one_or_list(self.models)
        self.metric_names = self._metric_names()

    def _build_reference(self) -> list:
        from nemo_lpo.train.checkpoint import load_model_weights

        _, _, references = _build_module(self.cfg)
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
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )

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

    def _metric_names(self) -> list[str]:
        """Names the loss reports (same on every rank, whether or not it computes the loss)."""
        from nemo_lpo.losses import listwise_loss

        zeros = torch.zeros(1, 2)
        _, metrics = listwise_loss(self.cfg.loss.type, zeros, zeros, torch.tensor([[1.0, 0.0]]),
                                   torch.ones(1, 2, dtype=torch.bool), self.cfg.loss.beta,
                                   **self._loss_options({"response_lengths": torch.ones(1, 2, dtype=torch.long)}))
        return ["loss", *sorted(metrics)]

    def _loss_options(self, batch: dict) -> dict:
        options = dict(self.cfg.loss.options)
        # per-token NLL of the best response (the sft_weight term, the sft loss) needs the responses' token counts
        if (options.get("sft_weight", 0) or self.cfg.loss.type == "sft") and "response_lengths" in batch:
            options["response_lengths"] = batch["response_lengths"]
        return options

    # ------------------------------------------------------------------ schedule callbacks
    def forward_step(self, global_valid: torch.Tensor, num_microbatches: int, data_iterator, model):
        """Megatron ``forward_step_func``: run this stage on the next micro-batch, return the loss callback."""
        batch = next(data_iterator)
        output = model(**self.model_inputs(batch, model))
        return output, partial(self.loss_func, batch, global_valid, num_microbatches)

    # Batch-layout hooks: a subclass for another batch layout (nemo_lpo.packing's shared-prompt rows)
    # overrides these three and keeps the loss scaling, metric sums and reference handling below.
    def model_inputs(self, batch: dict, model) -> dict:
        """GPTModel forward arguments for ``batch`` (the last stage returns -log p(label) per token)."""
        from nemo_lpo.train.logprobs import model_inputs

        return model_inputs(batch, model)

    def response_logps(self, output: torch.Tensor, batch: dict, length_average: bool) -> torch.Tensor:
        """[B, K] response log-probs from the last stage's ``output``."""
        from nemo_lpo.train.logprobs import sequence_logps

        return sequence_logps(-output.float(), batch, length_average)

    def computed_tokens(self, batch: dict) -> torch.Tensor:
        """Number of tokens the model computed for ``batch`` (throughput metric)."""
        # empty rows pad a virtual-pipeline step's micro-batches to one shape (step.add_empty_rows)
        return batch["seq_lengths"].sum() - batch.get("empty_rows", 0)

    def loss_func(self, batch: dict, global_valid: torch.Tensor, num_microbatches: int, output: torch.Tensor):
        """Return (scaled micro-batch loss, metric SUMS) on the last stage; see the module docstring."""
        from nemo_lpo.losses import listwise_loss

        policy = self.response_logps(output, batch, self.cfg.loss.length_average)
        reference = batch["ref_logps"].to(policy)
        per_list, metrics = listwise_loss(self.cfg.loss.type, policy, reference, batch["rewards"].to(policy),
                                          batch["response_mask"], self.cfg.loss.beta, **self._loss_options(batch))
        loss_sum = per_list.sum()
        scale = num_microbatches * self.dp_size / global_valid.clamp(min=1).to(loss_sum)
        valid = metrics["lists/valid"]
        sums = {name: (value * valid).detach() for name, value in metrics.items() if name != "lists/valid"}
        sums["lists/valid"] = valid.detach()
        sums["loss"] = loss_sum.detach()
        sums["tokens"] = self.computed_tokens(batch).to(loss_sum)
        return loss_sum * scale, sums

    def reference_forward_step(self, length_average: bool, data_iterator, model):
        """``forward_step_func`` of the forward-only reference pass: the callback reports [B, K] log-probs."""
        batch = next(data_iterator)
        output = model(**self.model_inputs(batch, model))

        def loss_func(out):
            logps = self.response_logps(out, batch, length_average).detach()
            return torch.zeros((), device=out.device), {"ref_logps": logps}

        return output, loss_func

    # ------------------------------------------------------------------ reference
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
        """Fill ``ref_logps`` of every micro-batch with the frozen reference (forward only, same schedule)."""
        if self.reference is None:
            raise RuntimeError("reference.mode is precomputed but the batch has no ref_logps "
                               "(run `nemo-lpo ref-logps` on the dataset first, or set reference.mode=online)")
        with self._reference_on_device() as references:
            logps = run_forward_only(references, self.reference_forward_step, microbatches,
                                     self.cfg.loss.length_average)
        for batch, value in zip(microbatches, logps, strict=False):
            batch["ref_logps"] = value


def run_forward_only(module, forward_step_factory, microbatches: list[dict], length_average: bool) -> list:
    """Run ``microbatches`` forward through ``module`` with megatron's schedule; [B, K] log-probs on the last stage.

    ``module`` is a model or its list of virtual-pipeline chunks. Under the interleaved schedule the micro-batches
    must share one shape (callers pad them) and their count must be a multiple of pp: the last one is repeated
    to fill up and its extra results dropped. Other pipeline stages get an empty list (they do not need the values).
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = module if isinstance(module, list) else [module]
    count = len(microbatches)
    if len(chunks) > 1:
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        microbatches = microbatches + [microbatches[-1]] * (-count % pp)
    first = microbatches[0]["tokens"]
    data = chunk_iterators(microbatches, len(chunks))
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=partial(forward_step_factory, length_average),
            data_iterator=data, model=chunks, num_microbatches=len(microbatches),
            seq_length=first.shape[1], micro_batch_size=first.shape[0], forward_only=True,
        )
    return [item["ref_logps"] for item in out][:count] if out else []

"""From a run config to this rank's model chunks: architecture, TransformerConfig, layer implementation.

The architecture is a named preset or the one a converted checkpoint records.

``resolve_preset`` is shared by training, the reference pass and ``nemo-lpo eval`` so that all three build the same
architecture from the same config; ``build_model_chunks`` builds one ``GPTModelWithPositions`` per virtual
pipeline stage (one without VPP), on the GPU when there is one, wrapped in megatron's ``Float16Module`` for bf16.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.transformer.module import Float16Module

from nemo_lpo.config import Config, ConfigError
from nemo_lpo.io import checkpoint_sidecar
from nemo_lpo.model.build import build_gpt_model, resolve_use_te
from nemo_lpo.model.presets import ModelPreset, get_preset, transformer_config
from nemo_lpo.model.sidecar import ModelDescriptionError, read_checkpoint_preset

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FROM_CHECKPOINT = "from_checkpoint"
"""``model.preset`` value: the architecture recorded by a converted checkpoint."""
# ModelPreset fields that do not describe the weights' architecture (a name; the random-init scale)
_NOT_ARCHITECTURE = ("name", "init_method_std")

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


def _architecture_diff(named: ModelPreset, recorded: ModelPreset) -> list[str]:
    return [f"{f.name}: preset {getattr(named, f.name)!r} vs checkpoint {getattr(recorded, f.name)!r}"
            for f in dataclasses.fields(named)
            if f.name not in _NOT_ARCHITECTURE and getattr(named, f.name) != getattr(recorded, f.name)]


def _recorded_presets(checkpoints: dict[str, str | None]) -> list[tuple[str, str, ModelPreset]]:
    """(config key, path, preset) of every converted checkpoint among ``{config key: path}``, in order."""
    recorded = []
    for key, path in checkpoints.items():
        sidecar = checkpoint_sidecar(path)
        if sidecar is not None:
            try:
                recorded.append((key, path, read_checkpoint_preset(sidecar.parent)))
            except ModelDescriptionError as err:
                raise ConfigError(f"{key}: {err}") from None
    return recorded


def preset_of(name: str, checkpoints: dict[str, str | None], key: str = "model.preset") -> ModelPreset:
    """The preset called ``name``, or (``from_checkpoint``) the first one ``checkpoints`` record; all must agree.

    Args:
        name: a preset name or ``from_checkpoint``.
        checkpoints: ``{config key: checkpoint path or None}``, searched in order for ``nemo_lpo_model.json``.
        key: the config key of ``name``, for messages.

    Raises:
        ConfigError: no converted checkpoint for ``from_checkpoint``, an unknown name, or a disagreement.
    """
    recorded = _recorded_presets(checkpoints)
    if name == FROM_CHECKPOINT:
        if not recorded:
            given = " or ".join(f"{k}={v!r}" for k, v in checkpoints.items())
            raise ConfigError(f"{key}=from_checkpoint: no converted checkpoint description (nemo_lpo_model.json) in "
                              f"{given}; convert the HF model with `nemo-lpo convert hf-to-mcore` or name a preset")
        preset, source = recorded[0][2], f"{recorded[0][0]}={recorded[0][1]}"
    else:
        try:
            preset = get_preset(name)
        except KeyError as err:
            raise ConfigError(f"{key}: {err.args[0]} (or {FROM_CHECKPOINT})") from None
        source = f"{key}={name}"
    for other_key, path, other in recorded:
        diff = _architecture_diff(preset, other)
        if diff:
            raise ConfigError(f"{source} and {other_key}={path} (nemo_lpo_model.json) describe different models: "
                              + "; ".join(diff) + f". Set {key}={FROM_CHECKPOINT} or convert a matching model")
    return preset


def resolve_preset(cfg: Config) -> ModelPreset:
    """The ModelPreset to build: ``model.preset`` by name, or the one a converted checkpoint records.

    ``model.preset: from_checkpoint`` takes the architecture from the ``nemo_lpo_model.json`` of
    ``model.init_checkpoint`` (else ``reference.checkpoint``), so a model that matches no named preset (a custom
    SFT Llama-layout model) trains after ``nemo-lpo convert hf-to-mcore``. With a named preset, every converted
    checkpoint given (init and reference) must record the same architecture.

    Raises:
        ConfigError: no converted checkpoint for ``from_checkpoint``, an unknown name, or a disagreement.
    """
    preset = preset_of(cfg.model.preset, {"model.init_checkpoint": cfg.model.init_checkpoint,
                                          "reference.checkpoint": cfg.reference.checkpoint})
    source = f"model.preset={cfg.model.preset}"
    if cfg.model.moe_grouped_gemm and not preset.is_moe:
        raise ConfigError(f"model.moe_grouped_gemm=true but {source} has no experts; set it to null (auto) or false")
    p = cfg.parallel
    if p.vpp > 1 and preset.num_layers % (p.pp * p.vpp):
        raise ConfigError(f"parallel.vpp: {source} has {preset.num_layers} layers, not divisible by "
                          f"pp*vpp = {p.pp}*{p.vpp}")
    return preset


def build_transformer_config(cfg: Config):
    """Return (preset, TransformerConfig) for ``cfg.model`` under ``cfg.parallel``."""
    preset = resolve_preset(cfg)
    p, m = cfg.parallel, cfg.model
    dtype = DTYPES[m.params_dtype]
    extra = {} if m.moe_aux_loss_coeff is None else {"moe_aux_loss_coeff": m.moe_aux_loss_coeff}
    if p.vpp > 1:
        extra.update(virtual_pipeline_model_parallel_size=p.vpp, **VIRTUAL_PIPELINE_P2P)
    grouped_gemm = m.moe_grouped_gemm
    if grouped_gemm is None:  # auto: with TE's layer spec (the one that has grouped GEMM), for MoE models
        grouped_gemm = preset.is_moe and resolve_use_te(m.transformer_impl)
    if m.fp8_recipe is not None:
        extra["fp8_recipe"] = m.fp8_recipe
    config = transformer_config(
        preset, tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, sequence_parallel=p.sequence_parallel,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp8=m.fp8, moe_grouped_gemm=grouped_gemm,
        recompute=None if m.recompute == "none" else m.recompute,
        moe_token_dispatcher_type=m.moe_token_dispatcher, **extra,
    )
    return preset, config


def build_model_chunks(cfg: Config, *, use_te: bool | None = None):
    """(preset, config, chunks): this rank's model chunks, one per virtual pipeline stage (one without VPP).

    ``use_te``: TE's layer spec or megatron's local one (default: ``model.transformer_impl``, ``resolve_use_te``).
    """
    preset, config = build_transformer_config(cfg)
    if use_te is None:
        use_te = resolve_use_te(cfg.model.transformer_impl)
    # shared-prompt rows on TE take the gathered varlen core attention (model.te_varlen_attention)
    te_gathered = use_te and cfg.model.te_varlen_attention and cfg.data.shared_prompt
    vpp = cfg.parallel.vpp
    chunks = []
    for vp_stage in range(vpp) if vpp > 1 else [None]:
        module = build_gpt_model(preset, config, vp_stage=vp_stage, use_te=use_te, te_gathered_attention=te_gathered)
        if torch.cuda.is_available():
            module.cuda(torch.cuda.current_device())
        if config.bf16:
            module = Float16Module(config, module)
        chunks.append(module)
    return preset, config, chunks


"""Layer-spec selection (Transformer Engine when it imports, megatron's local spec otherwise) and model building."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention

from nemo_lpo.model.attention import GatheredDotProductAttention, with_core_attention
from nemo_lpo.model.gpt import GPTModelWithPositions, unwrapped_attribute
from nemo_lpo.model.presets import ModelPreset
from nemo_lpo.model.varlen import check_te_gathered_config


def transformer_engine_available() -> bool:
    """Whether Transformer Engine imports here (lazily; a broken TE raises RuntimeError/OSError, not ImportError)."""
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    return True


def uses_transformer_engine(model) -> bool:
    """Whether ``model`` (possibly wrapped: DDP, Float16Module, a list of chunks) was built from TE's layer spec.

    ``build_gpt_model`` records the choice on the ``GPTModelWithPositions`` it returns; the batch layouts read it
    to refuse combinations TE's attention would compute wrongly (``nemo_lpo.batch.layouts``).
    """
    if isinstance(model, (list, tuple)):
        return any(uses_transformer_engine(chunk) for chunk in model)
    return bool(unwrapped_attribute(model, "uses_transformer_engine"))


def resolve_use_te(transformer_impl: str = "auto") -> bool:
    """Whether to build TE's layer spec for ``model.transformer_impl`` (Megatron-LM's ``--transformer-impl``).

    ``auto``: TE when it imports; ``transformer_engine``: TE, an error when it does not import; ``local``:
    megatron's local spec (with the gathered core attention).
    """
    if transformer_impl == "local":
        return False
    if transformer_impl == "transformer_engine":
        if not transformer_engine_available():
            raise RuntimeError("model.transformer_impl=transformer_engine but transformer_engine does not import "
                               "on this machine (use an NGC PyTorch/NeMo image, or model.transformer_impl=local)")
        return True
    if transformer_impl != "auto":
        raise ValueError(f"transformer_impl must be auto, transformer_engine or local, got {transformer_impl!r}")
    return transformer_engine_available()


def layer_spec(config, *, use_te: bool | None = None, vp_stage: int | None = None,
               te_gathered_attention: bool = False):
    """The decoder block spec for ``config``: TE's when ``use_te`` (default: when TE imports), local otherwise.

    ``te_gathered_attention``: on TE's spec, core attention that takes shared-prompt / packed layouts
    (``nemo_lpo/model/te_attention.py``, code only where TE is absent); the local spec always has its gathered one.

    MoE configs get megatron's MoE layers (SequentialMLP experts on the local path; TE grouped GEMM when
    TE is used and ``moe_grouped_gemm`` is set). FP8 or ``moe_grouped_gemm`` without TE is an error.
    """
    if use_te is not False and te_gathered_attention:
        check_te_gathered_config(config)  # by name, before TE is imported or a layer is built
    if use_te is None:
        use_te = transformer_engine_available()
    elif use_te and not transformer_engine_available():
        raise RuntimeError("use_te=True but transformer_engine does not import on this machine")
    if getattr(config, "fp8", None) and not use_te:
        raise ValueError(
            f"fp8={config.fp8!r} needs Transformer Engine, which is not available here "
            "(or use_te=False was passed); set fp8=None to run in bf16/fp32"
        )
    if getattr(config, "moe_grouped_gemm", False) and not use_te:
        raise ValueError(
            "moe_grouped_gemm=True needs Transformer Engine's layer spec (TEGroupedMLP), which is not used here "
            "(TE does not import, or use_te=False was passed); megatron's local spec would silently run one GEMM "
            "per expert instead: set model.moe_grouped_gemm=false (or null: auto)"
        )
    if use_te:
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=True, normalization="RMSNorm",
                                          vp_stage=vp_stage)
        if te_gathered_attention:

            from nemo_lpo.model.te_attention import with_te_gathered_attention  # imports TE: only on its spec

            spec = with_te_gathered_attention(spec)
        return spec
    return with_gathered_attention(get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                                              normalization="RMSNorm", vp_stage=vp_stage))


def with_gathered_attention(block_spec):
    """A copy of a local decoder block spec whose core attention is ``GatheredDotProductAttention``.

    It is megatron's ``DotProductAttention`` for boolean masks and computes shared-prompt / packed rows part
    by part when handed an ``attention_layout`` (nemo_lpo/model/attention.py); no parameters change.
    """
    return with_core_attention(block_spec, DotProductAttention, GatheredDotProductAttention)


def build_gpt_model(
    preset: ModelPreset,
    config,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    use_te: bool | None = None,
    vp_stage: int | None = None,
    te_gathered_attention: bool = False,
):
    """Build the megatron GPTModel of ``preset`` for this rank's pipeline stage.

    Needs ``parallel.initialize_parallel`` first. The model is a ``GPTModelWithPositions`` (a GPTModel
    whose RoPE honours ``position_ids``; same parameters and state dict), with untied input/output
    embeddings, RoPE θ from the preset, and unpadded vocab (``preset.vocab_size``).

    Args:
        preset: the architecture.
        config: ``presets.transformer_config(preset, ...)``.
        pre_process: this stage holds the embedding (default: first pipeline stage).
        post_process: this stage holds the output layer (default: last pipeline stage).
        use_te: force the TE (True) or local (False) layer spec; default: TE when it imports.
        vp_stage: virtual pipeline stage, if interleaving.
        te_gathered_attention: on TE's spec, the core attention that takes layouts (``layer_spec``).
    """
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if config.num_layers != preset.num_layers:
        raise ValueError(f"config has {config.num_layers} layers but preset {preset.name} has {preset.num_layers}")
    if not torch.cuda.is_available() and not config.use_cpu_initialization:
        raise ValueError("no CUDA here: build with transformer_config(..., use_cpu_initialization=True)")
    if use_te is None:
        use_te = transformer_engine_available()
    spec = layer_spec(config, use_te=use_te, vp_stage=vp_stage, te_gathered_attention=te_gathered_attention)
    return GPTModelWithPositions(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=preset.vocab_size,
        max_sequence_length=preset.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(preset.rotary_base),
        sliding_window=preset.sliding_window,
        uses_transformer_engine=use_te,
        vp_stage=vp_stage,
    )

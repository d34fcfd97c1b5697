"""Architecture presets (Mixtral-8x7B, Mistral-7B, tiny CPU variants) and their megatron TransformerConfig.

A preset holds only the architecture (what a HF ``config.json`` holds); the parallel plan, precision and
recompute are arguments of ``transformer_config``, so the same preset runs on a laptop CPU and on a cluster.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

FP8_FORMATS = (None, "hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
DISPATCHERS = ("alltoall", "allgather")


@dataclass(frozen=True)
class ModelPreset:
    """A decoder-only Mistral-family architecture (RMSNorm, SwiGLU, RoPE, GQA, no biases, untied embeddings)."""

    name: str
    """Registry key, e.g. ``mixtral-8x7b``."""
    num_layers: int
    """Transformer layers (HF ``num_hidden_layers``)."""
    hidden_size: int
    """Model width (HF ``hidden_size``)."""
    ffn_hidden_size: int
    """SwiGLU inner width per expert / dense MLP (HF ``intermediate_size``)."""
    num_attention_heads: int
    """Query heads (HF ``num_attention_heads``)."""
    num_query_groups: int
    """Key/value heads for grouped-query attention (HF ``num_key_value_heads``)."""
    vocab_size: int
    """Vocabulary size, unpadded (32000 for the Mistral v1 tokenizer)."""
    max_position_embeddings: int
    """Longest sequence the model was trained for (HF ``max_position_embeddings``)."""
    rotary_base: float
    """RoPE θ (HF ``rope_theta``)."""
    norm_epsilon: float = 1e-5
    """RMSNorm ε (HF ``rms_norm_eps``)."""
    num_experts: int | None = None
    """Experts per MoE layer (HF ``num_local_experts``); None for a dense model."""
    moe_router_topk: int = 2
    """Experts per token (HF ``num_experts_per_tok``); used only when ``num_experts`` is set."""
    sliding_window: int | None = None
    """Sliding-window attention span (Mistral-7B v0.1: 4096). megatron's local attention cannot honour it
    together with an explicit mask, so sequences must fit inside it there (checked at forward)."""
    init_method_std: float = 0.02
    """Std of the normal weight init (HF ``initializer_range``), for models built from scratch."""

    def __post_init__(self) -> None:
        for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                      "num_query_groups", "vocab_size", "max_position_embeddings"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelPreset {self.name!r}: {field} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"ModelPreset {self.name!r}: hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"ModelPreset {self.name!r}: num_attention_heads {self.num_attention_heads} is not "
                             f"divisible by num_query_groups {self.num_query_groups}")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(f"ModelPreset {self.name!r}: head dim must be even for RoPE")
        if self.rotary_base <= 0 or self.norm_epsilon <= 0 or self.init_method_std <= 0:
            raise ValueError(f"ModelPreset {self.name!r}: rotary_base, norm_epsilon, init_method_std must be > 0")
        if self.num_experts is not None and not (1 <= self.moe_router_topk <= self.num_experts):
            raise ValueError(f"ModelPreset {self.name!r}: moe_router_topk {self.moe_router_topk} must be in "
                             f"[1, num_experts={self.num_experts}]")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"ModelPreset {self.name!r}: sliding_window must be positive or None")

    @property
    def is_moe(self) -> bool:
        """Whether the MLPs are mixtures of experts."""
        return self.num_experts is not None

    @property
    def head_dim(self) -> int:
        """Per-head width (``kv_channels``)."""
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes) -> ModelPreset:
        """A validated copy with some fields changed (e.g. fewer layers for a test)."""
        return dataclasses.replace(self, **changes)


_MISTRAL_DENSE = dict(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                      num_query_groups=8, vocab_size=32000, norm_epsilon=1e-5)

PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        # https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json
        ModelPreset(name="mixtral-8x7b", **_MISTRAL_DENSE, max_position_embeddings=32768, rotary_base=1e6,
                    num_experts=8, moe_router_topk=2),
        # https://huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json
        ModelPreset(name="mistral-7b", **_MISTRAL_DENSE, max_position_embeddings=32768, rotary_base=1e4,
                    sliding_window=4096),
        # CPU-sized, same family; vocab 32000 so the real Mistral tokenizer fits.
        ModelPreset(name="tiny-mixtral", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                    num_query_groups=2, vocab_size=32000, max_position_embeddings=4096, rotary_base=1e6,
                    num_experts=4, moe_router_topk=2),
        ModelPreset(name="tiny-mistral", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                    num_query_groups=2, vocab_size=32000, max_position_embeddings=4096, rotary_base=1e4),
    )
}


def get_preset(name: str) -> ModelPreset:
    """Look a preset up by name, with a clear error listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None


def transformer_config(
    preset: ModelPreset,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    bf16: bool = False,
    fp8: str | None = None,
    fp8_recipe: str = "delayed",
    moe_grouped_gemm: bool = False,
    recompute: str | None = None,
    recompute_num_layers: int | None = None,
    moe_aux_loss_coeff: float = 1e-2,
    moe_token_dispatcher_type: str = "alltoall",
    variable_seq_lengths: bool | None = None,
    use_cpu_initialization: bool | None = None,
    fusions: bool | None = None,
    **overrides,
):
    """Build megatron's TransformerConfig for ``preset`` under a parallel plan and precision.

    Args:
        preset: the architecture.
        tp: tensor-parallel size.
        pp: pipeline-parallel size (must divide ``num_layers``).
        ep: expert-parallel size (must divide ``num_experts``).
        etp: expert-tensor-parallel size (None: megatron's default, ``tp``).
        sequence_parallel: shard activations along the sequence in TP regions (needs tp > 1; megatron
            requires it for MoE with tp > 1 when training).
        params_dtype: dtype of the weights.
        bf16: bf16 mixed precision (``params_dtype`` should then be torch.bfloat16).
        fp8: None, ``'hybrid'`` or ``'e4m3'`` (needs Transformer Engine; checked when building the model).
        fp8_recipe: TE FP8 recipe (``delayed``, ``tensorwise``, ``blockwise``, ``mxfp8``).
        moe_grouped_gemm: MoE experts as one grouped GEMM (TE's ``TEGroupedMLP``; needs the TE layer spec,
            ``build.layer_spec`` refuses it on the local one); False: one GEMM per expert (``SequentialMLP``).
        recompute: None, ``'selective'`` (core attention) or ``'full'`` (uniform, every layer).
        recompute_num_layers: layers per recompute chunk for ``'full'`` (default 1).
        moe_aux_loss_coeff: weight of the router load-balancing loss (added to the backward by megatron).
        moe_token_dispatcher_type: ``'alltoall'`` or ``'allgather'``.
        variable_seq_lengths: micro-batches may differ in length, so pipeline p2p exchanges shapes first
            (default: when pp > 1; megatron allows it only with the alltoall dispatcher).
        use_cpu_initialization: init weights on the host (default: when CUDA is absent).
        fusions: enable megatron's fused kernels (default: only with CUDA; they need it).
        **overrides: any further TransformerConfig fields, passed through unchanged.
    """
    cuda = torch.cuda.is_available()
    fusions = cuda if fusions is None else fusions
    if use_cpu_initialization is None:
        use_cpu_initialization = not cuda
    if fp8 not in FP8_FORMATS:
        raise ValueError(f"fp8 must be one of {FP8_FORMATS}, got {fp8!r}")
    if fp8 is not None and fp8_recipe not in FP8_RECIPES:
        raise ValueError(f"fp8_recipe must be one of {FP8_RECIPES}, got {fp8_recipe!r}")
    if recompute not in (None, "selective", "full"):
        raise ValueError(f"recompute must be None, 'selective' or 'full', got {recompute!r}")
    if moe_token_dispatcher_type not in DISPATCHERS:
        raise ValueError(f"moe_token_dispatcher_type must be one of {DISPATCHERS}, got {moe_token_dispatcher_type!r}")
    if preset.num_layers % pp:
        raise ValueError(f"{preset.name}: num_layers {preset.num_layers} is not divisible by pp={pp}")
    if preset.vocab_size % tp:
        raise ValueError(f"{preset.name}: vocab_size {preset.vocab_size} is not divisible by tp={tp}")
    if preset.num_query_groups % tp:
        raise ValueError(f"{preset.name}: num_query_groups {preset.num_query_groups} is not divisible by tp={tp}")
    if moe_grouped_gemm and not preset.is_moe:
        raise ValueError(f"{preset.name} is dense: moe_grouped_gemm=True needs a MoE preset")
    if ep > 1 and not preset.is_moe:
        raise ValueError(f"{preset.name} is dense: expert parallelism ep={ep} needs a MoE preset")
    if preset.is_moe and preset.num_experts % ep:
        raise ValueError(f"{preset.name}: num_experts {preset.num_experts} is not divisible by ep={ep}")
    if variable_seq_lengths is None:
        variable_seq_lengths = pp > 1
    if sequence_parallel and tp == 1:
        sequence_parallel = False  # megatron forbids it at tp=1; it is a no-op there anyway

    kwargs = dict(
        num_layers=preset.num_layers,
        hidden_size=preset.hidden_size,
        ffn_hidden_size=preset.ffn_hidden_size,
        num_attention_heads=preset.num_attention_heads,
        num_query_groups=preset.num_query_groups,
        kv_channels=preset.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=preset.norm_epsilon,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=preset.init_method_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=bf16,
        variable_seq_lengths=variable_seq_lengths,
        use_cpu_initialization=use_cpu_initialization,
        # Fused kernels need CUDA; masked_softmax_fusion must stay off anyway on the local causal path
        # because its upper-triangular kernel silently ignores an explicit (packed) mask.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        moe_token_dispatcher_type=moe_token_dispatcher_type,
    )
    if fusions:
        kwargs.update(bias_activation_fusion=True, bias_dropout_fusion=True)
    if preset.is_moe:
        kwargs.update(
            num_moe_experts=preset.num_experts,
            moe_router_topk=preset.moe_router_topk,
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=moe_aux_loss_coeff,
            moe_grouped_gemm=moe_grouped_gemm,
            moe_permute_fusion=False,
        )
    if fp8 is not None:
        kwargs.update(fp8=fp8, fp8_recipe=fp8_recipe)
    if recompute == "selective":
        kwargs.update(recompute_granularity="selective")
    elif recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=recompute_num_layers or 1)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)

"""HF ``config.json`` <-> :class:`nemo_lpo.model.presets.ModelPreset`, through transformers' own config classes.

Only what megatron's Mistral-family GPTModel can honour is accepted; everything else is a
:class:`ConversionError` naming the config file and the field, raised before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig, LlamaConfig, MistralConfig, MixtralConfig

from nemo_lpo.model.presets import ModelPreset
from nemo_lpo.model.sidecar import ModelDescriptionError

SUPPORTED_ARCHITECTURES = ("MixtralForCausalLM", "MistralForCausalLM", "LlamaForCausalLM")


class ConversionError(ModelDescriptionError):
    """Bad input to a converter (missing file, unsupported setting, config that does not match the weights)."""


def load_hf_config(path: str | Path):
    """Read ``PATH/config.json`` with ``transformers.AutoConfig`` (local files only, never the hub)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{config_file}: not found (expected an HF model directory)")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, KeyError, OSError) as err:
        raise ConversionError(f"{config_file}: transformers cannot read it: {err}") from err


def architecture_of(config, source: str = "config.json") -> str:
    """The single supported ``architectures`` entry of ``config``, else a ConversionError."""
    archs = list(getattr(config, "architectures", None) or [])
    if len(archs) != 1:
        raise ConversionError(f"{source}: field 'architectures' must name exactly one architecture, got {archs}")
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"{source}: field 'architectures': {archs[0]!r} is not supported; supported: {SUPPORTED_ARCHITECTURES}"
        )
    return archs[0]


def _rope_theta(config, source: str) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ConversionError(
            f"{source}: field 'rope_parameters.rope_type' is {rope_type!r}; megatron's preset supports only "
            "plain RoPE ('default')"
        )
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ConversionError(f"{source}: no rope_theta in 'rope_parameters'")
    return float(theta)


def preset_from_hf_config(config, name: str | None = None, source: str = "config.json"):
    """Translate a Mixtral / Mistral / Llama ``PretrainedConfig`` into a validated ``ModelPreset``.

    Args:
        config: the transformers config object (from :func:`load_hf_config` or built in memory).
        name: preset name to record (default: ``hf-<model_type>``).
        source: what to call the config in error messages (its path).

    Raises:
        ConversionError: unsupported architecture or a setting the megatron model cannot honour.
    """
    arch = architecture_of(config, source)

    def bad(field: str, value: Any, why: str) -> ConversionError:
        return ConversionError(f"{source}: field {field!r} = {value!r}: {why}")

    if getattr(config, "hidden_act", "silu") != "silu":
        raise bad("hidden_act", config.hidden_act, "only SwiGLU with silu is supported")
    if getattr(config, "tie_word_embeddings", False):
        raise bad("tie_word_embeddings", True, "tied input/output embeddings are not supported (the presets are "
                  "untied, as Mixtral/Mistral are)")
    for field in ("attention_bias", "mlp_bias"):
        if getattr(config, field, False):
            raise bad(field, True, "biases are not supported (the megatron model has no linear biases)")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None and head_dim * heads != config.hidden_size:
        raise bad("head_dim", head_dim, f"must equal hidden_size / num_attention_heads = "
                  f"{config.hidden_size // heads} (a decoupled head_dim is not supported)")
    sliding_window = getattr(config, "sliding_window", None)
    if arch == "LlamaForCausalLM":
        sliding_window = None
    if sliding_window is not None and sliding_window >= config.max_position_embeddings:
        sliding_window = None  # a window that covers every position is plain causal attention
    num_experts = None
    topk = 2
    if arch == "MixtralForCausalLM":
        num_experts = int(config.num_local_experts)
        topk = int(config.num_experts_per_tok)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    try:
        return ModelPreset(
            name=name or f"hf-{config.model_type}",
            num_layers=int(config.num_hidden_layers),
            hidden_size=int(config.hidden_size),
            ffn_hidden_size=int(config.intermediate_size),
            num_attention_heads=int(heads),
            num_query_groups=int(kv_heads),
            vocab_size=int(config.vocab_size),
            max_position_embeddings=int(config.max_position_embeddings),
            rotary_base=_rope_theta(config, source),
            norm_epsilon=float(config.rms_norm_eps),
            num_experts=num_experts,
            moe_router_topk=topk,
            sliding_window=sliding_window,
            init_method_std=float(getattr(config, "initializer_range", 0.02)),
        )
    except ValueError as err:
        if isinstance(err, ConversionError):
            raise
        raise ConversionError(f"{source}: {err}") from err


def check_sequence_length(preset, seq_length: int | None, source: str = "config.json") -> None:
    """Refuse a sliding window shorter than the sequence length megatron will be run at.

    megatron's local attention applies a full causal mask, so it honours a sliding window only when
    every sequence fits inside it.
    """
    if seq_length is None or preset.sliding_window is None:
        return
    if preset.sliding_window < seq_length:
        raise ConversionError(
            f"{source}: field 'sliding_window' = {preset.sliding_window} is shorter than the sequence length "
            f"{seq_length}; megatron's attention here cannot honour a sliding window (use sequences of at most "
            f"{preset.sliding_window} tokens)"
        )


def hf_config_from_preset(preset, architecture: str, base=None):
    """Build the transformers config of ``preset`` for ``architecture``.

    Args:
        preset: the ModelPreset.
        architecture: one of :data:`SUPPORTED_ARCHITECTURES`.
        base: an optional config to start from (keeps token ids, generation defaults and the like); its
            architecture fields are overwritten by the preset's.
    """
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(f"architecture {architecture!r} is not supported; supported: {SUPPORTED_ARCHITECTURES}")
    if architecture == "MixtralForCausalLM" and not preset.is_moe:
        raise ConversionError(f"preset {preset.name!r} is dense; it cannot be exported as MixtralForCausalLM")
    if architecture != "MixtralForCausalLM" and preset.is_moe:
        raise ConversionError(f"preset {preset.name!r} is a mixture of experts; export it as MixtralForCausalLM")
    if architecture == "LlamaForCausalLM" and preset.sliding_window is not None:
        raise ConversionError(f"preset {preset.name!r} has a sliding window; LlamaForCausalLM has none")
    cls = {"MixtralForCausalLM": MixtralConfig, "MistralForCausalLM": MistralConfig,
           "LlamaForCausalLM": LlamaConfig}[architecture]
    fields = dict(base.to_dict()) if base is not None else {}
    for key in ("architectures", "transformers_version", "_name_or_path", "model_type", "dtype", "torch_dtype"):
        fields.pop(key, None)
    fields.update(
        vocab_size=preset.vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.ffn_hidden_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_query_groups,
        head_dim=preset.head_dim,
        max_position_embeddings=preset.max_position_embeddings,
        rms_norm_eps=preset.norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": preset.rotary_base},
        hidden_act="silu",
        tie_word_embeddings=False,
        initializer_range=preset.init_method_std,
    )
    if architecture != "LlamaForCausalLM":
        fields["sliding_window"] = preset.sliding_window
    if preset.is_moe:
        fields.update(num_local_experts=preset.num_experts, num_experts_per_tok=preset.moe_router_topk)
    config = cls(**fields)
    config.architectures = [architecture]
    return config

"""Load a converted checkpoint into megatron at the current parallel layout and compare logits with HF.

Used by the parity tests (single process and torchrun) and by users checking a conversion.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from transformers import AutoModelForCausalLM

from nemo_lpo.convert.hf_config import ConversionError
from nemo_lpo.convert.mcore_side import DTYPES
from nemo_lpo.model.build import build_gpt_model
from nemo_lpo.model.presets import transformer_config
from nemo_lpo.model.sidecar import read_sidecar


def load_megatron_model(ckpt: str | Path, *, params_dtype: torch.dtype | None = None):
    """Build the checkpoint's model at megatron's current TP/PP/EP and load it as the trainer does.

    ``parallel.initialize_parallel`` must have run. Returns ``(model, preset)``.
    """
    sidecar = read_sidecar(ckpt)
    if sidecar is None:
        raise ConversionError(f"{ckpt}: no model description; not a converted checkpoint")
    preset = sidecar["preset"]
    dtype = params_dtype or DTYPES[sidecar["params_dtype"]]
    tp = parallel_state.get_tensor_model_parallel_world_size()
    config = transformer_config(
        preset, tp=tp, pp=parallel_state.get_pipeline_model_parallel_world_size(),
        ep=parallel_state.get_expert_model_parallel_world_size(), params_dtype=dtype,
        sequence_parallel=tp > 1 and preset.is_moe,  # megatron requires it for MoE with TP
        use_cpu_initialization=True,
    )
    model = build_gpt_model(preset, config)
    sharded_sd = model.sharded_state_dict(metadata=sidecar.get("sharded_metadata") or {})
    state = dist_checkpointing.load(sharded_sd, str(ckpt))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"loading {ckpt}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    return model, preset


@torch.no_grad()
def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits [B, S, V] of a single-stage megatron model (gathered over TP)."""
    batch, seq = tokens.shape
    positions = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    mask = torch.ones(seq, seq, dtype=torch.bool).triu(1)[None, None]  # True = masked
    logits = model(tokens, positions, mask)
    return gather_from_tensor_model_parallel_region(logits)


@torch.no_grad()
def hf_logits(hf_path: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [B, S, V] of the HF model at ``hf_path`` (eager attention, fp32)."""
    model = AutoModelForCausalLM.from_pretrained(str(hf_path), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model(input_ids=tokens).logits

"""The export half of tests/dist/peft_train.py (scenario ``export``): adapter checkpoints through ``mcore-to-hf``.

The LoRA run's final checkpoint (adapters on every linear, experts included) exports merged weights whose
transformers logits are compared with the adapter model's own megatron logits; its adapters alone are refused
in PEFT format (experts). An attention-only LoRA run (2 steps) exports merged weights and PEFT adapters; the
adapters are loaded with ``peft`` onto the exported base and give the adapter model's logits.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from nemo_lpo.train.adapter_checkpoint import load_adapter_model
from nemo_lpo.convert.hf_config import ConversionError
from nemo_lpo.convert.mcore_to_hf import convert_mcore_to_hf
from nemo_lpo.convert.verify import hf_logits, megatron_logits
from nemo_lpo.io import resolve_checkpoint


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _peft_logits(base_hf: Path, adapters: Path, tokens: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_hf), dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, str(adapters)).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


def export_and_compare(work: Path, cfg, train_attention_only) -> dict:
    """Run the export checks; ``train_attention_only()`` trains the attention-only run and returns its run dir."""
    out = work / "export"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tokens = torch.randint(0, 32000, (2, 24), generator=torch.Generator().manual_seed(7))
    result: dict = {}

    full = resolve_checkpoint(work / "lora" / "checkpoints")
    want = megatron_logits(load_adapter_model(full).module, tokens)
    summary = convert_mcore_to_hf(full, out / "merged")
    result["merged_diff"] = _max_diff(hf_logits(out / "merged", tokens), want)
    result["merged_summary"] = {k: summary[k] for k in ("architecture", "dtype", "merged_adapters")}
    try:
        convert_mcore_to_hf(full, out / "merged_again", adapters_out=out / "experts_peft")
        result["experts_refused"] = None
    except ConversionError as err:
        result["experts_refused"] = str(err)
    result["no_partial_output"] = not (out / "experts_peft").exists() and not (out / "merged_again").exists()

    attention = resolve_checkpoint(train_attention_only() / "checkpoints")
    want = megatron_logits(load_adapter_model(attention).module, tokens)
    summary = convert_mcore_to_hf(attention, out / "attn_merged", adapters_out=out / "attn_peft")
    base_hf = convert_mcore_to_hf(work / "init", out / "base_hf", preset_name=cfg.model.preset)["out"]
    result["attn_merged_diff"] = _max_diff(hf_logits(out / "attn_merged", tokens), want)
    result["peft_diff"] = _max_diff(_peft_logits(Path(base_hf), out / "attn_peft", tokens), want)
    result["base_vs_adapters_diff"] = _max_diff(hf_logits(base_hf, tokens), want)  # the adapters do something
    result["peft_files"] = sorted(p.name for p in (out / "attn_peft").iterdir())
    result["peft_targets"] = summary["adapters"]["target_modules"]
    return result

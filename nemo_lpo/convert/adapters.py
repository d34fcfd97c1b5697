"""Export of an adapter checkpoint (``peft.type`` lora / dora): merged weights, and the adapters in HF PEFT format.

The run's model is rebuilt in one process (TP=PP=EP=1) from the base checkpoint the adapter checkpoint points
at (``train.adapter_checkpoint``: its weight checksum checked, Bridge's adapters added and loaded), then either
folded into the base weights (``merge_adapter_checkpoint``: Bridge's ``LoRAMerge`` through ``LoRALinear.weight``;
DoRA's magnitude x direction) and written as an ordinary megatron checkpoint for ``mcore_to_hf``, or written
alone as ``adapter_config.json`` + ``adapter_model.safetensors`` for ``peft.PeftModel.from_pretrained`` on the
exported base (``write_peft_adapters``). The whole model is held in host memory once (checkpoint dtype).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from nemo_lpo.convert.hf_config import ConversionError
from nemo_lpo.convert.mapping import expand
from nemo_lpo.convert.mcore_side import ensure_single_process_parallel
from nemo_lpo.io import SIDECAR_NAME, atomic_write
from nemo_lpo.train.adapter_checkpoint import load_adapter_model
from nemo_lpo.train.adapters import merge_adapters
from nemo_lpo.train.checkpoint import save_model_weights


def _adapter_model(ckpt: Path):
    """``adapter_checkpoint.load_adapter_model`` in the converters' one-rank world; a missing base names itself."""
    ensure_single_process_parallel()
    try:
        return load_adapter_model(ckpt)
    except FileNotFoundError as err:
        raise ConversionError(f"{err}; the export needs it") from None


def merge_adapter_checkpoint(ckpt: Path, dest: Path) -> tuple[str, str | None]:
    """Write the merged model of the adapter checkpoint ``ckpt`` to ``dest`` (a megatron dist checkpoint).

    Returns (the run's model preset name, the base checkpoint's tokenizer folder ``hf`` or None).
    """
    lpo = _adapter_model(ckpt)
    merge_adapters(lpo.modules)
    save_model_weights(lpo.module, dest)
    if (ckpt / SIDECAR_NAME).is_file():  # a converted base's description: for from_checkpoint models
        shutil.copyfile(ckpt / SIDECAR_NAME, dest / SIDECAR_NAME)
    base_hf = Path(lpo.base["base_checkpoint"]) / "hf"
    return lpo.cfg.model.preset, str(base_hf) if base_hf.is_dir() else None


def _hf_module(hf_weight_name: str) -> str:
    return hf_weight_name.removesuffix(".weight")


def write_peft_adapters(ckpt: Path, out: Path, architecture: str | None = None) -> dict:
    """Write the adapters of ``ckpt`` in Hugging Face PEFT format under ``out`` (created; must not exist).

    Each adapter's A (``linear_in``) and B (``linear_out``) go through the conversion table of its base linear:
    B and DoRA's magnitude split by output rows as the weight does (q/k/v, gate/up), A is shared by the parts.

    Raises:
        ConversionError: expert adapters (transformers fuses Mixtral's experts into 3-D parameters, which peft's
            LoRA does not target as linears), or ``out`` exists.
    """
    from peft import LoraConfig  # the export's one use of peft (optional: `pip install peft`)

    if out.exists():
        raise ConversionError(f"{out}: already exists; refusing to overwrite")
    lpo = _adapter_model(ckpt)
    preset = lpo.preset
    architecture = architecture or ("MixtralForCausalLM" if preset.is_moe else "MistralForCausalLM")
    by_mcore = {m.mcore: m for m in expand(architecture, preset)}
    tensors, targets = {}, set()
    for name, param in lpo.module.named_parameters():
        if ".adapter." not in name:
            continue
        base_name, part = name.split(".adapter.")
        if ".experts." in base_name:
            raise ConversionError(f"{ckpt}: {base_name} has an adapter, but transformers holds Mixtral's experts as "
                                  "fused 3-D parameters that peft's LoRA cannot target; export the merged model, or "
                                  "train with peft.target_modules=[linear_qkv, linear_proj]")
        mapping = by_mcore[f"{base_name}.weight"]
        value = param.detach().float()
        key = {"linear_in.weight": "lora_A.weight", "linear_out.weight": "lora_B.weight",
               "weight_magnitude": "lora_magnitude_vector"}[part]
        parts = ([value] * len(mapping.hf) if key == "lora_A.weight"
                 else [t.squeeze(-1) for t in mapping.to_hf(preset, value.reshape(value.shape[0], -1)).values()])
        for hf_name, tensor in zip(mapping.hf, parts, strict=True):
            tensors[f"base_model.model.{_hf_module(hf_name)}.{key}"] = tensor.clone()  # A: one copy per part
            targets.add(_hf_module(hf_name).rsplit(".", 1)[-1])
    p = lpo.cfg.peft
    config = LoraConfig(r=p.dim, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=sorted(targets),
                        use_dora=p.type == "dora", task_type="CAUSAL_LM", bias="none")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    atomic_write(tmp / "adapter_config.json", json.dumps(config.to_dict(), indent=2, default=list) + "\n")
    tmp.rename(out)
    return {"out": str(out), "tensors": len(tensors), "target_modules": sorted(targets)}


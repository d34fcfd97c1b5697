"""Export of an adapter checkpoint (``peft.type`` lora / dora): merged weights, and the adapters in HF PEFT format.

The run's model is rebuilt in one process (TP=PP=EP=1) from the base checkpoint the adapter checkpoint points
at (its weight checksum checked), Bridge's adapters are added and loaded from the checkpoint, then either
folded into the base weights (``merge_adapter_checkpoint``: Bridge's ``LoRAMerge`` through ``LoRALinear.weight``;
DoRA's magnitude x direction) and written as an ordinary megatron checkpoint for ``mcore_to_hf``, or written
alone as ``adapter_config.json`` + ``adapter_model.safetensors`` for ``peft.PeftModel.from_pretrained`` on the
exported base (``write_peft_adapters``). The whole model is held in host memory once (checkpoint dtype).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from megatron.core import dist_checkpointing
from safetensors.torch import save_file

from nemo_lpo.config.loader import from_dict
from nemo_lpo.convert.hf_config import ConversionError
from nemo_lpo.convert.mapping import expand
from nemo_lpo.convert.mcore_side import ensure_single_process_parallel
from nemo_lpo.io import SIDECAR_NAME, atomic_write
from nemo_lpo.train.adapters import adapter_sharded_state, check_base_pointer, load_adapter_state, merge_adapters
from nemo_lpo.train.checkpoint import model_sharded_state_dict, save_model_weights
from nemo_lpo.train.lpo_model import LPOModel

SINGLE_PROCESS = {"tp": 1, "pp": 1, "vpp": 1, "ep": 1, "etp": None, "sequence_parallel": False,
                  "distributed_optimizer": False, "overlap_grad_reduce": False, "overlap_param_gather": False}


def adapter_pointer(ckpt: Path) -> dict | None:
    """The base pointer of an adapter checkpoint (``peft`` in its common state); None for any other checkpoint."""
    try:
        common = dist_checkpointing.load_common_state_dict(str(ckpt))
    except Exception:  # noqa: BLE001 - not a training checkpoint: no pointer
        return None
    return common.get("peft") if isinstance(common, dict) else None


def load_adapter_model(ckpt: Path) -> LPOModel:
    """The adapter run's policy at TP=PP=EP=1: base weights from the pointed-at checkpoint, adapters from ``ckpt``."""
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    pointer = common["peft"]
    saved = common["config"]
    saved["parallel"] = {**saved.get("parallel", {}), **SINGLE_PROCESS}
    saved["model"] = {**saved["model"], "init_checkpoint": pointer["base_checkpoint"]}
    if not Path(pointer["base_checkpoint"]).is_dir():
        raise ConversionError(f"{ckpt}: the adapters' base checkpoint {pointer['base_checkpoint']} is not there; the "
                              "export needs it (the adapter checkpoint holds only the adapters)")
    cfg = from_dict(saved, source=f"{ckpt} (run config)")
    ensure_single_process_parallel()
    lpo = LPOModel(cfg, train=False)
    check_base_pointer(pointer, lpo.base, ckpt)
    request = adapter_sharded_state(lpo.peft, model_sharded_state_dict(lpo.module))
    loaded = dist_checkpointing.load(request, str(ckpt))  # with the checkpoint's common state: keep the model's
    load_adapter_state(lpo.module, {key: value for key, value in loaded.items() if key in request})
    for module in lpo.modules:
        module.eval()
    return lpo


def merge_adapter_checkpoint(ckpt: Path, dest: Path) -> tuple[str, str | None]:
    """Write the merged model of the adapter checkpoint ``ckpt`` to ``dest`` (a megatron dist checkpoint).

    Returns (the run's model preset name, the base checkpoint's tokenizer folder ``hf`` or None).
    """
    lpo = load_adapter_model(ckpt)
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
    lpo = load_adapter_model(ckpt)
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


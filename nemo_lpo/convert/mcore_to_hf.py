"""megatron dist checkpoint (any TP/PP/EP it was saved at) -> HF safetensors that transformers loads.

The checkpoint is read one layer at a time (torch DCP reassembles each full tensor from whatever shards
it was saved in), mapped back through the architecture's table and written in safetensors shards, so
peak host memory is one output shard plus one layer. Output goes to a temporary sibling directory that
is renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from transformers import AutoConfig, GenerationConfig

from nemo_lpo.config.sources import train_prefixes
from nemo_lpo.convert.adapters import merge_adapter_checkpoint, write_peft_adapters
from nemo_lpo.convert.hf_config import (
    ConversionError,
    architecture_of,
    hf_config_from_preset,
    load_hf_config,
    preset_from_hf_config,
)
from nemo_lpo.convert.hf_io import ShardedSafetensorsWriter
from nemo_lpo.convert.hf_to_mcore import temp_sibling
from nemo_lpo.convert.mapping import expand, group_by_layer
from nemo_lpo.convert.mcore_side import (
    DTYPES,
    SHARDED_METADATA_VARIANTS,
    build_meta_model,
    checkpoint_global_shapes,
    chunk_locations,
    ensure_single_process_parallel,
    model_sharded_state_dict,
    read_parameters,
    release_freed_memory,
)
from nemo_lpo.data.layout import manifest_path
from nemo_lpo.io import resolve_checkpoint
from nemo_lpo.model.presets import get_preset
from nemo_lpo.model.sidecar import read_sidecar
from nemo_lpo.train.adapter_checkpoint import adapter_pointer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")


def _checkpoint_tensor_metadata(ckpt: Path) -> dict:

    if not (ckpt / ".metadata").is_file() or not (ckpt / "metadata.json").is_file():
        raise ConversionError(f"{ckpt}: not a megatron torch_dist checkpoint (no .metadata / metadata.json)")
    metadata = FileSystemReader(str(ckpt)).read_metadata()
    return {k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def _resolve_model(ckpt: Path, hf_config_from: str | Path | None, preset_name: str | None):
    """(preset, architecture, base HF config or None, where the description came from)."""
    if hf_config_from is not None:
        base = load_hf_config(hf_config_from)
        source = str(Path(hf_config_from) / "config.json")
        arch = architecture_of(base, source)
        return preset_from_hf_config(base, name=f"hf:{Path(hf_config_from).name}", source=source), arch, base, source
    sidecar = read_sidecar(ckpt)
    if sidecar is not None:
        base = None
        if sidecar.get("hf_config"):
            fields = dict(sidecar["hf_config"])
            base = AutoConfig.for_model(fields.pop("model_type"), **fields)
        return sidecar["preset"], sidecar["architecture"], base, str(ckpt / "nemo_lpo_model.json")
    if preset_name is None:
        preset_name = _training_run_preset(ckpt)
    if preset_name is not None:
        try:
            preset = get_preset(preset_name)
        except KeyError as err:
            raise ConversionError(str(err)) from err
        arch = "MixtralForCausalLM" if preset.is_moe else "MistralForCausalLM"
        return preset, arch, None, f"preset {preset_name}"
    raise ConversionError(f"{ckpt}: neither a converted checkpoint (nemo_lpo_model.json) nor a training checkpoint "
                          "naming its model preset; pass --hf-config-from PATH (an HF model directory of the same "
                          "architecture) or --preset NAME")


def _run_config(ckpt: Path) -> dict:
    """The run config a training checkpoint stores in its common state ({} for any other checkpoint)."""
    try:
        common = dist_checkpointing.load_common_state_dict(str(ckpt))
    except Exception:  # noqa: BLE001 - any unreadable common state just means "no run config here"
        return {}
    config = common.get("config") if isinstance(common, dict) else None
    return config if isinstance(config, dict) else {}


def _training_run_preset(ckpt: Path) -> str | None:
    """``model.preset`` of the run config a training checkpoint stores in its common state, if any."""
    model = _run_config(ckpt).get("model")
    preset = model.get("preset") if isinstance(model, dict) else None
    return preset if isinstance(preset, str) else None


def pack_chat_template(ckpt: Path) -> str | None:
    """The chat template the run's training data was packed with (its pack manifests), for the exported tokenizer.

    None when the checkpoint names no packed data, or the data was packed with a non-Jinja tokenizer
    (mistral-common). Sources of a blend packed with different templates are refused.
    """
    data = _run_config(ckpt).get("data") or {}
    templates = set()
    for prefix in train_prefixes(data.get("train_prefix")):
        path = manifest_path(prefix)
        if not path.is_file():
            continue
        tokenizer = json.loads(path.read_text()).get("tokenizer", {})
        if tokenizer.get("kind") == "huggingface" and tokenizer.get("template"):
            templates.add(tokenizer["template"])
    if len(templates) > 1:
        raise ConversionError(f"{ckpt}: the sources of data.train_prefix were packed with {len(templates)} different "
                              "chat templates; pass the one to export with the tokenizer (--tokenizer DIR)")
    return templates.pop() if templates else None


def _write_chat_template(out: Path, template: str) -> None:
    """Put ``template`` into the exported tokenizer: ``chat_template.jinja``, which transformers reads first."""
    (out / "chat_template.jinja").write_text(template)
    config_path = out / "tokenizer_config.json"
    if config_path.is_file():  # an older inline template would otherwise sit beside it, disagreeing
        config = json.loads(config_path.read_text())
        if config.pop("chat_template", None) is not None:
            config_path.write_text(json.dumps(config, indent=2) + "\n")


def _match_layout(model, tensor_md: dict, ckpt: Path, source: str) -> tuple[dict, dict]:
    """The sharded-state-dict variant whose keys and shapes the checkpoint holds; else a clear error."""
    problems = []
    for variant in SHARDED_METADATA_VARIANTS:
        sharded_sd = model_sharded_state_dict(model, variant)
        expected = checkpoint_global_shapes(sharded_sd)
        missing = [k for k in expected if k not in tensor_md]
        if missing:
            problems.append(f"{variant or 'default'}: {len(missing)} key(s) missing, e.g. {missing[:3]}")
            continue
        wrong = [(k, tuple(tensor_md[k].size), shape) for k, shape in expected.items()
                 if tuple(tensor_md[k].size) != shape]
        if wrong:
            key, found, want = wrong[0]
            raise ConversionError(f"{source} does not match the checkpoint {ckpt}: {key} has shape {found}, the "
                                  f"config implies {want} ({len(wrong)} tensor(s) differ)")
        return variant, sharded_sd
    raise ConversionError(f"{source} does not match the checkpoint {ckpt}: " + "; ".join(problems))


def _copy_files(src: Path, dst: Path, names) -> list[str]:
    copied = []
    for name in names:
        if (src / name).is_file():  # contents only: the copy gets the usual mode (0666 & ~umask), not the source's
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def convert_mcore_to_hf(
    ckpt: str | Path,
    out: str | Path,
    *,
    hf_config_from: str | Path | None = None,
    tokenizer: str | Path | None = None,
    preset_name: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    adapters_out: str | Path | None = None,
    chat_template_from: str | Path | None = None,
) -> dict:
    """Export the megatron checkpoint ``ckpt`` as an HF model directory ``out``.

    Args:
        ckpt: dist checkpoint directory (written by ``convert hf-to-mcore`` or the trainer; a training run's
            checkpoint folder with a ``latest`` marker resolves to its newest checkpoint).
        out: HF directory to create (must not exist).
        hf_config_from: HF model directory whose config (and generation config) describes the model;
            default: the description stored with the checkpoint.
        tokenizer: directory whose tokenizer files are copied (default: those stored with the checkpoint).
        preset_name: a ``nemo_lpo.model.presets`` name, for checkpoints without a stored description
            (default for a training checkpoint: the ``model.preset`` of the run config it stores).
        dtype: ``fp32`` / ``bf16`` output (default: the checkpoint's own dtype, so the export is exact).
        max_shard_bytes: safetensors shard size.
        adapters_out: an adapter checkpoint's adapters alone in Hugging Face PEFT format go here too.
        chat_template_from: training checkpoint whose packed data's chat template the exported tokenizer gets
            (default: ``ckpt``; the template recorded in the pack manifest of its ``data.train_prefix``).

    An adapter checkpoint (``peft``) exports its base with the adapters merged in (an ordinary HF model).
    """
    ckpt, out = Path(ckpt), Path(out)
    if not ckpt.is_dir():
        raise ConversionError(f"{ckpt}: checkpoint directory not found")
    try:  # a training run's checkpoint folder: its newest complete checkpoint
        ckpt = resolve_checkpoint(ckpt)
    except FileNotFoundError as err:
        raise ConversionError(str(err)) from err
    if adapter_pointer(ckpt) is not None:
        return _convert_adapter_checkpoint(ckpt, out, hf_config_from=hf_config_from, tokenizer=tokenizer,
                                           preset_name=preset_name, dtype=dtype, max_shard_bytes=max_shard_bytes,
                                           adapters_out=adapters_out)
    if adapters_out is not None:
        raise ConversionError(f"{ckpt}: --adapters-out needs an adapter checkpoint (a run with peft.type lora/dora)")
    template = pack_chat_template(Path(chat_template_from) if chat_template_from else ckpt)
    tensor_md = _checkpoint_tensor_metadata(ckpt)
    ensure_single_process_parallel()
    preset, architecture, base, source = _resolve_model(ckpt, hf_config_from, preset_name)
    hf_config = hf_config_from_preset(preset, architecture, base)
    if tokenizer is not None and not any((Path(tokenizer) / n).is_file() for n in TOKENIZER_FILES):
        raise ConversionError(f"{tokenizer}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if out.exists():
        raise ConversionError(f"{out}: already exists; refusing to overwrite")

    model = build_meta_model(preset, torch.float32)
    variant, sharded_sd = _match_layout(model, tensor_md, ckpt, source)
    ckpt_dtype = tensor_md[sharded_sd["embedding.word_embeddings.weight"].key].properties.dtype
    out_dtype = DTYPES[dtype] if dtype else ckpt_dtype

    mappings = expand(architecture, preset)
    tmp = temp_sibling(out)
    try:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes)
        locations = chunk_locations(sharded_sd)
        global_shapes = checkpoint_global_shapes(sharded_sd)
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        for _, group in group_by_layer(mappings):
            release_freed_memory()
            loaded = read_parameters(ckpt, locations, {m.mcore for m in group}, shapes, global_shapes, ckpt_dtype)
            for mapping in group:
                for name, tensor in mapping.to_hf(preset, loaded.pop(mapping.mcore)).items():
                    writer.add(name, tensor.to(out_dtype))
        shards = writer.finish()
        hf_config.dtype = out_dtype
        hf_config.save_pretrained(str(tmp))
        side = ckpt / "hf"
        generation_src = Path(hf_config_from) if hf_config_from is not None else side
        if not _copy_files(generation_src, tmp, ["generation_config.json"]):

            GenerationConfig.from_model_config(hf_config).save_pretrained(str(tmp))
        tokenizer_files = _copy_files(Path(tokenizer) if tokenizer is not None else side, tmp, TOKENIZER_FILES)
        if template is not None and tokenizer_files:
            _write_chat_template(tmp, template)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"architecture": architecture, "preset": preset, "dtype": str(out_dtype).replace("torch.", ""),
            "shards": shards, "tokenizer_files": tokenizer_files, "layout": variant, "out": str(out),
            "chat_template": template is not None and bool(tokenizer_files)}


def _convert_adapter_checkpoint(ckpt: Path, out: Path, *, adapters_out, tokenizer, preset_name, **options) -> dict:
    """Merged export of an adapter checkpoint (and its PEFT-format adapters): see ``convert.adapters``."""
    if out.exists():
        raise ConversionError(f"{out}: already exists; refusing to overwrite")
    adapters = write_peft_adapters(ckpt, Path(adapters_out)) if adapters_out is not None else None  # refusals first
    merged = temp_sibling(out).with_name(out.name + ".merged-mcore.tmp")
    shutil.rmtree(merged, ignore_errors=True)
    try:
        run_preset, base_tokenizer = merge_adapter_checkpoint(ckpt, merged)
        summary = convert_mcore_to_hf(merged, out, tokenizer=tokenizer or base_tokenizer,
                                      preset_name=preset_name or run_preset, chat_template_from=ckpt, **options)
    except BaseException:
        if adapters is not None:  # all or nothing
            shutil.rmtree(adapters["out"], ignore_errors=True)
        raise
    finally:
        shutil.rmtree(merged, ignore_errors=True)
    summary["merged_adapters"] = str(ckpt)
    if adapters is not None:
        summary["adapters"] = adapters
    return summary

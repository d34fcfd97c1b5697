"""megatron dist checkpoint (any TP/PP/EP it was saved at) -> HF safetensors that transformers loads.

The checkpoint is read one layer at a time (torch DCP reassembles each full tensor from whatever shards
it was saved in), mapped back through the architecture's table and written in safetensors shards, so
peak host memory is one output shard plus one layer. Output goes to a temporary sibling directory that
is renamed into place at the end.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from transformers import AutoConfig, GenerationConfig

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
from nemo_lpo.io import resolve_checkpoint
from nemo_lpo.model.presets import get_preset
from nemo_lpo.model.sidecar import read_sidecar

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


def _training_run_preset(ckpt: Path) -> str | None:
    """``model.preset`` of the run config a training checkpoint stores in its common state, if any."""
    try:
        common = dist_checkpointing.load_common_state_dict(str(ckpt))
    except Exception:  # noqa: BLE001 - any unreadable common state just means "no run config here"
        return None
    config = common.get("config") if isinstance(common, dict) else None
    model = config.get("model") if isinstance(config, dict) else None
    preset = model.get("preset") if isinstance(model, dict) else None
    return preset if isinstance(preset, str) else None


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
    """
    ckpt, out = Path(ckpt), Path(out)
    if not ckpt.is_dir():
        raise ConversionError(f"{ckpt}: checkpoint directory not found")
    try:  # a training run's checkpoint folder: its newest complete checkpoint
        ckpt = resolve_checkpoint(ckpt)
    except FileNotFoundError as err:
        raise ConversionError(str(err)) from err
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
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"architecture": architecture, "preset": preset, "dtype": str(out_dtype).replace("torch.", ""),
            "shards": shards, "tokenizer_files": tokenizer_files, "layout": variant, "out": str(out)}

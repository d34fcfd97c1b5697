"""HF safetensors (Mixtral / Mistral / Llama) -> megatron dist checkpoint (torch_dist), streaming.

Every check (config, architecture, shard files, tensor names and shapes, target layout) runs before
anything is written; the checkpoint is written into a temporary sibling directory and renamed into
place, so a failure leaves nothing at ``out``. Peak host memory: the mapped pages of one safetensors
shard plus a couple of megatron parameters (a fused qkv / fc1 and its sources), never the model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from nemo_lpo.convert.hf_config import (
    ConversionError,
    architecture_of,
    check_sequence_length,
    load_hf_config,
    preset_from_hf_config,
)
from nemo_lpo.convert.hf_io import HFCheckpointReader
from nemo_lpo.convert.mapping import expand, expected_hf_shapes
from nemo_lpo.convert.mcore_side import (
    DTYPES,
    SHARDED_METADATA_VARIANTS,
    LazyParameters,
    build_meta_model,
    check_layout,
    chunk_locations,
    ensure_single_process_parallel,
    make_lazy_save_strategy,
    model_sharded_state_dict,
)
from nemo_lpo.model.sidecar import write_sidecar

# Files copied beside the checkpoint (under hf/) so that the export can restore them.
HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
                 "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _default_dtype(reader: HFCheckpointReader) -> str:
    return "fp32" if set(reader.dtypes.values()) == {"F32"} else "bf16"


def temp_sibling(out: Path) -> Path:
    """A fresh temporary directory beside ``out`` (same filesystem, so the final rename is atomic)."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def convert_hf_to_mcore(
    hf_path: str | Path,
    out: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    dtype: str | None = None,
    seq_length: int | None = None,
) -> dict:
    """Convert the HF model at ``hf_path`` into a megatron dist checkpoint at ``out``.

    Args:
        hf_path: HF model directory (config.json + safetensors shards).
        out: checkpoint directory to create (must not exist).
        tp: tensor-parallel size the checkpoint will be trained at (validated; the checkpoint itself is
            layout-free: megatron reshards torch_dist checkpoints on load).
        pp: pipeline-parallel size (validated likewise).
        ep: expert-parallel size (validated likewise).
        dtype: ``fp32`` or ``bf16`` parameters (default: fp32 when the HF weights are all fp32, else bf16).
        seq_length: training sequence length, if known: refused when longer than a sliding window.

    Returns:
        A summary dict (preset, architecture, dtype, parameters produced).
    """
    hf_path, out = Path(hf_path), Path(out)
    source = str(hf_path / "config.json")
    config = load_hf_config(hf_path)
    architecture = architecture_of(config, source)
    preset = preset_from_hf_config(config, name=f"hf:{hf_path.name}", source=source)
    check_sequence_length(preset, seq_length, source)
    check_layout(preset, tp, pp, ep)
    reader = HFCheckpointReader(hf_path)
    reader.validate(expected_hf_shapes(architecture, preset), source)
    dtype = dtype or _default_dtype(reader)
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if out.exists():
        raise ConversionError(f"{out}: already exists; refusing to overwrite a checkpoint")

    ensure_single_process_parallel()
    torch_dtype = DTYPES[dtype]
    model = build_meta_model(preset, torch_dtype)
    mappings = {m.mcore: m for m in expand(architecture, preset)}
    meta_params = {name: p for name, p in model.named_parameters()}
    if set(meta_params) != set(mappings):
        raise RuntimeError(  # a code bug, not bad input: the table and megatron disagree
            f"mapping table for {architecture} and megatron's model differ: only in model "
            f"{sorted(set(meta_params) - set(mappings))[:5]}, only in table {sorted(set(mappings) - set(meta_params))[:5]}"
        )

    def produce(name: str) -> torch.Tensor:
        mapping = mappings[name]
        tensor = mapping.to_mcore(preset, [reader.get(h) for h in mapping.hf]).to(torch_dtype).contiguous()
        if tensor.shape != meta_params[name].shape:
            raise ConversionError(f"{name}: built shape {tuple(tensor.shape)} from {mapping.hf}, megatron "
                                  f"expects {tuple(meta_params[name].shape)}")
        return tensor

    sharded_metadata = SHARDED_METADATA_VARIANTS[0]
    sharded_sd = model_sharded_state_dict(model, sharded_metadata)
    locations = chunk_locations(sharded_sd)
    chunk_counts: dict[str, int] = {}
    for location in locations.values():
        chunk_counts[location.param] = chunk_counts.get(location.param, 0) + 1
    params = LazyParameters(produce, chunk_counts)
    strategy = make_lazy_save_strategy(locations, params)


    tmp = temp_sibling(out)
    try:
        # No content_metadata: load() would return it as an extra top-level key of the model state dict.
        dist_checkpointing.save(sharded_sd, str(tmp), sharded_strategy=strategy)
        params.clear()
        reader.close()
        side = tmp / "hf"
        side.mkdir()
        for name in HF_SIDE_FILES:
            if (hf_path / name).is_file():
                shutil.copy2(hf_path / name, side / name)
        write_sidecar(tmp, preset=preset, architecture=architecture, hf_config=config, dtype=dtype,
                      sharded_metadata=sharded_metadata, source=str(hf_path.resolve()))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"preset": preset, "architecture": architecture, "dtype": dtype, "parameters": len(mappings),
            "produced": params.produced, "out": str(out)}

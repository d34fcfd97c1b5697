"""Converting a model several times larger than a memory cap keeps the converter's peak RSS under the cap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, MistralConfig

from tests.conftest import ALLOCATOR_TUNING
from tests.test_convert_roundtrip import make_hf_model

WORKER = Path(__file__).parent / "dist" / "convert_rss.py"
SHARD_BYTES = 16 * 2**20
CAP_BYTES = 72 * 2**20


def write_big_mistral(path: Path) -> int:
    """A random Mistral-layout model of ~330 MB fp32 in 16 MB shards, one shard in memory at a time."""
    config = MistralConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=24,
                           num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                           sliding_window=None)
    config.architectures = ["MistralForCausalLM"]
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    path.mkdir(parents=True)
    config.save_pretrained(str(path))
    gen = torch.Generator().manual_seed(0)
    shards, current, size, total = [], {}, 0, 0
    for name, shape in shapes.items():
        tensor = torch.randn(shape, generator=gen) * 0.02
        if current and size + tensor.nbytes > SHARD_BYTES:
            shards.append(current)
            save_file(current, str(path / f"part-{len(shards)}.safetensors"))
            current, size = {}, 0
        current[name] = tensor
        size += tensor.nbytes
        total += tensor.nbytes
    shards.append(current)
    save_file(current, str(path / f"part-{len(shards)}.safetensors"))
    weight_map = {n: f"part-{i + 1}.safetensors" for i, shard in enumerate(shards) for n in shard}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return total


def run_worker(*args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for name in ALLOCATOR_TUNING:  # the cap is for glibc's default behaviour, which users run with
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_rss_stays_under_cap_both_directions(tmp_path):
    model_bytes = write_big_mistral(tmp_path / "hf")
    assert model_bytes > 4 * CAP_BYTES
    warm = make_hf_model(tmp_path / "tiny", "MistralForCausalLM")
    (tmp_path / "s1").mkdir()
    (tmp_path / "s2").mkdir()
    to_mcore = run_worker("hf-to-mcore", str(tmp_path / "hf"), str(tmp_path / "ckpt"), str(SHARD_BYTES), str(warm),
                          str(tmp_path / "s1"))
    to_hf = run_worker("mcore-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "export"), str(SHARD_BYTES), str(warm),
                       str(tmp_path / "s2"))
    for direction, m in (("hf-to-mcore", to_mcore), ("mcore-to-hf", to_hf)):
        growth = m["peak_rss"] - m["baseline_rss"]
        print(f"{direction}: model {model_bytes / 2**20:.0f} MiB, baseline {m['baseline_rss'] / 2**20:.0f} MiB, "
              f"peak {m['peak_rss'] / 2**20:.0f} MiB, growth {growth / 2**20:.0f} MiB (cap {CAP_BYTES / 2**20:.0f})")
        assert growth < CAP_BYTES, f"{direction}: peak RSS grew by {growth / 2**20:.0f} MiB"
    # the result is complete, so the bound was not bought by skipping work
    assert sum(p.stat().st_size for p in (tmp_path / "export").glob("*.safetensors")) >= model_bytes

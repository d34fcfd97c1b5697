"""Converted checkpoints load at TP=2 and EP=2 (torchrun, gloo) with HF's logits, and export back exactly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from nemo_lpo.convert.hf_to_mcore import convert_hf_to_mcore
from nemo_lpo.convert.mcore_to_hf import convert_mcore_to_hf
from tests.test_convert_roundtrip import hf_tensors, make_hf_model
from tests.torchrun import run_torchrun

WORKER = Path(__file__).parent / "dist" / "convert_parity.py"


@pytest.mark.distributed
@pytest.mark.parametrize("arch,tp,ep", [
    ("MixtralForCausalLM", 2, 1),
    ("MixtralForCausalLM", 1, 2),
    ("MistralForCausalLM", 2, 1),
])
def test_import_loads_at_layout_with_hf_logits_and_exports_back(tmp_path, arch, tp, ep):
    hf = make_hf_model(tmp_path / "hf", arch, seed=3)
    convert_hf_to_mcore(hf, tmp_path / "ckpt", tp=tp, ep=ep)
    out = run_torchrun(WORKER, 2, "--hf", str(hf), "--ckpt", str(tmp_path / "ckpt"), "--tp", str(tp),
                       "--ep", str(ep), "--save-to", str(tmp_path / "resaved"))
    diff = float(re.search(r"MAXDIFF (\S+)", out).group(1))
    print(f"{arch} tp={tp} ep={ep}: max |megatron - HF| logit difference {diff:.3e}")
    assert diff < 1e-5
    # megatron's own save at this layout (the trainer's format) exports to the original weights, bit for bit
    convert_mcore_to_hf(tmp_path / "resaved", tmp_path / "export", hf_config_from=hf)
    original, back = hf_tensors(hf), hf_tensors(tmp_path / "export")
    assert list(back) == list(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name

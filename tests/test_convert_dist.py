"""Converted checkpoints load at TP=2 and EP=2 (torchrun, gloo) with HF's logits, and export back exactly.

One torchrun launch runs every layout in turn (the worker rebuilds megatron's groups for each).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nemo_lpo.convert.hf_to_mcore import convert_hf_to_mcore
from nemo_lpo.convert.mcore_to_hf import convert_mcore_to_hf
from tests.dist.train_common import results
from tests.test_convert_roundtrip import hf_tensors, make_hf_model
from tests.torchrun import run_torchrun

pytestmark = pytest.mark.distributed
SCENARIOS = {  # name: (architecture, tp, pp, ep)
    "mixtral-tp2": ("MixtralForCausalLM", 2, 1, 1),
    "mixtral-ep2": ("MixtralForCausalLM", 1, 1, 2),
    "mistral-tp2": ("MistralForCausalLM", 2, 1, 1),
    "mixtral-pp2": ("MixtralForCausalLM", 1, 2, 1),
}
LOGIT_SCENARIOS = [name for name, (_, _, pp, _) in SCENARIOS.items() if pp == 1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Import each model, run the worker once over all scenarios; returns (root, {scenario: result})."""
    root = tmp_path_factory.mktemp("dist")
    specs = []
    for name, (arch, tp, pp, ep) in SCENARIOS.items():
        hf = make_hf_model(root / name / "hf", arch, seed=3)
        convert_hf_to_mcore(hf, root / name / "ckpt", tp=tp, pp=pp, ep=ep)
        specs += ["--scenario", f"{name},{hf},{root / name / 'ckpt'},{tp},{pp},{ep},{root / name / 'resaved'}"]
    out = run_torchrun(Path(__file__).parent / "dist" / "convert_parity.py", 2, *specs)
    return root, results(out)


@pytest.mark.parametrize("name", LOGIT_SCENARIOS)
def test_import_loads_at_layout_with_hf_logits(launched, name):
    _, found = launched
    diff = found[name]["maxdiff"]
    print(f"{name}: max |megatron - HF| logit difference {diff:.3e}")
    assert diff < 1e-5


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_megatron_save_at_layout_exports_bit_identical(launched, name):
    root, found = launched
    assert name in found  # the worker loaded the import at this layout (PP=2: each stage its own layers)
    hf = root / name / "hf"
    # megatron's own save at this layout (the trainer's format) exports to the original weights, bit for bit
    convert_mcore_to_hf(root / name / "resaved", root / name / "export", hf_config_from=hf)
    original, back = hf_tensors(hf), hf_tensors(root / name / "export")
    assert list(back) == list(original)
    for tensor_name, tensor in original.items():
        assert torch.equal(back[tensor_name], tensor), tensor_name

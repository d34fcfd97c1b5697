"""HF model -> import -> one real training step (`nemo-lpo train`) -> export -> transformers loads and generates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig

from nemo_lpo.convert.hf_to_mcore import convert_hf_to_mcore
from nemo_lpo.convert.mcore_to_hf import convert_mcore_to_hf
from tests.dist.train_common import DEMO_LISTS, REPO, TINY_CONF, pack_lists
from tests.test_convert_roundtrip import hf_tensors
from tests.torchrun import run_torchrun

CLI = REPO / "nemo_lpo" / "cli.py"


def make_tiny_mixtral_hf(path: Path) -> Path:
    """An HF Mixtral with the ``tiny-mixtral`` preset's architecture (the trainer builds from the preset)."""
    from nemo_lpo.model.presets import PRESETS

    p = PRESETS["tiny-mixtral"]
    config = MixtralConfig(vocab_size=p.vocab_size, hidden_size=p.hidden_size, intermediate_size=p.ffn_hidden_size,
                           num_hidden_layers=p.num_layers, num_attention_heads=p.num_attention_heads,
                           num_key_value_heads=p.num_query_groups, max_position_embeddings=p.max_position_embeddings,
                           rms_norm_eps=p.norm_epsilon, num_local_experts=p.num_experts,
                           num_experts_per_tok=p.moe_router_topk,
                           rope_parameters={"rope_type": "default", "rope_theta": p.rotary_base})
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(path))
    return path


@pytest.mark.distributed
@pytest.mark.slow
def test_trained_step_exports_and_generates(tmp_path):
    from nemo_lpo.convert.verify import megatron_logits
    from nemo_lpo.evaluate.run import build_model

    hf = make_tiny_mixtral_hf(tmp_path / "hf")
    convert_hf_to_mcore(hf, tmp_path / "start")
    prefix = pack_lists(DEMO_LISTS, tmp_path / "data" / "lists", 8)
    run_torchrun(CLI, 1, "train", str(TINY_CONF), f"data.train_prefix={prefix}", f"logging.run_dir={tmp_path / 'run'}",
                 f"model.init_checkpoint={tmp_path / 'start'}", "reference.mode=online", "train.max_steps=1",
                 "checkpoint.save_interval=1", "optim.lr=1e-3", "optim.warmup_steps=0", "data.global_batch_size=2",
                 "data.micro_batch_size=2", "logging.tensorboard=false")
    # the run folder (its `latest` marker), the preset read from the run config the checkpoint stores
    summary = convert_mcore_to_hf(tmp_path / "run" / "checkpoints", tmp_path / "export")
    assert summary["architecture"] == "MixtralForCausalLM"

    before, after = hf_tensors(hf), hf_tensors(tmp_path / "export")
    assert list(after) == list(before)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed  # the training step moved the weights

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), dtype=torch.float32)
    model.eval()
    prompt = torch.tensor([[1, 851, 349, 264, 1369]])
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, prompt.shape[1] + 8) and torch.equal(generated[:, :5], prompt)
    # the exported model is the trained megatron model: same logits as megatron on the trainer's checkpoint
    module = build_model("tiny-mixtral", tmp_path / "run" / "checkpoints")
    with torch.no_grad():
        reference = megatron_logits(module, generated)
        exported = model(input_ids=generated).logits
    assert (reference - exported).abs().max().item() < 1e-5

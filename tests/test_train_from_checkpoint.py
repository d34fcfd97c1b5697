"""``model.preset: from_checkpoint``: train a converted HF model that matches no named preset.

A tiny random HF Llama (3 layers, hidden 48: no preset has it) is converted with ``hf-to-mcore``; the
trainer takes its architecture from the checkpoint's ``nemo_lpo_model.json`` in the reference pass and in
training, a named preset that disagrees is refused with the differing fields, and the trained checkpoint
carries the description so ``mcore-to-hf`` exports it as the Llama it came from.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from nemo_lpo.cli import main
from nemo_lpo.config import ConfigError, load_config
from nemo_lpo.convert.hf_to_mcore import convert_hf_to_mcore
from nemo_lpo.losses import listwise_loss
from nemo_lpo.model.presets import PRESETS
from nemo_lpo.model.resolve import resolve_preset
from tests.dist.train_common import DEMO_LISTS, REPO, TINY_CONF, metrics_lines, pack_lists
from tests.torchrun import run_torchrun

CLI = REPO / "nemo_lpo" / "cli.py"
# vocab 32000: the demo lists are packed with the real Mistral tokenizer
LLAMA = dict(vocab_size=32000, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A converted tiny random HF Llama whose architecture is none of the named presets."""
    root = tmp_path_factory.mktemp("custom_llama")
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA), dtype=torch.float32).save_pretrained(str(root / "hf"))
    convert_hf_to_mcore(root / "hf", root / "ckpt")
    return root / "ckpt"


def _arch(preset) -> dict:
    return {k: v for k, v in dataclasses.asdict(preset).items() if k not in ("name", "init_method_std")}


def test_preset_comes_from_the_checkpoint(converted):
    cfg = load_config(TINY_CONF, ["model.preset=from_checkpoint", f"model.init_checkpoint={converted}"])
    preset = resolve_preset(cfg)
    assert (preset.num_layers, preset.hidden_size, preset.ffn_hidden_size) == (3, 48, 80)
    assert (preset.num_attention_heads, preset.num_query_groups, preset.norm_epsilon) == (4, 2, 1e-6)
    assert not preset.is_moe
    assert all(_arch(preset) != _arch(named) for named in PRESETS.values())  # really matches no preset
    # the reference pass's own checkpoint (`ref-logps --checkpoint`) is a source too
    ref_only = load_config(TINY_CONF, ["model.preset=from_checkpoint", f"reference.checkpoint={converted}"])
    assert _arch(resolve_preset(ref_only)) == _arch(preset)


def test_named_preset_that_disagrees_is_refused(converted, capsys):
    cfg = load_config(TINY_CONF, ["model.preset=tiny-mistral", f"model.init_checkpoint={converted}"])
    with pytest.raises(ConfigError) as err:
        resolve_preset(cfg)
    message = str(err.value)
    assert "model.preset=tiny-mistral" in message and str(converted) in message
    assert "num_layers: preset 2 vs checkpoint 3" in message and "hidden_size: preset 64 vs checkpoint 48" in message
    assert "from_checkpoint" in message
    # the command refuses before launching anything (exit 2, the message on stderr)
    assert main(["train", str(TINY_CONF), "model.preset=tiny-mistral", f"model.init_checkpoint={converted}"]) == 2
    assert "describe different models" in capsys.readouterr().err


def test_from_checkpoint_needs_a_converted_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="from_checkpoint needs model.init_checkpoint"):
        load_config(TINY_CONF, ["model.preset=from_checkpoint"])
    (tmp_path / "plain").mkdir()  # e.g. a dist checkpoint without nemo_lpo_model.json
    cfg = load_config(TINY_CONF, ["model.preset=from_checkpoint", f"model.init_checkpoint={tmp_path / 'plain'}"])
    with pytest.raises(ConfigError, match="no converted checkpoint description"):
        resolve_preset(cfg)
    with pytest.raises(ConfigError, match="unknown model preset 'tiny-mixtrall'"):
        resolve_preset(load_config(TINY_CONF, ["model.preset=tiny-mixtrall"]))


def zero_reward_loss(cfg, dataset) -> float:
    """The loss module's value for every list of ``dataset`` at implicit rewards 0 (policy == reference), averaged."""
    lists = [dataset[i]["rewards"] for i in range(len(dataset))]
    width = max(len(r) for r in lists)
    rewards = torch.zeros(len(lists), width, dtype=torch.float64)
    mask = torch.zeros(len(lists), width, dtype=torch.bool)
    for row, r in enumerate(lists):
        rewards[row, :len(r)], mask[row, :len(r)] = torch.as_tensor(r, dtype=torch.float64), True
    zeros = torch.zeros_like(rewards)
    return listwise_loss(cfg.loss.type, zeros, zeros, rewards, mask, cfg.loss.beta, **cfg.loss.options)[0].mean().item()


@pytest.mark.distributed
def test_reference_pass_and_training_step_from_checkpoint(converted, tmp_path):
    """ref-logps and one training step of the converted model; step 1 is the closed form of the reference.

    The reference pass and the policy are the same weights (the converted checkpoint): every implicit reward is
    exactly 0, and the step-1 loss is the loss function's value at zero rewards for the step's lists (all 4).
    """
    from nemo_lpo.convert.mcore_to_hf import convert_mcore_to_hf
    from nemo_lpo.data import ListwiseDataset
    from nemo_lpo.model.sidecar import read_checkpoint_preset

    prefix = pack_lists(DEMO_LISTS, tmp_path / "data" / "lists", 4)
    common = [str(TINY_CONF), f"data.train_prefix={prefix}", "model.preset=from_checkpoint",
              f"model.init_checkpoint={converted}", "data.global_batch_size=4", "data.micro_batch_size=2"]
    run_torchrun(CLI, 1, "ref-logps", *common)
    meta = ListwiseDataset(prefix).ref_meta  # the reference pass built the checkpoint's architecture
    assert meta["preset"] == read_checkpoint_preset(converted).name and meta["checkpoint"] == str(converted)
    run = tmp_path / "run"
    run_torchrun(CLI, 1, "train", *common, f"logging.run_dir={run}", "reference.mode=precomputed",
                 "train.max_steps=1", "optim.lr=1e-3", "optim.warmup_steps=0", "logging.tensorboard=false")
    (line,) = metrics_lines(run / "metrics.jsonl")
    assert line["step"] == 1 and line["lists/valid"] == 4 and line["grad_norm"] > 0
    assert line["rewards/margins"] == 0.0 and line["rewards/chosen"] == 0.0 and line["rewards/rejected"] == 0.0
    cfg = load_config(TINY_CONF, common[1:])
    assert line["loss"] == pytest.approx(zero_reward_loss(cfg, ListwiseDataset(prefix)), rel=1e-6)
    # the trained checkpoint carries the model description: it exports as the Llama it came from
    summary = convert_mcore_to_hf(run / "checkpoints", tmp_path / "export")
    assert summary["architecture"] == "LlamaForCausalLM"
    exported = AutoConfig.from_pretrained(str(tmp_path / "export"))
    assert {k: getattr(exported, k) for k in LLAMA} == LLAMA

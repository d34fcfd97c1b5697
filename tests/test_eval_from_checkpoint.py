"""`nemo-lpo eval` of a run trained with ``model.preset=from_checkpoint`` (a converted HF model, no named preset).

A tiny random HF Llama (3 layers, hidden 48: no preset has it) is converted with ``hf-to-mcore`` and trained for
two steps in this process; the evaluator must take the architecture from the checkpoints' model description as
the trainer does, not look ``from_checkpoint`` up as a preset name.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from tests.dist.train_common import DEMO_LISTS, TINY_CONF, pack_lists

N_LISTS = 4
LLAMA = dict(vocab_size=32000, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(converted checkpoint, HF folder, packed prefix, run folder) of a 2-step from_checkpoint run."""
    from nemo_lpo.config import load_config
    from nemo_lpo.convert.hf_to_mcore import convert_hf_to_mcore
    from nemo_lpo.train.loop import train

    root = tmp_path_factory.mktemp("eval_from_ckpt")
    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA), dtype=torch.float32).save_pretrained(str(root / "hf"))
    convert_hf_to_mcore(root / "hf", root / "ckpt")
    prefix = pack_lists(DEMO_LISTS, root / "data" / "lists", N_LISTS)
    run = root / "run"
    train(load_config(TINY_CONF, [
        f"data.train_prefix={prefix}", "model.preset=from_checkpoint", f"model.init_checkpoint={root / 'ckpt'}",
        "data.global_batch_size=2", "data.micro_batch_size=2", "reference.mode=online", "train.max_steps=2",
        "optim.lr=1e-2", "optim.warmup_steps=0", "checkpoint.save_interval=null", "checkpoint.save_at_end=true",
        "loss.beta=0.5", f"logging.run_dir={run}", "logging.tensorboard=false"]))
    return root / "ckpt", root / "hf", prefix, run


def _hf_response_logps(hf_dir, prefix) -> np.ndarray:
    """Summed response log-probs of every (list, slot) computed by transformers on the HF original."""
    from nemo_lpo.data import ListwiseDataset

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ds = ListwiseDataset(prefix)
    out = np.full((len(ds), 4), np.nan)
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            for j, response in enumerate(item["response_ids"]):
                seq = torch.tensor(np.concatenate([item["prompt_ids"], response]), dtype=torch.long)[None]
                logp = torch.log_softmax(model(seq).logits[0, :-1].float(), dim=-1).gather(-1, seq[0, 1:, None])[:, 0]
                out[i, j] = float(logp[len(item["prompt_ids"]) - 1:].sum())
    return out


def test_eval_of_a_from_checkpoint_run_uses_the_checkpoint_architecture(trained):
    from nemo_lpo.evaluate.run import evaluate_checkpoint
    from nemo_lpo.model.sidecar import read_checkpoint_preset

    converted, hf_dir, prefix, run = trained
    # defaults only: architecture, reference (the run's init checkpoint) and β all come from the run
    result = evaluate_checkpoint(run / "checkpoints", prefix)
    assert result["preset"] == read_checkpoint_preset(converted).name
    assert result["reference"] == str(converted) and result["beta"] == 0.5
    assert result["lists"] == N_LISTS
    # the converted start, evaluated as a weights-only checkpoint (architecture from its own description),
    # gives the log-probs transformers computes on the HF original: the evaluator built the right model
    start = evaluate_checkpoint(converted, prefix, reference=converted)
    np.testing.assert_allclose(start["_policy_logps"], _hf_response_logps(hf_dir, prefix), rtol=1e-4, atol=1e-3)
    assert start["implicit/accuracy"] == 0.5  # a policy against itself: every implicit reward is 0
    # two steps at lr 1e-2 moved the policy away from the start
    assert not np.allclose(result["_policy_logps"], start["_policy_logps"])


def test_eval_refuses_a_named_preset_that_disagrees(trained):
    from nemo_lpo.cli import main
    from nemo_lpo.evaluate.run import evaluate_checkpoint

    converted, _, prefix, run = trained
    with pytest.raises(ValueError, match="describe different models") as err:
        evaluate_checkpoint(run / "checkpoints", prefix, preset="tiny-mixtral")
    assert "num_layers: preset 2 vs checkpoint 3" in str(err.value)
    with pytest.raises(ValueError, match="unknown model preset 'tiny-mixtrall'"):
        evaluate_checkpoint(run / "checkpoints", prefix, preset="tiny-mixtrall")
    assert main(["eval", str(run / "checkpoints"), str(prefix), "--preset", "tiny-mistral"]) == 1

"""Shared-prompt packing: layout by hand, and log-probs equal to the unpacked computation (CPU, megatron)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

TOL = 1e-5
PAD = 0


def make_items(seed: int, ks=(3, 1, 4, 2), prompt_range=(1, 12), response_range=(1, 7), vocab=32000) -> list[dict]:
    """Ragged lists with variable prompt lengths (1-token prompts and 1-token responses included)."""
    rng = np.random.default_rng(seed)
    items = []
    for b, k in enumerate(ks):
        prompt = rng.integers(3, vocab, rng.integers(*prompt_range)).astype(np.int32)
        responses = [rng.integers(3, vocab, rng.integers(*response_range)).astype(np.int32) for _ in range(k)]
        for r in responses:
            r[-1] = 2
        items.append({"prompt_ids": prompt, "response_ids": responses, "rewards": rng.random(k).astype(np.float32),
                      "ref_logps": None, "index": 100 + b})
    return items


def test_layout_by_hand():
    from nemo_lpo.batch.masks import shared_prompt_mask
    from nemo_lpo.batch.shared_prompt import collate_shared_prompt

    items = [{"prompt_ids": [5, 6, 7], "response_ids": [[8, 2], [9, 10, 2]], "rewards": [1.0, 0.0], "index": 7},
             {"prompt_ids": [11], "response_ids": [[12]], "rewards": [0.5], "index": 8}]
    batch = collate_shared_prompt(items, pad_id=PAD, pad_to_multiple_of=4)
    assert batch["tokens"].tolist() == [[5, 6, 7, 8, 2, 9, 10, 2], [11, 12, 0, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5], [0, 1, 0, 1, 2, 3, 4, 5]]
    assert batch["part_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 0, 0, 0, 0, 0, 0]]
    assert batch["segment_ids"].tolist() == [[0] * 8, [1, 1, -1, -1, -1, -1, -1, -1]]
    # first token of each response predicted at the last prompt position (flat index row * S + pos)
    assert batch["gather_index"].tolist() == [2, 3, 2, 5, 6, 8]
    assert batch["gather_labels"].tolist() == [8, 2, 9, 10, 2, 12]
    assert batch["gather_seq"].tolist() == [0, 0, 1, 1, 1, 2]
    assert batch["list_index"].tolist() == [0, 0, 1] and batch["slot_index"].tolist() == [0, 1, 0]
    assert batch["seq_lengths"].tolist() == [5, 6, 2] and batch["row_lengths"].tolist() == [8, 2]
    assert batch["response_mask"].tolist() == [[True, True], [True, False]]
    assert batch["list_ids"].tolist() == [7, 8] and "ref_logps" not in batch
    allowed = ~shared_prompt_mask(batch)[0, 0]
    # the second response's first token (row position 5) sees the prompt and itself, not response 1
    assert allowed[5].tolist() == [True, True, True, False, False, True, False, False]
    assert allowed[4].tolist() == [True, True, True, True, True, False, False, False]
    assert not allowed[2, 3]  # causal
    pad_rows = ~shared_prompt_mask(batch)[1, 0]
    assert pad_rows.any(dim=-1).all()  # no fully masked row
    assert not pad_rows[1, 2:].any() and not pad_rows[3, :2].any()  # padding and list 1 are apart


def test_packed_layout_keeps_lists_apart():
    from nemo_lpo.batch.masks import shared_prompt_mask
    from nemo_lpo.batch.shared_prompt import collate_shared_prompt

    items = make_items(seed=0, ks=(2, 3))
    batch = collate_shared_prompt(items, pad_id=PAD, packed=True)
    assert batch["tokens"].shape[0] == 1
    allowed = ~shared_prompt_mask(batch)[0, 0]
    first = len(items[0]["prompt_ids"]) + sum(len(r) for r in items[0]["response_ids"])
    assert not allowed[first:, :first].any()  # list 1 never sees list 0


@pytest.mark.parametrize("bad, message", [
    ({"prompt_ids": []}, "prompt_ids is empty"),
    ({"response_ids": [[3, 2], []]}, r"response_ids\[1\] is empty"),
    ({"response_ids": []}, "response_ids is empty"),
    ({"rewards": [1.0, 2.0, 3.0]}, "3 rewards for 2 responses"),
])
def test_bad_input_names_the_list(bad, message):
    from nemo_lpo.batch.shared_prompt import collate_shared_prompt

    good = {"prompt_ids": [5], "response_ids": [[3, 2], [4, 2]], "rewards": [1.0, 0.0], "index": 0}
    with pytest.raises(ValueError, match=message) as info:
        collate_shared_prompt([good, {**good, "index": 42, **bad}], pad_id=PAD)
    assert "list 1 (dataset index 42)" in str(info.value)
    with pytest.raises(ValueError, match="empty micro-batch"):
        collate_shared_prompt([], pad_id=PAD)


@pytest.fixture(scope="module")
def tiny_models(megatron_single):
    from nemo_lpo.model.build import build_gpt_model
    from nemo_lpo.model.presets import PRESETS, transformer_config

    torch.manual_seed(0)
    models = {}
    for name in ("tiny-mixtral", "tiny-mistral"):
        preset = PRESETS[name]
        models[name] = build_gpt_model(preset, transformer_config(preset)).eval()
    return models


def unpacked_logps(model, items, length_average=False):
    """The reference: every (prompt, response) as its own padded sequence, through the model part's API."""
    from nemo_lpo.batch.collate import ListwiseCollator
    from nemo_lpo.batch.layouts import sequence_layout_of
    from nemo_lpo.batch.logps import sequence_logps

    batch = ListwiseCollator(PAD)(items)
    return sequence_logps(sequence_layout_of(batch).token_logps(model, batch), batch, length_average)


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-mistral"])
@pytest.mark.parametrize("packed", [False, True])
def test_logps_equal_unpacked(tiny_models, name, packed):
    from nemo_lpo.batch.layouts import SharedPromptLayout
    from nemo_lpo.batch.shared_prompt import collate_shared_prompt

    model = tiny_models[name]
    items = make_items(seed=1 + packed)
    batch = collate_shared_prompt(items, PAD, pad_to_multiple_of=8, packed=packed)
    with torch.no_grad():
        expected = unpacked_logps(model, items)
        got = SharedPromptLayout().logps(model, batch)
    assert got.shape == expected.shape == (4, 4)
    assert (got[~batch["response_mask"]] == 0).all() and (got[batch["response_mask"]] < 0).all()
    diff = (got - expected).abs().max().item()
    print(f"{name} packed={packed}: max |shared - unpacked| = {diff:.2e}")
    assert diff < TOL


def test_length_average_equal_unpacked(tiny_models):
    from nemo_lpo.batch.layouts import SharedPromptLayout
    from nemo_lpo.batch.shared_prompt import collate_shared_prompt

    model = tiny_models["tiny-mixtral"]
    items = make_items(seed=5, ks=(2, 5))
    with torch.no_grad():
        expected = unpacked_logps(model, items, length_average=True)
        got = SharedPromptLayout().logps(model, collate_shared_prompt(items, PAD), length_average=True)
    assert (got - expected).abs().max().item() < TOL


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-mistral"])
def test_gradients_equal_unpacked(tiny_models, name):
    """The backward through the gathered rows gives the unpacked gradients (prompt computed once)."""
    from nemo_lpo.batch.layouts import SharedPromptLayout
    from nemo_lpo.batch.shared_prompt import collate_shared_prompt

    model = tiny_models[name]
    items = make_items(seed=3, ks=(3, 2))
    weights = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    grads = []
    for compute in (lambda: unpacked_logps(model, items),
                    lambda: SharedPromptLayout().logps(model, collate_shared_prompt(items, PAD))):
        model.zero_grad(set_to_none=True)
        (compute() * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    worst = max(((grads[0][n] - grads[1][n]).abs().max() / grads[0][n].abs().max().clamp_min(1e-12)).item()
                for n in grads[0])
    print(f"{name}: worst relative gradient difference {worst:.2e}")
    assert worst < 1e-4
    model.zero_grad(set_to_none=True)


def test_mask_and_positions_are_what_make_it_exact(tiny_models):
    """Dropping the response-isolation from the mask, or the shared positions, breaks the parity."""
    from nemo_lpo.batch.layouts import SharedPromptLayout
    from nemo_lpo.batch.shared_prompt import collate_shared_prompt

    model = tiny_models["tiny-mistral"]
    items = make_items(seed=4, ks=(3,), prompt_range=(6, 7), response_range=(5, 6))
    batch = collate_shared_prompt(items, PAD)
    with torch.no_grad():
        expected = unpacked_logps(model, items)
        layout = SharedPromptLayout(dense_masks=True)
        inputs = layout.model_inputs(batch, model)
        seq = batch["tokens"].shape[1]
        plain_causal = dict(inputs, attention_mask=~torch.tril(torch.ones(seq, seq, dtype=torch.bool))[None, None])
        row_positions = dict(inputs, position_ids=torch.arange(batch["tokens"].shape[1])[None])
        for broken in (plain_causal, row_positions):
            got = layout.response_logps(model(**broken), batch)
            assert (got[0, 1:] - expected[0, 1:]).abs().max().item() > 1e-3


def test_feeds_listwise_loss(tiny_models):
    """The [B, K] output goes straight into listwise_loss and back-propagates."""
    from nemo_lpo.batch.layouts import SharedPromptLayout
    from nemo_lpo.batch.shared_prompt import collate_shared_prompt
    from nemo_lpo.losses import listwise_loss

    model = tiny_models["tiny-mixtral"]
    items = make_items(seed=6, ks=(4, 4))
    batch = collate_shared_prompt(items, PAD)
    policy = SharedPromptLayout().logps(model, batch)
    loss, metrics = listwise_loss("dpo_pw", policy, policy.detach(), batch["rewards"], batch["response_mask"], 0.1)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    assert metrics["lists/valid"].item() == 2
    loss.sum().backward()  # differentiable end to end

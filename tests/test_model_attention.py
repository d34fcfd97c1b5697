"""GatheredDotProductAttention: the gather plan by hand, and outputs / gradients equal megatron's dense path."""

from __future__ import annotations

import pytest
import torch

from tests.test_shared_prompt import PAD, make_items


def test_plan_by_hand():
    from nemo_lpo.batch.shared_prompt import collate_shared_prompt
    from nemo_lpo.model.attention import attention_layout, plan_attention

    items = [{"prompt_ids": [5, 6, 7], "response_ids": [[8, 2], [9, 10, 2]], "rewards": [1.0, 0.0], "index": 7},
             {"prompt_ids": [11], "response_ids": [[12]], "rewards": [0.5], "index": 8}]
    batch = collate_shared_prompt(items, pad_id=PAD, pad_to_multiple_of=4)  # rows of 8
    plan = plan_attention(attention_layout(batch["segment_ids"], batch["part_ids"]))
    # prompts (row 0 positions 0..2; row 1 flat position 8) in two batches: 1 token is under half of 3
    assert [b.query_index.tolist() for b in plan[:2]] == [[[0, 1, 2]], [[8]]]
    assert all(b.mask is None and b.key_index is b.query_index for b in plan[:2])  # causal over themselves
    # responses, longest first: lengths 3 and 2 together (padding repeats the first position), 1 alone
    together, alone = plan[2:]
    assert together.query_index.tolist() == [[5, 6, 7], [3, 4, 3]]
    assert together.query_valid.tolist() == [[True, True, True], [True, True, False]]
    # keys: the list's prompt, then the response itself; padding repeats the prompt's first token
    assert together.key_index.tolist() == [[0, 1, 2, 5, 6, 7], [0, 1, 2, 3, 4, 0]]
    assert together.mask[0, 0].tolist() == [[True, True, True, True, False, False],  # y_2's first token
                                            [True, True, True, True, True, False],
                                            [True, True, True, True, True, True]]
    assert together.mask[1, 0, 1].tolist() == [True, True, True, True, True, False]
    assert alone.query_index.tolist() == [[9]] and alone.key_index.tolist() == [[8, 9]]
    assert alone.mask[0, 0].tolist() == [[True, True]]


def test_parts_of_very_different_lengths_are_batched_apart():
    from nemo_lpo.model.attention import _length_buckets

    buckets = _length_buckets(torch.tensor([20, 2000, 25, 1500, 999, 11]))
    assert [b.tolist() for b in buckets] == [[1, 3], [4], [2, 0], [5]]  # each longest < 2x its shortest


def test_a_response_without_its_prompt_is_refused():
    from nemo_lpo.model.attention import attention_layout, plan_attention

    segment = torch.tensor([[0, 0, 1, 1]])
    part = torch.tensor([[0, 1, 1, 1]])  # list 1 has no prompt
    with pytest.raises(ValueError, match="does not follow its list's prompt"):
        plan_attention(attention_layout(segment, part))


@pytest.fixture(scope="module")
def attention_modules(megatron_single):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from nemo_lpo.model.attention import GatheredDotProductAttention

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                               masked_softmax_fusion=False, attention_dropout=0.0)
    kwargs = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.arbitrary, attention_type="self")
    return DotProductAttention(**kwargs), GatheredDotProductAttention(**kwargs)


def _qkv(seq: int, rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(seq, rows, 4, 8, generator=g, requires_grad=True)
    k = torch.randn(seq, rows, 2, 8, generator=g, requires_grad=True)
    v = torch.randn(seq, rows, 2, 8, generator=g, requires_grad=True)
    return q, k, v


def real_token_outputs_and_grads(module, q, k, v, mask, real: torch.Tensor):
    """``module(q, k, v, mask)`` at the real tokens, and q/k/v gradients of a fixed weighting of them."""
    out = module(q, k, v, mask)  # [S, R, heads * dim]
    weight = torch.linspace(-1, 1, out.numel()).view_as(out) * real.T[:, :, None]
    (out * weight).sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    return out * real.T[:, :, None], grads


@pytest.mark.parametrize("packed", [False, True])
def test_equals_the_dense_masked_path(attention_modules, packed):
    from nemo_lpo.batch.masks import shared_prompt_mask
    from nemo_lpo.batch.shared_prompt import collate_shared_prompt
    from nemo_lpo.model.attention import attention_layout

    dense, gathered = attention_modules
    batch = collate_shared_prompt(make_items(seed=11 + packed), pad_id=PAD, pad_to_multiple_of=8, packed=packed)
    rows, seq = batch["tokens"].shape
    real = batch["segment_ids"] >= 0
    q, k, v = _qkv(seq, rows, seed=3)
    expected, expected_grads = real_token_outputs_and_grads(dense, q, k, v, shared_prompt_mask(batch), real)
    layout = attention_layout(batch["segment_ids"], batch["part_ids"])
    got, got_grads = real_token_outputs_and_grads(gathered, q, k, v, layout, real)
    assert (got - expected).abs().max().item() < 1e-5
    for g, e in zip(got_grads, expected_grads, strict=True):
        assert (g - e).abs().max().item() < 1e-5
    assert hasattr(layout, "_nemo_lpo_plan")  # planned once, reused by the next layer


def test_packed_sequences_layout_equals_the_block_diagonal_mask(attention_modules):
    """A packed row of independent sequences (every token part 0): causal blocks, as packed_causal_mask."""
    from nemo_lpo.batch.masks import packed_causal_mask
    from nemo_lpo.model.attention import attention_layout

    dense, gathered = attention_modules
    cu_seqlens = torch.tensor([0, 5, 6, 13, 21])
    seq = 24
    positions = torch.arange(seq)
    segment = torch.bucketize(positions, cu_seqlens[1:], right=True)
    segment = torch.where(positions < cu_seqlens[-1], segment, -1)[None]
    q, k, v = _qkv(seq, 1, seed=5)
    real = segment >= 0
    expected, expected_grads = real_token_outputs_and_grads(dense, q, k, v, packed_causal_mask(cu_seqlens, seq), real)
    got, got_grads = real_token_outputs_and_grads(gathered, q, k, v, attention_layout(segment, torch.zeros_like(segment)),
                                                   real)
    assert (got - expected).abs().max().item() < 1e-5
    for g, e in zip(got_grads, expected_grads, strict=True):
        assert (g - e).abs().max().item() < 1e-5


def test_a_boolean_mask_takes_megatrons_dense_path(attention_modules):
    from nemo_lpo.batch.masks import causal_padding_mask

    dense, gathered = attention_modules
    q, k, v = _qkv(6, 2, seed=7)
    mask = causal_padding_mask(torch.tensor([6, 4]), 6)
    assert torch.equal(gathered(q, k, v, mask), dense(q, k, v, mask))


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-mistral"])
def test_models_take_the_layout_and_match_the_dense_mask(megatron_single, name):
    """Built (local-spec) models get the layout for shared-prompt and packed batches, and the dense results.

    Log-probs and gradients equal those with megatron's dense boolean mask (layouts with ``dense_masks=True``).
    """
    from nemo_lpo.batch.collate import ListwiseCollator
    from nemo_lpo.batch.layouts import PackedLayout, SharedPromptLayout
    from nemo_lpo.batch.shared_prompt import collate_shared_prompt
    from nemo_lpo.model.build import build_gpt_model
    from nemo_lpo.model.presets import PRESETS, transformer_config

    preset = PRESETS[name]
    model = build_gpt_model(preset, transformer_config(preset)).eval()
    items = make_items(seed=21, ks=(3, 2, 4))
    shared = collate_shared_prompt(items, PAD, pad_to_multiple_of=8, packed=True)
    packed = ListwiseCollator(PAD, packed=True)(items)
    assert SharedPromptLayout(packed=True).model_inputs(shared, model)["attention_mask"].dtype == torch.int64
    assert PackedLayout().model_inputs(packed, model)["attention_mask"].dtype == torch.int64
    assert SharedPromptLayout(dense_masks=True).model_inputs(shared, model)["attention_mask"].dtype == torch.bool
    results = {}
    for mode in ("gathered", "dense"):
        dense = mode == "dense"
        model.zero_grad()
        logps = SharedPromptLayout(packed=True, dense_masks=dense).logps(model, shared)
        logps[shared["response_mask"]].sum().backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        with torch.no_grad():
            packed_logps = PackedLayout(dense_masks=dense).logps(model, packed)
        results[mode] = (logps.detach(), grads, packed_logps)
    for got, expected in zip(results["gathered"], results["dense"], strict=True):
        assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recompute_recomputes_the_gathered_attention(megatron_single, recompute):
    """Activation recompute saves the layout tensor and recomputes the parts: same log-probs and gradients."""
    from nemo_lpo.batch.layouts import SharedPromptLayout
    from nemo_lpo.batch.shared_prompt import collate_shared_prompt
    from nemo_lpo.model.build import build_gpt_model
    from nemo_lpo.model.presets import PRESETS, transformer_config

    preset = PRESETS["tiny-mistral"]
    batch = collate_shared_prompt(make_items(seed=31, ks=(3, 2)), PAD, pad_to_multiple_of=8)
    results, forwards = [], []
    for setting in (None, recompute):
        torch.manual_seed(0)
        model = build_gpt_model(preset, transformer_config(preset, recompute=setting)).train()
        # the gathered core attention of every layer counts its forwards: recompute runs each one again in backward
        count = [0]
        for layer in model.decoder.layers:
            layer.self_attention.core_attention.register_forward_hook(
                lambda module, args, output, count=count: count.__setitem__(0, count[0] + 1))
        logps = SharedPromptLayout().logps(model, batch)
        after_forward = count[0]
        logps[batch["response_mask"]].sum().backward()
        forwards.append((after_forward, count[0]))
        results.append((logps.detach(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])))
    layers = preset.num_layers
    assert forwards == [(layers, layers), (layers, 2 * layers)]  # recompute really ran (once per layer)
    (plain, plain_grads), (again, again_grads) = results
    assert (again - plain).abs().max().item() <= 1e-6 * plain.abs().max().item()
    assert (again_grads - plain_grads).abs().max().item() <= 1e-5 * plain_grads.abs().max().item()

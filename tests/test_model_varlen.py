"""Varlen (THD) plans for Transformer Engine, executed on CPU: index math by hand, attention equal to the dense mask.

TE itself is absent here; the plans drive ``reference_varlen_kernel`` (SDPA per segment, TE's bottom-right causal
mask) and megatron's own THD path (squeeze, per-sequence RoPE, reshape) through a CPU core attention.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention

from nemo_lpo.model.attention import attention_layout, is_attention_layout
from nemo_lpo.model.varlen import (
    VarlenPlan,
    gathered_varlen_attention,
    packed_seq_params,
    reference_varlen_kernel,
    varlen_plan,
)
from tests.test_model_attention import real_token_outputs_and_grads
from tests.test_shared_prompt import PAD, make_items

ITEMS = [{"prompt_ids": [5, 6, 7], "response_ids": [[8, 2], [9, 10, 2]], "rewards": [1.0, 0.0], "index": 7},
         {"prompt_ids": [11], "response_ids": [[12]], "rewards": [0.5], "index": 8}]


def test_packed_seq_params_from_the_packed_collator_by_hand():
    from nemo_lpo.batch.collate import ListwiseCollator

    batch = ListwiseCollator(PAD, pad_to_multiple_of=8, packed=True)(ITEMS)
    # sequences prompt+response: 3+2, 3+3, 1+1 -> boundaries 0, 5, 11, 13; S rounded up to 16
    assert batch["cu_seqlens"].tolist() == [0, 5, 11, 13] and batch["tokens"].shape == (1, 16)
    params = packed_seq_params(batch["cu_seqlens"], 16, tp=2, sequence_parallel=True, fp8_recipe="delayed")
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.dtype == torch.int32 and params.cu_seqlens_q.tolist() == [0, 5, 11, 13, 16]
    assert params.cu_seqlens_kv.tolist() == [0, 5, 11, 13, 16]  # the 3 tail pads: a sequence of their own
    assert params.cu_seqlens_q_padded is None and params.cu_seqlens_kv_padded is None
    assert (params.max_seqlen_q, params.max_seqlen_kv) == (64, 64)  # the longest, 6, rounded up as TE does
    exact = ListwiseCollator(PAD, packed=True)(ITEMS)  # no tail padding: the boundaries as they are
    assert packed_seq_params(exact["cu_seqlens"], 13).cu_seqlens_q.tolist() == [0, 5, 11, 13]


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(tp=2, sequence_parallel=True), "divisible by 2, got S=13"),
    (dict(cp=2), "context parallelism"),
    (dict(fp8_recipe="tensorwise"), "local token count divisible by 8, got S = 13"),
])
def test_packed_seq_params_refuses_what_the_layout_cannot_split(kwargs, message):
    with pytest.raises(ValueError, match=message):
        packed_seq_params(torch.tensor([0, 5, 11, 13]), 13, **kwargs)
    with pytest.raises(ValueError, match="local token count divisible by 32"):
        packed_seq_params(torch.tensor([0, 5, 11, 13]), 16, fp8_recipe="mxfp8")
    with pytest.raises(ValueError, match="strictly increasing"):
        packed_seq_params(torch.tensor([0, 5, 5, 13]), 16)


def test_thd_rope_restarts_at_every_sequence_as_the_collators_positions(megatron_single):
    """Megatron's THD RoPE on the plan's cu_seqlens == RoPE at the packed collator's per-token positions."""
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer import TransformerConfig

    from nemo_lpo.batch.collate import ListwiseCollator
    from nemo_lpo.model.gpt import rotary_angles

    batch = ListwiseCollator(PAD, pad_to_multiple_of=8, packed=True)(make_items(seed=4, ks=(3, 2)))
    seq = batch["tokens"].shape[1]
    params = packed_seq_params(batch["cu_seqlens"], seq)
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, apply_rope_fusion=False)
    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, rotary_base=10000)
    freqs = rope(rope.get_rotary_seq_len(None, None, None, config, params), packed_seq=True)
    x = torch.randn(seq, 4, 8, generator=torch.Generator().manual_seed(0))
    thd = apply_rotary_pos_emb(x, freqs, config, cu_seqlens=params.cu_seqlens_q,
                               cp_group=parallel_state.get_context_parallel_group())
    per_token = apply_rotary_pos_emb(x[:, None], rotary_angles(batch["position_ids"], rope.inv_freq), config)[:, 0]
    assert (thd - per_token).abs().max().item() < 1e-6
    row_positions = torch.arange(seq)[None]  # what a plain causal row would use: not the same
    by_row = apply_rotary_pos_emb(x[:, None], rotary_angles(row_positions, rope.inv_freq), config)[:, 0]
    assert (thd - by_row).abs().max().item() > 1e-2


def test_varlen_plan_by_hand():
    from nemo_lpo.batch.shared_prompt import collate_shared_prompt

    batch = collate_shared_prompt(ITEMS, pad_id=PAD, pad_to_multiple_of=4)  # rows of 8
    plan = varlen_plan(attention_layout(batch["segment_ids"], batch["part_ids"]))
    # row 0: prompt 0..2, y_1 3..4, y_2 5..7; row 1 (flat 8..15): prompt 8, y_1 9, padding 10..15
    assert plan.query_index.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert plan.cu_seqlens_q.tolist() == [0, 3, 5, 8, 9, 10] and plan.cu_seqlens_q.dtype == torch.int32
    # keys: a prompt itself; a response [its prompt | itself]
    assert plan.key_index.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7, 8, 8, 9]
    assert plan.cu_seqlens_kv.tolist() == [0, 3, 8, 14, 15, 17] and plan.cu_seqlens_kv.dtype == torch.int32
    assert (plan.max_seqlen_q, plan.max_seqlen_kv) == (64, 64)  # the longest, 3 and 6, rounded up as TE does


def test_a_response_without_its_prompt_in_its_row_is_refused():
    with pytest.raises(ValueError, match="does not follow its list's prompt"):
        varlen_plan(attention_layout(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 1, 1, 1]])))
    with pytest.raises(ValueError, match="does not follow its list's prompt"):  # the prompt ends the row before
        varlen_plan(attention_layout(torch.tensor([[0, 0], [0, 0]]), torch.tensor([[0, 0], [1, 1]])))


@pytest.fixture(scope="module")
def dense_attention_module(megatron_single):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                               masked_softmax_fusion=False, attention_dropout=0.0)
    return DotProductAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.arbitrary,
                               attention_type="self")


def _qkv(seq: int, rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(seq, rows, 4, 8, generator=g, requires_grad=True),
            torch.randn(seq, rows, 2, 8, generator=g, requires_grad=True),
            torch.randn(seq, rows, 2, 8, generator=g, requires_grad=True))


def _assert_close(got, expected):
    (out, grads), (out_e, grads_e) = got, expected
    assert (out - out_e).abs().max().item() < 1e-5
    for g, e in zip(grads, grads_e, strict=True):
        assert (g - e).abs().max().item() < 1e-5


@pytest.mark.parametrize("packed", [False, True])
def test_varlen_plan_equals_the_dense_masked_path(dense_attention_module, packed):
    """Shared-prompt rows (one row per list, or all lists in one row), GQA: outputs and q/k/v gradients."""
    from nemo_lpo.batch.masks import shared_prompt_mask
    from nemo_lpo.batch.shared_prompt import collate_shared_prompt

    batch = collate_shared_prompt(make_items(seed=11 + packed), pad_id=PAD, pad_to_multiple_of=8, packed=packed)
    rows, seq = batch["tokens"].shape
    real = batch["segment_ids"] >= 0
    q, k, v = _qkv(seq, rows, seed=3)
    mask = shared_prompt_mask(batch)
    expected = real_token_outputs_and_grads(dense_attention_module, q, k, v, mask, real)
    plan = varlen_plan(attention_layout(batch["segment_ids"], batch["part_ids"]))
    got = real_token_outputs_and_grads(lambda q, k, v, _: gathered_varlen_attention(q, k, v, plan, reference_varlen_kernel()),
                                       q, k, v, None, real)
    _assert_close(got, expected)


def test_packed_layout_through_the_varlen_plan_equals_the_block_diagonal_mask(dense_attention_module):
    from nemo_lpo.batch.masks import packed_causal_mask
    from nemo_lpo.model.attention import packed_layout

    cu_seqlens, seq = torch.tensor([0, 5, 6, 13, 21]), 24
    real = packed_layout(cu_seqlens, seq)[:, 0] >= 0
    q, k, v = _qkv(seq, 1, seed=5)
    mask = packed_causal_mask(cu_seqlens, seq)
    expected = real_token_outputs_and_grads(dense_attention_module, q, k, v, mask, real)
    plan = varlen_plan(packed_layout(cu_seqlens, seq))
    assert plan.cu_seqlens_q.tolist() == plan.cu_seqlens_kv.tolist() == [0, 5, 6, 13, 21]
    got = real_token_outputs_and_grads(lambda q, k, v, _: gathered_varlen_attention(q, k, v, plan, reference_varlen_kernel()),
                                       q, k, v, None, real)
    _assert_close(got, expected)


class CPUVarlenAttention(DotProductAttention):
    """A core attention that serves megatron's THD path and the layout path on CPU with the reference kernel.

    It stands where ``TEDotProductAttention`` / ``TEGatheredDotProductAttention`` stand on a GPU, so that the
    plans above go through megatron's own THD handling (squeeze, per-sequence RoPE, reshape) here.
    """

    accepts_attention_layout = True

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        kernel = reference_varlen_kernel(self.softmax_scale)
        if is_attention_layout(attention_mask):
            return gathered_varlen_attention(query, key, value, varlen_plan(attention_mask), kernel)
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type)
        assert query.dim() == 3, "megatron squeezes q/k/v to [t, heads, dim] in THD"
        every = torch.arange(query.shape[0])
        plan = VarlenPlan(every, every, packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv,
                          packed_seq_params.max_seqlen_q, packed_seq_params.max_seqlen_kv)
        return kernel(query, key, value, plan).reshape(query.shape[0], -1)


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-mistral"])
def test_models_through_megatrons_thd_path_match_the_padded_batch(megatron_single, name):
    """The ``te`` cells of the layout table with ``te_varlen``: the layouts' TE inputs give the padded log-probs.

    Packed rows go as THD ``PackedSeqParams`` (no mask, no positions), shared-prompt rows as the part layout; the
    reference varlen kernel stands where TE's kernel stands, and the model is flagged as TE's, as the builder does.
    """
    from nemo_lpo.batch.collate import ListwiseCollator
    from nemo_lpo.batch.layouts import PackedLayout, PaddedLayout, SharedPromptLayout
    from nemo_lpo.batch.shared_prompt import collate_shared_prompt
    from nemo_lpo.model.build import build_gpt_model
    from nemo_lpo.model.presets import PRESETS, transformer_config

    preset = PRESETS[name]
    torch.manual_seed(0)
    model = build_gpt_model(preset, transformer_config(preset, moe_aux_loss_coeff=0.0)).eval()
    items = make_items(seed=21, ks=(3, 2, 4))
    padded = ListwiseCollator(PAD)(items)
    packed = ListwiseCollator(PAD, pad_to_multiple_of=16, packed=True)(items)
    shared = collate_shared_prompt(items, PAD, pad_to_multiple_of=8, packed=True)
    with torch.no_grad():
        expected = PaddedLayout(dense_masks=True).logps(model, padded)  # megatron's dense causal padded path
    varlen = model
    for layer in varlen.decoder.layers:  # no parameters in a core attention: the same model, another kernel
        layer.self_attention.core_attention.__class__ = CPUVarlenAttention
    varlen.uses_transformer_engine = True  # what build_gpt_model(use_te=True) records
    with torch.no_grad():
        packed_layout_te = PackedLayout(te_varlen=True)
        assert packed_layout_te.backend_of(varlen) == "te"
        inputs = packed_layout_te.model_inputs(packed, varlen)
        assert inputs["position_ids"] is None and inputs["attention_mask"] is None
        thd = packed_layout_te.response_logps(varlen(**inputs), packed)
        gathered = SharedPromptLayout(packed=True, te_varlen=True).logps(varlen, shared)
    scale = expected.abs().max().item()
    assert (thd - expected).abs().max().item() <= 1e-5 * scale
    assert (gathered - expected).abs().max().item() <= 1e-5 * scale

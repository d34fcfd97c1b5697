"""The production glue around Transformer Engine, EXECUTED ON CPU without TE (TE's kernels: code only here).

- TE's FP8 length rule (``varlen.fp8_length_multiple``: local tokens % 8, S / tp under sequence parallelism, 32
  for mxfp8), used by the trainer's padding (``feeder.run_pad_multiple``) and the THD checks
  (``varlen.packed_seq_params``), for tp 1, 2, 4, 8 with and without SP;
- ``max_seqlen_q/kv`` rounded up to 64 as TE rounds them;
- the real ``TEGatheredDotProductAttention`` (``te_attention.gathered_attention_class``) in a tiny model, on a
  CPU stand-in for megatron's ``TEDotProductAttention``, with TE's ``DotProductAttention.forward`` replaced by a
  recorder that checks every argument and runs the reference kernel: the log-probs of the padded batch, one plan
  per micro-batch even under selective recompute, and the config fields it cannot serve refused by name.
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from nemo_lpo.config import CONF_DIR, ConfigError, load_config
from nemo_lpo.model import build, te_attention, varlen
from nemo_lpo.model.attention import is_attention_layout, packed_layout
from nemo_lpo.model.varlen import (
    MAX_SEQLEN_MULTIPLE,
    VarlenPlan,
    check_te_gathered_config,
    fp8_length_multiple,
    packed_seq_params,
    reference_varlen_kernel,
    te_max_seqlen,
)
from nemo_lpo.train.feeder import run_pad_multiple
from tests.test_model_varlen import CPUVarlenAttention
from tests.test_shared_prompt import PAD, make_items

TPS = (1, 2, 4, 8)


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_fp8_length_rule_is_tes_local_token_rule(tp, sequence_parallel):
    split = tp if sequence_parallel else 1  # each rank's share of the S tokens
    for recipe, local in (("delayed", 8), ("tensorwise", 8), ("blockwise", 8), ("mxfp8", 32)):
        multiple = fp8_length_multiple(recipe, tp=tp, sequence_parallel=sequence_parallel)
        assert multiple == local * split
        cu = torch.tensor([0, 3, 5])
        packed_seq_params(cu, multiple, tp=tp, sequence_parallel=sequence_parallel, fp8_recipe=recipe)  # accepted
        for bad in (multiple + split, multiple + multiple // 2):  # splits over tp, but not into local multiples
            with pytest.raises(ValueError, match=f"local token count divisible by {local}"):
                packed_seq_params(cu, bad, tp=tp, sequence_parallel=sequence_parallel, fp8_recipe=recipe)
    assert fp8_length_multiple(None, tp=tp, sequence_parallel=sequence_parallel) == 1
    # the old rule (S % 16) refused lengths TE accepts without SP: 24 tokens are 3 FP8 blocks of 8
    if not sequence_parallel:
        packed_seq_params(torch.tensor([0, 24]), 24, tp=tp, fp8_recipe="delayed")


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_run_pad_multiple_applies_the_fp8_rule(tp, sequence_parallel):
    base = [f"parallel.tp={tp}", f"parallel.sequence_parallel={str(sequence_parallel).lower()}",
            "data.pad_to_multiple_of=8", "data.packed=true"]
    for fp8, expected_local in (([], 1), (["model.fp8=hybrid"], 8), (["model.fp8=hybrid", "model.fp8_recipe=mxfp8"], 32)):
        cfg = load_config(CONF_DIR / "tiny_cpu.yaml", base + fp8)
        multiple = run_pad_multiple(cfg)
        split = tp if sequence_parallel else 1
        assert multiple % 8 == 0 and multiple % split == 0
        assert (multiple // split) % expected_local == 0  # every rank's local tokens satisfy TE's rule
        # every length padded to it passes the THD checks
        packed_seq_params(torch.tensor([0, 3]), multiple, tp=tp, sequence_parallel=sequence_parallel,
                          fp8_recipe=cfg.model.fp8_recipe or ("delayed" if fp8 else None))


def test_max_seqlen_is_rounded_up_to_64_as_te_rounds_it():
    assert [te_max_seqlen(n) for n in (1, 63, 64, 65, 600)] == [64, 64, 64, 128, 640]
    params = packed_seq_params(torch.tensor([0, 70, 75]), 80)
    assert params.max_seqlen_q == params.max_seqlen_kv == 128 and MAX_SEQLEN_MULTIPLE == 64
    # never S itself with several sequences: megatron's THD RoPE would read a table of S rows as whole-row positions
    assert packed_seq_params(torch.tensor([0, 30, 64]), 64).max_seqlen_q == 128
    assert packed_seq_params(torch.tensor([0, 64]), 64).max_seqlen_q == 64  # one sequence: the same positions


def test_thd_rope_restarts_at_each_sequence_where_the_rounded_maximum_would_equal_s(megatron_single):
    """Why ``packed_seq_params`` keeps the 64-rounded maximum off S.

    megatron's THD RoPE reads a table of exactly ``cu_seqlens[-1]`` rows as whole-row positions, so the second
    sequence would continue the first's.
    """
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer import TransformerConfig

    from nemo_lpo.model.gpt import rotary_angles

    seq, first = 64, 30  # the longest sequence (34) rounds up to 64 == S
    params = packed_seq_params(torch.tensor([0, first, seq]), seq)
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, apply_rope_fusion=False)
    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, rotary_base=10000)
    x = torch.randn(seq, 4, 8, generator=torch.Generator().manual_seed(0))

    def thd_rope(p):
        freqs = rope(rope.get_rotary_seq_len(None, None, None, config, p), packed_seq=True)
        return apply_rotary_pos_emb(x, freqs, config, cu_seqlens=p.cu_seqlens_q,
                                    cp_group=parallel_state.get_context_parallel_group())

    positions = torch.cat([torch.arange(first), torch.arange(seq - first)])[None]  # restart at each sequence
    per_token = apply_rotary_pos_emb(x[:, None], rotary_angles(positions, rope.inv_freq), config)[:, 0]
    assert (thd_rope(params) - per_token).abs().max().item() < 1e-6
    at_s = dataclasses.replace(params, max_seqlen_q=seq, max_seqlen_kv=seq)  # planted: the rounded maximum left at S
    assert (thd_rope(at_s) - per_token).abs().max().item() > 1e-2


class StandInTEDotProductAttention(CPUVarlenAttention):
    """Where megatron's ``TEDotProductAttention`` stands (CPU): THD and padded paths, TE's backend sub-modules."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.flash_attention, self.fused_attention, self.unfused_attention = (
            types.SimpleNamespace(attention_type=self.attention_type) for _ in range(3))

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, num_splits=None):
        assert not is_attention_layout(attention_mask), "TEDotProductAttention never receives a layout"
        return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)


class Recorder:
    """TE's ``DotProductAttention.forward`` as TEGatheredDotProductAttention calls it: every argument checked."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, module, q, k, v, attention_mask, **kwargs):
        self.calls += 1
        assert set(kwargs) == {"qkv_format", "cu_seqlens_q", "cu_seqlens_kv", "max_seqlen_q", "max_seqlen_kv",
                               "attn_mask_type"}, sorted(kwargs)
        assert kwargs["qkv_format"] == "thd" and kwargs["attn_mask_type"] == "padding_causal_bottom_right"
        assert attention_mask is None
        for part in (module, module.flash_attention, module.fused_attention, module.unfused_attention):
            assert part.attention_type == "cross"  # different cu_seqlens for queries and keys
        cu_q, cu_kv = kwargs["cu_seqlens_q"], kwargs["cu_seqlens_kv"]
        for cu in (cu_q, cu_kv):
            assert cu.dtype == torch.int32 and cu.dim() == 1 and cu.device == q.device and int(cu[0]) == 0
            assert bool((cu[1:] > cu[:-1]).all())
        assert cu_q.shape == cu_kv.shape
        config = module.config
        heads, groups, dim = config.num_attention_heads, config.num_query_groups, config.kv_channels
        assert q.shape == (int(cu_q[-1]), heads, dim) and k.shape == v.shape == (int(cu_kv[-1]), groups, dim)
        assert q.dtype == k.dtype == v.dtype == config.params_dtype and k.device == v.device == q.device
        assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
        for name, cu in (("max_seqlen_q", cu_q), ("max_seqlen_kv", cu_kv)):
            value = kwargs[name]
            assert type(value) is int and value % 64 == 0 and int((cu[1:] - cu[:-1]).max()) <= value < \
                int((cu[1:] - cu[:-1]).max()) + 64, (name, value)
        plan = VarlenPlan(torch.empty(0), torch.empty(0), cu_q, cu_kv, kwargs["max_seqlen_q"], kwargs["max_seqlen_kv"])
        return reference_varlen_kernel(module.softmax_scale)(q, k, v, plan).reshape(q.shape[0], -1)  # TE: [t, h*d]


def _production_model(monkeypatch, recorder: Recorder, **config_kwargs):
    """A tiny model whose core attention is the production TEGatheredDotProductAttention on the stand-in base."""
    from nemo_lpo.model.presets import PRESETS, transformer_config

    cls = te_attention.gathered_attention_class(StandInTEDotProductAttention, recorder)
    monkeypatch.setattr(build, "GatheredDotProductAttention", cls)  # the local spec's core attention slot
    preset = PRESETS["tiny-mixtral"]
    torch.manual_seed(0)
    model = build.build_gpt_model(preset, transformer_config(preset, moe_aux_loss_coeff=0.0, **config_kwargs),
                                  use_te=False)
    assert sum(type(m) is cls for m in model.modules()) == preset.num_layers
    model.uses_transformer_engine = True  # what build_gpt_model(use_te=True) records: the layouts' TE inputs
    return model


@pytest.mark.parametrize("plant", [None, "top_left_mask"])
def test_production_gathered_attention_with_a_recorder_gives_the_padded_logps(megatron_single, monkeypatch, plant):
    from nemo_lpo.batch.collate import ListwiseCollator
    from nemo_lpo.batch.layouts import PaddedLayout, SharedPromptLayout
    from nemo_lpo.batch.shared_prompt import collate_shared_prompt

    recorder = Recorder()
    model = _production_model(monkeypatch, recorder).eval()
    items = make_items(seed=21, ks=(3, 2, 4))
    with torch.no_grad():
        expected = PaddedLayout(dense_masks=True).logps(model, ListwiseCollator(PAD)(items))  # megatron's dense path
    if plant:  # the error the recorder exists to catch: a mask type other than TE's bottom-right causal
        monkeypatch.setattr(te_attention, "BOTTOM_RIGHT_CAUSAL", "padding_causal")
        with pytest.raises(AssertionError):
            SharedPromptLayout(te_varlen=True).logps(model, collate_shared_prompt(items, PAD))
        return
    for packed in (False, True):
        with torch.no_grad():
            got = SharedPromptLayout(packed=packed, te_varlen=True).logps(model, collate_shared_prompt(
                items, PAD, pad_to_multiple_of=8, packed=packed))
        assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    assert recorder.calls == 2 * 2  # two layers, two batches: every layout went through the TE call
    for module in model.modules():
        if hasattr(module, "accepts_attention_layout"):
            assert module.attention_type == module.flash_attention.attention_type == "self"  # restored


@pytest.mark.parametrize("cache", [True, False])
def test_one_varlen_plan_per_micro_batch_under_selective_recompute(megatron_single, monkeypatch, cache):
    from nemo_lpo.batch.layouts import SharedPromptLayout
    from nemo_lpo.batch.shared_prompt import collate_shared_prompt

    model = _production_model(monkeypatch, Recorder(), recompute="selective").train()
    builds = []
    real_plan = varlen.varlen_plan
    monkeypatch.setattr(varlen, "varlen_plan", lambda layout: builds.append(1) or real_plan(layout))
    if not cache:  # the defect: recompute gets a detached alias of the layout, the attribute cache misses it
        monkeypatch.setattr(varlen, "PLAN_CACHE_SIZE", 0)
    batch = collate_shared_prompt(make_items(seed=5, ks=(2, 3)), PAD, pad_to_multiple_of=8)
    SharedPromptLayout(te_varlen=True).logps(model, batch).sum().backward()
    layers = model.config.num_layers
    assert len(builds) == (1 if cache else 1 + layers)  # forward: once for all layers; backward: recompute reuses it


def _same_plan(got: VarlenPlan, want: VarlenPlan) -> bool:
    return all(torch.equal(getattr(got, f), getattr(want, f)) for f in ("query_index", "key_index", "cu_seqlens_q",
                                                                         "cu_seqlens_kv")) and \
        (got.max_seqlen_q, got.max_seqlen_kv) == (want.max_seqlen_q, want.max_seqlen_kv)


def test_a_layout_buffer_refilled_in_place_gets_the_new_micro_batchs_plan():
    """The plan cache must not serve micro-batch A's plan to micro-batch B written into A's storage."""
    first, second = (packed_layout(torch.tensor(cu), 16) for cu in ([0, 5, 16], [0, 9, 12, 16]))
    buffer = first.clone()
    assert _same_plan(varlen.cached_varlen_plan(buffer), varlen.varlen_plan(first))
    alias = buffer.detach()  # what recompute receives: same storage, same version counter
    assert varlen.cached_varlen_plan(alias) is varlen.cached_varlen_plan(buffer)
    buffer.copy_(second)  # the next micro-batch in the same tensor (a static input buffer)
    for tensor in (buffer, alias, buffer.detach()):
        assert _same_plan(varlen.cached_varlen_plan(tensor), varlen.varlen_plan(second))


@pytest.mark.parametrize("field", ["qk_clip", "log_max_attention_logit", "batch_invariant_mode"])
def test_fields_the_gathered_te_call_cannot_serve_are_refused_by_name(megatron_single, field):
    from nemo_lpo.model.presets import PRESETS, transformer_config

    # no config path sets them (the loader refuses the key), so model build is the earliest point to refuse them;
    # a config field added for one of them must be refused at load with model.te_varlen_attention
    with pytest.raises(ConfigError, match=f"unknown key 'model.{field}'"):
        load_config(None, [f"model.{field}=true", "model.te_varlen_attention=true"])
    check_te_gathered_config(transformer_config(PRESETS["tiny-mixtral"]))  # the defaults pass
    config = types.SimpleNamespace(**{field: True})
    with pytest.raises(ValueError, match=f"TransformerConfig {field} cannot be served"):
        check_te_gathered_config(config)
    with pytest.raises(ValueError, match=field):  # at model build, before TE is needed
        build.layer_spec(config, use_te=True, te_gathered_attention=True)
    with pytest.raises(ValueError, match=field):  # and in the class's constructor
        te_attention.gathered_attention_class(StandInTEDotProductAttention, Recorder())(config, 1, None, "self")

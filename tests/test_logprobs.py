"""Log-probs through megatron on one process: exact vs log_softmax, packed == padded, per-token RoPE, masks."""

from __future__ import annotations

import pytest
import torch

from tests.dist.model_common import build_tiny, make_items, packed_batch, padded_batch

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny_models(megatron_single):
    torch.manual_seed(0)
    return {name: build_tiny(name) for name in ("tiny-mixtral", "tiny-mistral")}


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-mistral"])
def test_token_logps_match_log_softmax(tiny_models, name):
    from nemo_lpo.batch.layouts import sequence_layout_of

    model = tiny_models[name]
    batch = padded_batch(make_items(seed=1))
    with torch.no_grad():
        got = sequence_layout_of(batch).token_logps(model, batch)
        inputs = sequence_layout_of(batch).model_inputs(batch, model)
        del inputs["labels"]  # without labels the model returns the logits
        logits = model(**inputs)
    expected = torch.log_softmax(logits.float(), dim=-1).gather(-1, batch["labels"][..., None])[..., 0]
    assert got.shape == batch["tokens"].shape
    assert (got - expected).abs().max().item() < TOL


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-mistral"])
def test_packed_equals_padded(tiny_models, name):
    from nemo_lpo.batch.layouts import sequence_layout_of
    from nemo_lpo.batch.logps import sequence_logps

    model = tiny_models[name]
    items = make_items(seed=2, ks=(2, 4, 1))
    padded, packed = padded_batch(items, multiple=4), packed_batch(items, multiple=8)
    with torch.no_grad():
        from_padded = sequence_logps(sequence_layout_of(padded).token_logps(model, padded), padded)
        from_packed = sequence_logps(sequence_layout_of(packed).token_logps(model, packed), packed)
    assert from_padded.shape == (3, 4)
    assert (from_padded[~padded["response_mask"]] == 0).all()
    assert (from_padded[padded["response_mask"]] < 0).all()
    assert (from_padded - from_packed).abs().max().item() < TOL


def _shared_prompt_inputs(prompt, y1, y2):
    """[prompt, y1, y2] in one row: y2 continues from the prompt's positions and sees only the prompt and itself."""
    p, a, b = len(prompt), len(y1), len(y2)
    tokens = torch.cat([prompt, y1, y2])[None]
    positions = torch.cat([torch.arange(p + a), torch.arange(p, p + b)])[None]
    s = p + a + b
    allowed = torch.tril(torch.ones(s, s, dtype=torch.bool))
    allowed[p + a:, p:p + a] = False  # y2 does not see y1
    return tokens, positions, ~allowed[None, None]


def test_position_ids_drive_rope(tiny_models, monkeypatch):
    """A shared-prompt row is exact only if RoPE uses the given (non-contiguous) positions."""
    from megatron.core.models.gpt import GPTModel

    from nemo_lpo.model.gpt import GPTModelWithPositions

    model = tiny_models["tiny-mistral"]
    g = torch.Generator().manual_seed(3)
    prompt, y1, y2 = (torch.randint(3, 32000, (n,), generator=g) for n in (6, 5, 4))
    tokens, positions, mask = _shared_prompt_inputs(prompt, y1, y2)
    alone = torch.cat([prompt, y2])[None]
    alone_mask = ~torch.tril(torch.ones(10, 10, dtype=torch.bool))[None, None]
    with torch.no_grad():
        expected = model(alone, torch.arange(10)[None], alone_mask)[0, 6:]
        got = model(tokens, positions, mask)[0, 11:]
        monkeypatch.setattr(GPTModelWithPositions, "_preprocess", GPTModel._preprocess)
        ignored = model(tokens, positions, mask)[0, 11:]
    assert (got - expected).abs().max().item() < TOL
    assert (ignored - expected).abs().max().item() > 1e-3  # megatron's own RoPE ignores position_ids


def test_state_dict_is_gptmodels(megatron_single):
    """The subclass adds no parameters: same state-dict and sharded-state-dict keys as a plain GPTModel."""
    from megatron.core.models.gpt import GPTModel

    from nemo_lpo.model.build import layer_spec
    from nemo_lpo.model.presets import PRESETS, transformer_config

    preset = PRESETS["tiny-mixtral"]
    config = transformer_config(preset)
    ours = build_tiny("tiny-mixtral")
    plain = GPTModel(config=config, transformer_layer_spec=layer_spec(config, use_te=False),
                     vocab_size=preset.vocab_size, max_sequence_length=preset.max_position_embeddings,
                     position_embedding_type="rope", rotary_base=int(preset.rotary_base),
                     share_embeddings_and_output_weights=False)
    assert {k: v.shape for k, v in ours.state_dict().items() if not k.endswith("_extra_state")} == {
        k: v.shape for k, v in plain.state_dict().items() if not k.endswith("_extra_state")}
    assert set(ours.sharded_state_dict()) == set(plain.sharded_state_dict())
    plain.load_state_dict(ours.state_dict())
    assert "output_layer.weight" in ours.state_dict()  # untied embeddings
    layer = ours.decoder.layers[0]  # megatron's local spec: torch RMSNorm, per-expert MLPs
    assert isinstance(layer.input_layernorm, torch.nn.RMSNorm)
    assert type(layer.mlp.experts).__name__ == "SequentialMLP" and len(layer.mlp.experts.local_experts) == 4


def test_sliding_window_is_enforced(megatron_single):
    from nemo_lpo.batch.layouts import PaddedLayout
    from nemo_lpo.model.build import build_gpt_model
    from nemo_lpo.model.presets import PRESETS, transformer_config

    preset = PRESETS["tiny-mistral"].replace(sliding_window=6)
    model = build_gpt_model(preset, transformer_config(preset)).eval()

    def batch(response_len):
        item = {"prompt_ids": torch.tensor([5, 6, 7]), "response_ids": [torch.arange(10, 10 + response_len)],
                "rewards": torch.tensor([1.0]), "index": 0}
        return padded_batch([item])

    with torch.no_grad():
        assert PaddedLayout().token_logps(model, batch(3)).shape == (1, 6)  # positions 0..5 fit the window
        with pytest.raises(ValueError, match="sliding window is 6"):
            PaddedLayout().token_logps(model, batch(4))
    # packed THD rows (TE) carry no positions: their longest sequence is checked instead
    from megatron.core.packed_seq_params import PackedSeqParams

    def params(*cu):  # max_seqlen rounded up to 64 as TE rounds it (varlen.te_max_seqlen): the cu_seqlens decide
        cu = torch.tensor(cu, dtype=torch.int32)
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=64, max_seqlen_kv=64)

    model._check_sliding_window(None, params(0, 6, 9))
    with pytest.raises(ValueError, match="reaches position 6 but the model's sliding window is 6"):
        model._check_sliding_window(None, params(0, 2, 9))


def test_moe_models_get_a_padding_mask(tiny_models):
    from nemo_lpo.batch.layouts import PaddedLayout


    batch = padded_batch(make_items(seed=5))
    moe = PaddedLayout().model_inputs(batch, tiny_models["tiny-mixtral"])
    dense = PaddedLayout().model_inputs(batch, tiny_models["tiny-mistral"])
    assert "padding_mask" not in dense
    lengths = batch["seq_lengths"]
    expected = torch.arange(batch["tokens"].shape[1])[None] >= lengths[:, None]
    assert torch.equal(moe["padding_mask"], expected)


@pytest.mark.parametrize("keep_empty_slots", [False, True])
def test_real_collator_batches(tiny_models, keep_empty_slots):
    """The data part's ListwiseCollator output (padded and packed) goes through unchanged and agrees."""
    from nemo_lpo.batch.collate import ListwiseCollator
    from nemo_lpo.batch.layouts import sequence_layout_of
    from nemo_lpo.batch.logps import sequence_logps

    model = tiny_models["tiny-mixtral"]
    items = make_items(seed=6, ks=(2, 3))
    results = []
    with torch.no_grad():
        for packed in (False, True):
            collate = ListwiseCollator(pad_id=0, pad_to_multiple_of=4, packed=packed, keep_empty_slots=keep_empty_slots)
            batch = collate(items)
            results.append(sequence_logps(sequence_layout_of(batch).token_logps(model, batch), batch))
        by_hand = padded_batch(items)
        results.append(sequence_logps(sequence_layout_of(by_hand).token_logps(model, by_hand), by_hand))
    assert results[0].shape == (2, 3) and results[0][0, 2] == 0
    assert (results[0] - results[1]).abs().max().item() < TOL
    assert (results[0] - results[2]).abs().max().item() < TOL

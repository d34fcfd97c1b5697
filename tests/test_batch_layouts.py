"""Every (batch layout x attention backend) combination is either served exactly or refused at start-up.

The reference semantics is the padded batch under megatron's dense causal mask. For each combination:

- served on megatron's local spec (``gathered``: the part layout; ``dense``: the layout's boolean mask): the
  layout's ``[B, K]`` log-probs equal the reference within 1e-5, on a built tiny Mixtral and Mistral;
- ``te``: Transformer Engine's layer spec runs its causal kernel and ignores the mask it is handed. TE does not
  exist on this machine, so what TE would compute is reproduced on the local model with a causal mask over the
  whole row (megatron's ``AttnMaskType.causal``, which the TE spec's self-attention is built with). Served
  combinations must equal the reference that way; refused ones must really differ (the refusal is needed) and
  must stop before any model is built, with an error naming the combination and what to use instead. The TE
  branch is chosen by the same flag the builder sets (``use_te`` / ``GPTModelWithPositions.uses_transformer_engine``).
"""

from __future__ import annotations

import pytest
import torch

from nemo_lpo.batch.layouts import BACKENDS, LAYOUTS, UnsupportedLayoutError, layout_by_name
from nemo_lpo.batch.masks import padding_token_mask
from nemo_lpo.config import CONF_DIR, load_config
from nemo_lpo.train.lpo_model import LPOModel, checked_layout
from tests.dist.model_common import build_tiny, make_items

PAD = 0
TOL = 1e-5
SERVED = {(layout, backend) for layout in LAYOUTS for backend in BACKENDS
          if backend not in layout_by_name(layout).refused}


@pytest.fixture(scope="module")
def tiny_models(megatron_single):
    torch.manual_seed(0)
    return {name: build_tiny(name).eval() for name in ("tiny-mixtral", "tiny-mistral")}


@pytest.fixture(scope="module")
def items():
    return make_items(seed=11, ks=(3, 1, 4, 2))


def _reference(model, items) -> torch.Tensor:
    layout = layout_by_name("padded", dense_masks=True)
    with torch.no_grad():
        return layout.logps(model, layout.collator(PAD, 8)(items))


def _te_semantics_logps(model, layout, items) -> torch.Tensor:
    """What TE's causal attention computes for this layout: the model inputs with a causal mask over the row."""
    batch = layout_by_name(layout.name, dense_masks=True).collator(PAD, 8)(items)
    inputs = layout_by_name(layout.name, dense_masks=True).model_inputs(batch, model)
    s = batch["tokens"].shape[1]
    inputs["attention_mask"] = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None]  # True = masked
    with torch.no_grad():
        return layout.response_logps(model(**inputs), batch)


def test_the_table_is_what_we_claim():
    """Padded batches run everywhere; packed and shared-prompt rows everywhere but on TE's causal attention.

    With ``te_varlen`` (``model.te_varlen_attention``) TE serves every layout through its varlen attention; those
    cells are proven on CPU with the reference varlen kernel in TE's place
    (tests/test_model_varlen.py::test_models_through_megatrons_thd_path_match_the_padded_batch).
    """
    assert SERVED == {(layout, backend) for layout in LAYOUTS for backend in ("gathered", "dense")} | {("padded", "te")}
    assert all(not layout_by_name(layout, te_varlen=True).refused for layout in LAYOUTS)


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-mistral"])
@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_combination_is_served_exactly_or_refused(tiny_models, items, name, layout_name, backend):
    model = tiny_models[name]
    expected = _reference(model, items)
    layout = layout_by_name(layout_name, dense_masks=backend == "dense")
    if backend == "te":
        got = _te_semantics_logps(model, layout, items)
        differs = (got - expected).abs().max().item() > 1e-3
        if (layout_name, backend) in SERVED:
            assert not differs, "TE's causal attention must equal the reference on a served layout"
            layout.check_backend("te")
        else:
            assert differs, "a refused combination must really be wrong (else refusing it costs users for nothing)"
            with pytest.raises(UnsupportedLayoutError, match=f"batch layout '{layout_name}' cannot run on attention "
                                                             "backend 'te'.*Instead, use padded batches"):
                layout.check_backend(layout.backend_for(use_te=True))
        return
    assert layout.backend_of(model) == backend  # the local spec has the gathered attention; dense_masks opts out
    batch = layout.collator(PAD, 8)(items)
    with torch.no_grad():
        got = layout.logps(model, batch)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL * max(1.0, expected.abs().max().item())


def test_model_flagged_as_te_is_refused_at_every_call(tiny_models, items):
    """The same flag the builder sets on a TE model makes ``model_inputs`` refuse packed and shared rows."""
    model = tiny_models["tiny-mistral"]
    model.uses_transformer_engine = True
    try:
        for layout_name in LAYOUTS:
            layout = layout_by_name(layout_name)
            batch = layout.collator(PAD, 8)(items)
            assert layout.backend_of(model) == "te"
            if layout_name == "padded":  # TE's causal kernel: no mask built for it
                assert layout.model_inputs(batch, model)["attention_mask"] is None
            else:
                with pytest.raises(UnsupportedLayoutError, match=layout_name):
                    layout.model_inputs(batch, model)
    finally:
        model.uses_transformer_engine = False


@pytest.mark.parametrize("overrides", [["data.packed=true"], ["data.shared_prompt=true"],
                                       ["data.shared_prompt=true", "data.packed=true"]])
def test_start_up_refuses_before_building(megatron_single, overrides):
    """``LPOModel`` (trainer, reference pass) and the CLI check the combination before anything is built."""
    cfg = load_config(CONF_DIR / "tiny_cpu.yaml", overrides)
    with pytest.raises(UnsupportedLayoutError, match="model.transformer_impl=local"):
        checked_layout(cfg, use_te=True)
    assert checked_layout(cfg, use_te=False).name.startswith(("packed", "shared_prompt"))
    opted_in = load_config(CONF_DIR / "tiny_cpu.yaml", [*overrides, "model.te_varlen_attention=true"])
    assert checked_layout(opted_in, use_te=True).te_varlen
    local = load_config(CONF_DIR / "tiny_cpu.yaml", [*overrides, "model.transformer_impl=local"])
    lpo = LPOModel(local, train=False)
    assert lpo.layout.backend_of(lpo.module) == "gathered"


def test_padding_token_mask_of_every_layout(items):
    """MoE routing statistics leave out exactly the padding tokens, whatever the layout."""
    real_tokens = sum(len(item["prompt_ids"]) * len(item["response_ids"]) + sum(map(len, item["response_ids"]))
                      for item in items)
    prompt_tokens = sum(len(item["prompt_ids"]) * (len(item["response_ids"]) - 1) for item in items)
    for layout_name in LAYOUTS:
        batch = layout_by_name(layout_name).collator(PAD, 8)(items)
        real = int((~padding_token_mask(batch)).sum())
        assert real == (real_tokens - prompt_tokens if layout_name.startswith("shared") else real_tokens), layout_name


def test_attended_pairs_by_hand():
    """The FLOP model's attention term: a prompt of 2 tokens with responses of 3 and 1 tokens (EOS included).

    Padded / packed: sequences of 5 and 3 tokens, causal: 5·6/2 + 3·4/2 = 15 + 6 = 21 pairs. Shared-prompt: the
    prompt once (2·3/2 = 3), each response its prompt block and triangle (3·2 + 3·4/2 = 12; 1·2 + 1 = 3): 18.
    """
    import numpy as np

    item = {"prompt_ids": np.array([5, 6], np.int32), "response_ids": [np.array([7, 8, 2], np.int32),
                                                                       np.array([2], np.int32)],
            "rewards": np.array([1.0, 0.0], np.float32), "index": 0}
    expected = {"padded": 21, "packed": 21, "shared_prompt": 18, "shared_prompt_packed": 18}
    for name, pairs in expected.items():
        layout = layout_by_name(name)
        assert float(layout.attended_pairs(layout.collator(PAD, 8)([item]))) == pairs, name

"""model.fp8_recipe and model.moe_grouped_gemm: validated when the config loads, passed to TransformerConfig."""

from __future__ import annotations

import pytest

from nemo_lpo.config import CONF_DIR, ConfigError, load_config

TINY = CONF_DIR / "tiny_cpu.yaml"


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.fp8=hybrid", "model.fp8_recipe=bogus"], "model.fp8_recipe: 'bogus' is not one of"),
    (["model.fp8=hybrid", "model.fp8_recipe=custom"], "model.fp8_recipe: 'custom' is not one of"),
    (["model.fp8_recipe=tensorwise"], "model.fp8_recipe=tensorwise needs model.fp8"),
    (["model.moe_grouped_gemm=sometimes"], "model.moe_grouped_gemm: expected bool"),
])
def test_bad_values_stop_the_load_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


def test_grouped_gemm_on_a_dense_preset_stops_when_the_architecture_is_resolved():
    from nemo_lpo.model.resolve import resolve_preset

    cfg = load_config(TINY, ["model.preset=tiny-mistral", "model.moe_grouped_gemm=true"])
    with pytest.raises(ConfigError, match="model.moe_grouped_gemm=true but model.preset=tiny-mistral has no experts"):
        resolve_preset(cfg)


def test_defaults_and_the_mixtral_recipe():
    cfg = load_config(TINY)
    assert cfg.model.fp8_recipe is None and cfg.model.moe_grouped_gemm is None  # megatron's default, auto
    mixtral = load_config(CONF_DIR / "experiments" / "ui_lpo_abs.yaml")
    assert mixtral.model.preset == "mixtral-8x7b" and mixtral.model.moe_grouped_gemm is True
    h100 = load_config(CONF_DIR.parent / "recipes" / "conf" / "mixtral_8x7b_h100.yaml")
    assert h100.model.moe_grouped_gemm is True and h100.model.fp8 == "hybrid"


def test_transformer_config_gets_both_and_the_local_spec_refuses_grouped_gemm(megatron_single):
    from nemo_lpo.model.build import layer_spec, transformer_engine_available
    from nemo_lpo.model.resolve import build_transformer_config

    assert not transformer_engine_available()  # this test describes a machine without TE
    _, auto = build_transformer_config(load_config(TINY))
    assert auto.num_moe_experts and auto.moe_grouped_gemm is False  # auto: no TE here, one GEMM per expert
    # a dense preset: megatron refuses MoE + FP8 configs unless TE (>= 1.7) imports
    _, fp8 = build_transformer_config(load_config(TINY, ["model.preset=tiny-mistral", "model.fp8=hybrid",
                                                         "model.fp8_recipe=tensorwise"]))
    assert (fp8.fp8, fp8.fp8_recipe) == ("hybrid", "tensorwise")
    _, grouped = build_transformer_config(load_config(TINY, ["model.moe_grouped_gemm=true"]))
    assert grouped.moe_grouped_gemm is True
    with pytest.raises(ValueError, match="moe_grouped_gemm=True needs Transformer Engine's layer spec"):
        layer_spec(grouped, use_te=False)

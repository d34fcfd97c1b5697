"""Megatron-Bridge recipes and providers (marker ``bridge``; skipped where Megatron-Bridge does not import).

Run where Megatron-Bridge 0.6 is installed (the NeMo container, or a venv with it): on a machine without
Transformer Engine the test-only ``bridge_te_shim`` answers Megatron-Bridge's unguarded TE / nvrx imports.
"""

from __future__ import annotations

import pytest

from tests.dist import bridge_te_shim
from tests.dist.train_common import DEMO_LISTS, pack_lists

bridge_te_shim.install()
from nemo_lpo.bridge import bridge_import_error  # noqa: E402

ERROR = bridge_import_error()
pytestmark = [pytest.mark.bridge, pytest.mark.skipif(ERROR is not None, reason=f"Megatron-Bridge: {ERROR}")]


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    return pack_lists(DEMO_LISTS, tmp_path_factory.mktemp("bridge") / "lists", 8)


def test_mixtral_recipe_mirrors_the_slurm_conf(prefix):
    from nemo_lpo.bridge.recipes import RECIPE_CONFS, lpo_mixtral_8x7b
    from nemo_lpo.config import load_config

    assert load_config(RECIPE_CONFS["mixtral-8x7b"], []).model.fp8 == "hybrid"
    # FP8 MoE needs Transformer Engine at config validation: checked without it here
    c = lpo_mixtral_8x7b(f"data.train_prefix={prefix}", "train.max_steps=10", "model.fp8=null")
    m = c.model
    assert (m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.expert_model_parallel_size) == (1, 4, 8)
    assert m.num_moe_experts == 8 and m.bf16 and m.calculate_per_token_loss
    assert m.moe_aux_loss_coeff == pytest.approx(1e-2 * c.train.micro_batch_size)
    assert c.train.global_batch_size == 32 and c.train.train_iters == 10
    assert c.ddp.average_in_collective is False and c.ddp.use_distributed_optimizer


def test_mistral_recipe_is_tp2_sp(prefix):
    from nemo_lpo.bridge.recipes import lpo_mistral_7b

    c = lpo_mistral_7b(f"data.train_prefix={prefix}", "train.max_steps=10")
    m = c.model
    assert (m.tensor_model_parallel_size, m.sequence_parallel, m.pipeline_model_parallel_size) == (2, True, 1)
    assert m.num_moe_experts is None and m.bf16 and c.dataset.pad_to_multiple_of % 2 == 0


def test_dataset_without_reference_is_refused(prefix):
    from nemo_lpo.bridge.provider import LPODatasetProvider

    with pytest.raises(ValueError, match="precomputed reference only"):
        LPODatasetProvider(train_prefix=str(prefix)).build_datasets(None)


def test_online_reference_is_refused(prefix):
    from nemo_lpo.bridge.recipes import recipe
    from nemo_lpo.config import ConfigError

    with pytest.raises(ConfigError, match="reference.mode"):
        recipe("tiny-cpu", [f"data.train_prefix={prefix}", "reference.mode=online"])


@pytest.mark.parametrize(("overrides", "field"), [
    (["parallel.pp=2", "parallel.vpp=2"], "parallel.vpp"),
    (["data.shared_prompt=true"], "data.shared_prompt"),
    (["checkpoint.keep_best=val/loss", "data.valid_prefix={prefix}"], "data.valid_prefix"),
])
def test_trainer_only_settings_are_refused_by_name(prefix, overrides, field):
    """What only nemo-lpo train does (virtual pipeline, shared-prompt rows, validation) is not silently ignored."""
    from nemo_lpo.bridge.recipes import config_container
    from nemo_lpo.config import CONF_DIR, ConfigError, load_config

    cfg = load_config(CONF_DIR / "tiny_cpu.yaml", [f"data.train_prefix={prefix}",
                                                    *(o.format(prefix=prefix) for o in overrides)])
    with pytest.raises(ConfigError, match=f"{field}: not supported by the Megatron-Bridge recipe"):
        config_container(cfg)


def test_pretrained_layout_links_the_checkpoint_and_adds_run_config(tmp_path):
    import yaml

    from nemo_lpo.bridge.recipes import pretrained_layout

    ckpt = tmp_path / "converted"
    ckpt.mkdir()
    (ckpt / "metadata.json").write_text("{}")
    (ckpt / "nemo_lpo_model.json").write_text("{}")
    out = pretrained_layout(ckpt, tmp_path / "run", tp=2, pp=4)
    assert sorted(p.name for p in (tmp_path / "run" / "pretrained").iterdir()) == \
        ["metadata.json", "nemo_lpo_model.json", "run_config.yaml"]
    run_config = yaml.safe_load((tmp_path / "run" / "pretrained" / "run_config.yaml").read_text())
    assert run_config["model"] == {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 4}
    assert out == str(tmp_path / "run" / "pretrained") and not (ckpt / "run_config.yaml").exists()

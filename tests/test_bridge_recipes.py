"""Megatron-Bridge recipes and providers (marker ``bridge``: run in .venv-bridge by ``make test``).

``make test`` runs the ``bridge`` tests in the Megatron-Bridge test environment (``make bridge-env``: megatron-bridge
0.6.2, transformers 5.12.1) and the rest in the main one. They fail, not skip, where Megatron-Bridge does not
import. On a machine without TE the test-only ``bridge_te_shim`` answers Megatron-Bridge's unguarded TE / nvrx imports.
"""

from __future__ import annotations

import pytest

from tests.dist import bridge_te_shim
from tests.dist.train_common import DEMO_LISTS, pack_lists

bridge_te_shim.install()
from nemo_lpo.bridge import bridge_import_error, missing_bridge_message  # noqa: E402

pytestmark = pytest.mark.bridge


def test_megatron_bridge_imports():
    error = bridge_import_error()
    assert error is None, missing_bridge_message(error)


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
    (["data.shuffle=false"], "data.shuffle"),
    (["data.seed=7"], "data.seed"),
    (["checkpoint.resume=false"], "checkpoint.resume"),
    (["checkpoint.save_at_end=false"], "checkpoint.save_at_end"),
])
def test_trainer_only_settings_are_refused_by_name(prefix, overrides, field):
    """What only nemo-lpo train does (vpp, shared prompts, validation, sampler, resume, final save) is refused."""
    from nemo_lpo.bridge.recipes import config_container
    from nemo_lpo.config import CONF_DIR, ConfigError, load_config

    cfg = load_config(CONF_DIR / "tiny_cpu.yaml", [f"data.train_prefix={prefix}",
                                                    *(o.format(prefix=prefix) for o in overrides)])
    with pytest.raises(ConfigError, match=f"{field}: not supported by the Megatron-Bridge recipe"):
        config_container(cfg)


def test_trainer_settings_reach_their_bridge_counterparts(prefix, tmp_path):
    """keep_last -> most_recent_k, checkpoint.dir -> save/load, W&B -> the logger, seq_length on the dataset."""
    from nemo_lpo.bridge.recipes import recipe

    base = [f"data.train_prefix={prefix}", f"logging.run_dir={tmp_path / 'run'}"]
    c = recipe("tiny-cpu", [*base, "checkpoint.keep_last=3", f"checkpoint.dir={tmp_path / 'ck'}",
                            "logging.wandb_project=lpo", "logging.wandb_name=run1"])[0]
    assert c.checkpoint.most_recent_k == 3
    assert c.checkpoint.save == c.checkpoint.load == str(tmp_path / "ck")
    assert (c.logger.wandb_project, c.logger.wandb_exp_name) == ("lpo", "run1")
    assert c.logger.wandb_save_dir == str(tmp_path / "run" / "wandb")
    assert c.dataset.seq_length == c.model.seq_length > 0
    c = recipe("tiny-cpu", [*base, "checkpoint.keep_last=0"])[0]
    assert c.checkpoint.most_recent_k == -1  # keep all, in Megatron-Bridge's terms
    assert c.checkpoint.save == str(tmp_path / "run" / "checkpoints") and c.logger.wandb_project is None


def test_seq_length_feeds_bridge_runtime_logging(prefix, tmp_path):
    """Megatron-Bridge's runtime / throughput logging reads ``config.dataset.seq_length`` (train_utils.py)."""
    import time

    from megatron.bridge.training.state import TrainState
    from megatron.bridge.training.utils.train_utils import report_runtime

    from nemo_lpo.bridge.recipes import recipe

    c = recipe("tiny-cpu", [f"data.train_prefix={prefix}", f"logging.run_dir={tmp_path}"])[0]
    state = TrainState()
    state.step, state.consumed_train_samples = 2, 8
    metrics = report_runtime(state, time.time(), c.dataset.seq_length, train_iters=4)
    assert metrics["time/tokens"] == 8 * c.model.seq_length

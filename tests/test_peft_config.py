"""The ``peft`` config section (validated at load) and the start-up refusal where Megatron-Bridge's PEFT is missing."""

from __future__ import annotations

import importlib.util

import pytest

from nemo_lpo.cli import main
from nemo_lpo.config import ConfigError, PeftConfig, load_config
from nemo_lpo.train.adapters import require_peft
from tests.dist.train_common import TINY_CONF

LORA = ["peft.type=lora", "model.init_checkpoint=/some/base"]


def test_default_is_full_parameter_training():
    cfg = load_config(TINY_CONF)
    assert cfg.peft.type == "none" and not cfg.peft.enabled
    assert cfg.peft.target_modules == ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def test_lora_section_loads():
    cfg = load_config(TINY_CONF, [*LORA, "peft.dim=8", "peft.alpha=16", "peft.dropout=0.1",
                                  "peft.target_modules=[linear_qkv,'*.layers.0.*.linear_fc1']", "reference.mode=base"])
    assert (cfg.peft.type, cfg.peft.dim, cfg.peft.alpha, cfg.peft.dropout) == ("lora", 8, 16, 0.1)
    assert cfg.peft.target_modules == ["linear_qkv", "*.layers.0.*.linear_fc1"]


@pytest.mark.parametrize(("overrides", "names"), [
    (["peft.type=qlora"], "peft.type"),
    ([*LORA, "peft.dim=0"], "peft.dim"),
    ([*LORA, "peft.alpha=-1"], "peft.alpha"),
    ([*LORA, "peft.dropout=1.0"], "peft.dropout"),
    ([*LORA, "peft.target_modules=[linear_qkvv]"], "peft.target_modules"),
    ([*LORA, "peft.target_modules=[]"], "peft.target_modules"),
    (["reference.mode=base"], "peft.type"),  # the base reference needs adapters to switch off
])
def test_bad_peft_settings_are_refused_by_name(overrides, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config(TINY_CONF, overrides)


@pytest.mark.skipif(importlib.util.find_spec("megatron.bridge") is not None,
                    reason="Megatron-Bridge is installed here: the refusal is for environments without it")
def test_adapters_without_bridge_stop_at_start_up_naming_what_to_install(capsys, tmp_path):
    with pytest.raises(ConfigError) as err:
        require_peft(PeftConfig(type="lora"), "/some/base")
    message = str(err.value)
    assert "megatron-bridge" in message and "nvcr.io/nvidia/nemo" in message and "transformer-engine" in message
    require_peft(PeftConfig(type="none"), None)  # full-parameter runs never need it
    assert main(["train", str(TINY_CONF), *LORA, f"logging.run_dir={tmp_path}"]) == 2
    assert "megatron.bridge.peft" in capsys.readouterr().err


def test_adapters_need_a_base_checkpoint():
    cfg = load_config(TINY_CONF, ["peft.type=dora"])  # recipes leave the checkpoint to the command line
    with pytest.raises(ConfigError, match=r"model\.init_checkpoint"):
        require_peft(cfg.peft, cfg.model.init_checkpoint)

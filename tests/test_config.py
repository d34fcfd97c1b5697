"""Config system: layered YAML, key=value overrides, group selection and validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from nemo_lpo.config import CONF_DIR, Config, ConfigError, dump_config, load_config

TINY = CONF_DIR / "tiny_cpu.yaml"


def test_layers_merge_in_order():
    cfg = load_config(TINY)
    assert cfg.model.preset == "tiny-mixtral"  # model/tiny
    assert cfg.optim.lr == pytest.approx(1e-4)  # the composed file overrides base (5e-6)
    assert cfg.optim.adam_beta2 == pytest.approx(0.999)  # from base
    assert cfg.data.micro_batch_size == 2  # data/tiny
    assert cfg.parallel.tp == 1 and cfg.train.max_steps == 20


def test_overrides_and_group_selection():
    cfg = load_config(TINY, ["parallel=tp2", "optim.lr=3e-4", "loss.options.alpha=0.5", "train.max_steps=7"])
    assert cfg.parallel.tp == 2 and cfg.parallel.sequence_parallel is True
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.loss.options == {"alpha": 0.5}
    assert cfg.train.max_steps == 7


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
        ("model.presett=x", "did you mean 'model.preset'?"),
        ("paralel.tp=2", "did you mean 'parallel'?"),
        ("parallel.tp=two", "parallel.tp: expected int, got 'two'"),
        ("optim.decay_style=cosin", "did you mean 'cosine'?"),
        ("checkpoint.resume=3", "checkpoint.resume: expected bool"),
        ("nokey", "expected key=value"),
    ],
)
def test_override_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert message in str(err.value)
    assert "override" in str(err.value)


def test_file_errors_name_the_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults: [base, model/tiny]\noptim:\n  warmup_step: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'optim.warmup_step'; did you mean 'optim.warmup_steps'"):
        load_config(bad)
    bad.write_text("defaults: [base, model/nonexistent]\n")
    with pytest.raises(ConfigError, match="model/nonexistent"):
        load_config(bad)
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse YAML"):
        load_config(bad)


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="multiple of data.micro_batch_size"):
        load_config(TINY, ["data.global_batch_size=3"])
    with pytest.raises(ConfigError, match="not divisible by tp\\*pp"):
        load_config(TINY, ["parallel=tp2"]).data_parallel_size(3)
    assert load_config(TINY, ["parallel=ep2"]).data_parallel_size(2) == 2


def test_dump_roundtrip(tmp_path: Path):
    cfg = load_config(TINY, ["optim.lr=2e-4", "parallel=pp2"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and isinstance(again, Config)


def test_every_shipped_layer_is_valid():
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        load_config(path)

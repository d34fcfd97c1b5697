"""Config validation of the loss: ``loss.type`` against the registry, ``loss.options`` against what that loss reads.

The accepted options come from ``nemo_lpo.losses.LOSS_SPECS``; the last tests check that table against the
loss functions themselves (an option a loss is said to read changes its value, any other leaves it unchanged).
"""

from __future__ import annotations

import pytest
import torch

from nemo_lpo.config import CONF_DIR, Config, ConfigError, LossConfig, load_config
from nemo_lpo.losses import LOSS_SPECS, listwise_loss

TINY = CONF_DIR / "tiny_cpu.yaml"


def error_of(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(TINY, list(overrides))
    return str(err.value)


@pytest.mark.parametrize(("name", "closest"), [("listmel", "listmle"), ("kpoo", "kpo"), ("lpo-abs", "lpo_abs")])
def test_unknown_loss_type_names_the_field_and_the_closest_name(name, closest):
    message = error_of(f"loss.type={name}")
    assert f"loss.type: unknown loss '{name}'; the closest is '{closest}'" in message
    assert "listmle" in message and "kpo" in message  # the registry is listed


def test_unknown_loss_type_in_a_file_names_the_file(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("defaults: [tiny_cpu]\nloss:\n  type: plackett\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: loss\.type: unknown loss 'plackett'"):
        load_config(bad)


def test_direct_construction_is_checked_too():
    with pytest.raises(ConfigError, match="loss.options.alpha: loss.type=kpo takes no option 'alpha'"):
        Config(loss=LossConfig(type="kpo", options={"alpha": 0.5}))


def test_option_the_loss_does_not_read_is_named_with_its_readers():
    message = error_of("loss.type=lpo", "loss.options.alpha=0.5")
    assert "loss.options.alpha: loss.type=lpo takes no option 'alpha' (read by: nca, infonca)" in message
    assert "it takes: sft_weight, preference" in message
    assert "loss.options.k: loss.type=listmle takes no option 'k' (read by: kpo)" in error_of(
        "loss.type=listmle", "loss.options.k=2")


def test_misspelt_option_gets_a_suggestion():
    assert "did you mean 'preference'?" in error_of("loss.type=lpo", "loss.options.prefrence=true")


def test_runtime_tensor_option_cannot_come_from_a_config():
    message = error_of("loss.type=sft", "loss.options.response_lengths=3")
    assert "loss.options.response_lengths: loss.type=sft takes no option 'response_lengths'" in message


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("loss.type=kpo", "loss.options.k=2.5"), "loss.options.k: expected int, got 2.5 (float)"),
        (("loss.type=kpo", "loss.options.k=true"), "loss.options.k: expected int, got True (bool)"),
        (("loss.type=kpo", "loss.options.k=two"), "loss.options.k: expected int, got 'two' (str)"),
        (("loss.type=lpo", "loss.options.preference=1"), "loss.options.preference: expected bool, got 1 (int)"),
        (("loss.type=nca", "loss.options.alpha=[1]"), "loss.options.alpha: expected float, got [1] (list)"),
        (("loss.type=kto", "loss.options.kto_z=high"), "loss.options.kto_z: expected float or null, got 'high'"),
        (("loss.type=dpo", "loss.options.sft_weight=null"), "loss.options.sft_weight: expected float, got None"),
    ],
)
def test_option_of_the_wrong_type_is_named(overrides, message):
    assert message in error_of(*overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("loss.type=kpo", "loss.options.k=0"), "loss.options.k: option k (kpo's top positions) must be an int >= 1"),
        (("loss.type=infonca", "loss.options.alpha=0"), "loss.options.alpha: option alpha (reward temperature) must be > 0"),
    ],
)
def test_option_out_of_range_is_named(overrides, message):
    assert message in error_of(*overrides)


def test_accepted_options_load_and_ints_widen_to_float():
    cfg = load_config(TINY, ["loss.type=kto", "loss.options.kto_z=0", "loss.options.desirable_weight=2",
                             "loss.options.sft_weight=1"])
    assert cfg.loss.options == {"kto_z": 0.0, "desirable_weight": 2.0, "sft_weight": 1.0}
    assert all(isinstance(v, float) for v in cfg.loss.options.values())
    assert load_config(TINY, ["loss.type=kto", "loss.options.kto_z=null"]).loss.options == {"kto_z": None}
    kpo = load_config(TINY, ["loss.type=kpo", "loss.options.k=3"])
    assert kpo.loss.options == {"k": 3} and type(kpo.loss.options["k"]) is int


def test_options_in_a_file_are_checked_with_the_file_named(tmp_path):
    bad = tmp_path / "kpo.yaml"
    bad.write_text("defaults: [tiny_cpu]\nloss:\n  type: kpo\n  options: {k: 0}\n")
    with pytest.raises(ConfigError, match=r"kpo\.yaml: loss\.options\.k: option k"):
        load_config(bad)


# one non-default value per option a config may set (response_lengths comes from the batch)
NON_DEFAULT = {"preference": True, "alpha": 0.4, "sft_weight": 0.5, "kto_z": 0.3, "desirable_weight": 2.0,
               "undesirable_weight": 3.0, "k": 2}


def _loss(loss_type: str, **options) -> torch.Tensor:
    """Two K = 4 lists (K = 2 for dpo / ipo) with graded rewards, so that every option can show an effect."""
    gen = torch.Generator().manual_seed(4)
    k = 2 if loss_type in ("dpo", "ipo") else 4
    reference = -10 * torch.rand(2, k, generator=gen, dtype=torch.float64)
    policy = reference + 2 * torch.randn(2, k, generator=gen, dtype=torch.float64)
    rewards = torch.tensor([[3.0, 1.0, 4.0, 2.0], [0.5, 2.5, 1.5, 3.5]], dtype=torch.float64)[:, :k]
    lengths = torch.tensor([[5, 7, 3, 9], [4, 6, 8, 2]])[:, :k]
    return listwise_loss(loss_type, policy, reference, rewards, torch.ones(2, k, dtype=torch.bool), 0.5,
                         response_lengths=lengths, **options)[0]


@pytest.mark.parametrize("loss_type", sorted(LOSS_SPECS))
def test_the_options_table_matches_what_each_loss_reads(loss_type):
    accepted = set(_accepted_names(loss_type))
    base = _loss(loss_type)
    for name, value in NON_DEFAULT.items():
        changed = not torch.equal(_loss(loss_type, **{name: value}), base)
        assert changed == (name in accepted), f"{loss_type}: option {name} {'changes' if changed else 'keeps'} the loss"


def _accepted_names(loss_type: str) -> list[str]:
    """The option names the config accepts for ``loss_type``: each one alone must load."""
    names = []
    for name, value in NON_DEFAULT.items():
        try:
            load_config(TINY, [f"loss.type={loss_type}", f"loss.options.{name}={str(value).lower()}"])
        except ConfigError:
            continue
        names.append(name)
    return names

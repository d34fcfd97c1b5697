"""Megatron-Bridge's own set-up functions and ``train()`` train LPO on CPU at 1 rank, PP2, DP2 and EP2, and LoRA.

Marker ``bridge``: ``make test`` runs it in .venv-bridge. Two torchrun launches of tests/dist/bridge_loop.py
(1 process: the init checkpoint, ``single``, ``resume``, ``trainer``, ``lora`` (Bridge's PEFT hook applies
nemo-lpo's LoRA), ``lora_resume``, ``trainer_lora``; 2 processes: ``pp2``, ``dp2``, ``ep2``), every
scenario from the same init weights through Bridge's ``pretrained`` layout; the worker's docstring lists the Bridge
functions that run and where it enters below ``setup()``. Executed on CPU (gloo) with nemo_lpo.bridge.cpu_compat.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dist.train_common import DEMO_LISTS, pack_lists, results, scenario
from tests.torchrun import run_torchrun

WORKER = Path(__file__).parent / "dist" / "bridge_loop.py"
TOL = 1e-5  # the trainer's parity tolerance for losses (tests/test_train_parity.py)
LATER_TOL = 1e-4  # ... and for grad norms

pytestmark = [pytest.mark.bridge, pytest.mark.distributed]


@pytest.fixture(scope="module")
def found(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bridge_loop")
    prefix = pack_lists(DEMO_LISTS, root / "src" / "lists", 16)
    out = results(run_torchrun(WORKER, 1, str(root / "work"), str(prefix), "single", "resume", "trainer", "lora",
                               "lora_resume", "trainer_lora"))
    out.update(results(run_torchrun(WORKER, 2, str(root / "work"), str(prefix), "pp2", "dp2", "ep2")))
    return out


def test_bridge_train_runs_four_steps_and_saves(found):
    single = scenario(found, "single")
    assert (single["start"], single["end"]) == (0, 4)
    assert len(single["loss"]) == 4 and all(loss is not None for loss in single["loss"])
    assert len(set(single["loss"])) == 4 and all(norm > 0 for norm in single["grad_norm"])  # it trains
    assert single["saved"] == ["iter_0000002", "iter_0000004"]  # Bridge's save at save_interval (torch_dist)


def test_pp2_equals_one_rank(found):
    single, pp2 = scenario(found, "single"), scenario(found, "pp2")
    assert pp2["loss"] == single["loss"]  # the same micro-batches in the same order: bit-identical losses
    assert pp2["grad_norm"] == pytest.approx(single["grad_norm"], abs=1e-6)  # the norm sums over both stages


def test_resume_from_bridge_checkpoint_reproduces_steps_3_and_4(found):
    single, resume = scenario(found, "single"), scenario(found, "resume")
    assert (resume["start"], resume["end"]) == (2, 4)  # Bridge's load_checkpoint restored iteration 2
    assert resume["loss"] == single["loss"][2:]
    assert resume["grad_norm"] == single["grad_norm"][2:]


def assert_close(got: dict, want: dict) -> None:
    assert got["loss"] == pytest.approx(want["loss"], abs=TOL), (got["loss"], want["loss"])
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], abs=LATER_TOL), (got["grad_norm"], want["grad_norm"])


@pytest.mark.parametrize("name", ["single", "pp2"])
def test_same_lists_in_same_order_give_the_trainer_losses(found, name):
    assert_close(scenario(found, name), scenario(found, "trainer")["bridge_dp1"])


@pytest.mark.parametrize("name", ["dp2", "ep2"])
def test_data_parallel_layouts_match_the_trainer_in_bridge_order(found, name):
    assert_close(scenario(found, name), scenario(found, "trainer")["bridge_dp2"])


def test_sample_order_difference_is_what_separates_bridge_from_the_trainer(found):
    """Bridge's sampler order depends on the data-parallel size and differs from nemo-lpo's (docs/nemo.md)."""
    trainer = scenario(found, "trainer")
    orders = [trainer[key]["order"] for key in ("own", "bridge_dp1", "bridge_dp2")]
    assert all(sorted(order) == list(range(16)) for order in orders)  # each a permutation of the 16 lists
    assert len({tuple(order) for order in orders}) == 3
    assert trainer["own"]["loss"][0] != pytest.approx(trainer["bridge_dp1"]["loss"][0], abs=1e-3)
    assert scenario(found, "dp2")["loss"][0] != pytest.approx(scenario(found, "single")["loss"][0], abs=1e-3)


def test_bridge_train_with_lora_trains_only_the_adapters_and_saves_only_them(found):
    lora, single = scenario(found, "lora"), scenario(found, "single")
    assert (lora["start"], lora["end"]) == (0, 4) and len(set(lora["loss"])) == 4
    assert lora["base"][0] == lora["base"][1]  # the frozen base: bitwise the same sum of |w| after 4 steps
    assert lora["trainable_names"] == ["linear_in.weight", "linear_out.weight"]  # adapters only
    assert 0 < lora["params/trainable"] and lora["params/total"] == single["params/total"] + lora["params/trainable"]
    assert lora["params/trainable"] == scenario(found, "trainer_lora")["bridge_dp1"]["trainable"]
    model_keys = [key for key in lora["saved_keys"] if not key.startswith("optimizer.")]
    assert model_keys and all(".adapter." in key for key in model_keys), model_keys  # Bridge saved adapters only
    assert len(lora["saved_keys"]) < len(single["saved_keys"])


def test_bridge_lora_equals_the_trainers_lora_in_bridge_order(found):
    """Bridge's hook and nemo-lpo's trainer draw the same adapters (``adapter_init``) on the same base."""
    lora, trainer = scenario(found, "lora"), scenario(found, "trainer_lora")["bridge_dp1"]
    assert lora["base"][0] == pytest.approx(trainer["base"], rel=1e-12)  # the base came through the pretrained layout
    assert lora["loss"][0] == pytest.approx(scenario(found, "single")["loss"][0], abs=TOL)  # B = 0: the base's step 1
    assert_close(lora, trainer)


def test_bridge_lora_resume_reproduces_steps_3_and_4(found):
    lora, resume = scenario(found, "lora"), scenario(found, "lora_resume")
    assert (resume["start"], resume["end"]) == (2, 4)
    assert resume["loss"] == lora["loss"][2:]
    assert resume["grad_norm"] == lora["grad_norm"][2:]

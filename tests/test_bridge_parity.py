"""The Megatron-Bridge forward step (LPOTask, per-count normalisation) trains exactly as nemo-lpo's trainer.

Megatron-core's own ``get_forward_backward_func`` and ``finalize_model_grads`` with
``calculate_per_token_loss=True`` drive ``nemo_lpo.bridge.task.LPOTask``; over 3 steps from a shared init
checkpoint and a precomputed reference it gives the trainer's losses, grad norms and per-parameter gradients
at 1 process, DP2, PP2 and EP2 (two torchrun launches: 1 and 2 processes; tests/dist/bridge_parity.py).
Megatron-Bridge itself is not needed: this is the contract its ``train_step`` relies on.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dist.train_common import DEMO_LISTS, pack_lists, results
from tests.torchrun import run_torchrun

WORKER = Path(__file__).parent / "dist" / "bridge_parity.py"
TOL = 1e-6

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def found(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bridge_parity")
    prefix = pack_lists(DEMO_LISTS, root / "src" / "lists", 16)
    out = results(run_torchrun(WORKER, 1, str(root / "work"), str(prefix), "single"))
    assert "error" not in out.get("single", {}), out.get("single", {}).get("error")
    out.update(results(run_torchrun(WORKER, 2, str(root / "work"), str(prefix), "dp2", "pp2", "ep2")))
    return out


def scenario(found: dict, name: str) -> dict:
    assert name in found, f"scenario {name} printed no result"
    assert "error" not in found[name], f"scenario {name} failed:\n{found[name]['error']}"
    return found[name]


@pytest.mark.parametrize("name", ["single", "dp2", "pp2", "ep2"])
def test_bridge_task_matches_trainer(found, name):
    got = scenario(found, name)
    trainer, bridge = got["trainer"], got["bridge"]
    assert [line["step"] for line in trainer] == [line["step"] for line in bridge] == [1, 2, 3]
    assert trainer[0]["loss"] != trainer[2]["loss"]  # the runs actually train
    assert all(line["lists/valid"] == 4 for line in trainer)
    for t, b in zip(trainer, bridge, strict=True):
        assert b["loss"] == pytest.approx(t["loss"], abs=TOL), (t["step"], b["loss"], t["loss"])
        assert b["grad_norm"] == pytest.approx(t["grad_norm"], abs=TOL), (t["step"], b["grad_norm"], t["grad_norm"])
    for step, (diff, scale) in enumerate(zip(got["grad_diff"], got["grad_max"], strict=True), start=1):
        assert scale > 1e-3, (step, scale)  # gradients are there to compare
        assert diff <= TOL * scale, (step, diff, scale)


@pytest.mark.parametrize("name", ["dp2", "pp2", "ep2"])
def test_bridge_task_layout_reproduces_single_process(found, name):
    single = scenario(found, "single")["trainer"]
    for line, want in zip(scenario(found, name)["bridge"], single, strict=True):
        assert line["loss"] == pytest.approx(want["loss"], abs=1e-5)
        assert line["grad_norm"] == pytest.approx(want["grad_norm"], abs=1e-5)

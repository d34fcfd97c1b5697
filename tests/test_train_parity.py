"""LPO training is layout-invariant, and step 1 equals the closed form.

TP2+SP, PP2, EP2 (alltoall), DP2 (+ distributed optimizer), PP2 x virtual pipeline 2 (4-layer variant,
also resuming a 1-process checkpoint; with TP2+SP or DP2 + distributed optimizer on 4 processes), PP4 x VPP2
(8-layer variant), micro-batch splits and precomputed vs online reference all reproduce
the single-process run.

Three torchrun launches (1, 2 and 4 processes) run every scenario of tests/dist/train_parity.py on the same
packed lists and the same starting weights (a dist checkpoint written by the single-process launch).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tests.dist.train_common import DEMO_LISTS, pack_lists, results
from tests.torchrun import run_torchrun

WORKER = Path(__file__).parent / "dist" / "train_parity.py"
TOL = 1e-5
LAYOUTS = ["tp2", "pp2", "dp2", "ep2"]

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("parity")
    return root, pack_lists(DEMO_LISTS, root / "data" / "lists", 16)


@pytest.fixture(scope="module")
def single(work) -> dict:
    root, prefix = work
    out = run_torchrun(WORKER, 1, str(root), str(prefix), "base", "base_noaux", "mb4_noaux", "precomputed",
                       "recompute", "shared_noaux", "bf16", "base4", "base8", "val")
    return results(out)


@pytest.fixture(scope="module")
def layouts(work, single) -> dict:
    root, prefix = work
    assert "lines" in single["base"], single["base"].get("error")
    return results(run_torchrun(WORKER, 2, str(root), str(prefix), *LAYOUTS, "pp2_shared_noaux", "pp2_vpp2",
                                "pp2_vpp2_precomputed", "pp2_vpp2_resume", "pp2_from_vpp2", "pp2_val"))


@pytest.fixture(scope="module")
def four_processes(work, single) -> dict:
    root, prefix = work
    assert "lines" in single["base4"], single["base4"].get("error")
    return results(run_torchrun(WORKER, 4, str(root), str(prefix), "tp2_pp2", "tp2_pp2_vpp2",
                                "dp2_pp2_vpp2", "pp4_vpp2"))


def lines_of(found: dict, name: str) -> list[dict]:
    assert name in found, f"scenario {name} printed no result"
    assert "error" not in found[name], f"scenario {name} failed:\n{found[name]['error']}"
    return found[name]["lines"]


def assert_same_run(got: list[dict], want: list[dict], tol: float = TOL, steps=(1, 2, 3)) -> None:
    assert [line["step"] for line in got] == [line["step"] for line in want] == list(steps)
    for g, w in zip(got, want, strict=True):
        assert abs(g["loss"] - w["loss"]) < tol, (g["step"], g["loss"], w["loss"])
        assert abs(g["grad_norm"] - w["grad_norm"]) < tol, (g["step"], g["grad_norm"], w["grad_norm"])
        assert g["lists/valid"] == w["lists/valid"] and g["tokens"] == w["tokens"]
        for key in ("rewards/accuracies", "rewards/margins", "logps/chosen"):
            assert abs(g[key] - w[key]) < 1e-4 * max(1.0, abs(w[key])), (key, g[key], w[key])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_reproduces_single_process(layouts, single, layout):
    base = lines_of(single, "base")
    assert base[0]["loss"] != base[2]["loss"]  # the run actually trains
    assert_same_run(lines_of(layouts, layout), base)


def test_microbatch_split_invariance(single):
    # 4 micro-batches of 1 list vs 1 micro-batch of 4 lists (the MoE aux loss is off: megatron defines it
    # per micro-batch, so it is not split-invariant by construction).
    assert_same_run(lines_of(single, "mb4_noaux"), lines_of(single, "base_noaux"))


def test_precomputed_reference_equals_online(single):
    assert_same_run(lines_of(single, "precomputed"), lines_of(single, "base"), tol=1e-6)


def test_full_recompute_changes_nothing(single):
    assert_same_run(lines_of(single, "recompute"), lines_of(single, "base"))


def test_shared_prompt_packing_matches_unpacked(single):
    """data.shared_prompt: one row per list, the prompt computed once; same losses and gradients."""
    shared, base = lines_of(single, "shared_noaux"), lines_of(single, "base_noaux")
    for got, want in zip(shared, base, strict=True):
        assert abs(got["loss"] - want["loss"]) < TOL and abs(got["grad_norm"] - want["grad_norm"]) < TOL
        assert got["rewards/accuracies"] == pytest.approx(want["rewards/accuracies"], abs=1e-6)
        assert got["tokens"] < want["tokens"]  # each prompt once instead of K times


def test_shared_prompt_under_pp2(layouts, single):
    """Shared-prompt rows (their per-token positions and list mask on both stages) through the PP2 pipeline."""
    shared = lines_of(single, "shared_noaux")
    assert shared[0]["loss"] != shared[2]["loss"]
    assert_same_run(lines_of(layouts, "pp2_shared_noaux"), shared)


def test_virtual_pipeline_reproduces_single_process(layouts, single):
    """PP2 x VPP2 (megatron's interleaved 1F1B, 4 layers: one per chunk) vs 1 process.

    Its micro-batches are padded to the step's longest, which changes nothing.
    """
    base = lines_of(single, "base4")
    assert base[0]["loss"] != base[2]["loss"]
    assert_same_run(lines_of(layouts, "pp2_vpp2"), base[:3])


def test_tensor_and_pipeline_parallel_moe(four_processes, single):
    """TP2 + sequence parallel x PP2 on the MoE model: later stages get their share of the padding mask."""
    assert_same_run(lines_of(four_processes, "tp2_pp2"), lines_of(single, "base"))


@pytest.mark.parametrize("scenario", ["tp2_pp2_vpp2", "dp2_pp2_vpp2"])
def test_virtual_pipeline_with_tensor_or_data_parallelism(four_processes, single, scenario):
    """4 processes: PP2 x VPP2 with TP2 + sequence parallel, and with DP2 + the distributed optimizer."""
    assert_same_run(lines_of(four_processes, scenario), lines_of(single, "base4")[:3])


def test_virtual_pipeline_four_stages(four_processes, single):
    """PP4 x VPP2 on an 8-layer variant (one layer per chunk) reproduces its 1-process run."""
    assert_same_run(lines_of(four_processes, "pp4_vpp2"), lines_of(single, "base8"))


def test_virtual_pipeline_reference_pass(layouts, single):
    """ref-logps through the interleaved schedule, then training on the sidecar: the online 1-process run."""
    assert_same_run(lines_of(layouts, "pp2_vpp2_precomputed"), lines_of(single, "base4")[:3])


def test_virtual_pipeline_resumes_single_process_checkpoint(layouts, single):
    """The 1-process step-3 checkpoint (model + optimizer) resumed as two chunks per rank at PP2 x VPP2."""
    assert_same_run(lines_of(layouts, "pp2_vpp2_resume"), lines_of(single, "base4")[3:], steps=(4, 5, 6))


def test_virtual_pipeline_checkpoint_resumes_without_chunks(layouts, single):
    """The PP2 x VPP2 step-5 checkpoint (chunks model0/model1 per rank) resumed at plain PP2 for step 6."""
    assert_same_run(lines_of(layouts, "pp2_from_vpp2"), lines_of(single, "base4")[5:], steps=(6,))


def test_bf16_tracks_fp32(single):
    bf16, base = lines_of(single, "bf16"), lines_of(single, "base")
    assert [line["grad_norm"] for line in bf16] != [line["grad_norm"] for line in base]  # really ran in bf16
    for got, want in zip(bf16, base, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-2)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=2e-2)


def test_step1_loss_is_closed_form(work, single):
    """Policy == reference at step 1: every implicit reward is 0, so LPO = ln2 · Σ_{r_i>r_j} |r_i² − r_j²|."""
    from nemo_lpo.data import ListwiseDataset, ListwiseSampler

    _, prefix = work
    dataset = ListwiseDataset(prefix)
    sampler = ListwiseSampler(len(dataset), 4, 1, 0, 1, seed=1234, shuffle=True)
    first_batch = [i for _, mb in zip(range(4), iter(sampler), strict=False) for i in mb]
    per_list = []
    for i in first_batch:
        r = dataset[i]["rewards"].astype(np.float64)
        weights = np.abs(r[:, None] ** 2 - r[None, :] ** 2) * (r[:, None] > r[None, :])
        per_list.append(math.log(2.0) * weights.sum())
    step1 = lines_of(single, "base")[0]
    assert step1["loss"] == pytest.approx(float(np.mean(per_list)), abs=1e-6)
    assert step1["rewards/margins"] == 0.0 and step1["rewards/chosen"] == 0.0


def test_validation_under_pp2_equals_single_process(layouts, single):
    """PP2 validation (last stage's log-probs, all-reduced) gives the 1-process val/ metrics at steps 0, 2, 3."""
    got, want = lines_of(layouts, "pp2_val"), lines_of(single, "val")
    validated = [line["step"] for line in want if "val/loss" in line]
    assert validated == [0, 2, 3] and [line["step"] for line in got if "val/loss" in line] == validated
    for g, w in zip(got, want, strict=True):
        keys = sorted(k for k in w if k.startswith("val/"))
        assert keys == sorted(k for k in g if k.startswith("val/"))
        for key in keys:
            if w[key] is None:  # NaN (undefined on these lists) in both
                assert g[key] is None, key
            else:
                assert abs(g[key] - w[key]) < 1e-4 * max(1.0, abs(w[key])), (g["step"], key, g[key], w[key])

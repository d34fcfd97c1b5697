"""LPO training is layout-invariant, and step 1 equals the closed form.

TP2+SP, PP2, EP2 (alltoall), DP2 (+ distributed optimizer, also with overlapped gradient reduce and parameter
gather), PP2 x virtual pipeline 2 (4-layer variant, also resuming a 1-process checkpoint; with TP2+SP or DP2 +
distributed optimizer on 4 processes), PP4 x VPP2 (8-layer variant), EP2 x PP2 (with and without VPP2),
TP2+SP x EP2, the full training state across EP2 x PP2 and 1 process in both directions, micro-batch splits and
precomputed vs online reference all reproduce the single-process run.

Every scenario trains on the ragged lists of ``train_common.RAGGED_SPEC`` (K = 2..8, ties, lists with no
ordered pair, responses of 2..200 tokens), from the same starting weights (a dist checkpoint written by the
single-process launch), and is compared step by step with 1 process on EVERY logged metric and on per-parameter
gradient checksums (``tests/dist/grad_checksums.py``: Σg, Σg², Σ|g| and <r, g> of each parameter, by its global
checkpoint key; r follows each element's index in the unsharded tensor), every tolerance relative per key. A
planted fault (two TP shards of a gradient swapped; a distributed-optimizer slice shifted) shows that misplaced
elements fail the comparison. Four torchrun launches (1, 2, 4, then 1 process again for the way back from EP2 x PP2).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tests.dist.grad_checksums import CHECKSUMS
from tests.dist.train_common import RAGGED_SPEC, pack_lists, results, without_timings, write_ragged_lists
from tests.torchrun import run_torchrun

WORKER = Path(__file__).parent / "dist" / "train_parity.py"
TOL = 1e-5
# Later steps: megatron's grad norm on CPU (its local multi_tensor_l2norm: torch.norm of each fp32 gradient) is
# off by up to ~3e-5 relative from the fp64 norm of the same gradients (measured: a 2M-element fp32 vector,
# torch.norm 1430.2379 vs 1430.2790 in fp64), differently for each way the gradients are split; every step here
# clips (norms 4-11 > clip 1.0), so that error scales each layout's update a little differently and the weights
# of step 2 on differ by that much. The FIRST step of each comparison starts from the same weights (init or
# checkpoint): its gradients are held to TOL; the logged grad norm and later steps' gradients to LATER_TOL.
LATER_TOL = 1e-4
# Every tolerance is RELATIVE, per key: |got - want| <= rtol * |want|. Measured worst relative differences over
# all the comparisons below (one run, 2 cores): loss 8e-7, grad_norm 3.5e-5, logps 8e-8, rewards 7.8e-5 (small
# differences of log-prob sums: was 1e-4 absolute on values of 1e-2), kendall tau 3e-8, accuracies 0. The
# implicit rewards are exactly 0 by construction at step 1 (policy == reference): there, and only there, the stated floor ZERO_FLOOR applies (measured: exactly 0 in every layout).
METRIC_RTOL = {"loss": TOL, "grad_norm": LATER_TOL, "lr": 1e-12, "logps/chosen": 1e-6, "logps/rejected": 1e-6,
               "rewards/chosen": 5e-4, "rewards/rejected": 5e-4, "rewards/margins": 5e-4,
               "rewards/accuracies": 1e-6, "rewards/kendall_tau": 1e-6}
DEFAULT_RTOL = 1e-4  # metrics not named above (validation's val/... use their training name's)
ZERO_FLOOR = {"rewards/chosen": 1e-9, "rewards/rejected": 1e-9, "rewards/margins": 1e-9}
# Gradient checksums (tests/dist/grad_checksums.py), per parameter key. Σg² and Σ|g| are relative to
# themselves (measured worst: 5.3e-7 on a first step, 1.2e-5 later; the pre-MLP layer norm's Σg², 1e-5 in
# size, is held to 1e-10 where it used to be held to 1e-5 absolute). The signed sums Σg and <r, g> cancel: 1 %
# of the keys' Σg are 1e-3 to 1e-5 of their terms' size Σ|g|, and two are 0 by construction (the router's and the
# output layer's: softmax gradients sum to 0 over the experts / the vocabulary; measured 1e-8 and 3e-9 of Σ|g|),
# so their rounding noise is relative to Σ|g|, not to the value: they are held to tol * Σ|g| of the key (measured
# worst: 1.6e-7 of Σ|g| on a first step, 4.9e-6 later), and never looser than the absolute bound tol * max(1,
# |want|) of before.
SIGNED = ("sum g", "<r, g>")
LAYOUTS = ["tp2", "pp2", "dp2", "ep2", "dp2_overlap"]
PLANTED = ["tp2_swapped_shards", "dp2_misplaced_slice"]  # faults the comparison must see (tests/dist/train_parity.py)
RESUMES = ["tp2_resume", "pp2_resume", "ep2_resume", "dp2_resume"]  # base4's 1-process checkpoint at 2 processes
RESUMED_BACK = ["pp2", "dp2"]  # and their step-5 checkpoints back at 1 process
EXACT = ("step", "lists/valid", "tokens")  # counts: equal, not close
MEASURED: dict[str, dict[str, float]] = {}  # scenario -> max relative differences, printed at the end (pytest -s)

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("parity")
    src = write_ragged_lists(root / "ragged.jsonl")
    return root, pack_lists(src, root / "data" / "lists", len(RAGGED_SPEC))


@pytest.fixture(scope="module", autouse=True)
def report_measured():
    yield
    for name, diffs in sorted(MEASURED.items()):
        print(f"parity {name}: " + ", ".join(f"{k} {v:.1e}" for k, v in sorted(diffs.items())))


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
    return results(run_torchrun(WORKER, 2, str(root), str(prefix), *LAYOUTS, *PLANTED, *RESUMES,
                                "pp2_shared_noaux", "pp2_vpp2",
                                "pp2_vpp2_precomputed", "pp2_vpp2_resume", "pp2_from_vpp2", "pp2_val"))


@pytest.fixture(scope="module")
def four_processes(work, single) -> dict:
    root, prefix = work
    assert "lines" in single["base4"], single["base4"].get("error")
    return results(run_torchrun(WORKER, 4, str(root), str(prefix), "tp2_pp2", "tp2_pp2_vpp2",
                                "dp2_pp2_vpp2", "pp4_vpp2", "ep2_pp2", "ep2_pp2_vpp2", "tp2_ep2", "ep2_pp2_resume"))


@pytest.fixture(scope="module")
def back_to_one(work, layouts, four_processes) -> dict:
    """1 process again: the EP2 x PP2, PP2 and DP2 step-5 checkpoints resumed for step 6, the DP2-overlap one for 3."""
    root, prefix = work
    assert "lines" in four_processes["ep2_pp2_resume"], four_processes["ep2_pp2_resume"].get("error")
    return results(run_torchrun(WORKER, 1, str(root), str(prefix), "init", "base4_from_ep2_pp2",
                                "base_from_dp2_overlap", *(f"base4_from_{layout}" for layout in RESUMED_BACK)))


def steps_of(found: dict, name: str) -> list[dict]:
    """The run's steps: each its metrics line with ``grads``, the per-parameter checksums of that step."""
    assert name in found, f"scenario {name} printed no result"
    assert "error" not in found[name], f"scenario {name} failed:\n{found[name]['error']}"
    lines, grads = [line for line in found[name]["lines"] if "loss" in line], found[name]["grads"]
    assert len(grads) == len(lines), (name, len(grads), len(lines))
    return [{**line, "grads": g} for line, g in zip(lines, grads, strict=True)]


def lines_of(found: dict, name: str) -> list[dict]:
    """Every metrics line of the run (a validation-only line at step 0 too)."""
    steps_of(found, name)  # the run reported no error
    return found[name]["lines"]


def metric_limit(key: str, want: float) -> float:
    """How far a logged metric may be from the 1-process value: relative per key, the floor only at 0."""
    name = key.removeprefix("val/")
    limit = METRIC_RTOL.get(name, DEFAULT_RTOL) * abs(want)
    return max(limit, ZERO_FLOOR[name]) if want == 0.0 and name in ZERO_FLOOR else limit


def checksum_limits(want: list[float], tol: float) -> dict[str, float]:
    """How far each gradient checksum of one parameter may be from the 1-process one (see SIGNED above)."""
    mass = want[CHECKSUMS.index("sum |g|")]
    return {name: tol * (min(mass, max(1.0, abs(value))) if name in SIGNED else abs(value))
            for name, value in zip(CHECKSUMS, want, strict=True)}


def _relative(got: float, want: float, scale: float) -> float:
    return abs(got - want) / scale if scale else (0.0 if got == want else math.inf)


def assert_same_run(got: list[dict], want: list[dict], tol: float = TOL, steps=(1, 2, 3), name: str = "",
                    skip: tuple[str, ...] = ()) -> None:
    """Step by step: every logged metric (counts exactly) and every parameter's gradient checksums.

    Metrics within ``metric_limit`` (relative per key; loss within ``tol``), each parameter's gradient checksums
    within ``checksum_limits`` at ``tol`` on the first step and LATER_TOL after. A failure names the step, the
    key and, for gradients, which checksum.
    """
    assert [line["step"] for line in got] == [line["step"] for line in want] == list(steps)
    diffs: dict[str, float] = {}
    for g, w in zip(got, want, strict=True):
        gl, wl = without_timings(g), without_timings(w)
        assert gl.keys() == wl.keys(), (gl.keys() ^ wl.keys())
        for key in wl:
            if key in skip or key == "grads":
                continue
            if key in EXACT:
                assert gl[key] == wl[key], (g["step"], key, gl[key], wl[key])
                continue
            limit = tol * abs(wl[key]) if key == "loss" else metric_limit(key, wl[key])
            assert abs(gl[key] - wl[key]) <= limit, (g["step"], key, gl[key], wl[key], f"limit {limit:.2e}")
            diffs[key] = max(diffs.get(key, 0.0), _relative(gl[key], wl[key], abs(wl[key])))
        if "grads" in w:
            first = g["step"] == steps[0]
            assert g["grads"].keys() == w["grads"].keys(), sorted(g["grads"].keys() ^ w["grads"].keys())
            for key, sums in w["grads"].items():
                limits = checksum_limits(sums, tol if first else LATER_TOL)
                for checksum, have, value in zip(CHECKSUMS, g["grads"][key], sums, strict=True):
                    assert abs(have - value) <= limits[checksum], (
                        f"step {g['step']} {key} {checksum}: {have!r} vs {value!r} (limit {limits[checksum]:.2e})")
                    scale = sums[CHECKSUMS.index("sum |g|")] if checksum in SIGNED else abs(value)
                    label = f"{checksum}, {'first step' if first else 'later'}"
                    diffs[label] = max(diffs.get(label, 0.0), _relative(have, value, scale))
    if name:
        MEASURED[name] = diffs


def test_ragged_dataset_is_what_the_scenarios_claim(work):
    """The packed lists: K = 2..8, ties, lists without an ordered pair, responses of 2 to 200 tokens."""
    from nemo_lpo.data import ListwiseDataset

    _, prefix = work
    dataset = ListwiseDataset(prefix)
    items = [dataset[i] for i in range(len(dataset))]
    ks = [len(item["rewards"]) for item in items]
    lengths = [len(r) for item in items for r in item["response_ids"]]
    assert min(ks) == 2 and max(ks) == 8 and len(set(ks)) == 7
    assert min(lengths) == 2 and max(lengths) == 200
    ordered = [bool((item["rewards"][:, None] > item["rewards"][None, :]).any()) for item in items]
    assert ordered.count(False) == 2  # valid lists (K >= 2) whose loss is 0
    assert sum(len(set(item["rewards"].tolist())) < len(item["rewards"]) for item in items) >= 4  # ties


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_reproduces_single_process(layouts, single, layout):
    base = steps_of(single, "base")
    assert base[0]["loss"] != base[2]["loss"]  # the run actually trains
    assert_same_run(steps_of(layouts, layout), base, name=layout)


@pytest.mark.parametrize("planted", PLANTED)
def test_misplaced_gradient_elements_fail_the_comparison(layouts, single, planted):
    """PLANTED faults before step 1's checksums move gradient elements of one weight, and the comparison sees it.

    tp2_swapped_shards: TP2 with the two ranks' gradient shards of the weight swapped; dp2_misplaced_slice: DP2
    with one distributed-optimizer slice of its gradient put back shifted by half its length.

    Every element is still there, so Σg, Σg² and Σ|g| of the whole tensor cannot see it; ``<r, g>``, whose
    weights follow each element's index in the unsharded tensor, must, and only for that weight.
    """
    got, want = steps_of(layouts, planted), steps_of(single, "base")[:1]
    with pytest.raises(AssertionError, match=r"<r, g>"):
        assert_same_run(got, want, steps=(1,))
    have, sums = got[0]["grads"], want[0]["grads"]
    failing = [(key, checksum) for key in sums
               for checksum, g, w in zip(CHECKSUMS, have[key], sums[key], strict=True)
               if abs(g - w) > checksum_limits(sums[key], TOL)[checksum]]
    assert failing == [(layouts[planted]["swapped"], "<r, g>")], failing  # the planted weight's checksum name


def test_softmax_gradients_sum_to_zero(single):
    """The claim behind the router's and the output layer's Σg bounds: 0 by construction, at every step."""
    for step in steps_of(single, "base"):
        zero = {key: sums for key, sums in step["grads"].items() if ".router." in key or key.startswith("output_layer")}
        assert len(zero) == 3  # the router of each of the 2 layers, the output layer
        for key, sums in zero.items():
            assert abs(sums[CHECKSUMS.index("sum g")]) <= 1e-6 * sums[CHECKSUMS.index("sum |g|")], (key, sums)


def test_microbatch_split_invariance(single):
    # 4 micro-batches of 1 list vs 1 micro-batch of 4 lists (the MoE aux loss is off: megatron defines it
    # per micro-batch, so it is not split-invariant by construction).
    assert_same_run(steps_of(single, "mb4_noaux"), steps_of(single, "base_noaux"), name="mb4_noaux")


def test_precomputed_reference_equals_online(single):
    assert_same_run(steps_of(single, "precomputed"), steps_of(single, "base"), tol=1e-6, name="precomputed")


def test_full_recompute_changes_nothing(single):
    assert_same_run(steps_of(single, "recompute"), steps_of(single, "base"), name="recompute")
    # and it really recomputed: the first layer's core attention ran twice per micro-batch (4 x 3), once without
    assert single["base"]["microbatches"] == single["recompute"]["microbatches"] == 12
    assert single["base"]["attention_forwards"] == 12
    assert single["recompute"]["attention_forwards"] == 24


def test_shared_prompt_packing_matches_unpacked(single):
    """data.shared_prompt: one row per list, the prompt computed once; same losses and gradients."""
    shared, base = steps_of(single, "shared_noaux"), steps_of(single, "base_noaux")
    assert_same_run(shared, base, skip=("tokens",), name="shared_noaux")
    assert all(got["tokens"] < want["tokens"] for got, want in zip(shared, base, strict=True))  # prompts once


def test_shared_prompt_under_pp2(layouts, single):
    """Shared-prompt rows (their per-token positions and list mask on both stages) through the PP2 pipeline."""
    shared = steps_of(single, "shared_noaux")
    assert shared[0]["loss"] != shared[2]["loss"]
    assert_same_run(steps_of(layouts, "pp2_shared_noaux"), shared, name="pp2_shared_noaux")


def test_virtual_pipeline_reproduces_single_process(layouts, single):
    """PP2 x VPP2 (megatron's interleaved 1F1B, 4 layers: one per chunk) vs 1 process.

    Its micro-batches are padded to the step's longest (and to the step's most sequences), which changes nothing.
    """
    base = steps_of(single, "base4")
    assert base[0]["loss"] != base[2]["loss"]
    assert_same_run(steps_of(layouts, "pp2_vpp2"), base[:3], name="pp2_vpp2")


def test_tensor_and_pipeline_parallel_moe(four_processes, single):
    """TP2 + sequence parallel x PP2 on the MoE model: later stages get their share of the padding mask."""
    assert_same_run(steps_of(four_processes, "tp2_pp2"), steps_of(single, "base"), name="tp2_pp2")


@pytest.mark.parametrize("scenario", ["tp2_pp2_vpp2", "dp2_pp2_vpp2", "ep2_pp2_vpp2"])
def test_virtual_pipeline_with_tensor_data_or_expert_parallelism(four_processes, single, scenario):
    """4 processes: PP2 x VPP2 with TP2 + SP, with DP2 + the distributed optimizer, and with EP2 (dp 2)."""
    assert_same_run(steps_of(four_processes, scenario), steps_of(single, "base4")[:3], name=scenario)


@pytest.mark.parametrize("scenario", ["ep2_pp2", "tp2_ep2"])
def test_expert_parallel_with_pipeline_or_tensor_parallelism(four_processes, single, scenario):
    """4 processes: EP2 x PP2 (the shipped Mixtral layout's kind) and TP2 + SP x EP2, alltoall dispatcher."""
    assert_same_run(steps_of(four_processes, scenario), steps_of(single, "base"), name=scenario)


def test_virtual_pipeline_four_stages(four_processes, single):
    """PP4 x VPP2 on an 8-layer variant (one layer per chunk) reproduces its 1-process run."""
    assert_same_run(steps_of(four_processes, "pp4_vpp2"), steps_of(single, "base8"), name="pp4_vpp2")


def test_virtual_pipeline_reference_pass(layouts, single):
    """ref-logps through the interleaved schedule, then training on the sidecar: the online 1-process run."""
    assert_same_run(steps_of(layouts, "pp2_vpp2_precomputed"), steps_of(single, "base4")[:3],
                    name="pp2_vpp2_precomputed")


def test_virtual_pipeline_resumes_single_process_checkpoint(layouts, single):
    """The 1-process step-3 checkpoint (model + optimizer) resumed as two chunks per rank at PP2 x VPP2."""
    assert_same_run(steps_of(layouts, "pp2_vpp2_resume"), steps_of(single, "base4")[3:], steps=(4, 5, 6),
                    name="pp2_vpp2_resume")


def test_virtual_pipeline_checkpoint_resumes_without_chunks(layouts, single):
    """The PP2 x VPP2 step-5 checkpoint (chunks model0/model1 per rank) resumed at plain PP2 for step 6."""
    assert_same_run(steps_of(layouts, "pp2_from_vpp2"), steps_of(single, "base4")[5:], steps=(6,),
                    name="pp2_from_vpp2")


def test_full_state_resumes_at_expert_and_pipeline_parallel(four_processes, single):
    """The 1-process step-3 checkpoint (model, Adam state, scheduler, data position) resumed at EP2 x PP2."""
    assert_same_run(steps_of(four_processes, "ep2_pp2_resume"), steps_of(single, "base4")[3:], steps=(4, 5, 6),
                    name="ep2_pp2_resume")


@pytest.mark.parametrize("scenario", RESUMES)
def test_single_process_checkpoint_resumes_under_another_layout(layouts, single, scenario):
    """The 1-process step-3 checkpoint resumed at 2 processes continues as the 1-process run (steps 4-6).

    Model, Adam state, scheduler and data position, resharded to TP2 + SP, PP2, EP2 or DP2 + distributed optimizer
    (which takes Adam's state as its slices). (Were tests/test_train_checkpoint.py's resumes through the CLI, one
    launch each, on loss and grad norm: now every metric and per-parameter gradients.)
    """
    assert_same_run(steps_of(layouts, scenario), steps_of(single, "base4")[3:], steps=(4, 5, 6), name=scenario)


@pytest.mark.parametrize("layout", RESUMED_BACK)
def test_two_process_checkpoint_resumes_at_one_process(back_to_one, single, layout):
    """The reverse: 2-process step-5 checkpoints resumed by 1 process for step 6.

    From PP2 each stage's half of the model and Adam state is merged; from DP2 + distributed optimizer Adam's
    state was saved from two slices per parameter.
    """
    assert_same_run(steps_of(back_to_one, f"base4_from_{layout}"), steps_of(single, "base4")[5:], steps=(6,),
                    name=f"base4_from_{layout}")


def test_expert_and_pipeline_parallel_checkpoint_resumes_at_one_process(back_to_one, single):
    """And back: the EP2 x PP2 step-5 checkpoint (experts and stages merged) resumed by 1 process for step 6."""
    assert_same_run(steps_of(back_to_one, "base4_from_ep2_pp2"), steps_of(single, "base4")[5:], steps=(6,),
                    name="base4_from_ep2_pp2")


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
                assert abs(g[key] - w[key]) <= metric_limit(key, w[key]), (g["step"], key, g[key], w[key])


def test_checkpoint_saved_with_deferred_parameter_gather_resumes(back_to_one, single):
    """A DP2 + distributed optimizer + overlap_param_gather checkpoint resumes by 1 process, exactly as trained.

    Its step-2 save runs while each rank holds only its own slice of the stepped weights (the all-gather
    waits for the next forward); 1 process resumes it for step 3.
    """
    assert_same_run(steps_of(back_to_one, "base_from_dp2_overlap"), steps_of(single, "base")[2:], steps=(3,),
                    name="base_from_dp2_overlap")

"""LoRA / DoRA LPO through Megatron-Bridge's PEFT, on CPU, in the Megatron-Bridge test environment.

One torchrun launch (1 process, tests/dist/peft_train.py; the test-only TE import shim lets Bridge's PEFT import)
trains the tiny Mixtral with LoRA on every linear (experts included) from a base init checkpoint with
``reference.mode=base``, then: the same run on a precomputed sidecar of the base, a resume of its step-2
checkpoint, a DoRA run, a resume onto another base, the exports (merged weights through transformers,
PEFT adapters through peft), a run from a saved adapter init, and ``nemo-lpo eval``'s scoring of the adapter
checkpoint against its merged weights; a 2-process launch runs that init at TP2 + SP
(expert TP 2: the expert adapters' collectives of ``nemo_lpo/train/lora_experts.py``), PP2 and EP2. Needs
Megatron-Bridge 0.6 with transformers 5.12 and peft in the interpreter that runs pytest: `make test` runs it in
.venv-bridge (BRIDGE_TESTS); the main run deselects the `bridge` marker.
"""

from __future__ import annotations

import pytest

from tests.dist.train_common import DEMO_LISTS, pack_lists, results, scenario
from tests.torchrun import run_torchrun

WORKER = "tests/dist/peft_train.py"
SCENARIOS = ("lora", "sidecar", "resume", "dora", "wrong_base", "export", "adapters0", "p_single", "eval")
PARALLEL = ("p_tp2", "p_pp2", "p_ep2")  # 2 processes, from the same base and adapter init as p_single
REFUSED = ("dora_tp2",)  # 2 processes, last: expert DoRA at expert TP 2 stops at start-up
TOL = 1e-6
# the trainer's parity tolerances (tests/test_train_parity.py): loss TOL, grad norm LATER_TOL, other metrics 1e-4
PARITY_TOL = {"loss": 1e-5, "grad_norm": 1e-4, "rewards/margins": 1e-4, "params/trainable": 0, "params/total": 0}

# `bridge` tests run in .venv-bridge (make test), where Megatron-Bridge and peft must import: no skip
pytestmark = [pytest.mark.bridge, pytest.mark.distributed]


@pytest.fixture(scope="module")
def found(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bridge_peft")
    prefix = pack_lists(DEMO_LISTS, root / "src" / "lists", 8)
    found = results(run_torchrun(WORKER, 1, str(root / "work"), str(prefix), *SCENARIOS, timeout=900))
    found.update(results(run_torchrun(WORKER, 2, str(root / "work"), str(prefix), *PARALLEL, *REFUSED,
                                       timeout=900)))
    return found


def test_only_adapters_train_and_the_base_stays_bitwise(found):
    got = scenario(found, "lora")
    assert got["trainable"] and all(".adapter." in name for name in got["trainable"])
    assert any(".experts." in name for name in got["trainable"])  # expert linears carry adapters too
    assert got["base_unchanged"]
    assert got["adapters_changed"] == got["trainable"]
    assert got["optimizer_params"] == len(got["trainable"])  # nothing frozen reaches the optimizer
    first, last = got["lines"][0], got["lines"][-1]
    assert 0 < first["params/trainable"] < first["params/total"] / 100
    assert first["loss"] != last["loss"]


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_step_one_policy_is_the_base(found, name):
    first = scenario(found, name)["lines"][0]  # B = 0 (LoRA), magnitude = |W0| (DoRA): the adapters add nothing yet
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first[key] == 0.0, (key, first[key])


def test_reference_base_equals_a_precomputed_sidecar_of_the_base(found):
    base, sidecar = scenario(found, "lora")["lines"], scenario(found, "sidecar")["lines"]
    assert [line["step"] for line in base] == [line["step"] for line in sidecar] == [1, 2, 3]
    for b, s in zip(base, sidecar, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "rewards/chosen", "logps/chosen"):
            assert s[key] == pytest.approx(b[key], abs=TOL), (b["step"], key, s[key], b[key])


def test_adapter_checkpoint_holds_adapters_and_points_at_its_base(found):
    got = scenario(found, "lora")
    keys = got["checkpoint_keys"]
    model_keys = [k for k in keys if not k.startswith("optimizer.") and k != "rng_state"]
    assert model_keys and all(".adapter." in k for k in model_keys), [k for k in model_keys if ".adapter." not in k]
    assert "embedding.word_embeddings.weight" not in keys
    assert got["checkpoint_peft"]["type"] == "lora" and got["checkpoint_peft"]["base_checkpoint"].endswith("init")


def test_resume_is_exact(found):
    resumed = scenario(found, "resume")["lines"]
    uninterrupted = scenario(found, "lora")["lines"][2]
    assert [line["step"] for line in resumed] == [3]
    for key in ("loss", "grad_norm", "rewards/margins"):
        assert resumed[0][key] == uninterrupted[key], key


def test_resume_onto_another_base_is_refused(found):
    refused = scenario(found, "wrong_base").get("refused")
    assert refused and "init_other" in refused and "checksum" in refused


def test_dora_trains(found):
    got = scenario(found, "dora")
    assert any(name.endswith("weight_magnitude") for name in got["trainable"])
    assert got["base_unchanged"] and got["adapters_changed"]
    assert got["lines"][0]["loss"] != got["lines"][-1]["loss"]


def test_merged_export_gives_the_adapter_models_logits(found):
    got = scenario(found, "export")
    assert got["merged_diff"] < 1e-5 and got["attn_merged_diff"] < 1e-5
    assert got["base_vs_adapters_diff"] > 1e-3  # the adapters changed the logits: the comparison means something


def test_peft_export_loads_with_peft(found):
    got = scenario(found, "export")
    assert got["peft_files"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert got["peft_targets"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert got["peft_diff"] < 1e-5
    assert "fused" in got["experts_refused"] and got["no_partial_output"]


@pytest.mark.parametrize("name", PARALLEL)
def test_parallel_layouts_equal_one_process_from_one_init(found, name):
    single, layout = scenario(found, "p_single")["lines"], scenario(found, name)["lines"]
    assert [line["step"] for line in layout] == [line["step"] for line in single] == [1, 2, 3]
    assert single[0]["loss"] != single[2]["loss"]
    for want, got in zip(single, layout, strict=True):
        for key, tol in PARITY_TOL.items():
            assert got[key] == pytest.approx(want[key], abs=tol), (name, want["step"], key, got[key], want[key])


def test_expert_dora_at_expert_tensor_parallelism_is_refused(found):
    error = found.get("dora_tp2", {}).get("error", "")  # Bridge's expert DoRA loses its TP collectives at etp > 1
    assert "ConfigError" in error and "parallel.etp=1" in error, error[-2000:]


def test_eval_scores_an_adapter_checkpoint_as_its_merged_weights(found):
    """``nemo-lpo eval`` of lora's adapter checkpoint equals the eval of its adapters merged into the base weights.

    The adapter checkpoint is scored as base + adapters against the run's base; it differs from the base's own
    scores (tests/dist/peft_eval.py).
    """
    got = scenario(found, "eval")
    assert got["reference"].endswith("/init")  # the run's base, read from the adapter checkpoint's config
    assert got["vs_merged"] < 1e-4, got  # summed over up to 200 tokens per response
    assert got["vs_base"] > 1e-2, got  # the adapters were applied
    adapters, merged = got["metrics"]["adapters"], got["metrics"]["merged"]
    ranking = [key for key in adapters if key != "loss"]
    assert [adapters[key] for key in ranking] == pytest.approx([merged[key] for key in ranking], abs=1e-5)
    assert adapters["loss"] > 0 and merged["loss"] is None  # the run's loss: only the adapter checkpoint has a config

"""``tests/te_checks.py --smoke`` in the CPU suite: the self-check's harness runs.

Each check compares only what could differ without TE, or says it is not applicable (never the local path against
itself); the FP8 evidence logic (losses, scaling state) is unit-tested here.

EXECUTED ON CPU with megatron's local spec; the TE side of each check is code only here (tests/test_te.py).
"""

from __future__ import annotations

import json

import pytest

from tests import te_checks
from tests.te_verdicts import KERNEL_TOLERANCE, fp8_loss_failures, kernel_failures

SMALL_BENCH = ["--k", "2", "--prompt", "24", "--response", "12", "--warmup", "0", "--reps", "1"]


def _smoke(capsys, name: str, *args: str) -> dict:
    assert te_checks.main([name, "--smoke", *args]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1
    return json.loads(lines[0][len("RESULT "):])


def test_smoke_te_vs_local_compares_the_local_spec_with_the_hf_original(capsys):
    r = _smoke(capsys, "te_vs_local")
    assert r["compared"].startswith("local spec vs HF") and r["responses"] > 0
    assert 0 < r["rel_diff"] < 1e-3  # two implementations: close, not identical


def test_smoke_layouts_and_bench_compare_the_layouts(capsys):
    r = _smoke(capsys, "layouts")
    for name in ("packed", "shared"):
        assert r[f"{name}_logps_rel"] < 1e-4 and r[f"{name}_grads_rel"] < 1e-3 and r[f"{name}_grads_cosine"] > 0.999
    bench = _smoke(capsys, "bench", *SMALL_BENCH)
    assert set(bench) == {"padded", "packed", "shared"} and bench["padded"]["logps_rel_vs_padded"] == 0.0
    assert bench["packed"]["logps_rel_vs_padded"] < 1e-4 and bench["shared"]["logps_rel_vs_padded"] < 1e-4
    assert bench["shared"]["tokens"] < bench["padded"]["tokens"]  # the prompt once per list


def test_smoke_kernels_runs_the_bf16_reference_through_the_check(capsys):
    r = _smoke(capsys, "kernels")
    assert kernel_failures(r) == [] and 0 < max(r["max_abs_err"].values()) < KERNEL_TOLERANCE


@pytest.mark.parametrize("name", ["grouped_gemm", "fp8"])
def test_smoke_checks_with_nothing_to_compare_say_so(capsys, name):
    r = _smoke(capsys, name)
    assert list(r) == ["not_applicable"] and "smoke" in r["not_applicable"]


def test_fp8_evidence_logic_fails_fp8_that_did_not_run():
    import types

    import numpy as np
    import torch

    bf16 = np.array([0.70, 0.65, 0.61])
    assert fp8_loss_failures(bf16, bf16 * (1 + 1e-2), 5e-2) == []
    assert fp8_loss_failures(bf16, bf16.copy(), 5e-2) == ["FP8 losses equal the bf16 ones exactly: FP8 "
                                                                     "did not run"]
    assert "differ from bf16 by 0.1" in fp8_loss_failures(bf16, bf16 * 1.1, 5e-2)[0]
    assert fp8_loss_failures(bf16, np.array([0.7, np.nan, 0.6]), 5e-2)[0].startswith("losses not comparable")

    def te_module(history):  # where TE keeps delayed scaling: module.fp8_meta["scaling_fwd"].amax_history
        module = torch.nn.Module()
        module.fp8_meta = {"scaling_fwd": types.SimpleNamespace(amax_history=torch.tensor(history))} if history else {}
        return module

    model = torch.nn.Sequential(te_module([[0.0, 0.0]]), te_module(None), torch.nn.Linear(1, 1))
    before = te_checks.fp8_scaling_state(model)
    assert before == {"0": 0.0}  # the module without scaling state yet (FP8 never ran) is absent
    model[0].fp8_meta["scaling_fwd"].amax_history += 2.5
    model[1].fp8_meta["scaling_fwd"] = types.SimpleNamespace(amax_history=torch.tensor([[1.0, 0.5]]))
    after = te_checks.fp8_scaling_state(model)
    assert te_checks.fp8_state_changes(before, after) == ["0", "1"]
    assert te_checks.fp8_state_changes(after, after) == []  # FP8 that did not run leaves the state as it was

"""The self-check's kernel check (tests/te_kernels.py) on CPU: planted mask errors make it FAIL.

The bf16 reference kernel passes it, and each planted mask error (the reference kernel with a wrong mask in TE's
place) makes it fail. EXECUTED ON CPU; the TE side is code only here. Measured on CPU (seeds 0-2): bf16 reference
7.9e-3..9.8e-3 max abs error; every planted error 3.0..4.0, against the tolerance 5e-2.
"""

from __future__ import annotations

import pytest
import torch

from tests.te_kernels import CPU_SIZES, reference_kernel_check
from tests.te_verdicts import KERNEL_TOLERANCE, backend_env, kernel_failures

PLANTED = {
    "no_mask": lambda lq, lk, device: torch.ones(lq, lk, dtype=torch.bool, device=device),  # a fully wrong mask
    "top_left": lambda lq, lk, device: torch.ones(lq, lk, dtype=torch.bool, device=device).tril(),
    "off_by_one": lambda lq, lk, device: torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq + 1),
}


def test_the_bf16_reference_kernel_passes_the_check():
    result = reference_kernel_check()
    assert kernel_failures(result) == [], result
    errors = result["max_abs_err"]
    assert 0 < errors["gathered"] < KERNEL_TOLERANCE / 2 and 0 < errors["packed"] < KERNEL_TOLERANCE / 2, errors
    assert result["segments"]["gathered"] > 2 * CPU_SIZES.lists and result["segments"]["packed"] >= 2 * CPU_SIZES.lists


@pytest.mark.parametrize("plant", sorted(PLANTED))
def test_each_planted_mask_error_fails_the_check(plant):
    result = reference_kernel_check(mask=PLANTED[plant])
    failures = kernel_failures(result)
    assert failures, result
    paths = {"gathered"} if plant == "top_left" else {"gathered", "packed"}  # equal q/kv lengths: top-left is right
    assert {f.split(":")[0] for f in failures} == paths, failures
    assert all(result["max_abs_err"][path] > 4 * KERNEL_TOLERANCE for path in paths), result


def test_a_backend_other_than_the_forced_one_fails_the_check():
    result = {"max_abs_err": {"gathered": 0.01, "packed": 0.01}, "backend": "flash",
              "backends_ran": {"gathered": "flash", "packed": "fused"}}
    assert kernel_failures(result) == ["packed: TE ran the fused backend, not the forced flash"]
    assert backend_env("fused") == {"NVTE_FLASH_ATTN": "0", "NVTE_FUSED_ATTN": "1", "NVTE_UNFUSED_ATTN": "0"}

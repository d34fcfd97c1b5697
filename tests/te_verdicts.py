"""What counts as a pass in the TE self-check: torch-free, so tests/test_te.py collects cheaply.

Used by tests/te_kernels.py, tests/te_checks.py and tests/test_te.py; unit-tested on CPU (tests/
test_te_kernel_check.py, tests/test_te_smoke.py).
"""

from __future__ import annotations

import numpy as np

KERNEL_TOLERANCE = 5e-2
"""Max |kernel - fp32 reference| over real tokens (q/k/v ~ N(0, 1) in bf16)."""

BACKEND_SWITCHES = {"flash": "NVTE_FLASH_ATTN", "fused": "NVTE_FUSED_ATTN", "unfused": "NVTE_UNFUSED_ATTN"}
"""TE's environment switches (attention/dot_product_attention/utils.py get_attention_backend): one on, two off."""


def backend_env(backend: str) -> dict[str, str]:
    """TE's switches forcing ``backend`` (the other two off)."""
    return {name: "1" if key == backend else "0" for key, name in BACKEND_SWITCHES.items()}


def kernel_failures(result: dict, tolerance: float = KERNEL_TOLERANCE) -> list[str]:
    """What makes the kernel check fail: an error past ``tolerance`` (NaN included), a backend other than asked."""
    failures = [f"{path}: max abs error {err:.3g} >= {tolerance:g}" for path, err in result["max_abs_err"].items()
                if not err < tolerance]
    wanted = result.get("backend")
    for path, ran in (result.get("backends_ran") or {}).items():
        if wanted is not None and ran != wanted:
            failures.append(f"{path}: TE ran the {ran} backend, not the forced {wanted}")
    return failures


def fp8_loss_failures(bf16: np.ndarray, fp8: np.ndarray, tolerance: float) -> list[str]:
    """Why FP8 losses do not show FP8 ran within tolerance: equal to bf16 (it did not run), too far, not finite."""
    if bf16.shape != fp8.shape or not (np.isfinite(bf16).all() and np.isfinite(fp8).all()):
        return [f"losses not comparable: bf16 {bf16.tolist()}, fp8 {fp8.tolist()}"]
    rel = np.abs(fp8 - bf16) / np.abs(bf16)
    failures = []
    if not rel.max() > 0:
        failures.append("FP8 losses equal the bf16 ones exactly: FP8 did not run")
    if not rel.max() < tolerance:
        failures.append(f"FP8 losses differ from bf16 by {rel.max():.3g} (relative) >= {tolerance:g}")
    return failures


FP8_PROBE = """
import torch
import transformer_engine.pytorch as te

ask = getattr(te, "is_fp8_available", None)  # newer TE exports it; older TE answers through FP8GlobalStateManager
if ask is not None:
    ok, why = ask(return_reason=True)
else:
    from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
    ok, why = FP8GlobalStateManager.is_fp8_available()
print("FP8", int(bool(ok)), torch.cuda.get_device_name(0), "|", why)
"""
"""Asks Transformer Engine whether this GPU runs FP8 with delayed / current scaling (the recipe the checks use)."""


def fp8_not_supported(probe_rc: int, probe_stdout: str) -> str | None:
    """TE's reason this GPU has no FP8 (with the GPU's name), from ``FP8_PROBE``'s output; None when it has FP8.

    Only TE's own "no" excuses the FP8 checks: a probe that failed or printed no answer gives None, so the checks
    run and fail with their own error instead of being reported not applicable.
    """
    answers = [line for line in probe_stdout.splitlines() if line.startswith("FP8 ")]
    if probe_rc != 0 or not answers:
        return None
    flag, rest = answers[-1][len("FP8 "):].split(" ", 1)
    if flag != "0":
        return None
    name, _, why = rest.partition(" | ")
    return f"{why.strip() or 'Transformer Engine reports no FP8'} ({name.strip()})"

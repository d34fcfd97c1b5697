"""tools/container_check.sh: skips pass only on a machine without a GPU.

Without a GPU it exits 0 and reports every GPU / TE item skipped; on a machine whose ``nvidia-smi -L`` lists a
GPU (a stand-in ``nvidia-smi`` here, CUDA unusable) every skip is a failure with its reason and no GPU check
passes without CUDA. The one exception, a check the GPU cannot run (FP8 where Transformer Engine says the GPU has
none), is listed n/a with TE's reason.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import GPU_PRESENT
from tests.dist.train_common import REPO
from tests.te_verdicts import fp8_not_supported
from tools.container_report import NOT_APPLICABLE
from tools.container_report import main as report_main

STAND_IN_NVIDIA_SMI = """#!/bin/sh
# a stand-in nvidia-smi: lists one GPU that CUDA cannot use on this CPU machine
case "$1" in
  -L) echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-stand-in)" ;;
  *) echo "NVIDIA H100 80GB HBM3, 81559 MiB, 570.00" ;;
esac
"""

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_te" name="test_te_a" time="0.1"><properties><property name="detail" value="rel 1e-5"/>
</properties></testcase>
<testcase classname="tests.test_te" name="test_te_b" time="0.0"><skipped type="pytest.skip"
 message="Transformer Engine does not import in this image: ImportError: libcudnn.so.9">skip</skipped></testcase>
</testsuite></testsuites>"""


def _run_check(tmp_path, env: dict) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    proc = subprocess.run(["bash", str(REPO / "tools" / "container_check.sh")], capture_output=True, text=True,
                          env=dict(env, OUT=str(tmp_path / "out")), timeout=900)
    rows = [line.split(None, 3) for line in proc.stdout.splitlines() if line.startswith(("test_gpu::", "test_te::"))]
    return proc, rows


@pytest.mark.skipif(GPU_PRESENT, reason="describes a machine without a GPU (on a GPU machine the checks run)")
def test_container_check_on_cpu_reports_every_item_skipped(tmp_path):
    proc, rows = _run_check(tmp_path, dict(os.environ))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    names = {row[0] for row in rows}
    for check in ("test_te_spec_matches_local_spec_from_one_converted_checkpoint",
                  "test_te_packed_and_shared_prompt_match_padded[fp32]",
                  "test_te_packed_and_shared_prompt_match_padded[bf16]",
                  *(f"test_te_fp8_hybrid_tracks_bf16_over_20_steps[{layout}]" for layout in ("padded", "packed", "shared")),
                  "test_te_fp8_scaling_state_changes_on_every_layout",
                  *(f"test_te_attention_kernels_match_the_reference_per_backend[{backend}]"
                    for backend in ("flash", "fused", "unfused")),
                  "test_te_grouped_gemm_matches_sequential_experts",
                  "test_te_layouts_step_time_and_memory_on_mixtral_layer_shapes"):
        assert f"test_te::{check}" in names, out
    assert sum(name.startswith("test_gpu::") for name in names) >= 4, out
    for row in rows:  # check, status, seconds, reason
        assert len(row) == 4 and row[1] == "skipped" and "needs an NVIDIA GPU" in row[3], row
    assert f"{len(rows)} skipped" in proc.stdout and "container check: OK" in proc.stdout
    assert (tmp_path / "out" / "report.xml").is_file()


@pytest.mark.skipif(GPU_PRESENT, reason="plants a stand-in nvidia-smi on a machine without a usable GPU")
def test_container_check_with_a_listed_gpu_fails_every_check_that_did_not_run_on_cuda(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(STAND_IN_NVIDIA_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "NEMO_LPO_TEST_CUDA_DEVICES")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    proc, rows = _run_check(tmp_path, env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "GPU 0: NVIDIA H100" in proc.stdout and "container check: FAILED" in proc.stdout, out
    te_rows = [row for row in rows if row[0].startswith("test_te::")]
    gpu_rows = [row for row in rows if row[0].startswith("test_gpu::")]
    assert len(te_rows) >= 6 and len(gpu_rows) >= 4, out
    for row in te_rows:  # skipped on a GPU machine: a failure, with the skip's reason
        assert row[1] == "FAILED(skip)" and "CUDA does not work" in row[3], row
    for row in gpu_rows:  # ran, and failed on the CUDA assertion instead of passing on the CPU
        assert row[1] in ("FAILED", "ERROR") and "CUDA does not work" in row[3], row
    assert not [row for row in rows if row[1] in ("passed", "skipped")], out


@pytest.mark.parametrize("gpu_listed", [False, True])
def test_container_report_counts_a_skip_as_a_failure_only_where_a_gpu_is_listed(tmp_path, capsys, gpu_listed):
    report = tmp_path / "report.xml"
    report.write_text(JUNIT)
    rc = report_main([str(report), "--pytest-rc", "0", *(["--gpu-listed"] if gpu_listed else [])])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("test_te::test_te_b"))
    assert "libcudnn.so.9" in row
    if gpu_listed:
        assert rc == 1 and "FAILED(skip)" in row and "1 skipped on a GPU machine" in out
    else:
        assert rc == 0 and " skipped " in row and "container check: OK" in out
    assert "rel 1e-5" in out


A100_NO_FP8 = "Device compute capability 8.9 or higher required for FP8 execution. (NVIDIA A100-SXM4-80GB)"


def _junit(*cases: tuple[str, str | None]) -> str:
    """A JUnit report of test_te cases: (name, skip message or None for a pass)."""
    body = "".join(
        f'<testcase classname="tests.test_te" name="{name}" time="0.1">'
        + (f'<skipped type="pytest.skip" message="{skip}">skip</skipped>' if skip is not None else "")
        + "</testcase>" for name, skip in cases)
    return f'<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">{body}</testsuite></testsuites>'


def _report(tmp_path, capsys, xml: str) -> tuple[int, dict[str, str], str]:
    (tmp_path / "report.xml").write_text(xml)
    rc = report_main([str(tmp_path / "report.xml"), "--pytest-rc", "0", "--gpu-listed"])
    out = capsys.readouterr().out
    statuses = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith("test_te::")}
    return rc, statuses, out


def test_a_check_the_gpu_cannot_run_is_listed_not_applicable_and_nothing_else_is(tmp_path, capsys):
    rc, statuses, out = _report(tmp_path, capsys, _junit(
        ("test_te_kernels", None), ("test_te_fp8", f"{NOT_APPLICABLE} {A100_NO_FP8}"),
        ("test_te_grouped", "Transformer Engine does not import in this image: ImportError: libcudnn.so.9"),
        # the marker anywhere but at the start is an ordinary skip: a failure where a GPU is listed
        ("test_te_other", f"needs something; {NOT_APPLICABLE} maybe")))
    assert statuses == {"test_te::test_te_kernels": "passed", "test_te::test_te_fp8": "n/a",
                        "test_te::test_te_grouped": "FAILED(skip)", "test_te::test_te_other": "FAILED(skip)"}
    assert rc == 1 and "A100-SXM4-80GB" in out and "2 skipped on a GPU machine" in out


def test_a_gpu_without_fp8_passes_the_self_check_with_the_fp8_checks_not_applicable(tmp_path, capsys):
    rc, statuses, out = _report(tmp_path, capsys, _junit(
        ("test_te_kernels", None), ("test_te_fp8", f"{NOT_APPLICABLE} {A100_NO_FP8}")))
    assert rc == 0 and statuses["test_te::test_te_fp8"] == "n/a"
    assert "container check: OK (1 checks not applicable on this GPU)" in out


@pytest.mark.parametrize(("rc", "stdout", "verdict"), [
    (0, "FP8 0 NVIDIA A100-SXM4-80GB | Device compute capability 8.9 or higher required for FP8 execution.\n",
     A100_NO_FP8),
    (0, "FP8 1 NVIDIA H100 80GB HBM3 | \n", None),  # has FP8: the checks run
    (1, "FP8 0 NVIDIA A100-SXM4-80GB | no\n", None),  # the probe failed: the checks run and fail on their own
    (0, "Traceback (most recent call last):\n", None),  # no answer from TE: never excused
])
def test_only_transformer_engines_own_no_makes_the_fp8_checks_not_applicable(rc, stdout, verdict):
    assert fp8_not_supported(rc, stdout) == verdict

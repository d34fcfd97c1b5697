"""tools/container_check.sh on a machine without a GPU: it exits 0 and reports every GPU / TE item skipped."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import GPU_PRESENT
from tests.dist.train_common import REPO


@pytest.mark.skipif(GPU_PRESENT, reason="describes a machine without a GPU (on a GPU machine the checks run)")
def test_container_check_on_cpu_reports_every_item_skipped(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path))
    proc = subprocess.run(["bash", str(REPO / "tools" / "container_check.sh")], capture_output=True, text=True,
                          env=env, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    rows = [line.split(None, 3) for line in proc.stdout.splitlines() if line.startswith(("test_gpu::", "test_te::"))]
    names = {row[0] for row in rows}
    for check in ("test_te_spec_matches_local_spec_from_one_converted_checkpoint",
                  "test_te_packed_and_shared_prompt_match_padded[fp32]",
                  "test_te_packed_and_shared_prompt_match_padded[bf16]", "test_te_fp8_hybrid_tracks_bf16_over_20_steps",
                  "test_te_grouped_gemm_matches_sequential_experts",
                  "test_te_layouts_step_time_and_memory_on_mixtral_layer_shapes"):
        assert f"test_te::{check}" in names, out
    assert sum(name.startswith("test_gpu::") for name in names) >= 4, out
    for row in rows:  # check, status, seconds, reason
        assert len(row) == 4 and row[1] == "skipped" and "needs an NVIDIA GPU" in row[3], row
    assert f"{len(rows)} skipped" in proc.stdout and "container check: OK" in proc.stdout
    assert (tmp_path / "report.xml").is_file()

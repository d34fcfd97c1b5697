"""No silent CPU fallback on a machine with GPUs whose CUDA does not work.

The trainer, ref-logps and eval stop with one clear error unless the CPU is asked for (``parallel.allow_cpu`` /
``NEMO_LPO_ALLOW_CPU=1``).

Executed on CPU with a stand-in ``nvidia-smi`` on PATH that lists a GPU CUDA cannot use. Skipped on a real GPU
machine: there the in-process CUDA initialisation this plants would see the real GPU the suite hides.
"""

from __future__ import annotations

import pytest

from nemo_lpo.cli import build_parser
from nemo_lpo.model.parallel import check_cuda_or_cpu_allowed, gpus_asked_for, initialize_parallel
from tests.conftest import GPU_PRESENT
from tests.dist.train_common import TINY_CONF
from tests.test_container_check import STAND_IN_NVIDIA_SMI

pytestmark = pytest.mark.skipif(GPU_PRESENT, reason="plants a stand-in nvidia-smi; this machine has a real GPU")


@pytest.fixture
def stand_in_gpu(tmp_path, monkeypatch):
    """PATH with a stand-in ``nvidia-smi`` listing one GPU; CUDA_VISIBLE_DEVICES unset (the suite's "" removed)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(STAND_IN_NVIDIA_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("NEMO_LPO_ALLOW_CPU", raising=False)


@pytest.mark.parametrize(("environ", "asked"), [
    ({"CUDA_VISIBLE_DEVICES": ""}, None),  # hidden on purpose (the test suite): nvidia-smi is not asked
    ({"CUDA_VISIBLE_DEVICES": "-1"}, None),
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, "CUDA_VISIBLE_DEVICES=0,1"),
    ({"SLURM_STEP_GPUS": "0,1"}, "SLURM_STEP_GPUS=0,1"),
    ({"SLURM_GPUS_ON_NODE": "0"}, "nvidia-smi -L lists 1 GPU(s)"),  # no Slurm GPU: nvidia-smi decides
    ({}, "nvidia-smi -L lists 1 GPU(s): GPU 0: NVIDIA H100"),
])
def test_gpus_asked_for_reads_cuda_visible_devices_then_slurm_then_nvidia_smi(stand_in_gpu, environ, asked):
    reason = gpus_asked_for(environ)
    assert reason == asked if asked is None else reason.startswith(asked), reason


def test_no_gpu_listed_means_no_gpu_asked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi at all
    assert gpus_asked_for({}) is None


def test_trainer_refuses_the_cpu_where_a_gpu_is_listed(stand_in_gpu, capsys):
    for command in ("train", "ref-logps"):
        args = build_parser().parse_args([command, str(TINY_CONF)])
        assert args.func(args) == 2
        err = capsys.readouterr().err
        assert f"nemo-lpo {command}: error: this machine has GPUs (nvidia-smi -L lists 1 GPU(s)" in err, err
        assert "Refusing to fall back to the CPU" in err and "parallel.allow_cpu=true" in err, err


def test_eval_path_refuses_the_cpu_where_a_gpu_is_listed(stand_in_gpu):
    with pytest.raises(RuntimeError, match="CUDA does not work in this process"):
        initialize_parallel()  # evaluate_checkpoint (nemo-lpo eval) and the demo start here


def test_eval_cli_refuses_the_cpu_in_one_line(stand_in_gpu, monkeypatch, capsys):
    from nemo_lpo.evaluate import run

    monkeypatch.setattr(run, "ListwiseDataset", lambda prefix: None)  # no dataset needed: the check comes first
    args = build_parser().parse_args(["eval", "no-checkpoint", "no-dataset"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("nemo-lpo eval: error: this machine has GPUs (nvidia-smi -L lists 1 GPU(s)") and \
        err.count("\n") == 1, err  # one line, no traceback


def test_the_cpu_asked_for_explicitly_is_allowed(stand_in_gpu, monkeypatch):
    with pytest.raises(RuntimeError, match="NEMO_LPO_ALLOW_CPU=1"):
        check_cuda_or_cpu_allowed()
    check_cuda_or_cpu_allowed(allow_cpu=True)  # parallel.allow_cpu=true
    monkeypatch.setenv("NEMO_LPO_ALLOW_CPU", "1")
    check_cuda_or_cpu_allowed()

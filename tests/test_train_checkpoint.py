"""Checkpoints through the real CLI (torchrun + `nemo-lpo train`).

Exact resume and resume under another layout (kills during steps and saves: tests/test_train_crash.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.dist.train_common import DEMO_LISTS, REPO, TINY_CONF, metrics_lines, pack_lists, without_timings
from tests.torchrun import run_torchrun

CLI = REPO / "nemo_lpo" / "cli.py"
INIT_WORKER = REPO / "tests" / "dist" / "train_parity.py"  # its `init` scenario writes seeded starting weights
pytestmark = pytest.mark.distributed


def overrides(prefix: Path, run_dir: Path, *extra: str) -> list[str]:
    # the online reference is the starting checkpoint: the same weights under every layout (a random init
    # is drawn differently per pipeline / expert layout)
    return [f"data.train_prefix={prefix}", f"logging.run_dir={run_dir}", "reference.mode=online",
            f"model.init_checkpoint={prefix.parent.parent / 'init'}",
            "train.max_steps=6", "optim.lr=1e-3", "optim.warmup_steps=1", "data.global_batch_size=4",
            "data.micro_batch_size=2", "logging.tensorboard=false", "checkpoint.keep_last=0", *extra]


@pytest.fixture(scope="module")
def prefix(tmp_path_factory) -> Path:
    """16 packed demo lists under ROOT/data/lists, and the seeded starting weights in ROOT/init."""
    root = tmp_path_factory.mktemp("ckpt")
    prefix = pack_lists(DEMO_LISTS, root / "data" / "lists", 16)
    run_torchrun(INIT_WORKER, 1, str(root), str(prefix), "init")
    assert (root / "init" / "metadata.json").is_file()
    return prefix


@pytest.fixture(scope="module")
def straight(prefix, tmp_path_factory) -> Path:
    """6 steps in one go, checkpoints at 3 and 6."""
    run = tmp_path_factory.mktemp("straight")
    run_torchrun(CLI, 1, "train", str(TINY_CONF), *overrides(prefix, run, "checkpoint.save_interval=3"))
    return run


def resumed_copy(straight: Path, dst: Path) -> None:
    """A run folder holding only the straight run's step-3 checkpoint (as if a job stopped there)."""
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step_0000003", dst / "checkpoints" / "step_0000003")
    (dst / "checkpoints" / "latest").write_text("step_0000003\n")


def test_straight_run_checkpoints(straight):
    lines = metrics_lines(straight / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert (straight / "checkpoints" / "latest").read_text().strip() == "step_0000006"
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["latest", "step_0000003", "step_0000006"]
    assert (straight / "config.yaml").is_file()


def test_resume_gives_identical_metrics(straight, prefix, tmp_path):
    resumed_copy(straight, tmp_path)
    out = run_torchrun(CLI, 1, "train", str(TINY_CONF), *overrides(prefix, tmp_path, "checkpoint.save_interval=3"))
    assert "resumed from" in out and "at step 3" in out
    want = [without_timings(line) for line in metrics_lines(straight / "metrics.jsonl")[3:]]
    got = [without_timings(line) for line in metrics_lines(tmp_path / "metrics.jsonl")]
    assert got == want  # bit-identical: model, Adam state, scheduler, data position and RNG restored


# Resume layouts (2 processes each): model AND optimizer state resharded by megatron dist checkpointing.
RESUME_LAYOUTS = {
    "tp2": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pp=2"],
    "ep2": ["parallel.ep=2"],
    # DP2: the DistributedOptimizer shards Adam's state over the two ranks (fully_sharded_model_space slices)
    "dp2_distopt": ["parallel.distributed_optimizer=true"],
}
_resumed: dict[str, Path] = {}


REVERSE_FROM = ["pp2", "dp2_distopt"]  # these resumed runs also checkpoint step 4, resumed at 1 process below


def resume_at(layout: str, straight: Path, prefix: Path, root: Path) -> Path:
    """Resume the straight run's step-3 checkpoint under ``layout`` (once per module); returns the run folder."""
    if layout not in _resumed:
        _resumed[layout] = None  # a failure is reported once, by the first test that needs the run
        run = root / layout
        resumed_copy(straight, run)
        saves = ["checkpoint.save_interval=4"] if layout in REVERSE_FROM else []
        out = run_torchrun(CLI, 2, "train", str(TINY_CONF),
                           *overrides(prefix, run, *RESUME_LAYOUTS[layout], *saves, "checkpoint.save_at_end=false"))
        assert "resumed from" in out and "at step 3" in out
        _resumed[layout] = run
    if _resumed[layout] is None:
        pytest.fail(f"the {layout} resume failed (see test_resume_under_another_layout[{layout}])")
    return _resumed[layout]


def assert_continues(got: list[dict], want: list[dict], steps: list[int]) -> None:
    assert [g["step"] for g in got] == steps
    for g, w in zip(got, want, strict=True):
        assert g["tokens"] == w["tokens"] and g["lists/valid"] == w["lists/valid"]  # the same lists, in order
        assert abs(g["loss"] - w["loss"]) < 1e-5 and abs(g["grad_norm"] - w["grad_norm"]) < 1e-5, (g, w)
        assert g["lr"] == pytest.approx(w["lr"], rel=1e-12)


@pytest.mark.parametrize("layout", list(RESUME_LAYOUTS))
def test_resume_under_another_layout(straight, prefix, tmp_path_factory, layout):
    """Saved at 1 process, resumed at 2 processes under ``layout``: steps 4-6 match the straight run."""
    run = resume_at(layout, straight, prefix, tmp_path_factory.getbasetemp() / "resumed")
    assert_continues(metrics_lines(run / "metrics.jsonl"), metrics_lines(straight / "metrics.jsonl")[3:], [4, 5, 6])


@pytest.mark.parametrize("layout", REVERSE_FROM)
def test_resume_at_one_process(straight, prefix, tmp_path_factory, tmp_path, layout):
    """The reverse direction: a 2-process run's step-4 checkpoint resumed at 1 process (plain optimizer).

    From pp2 each stage's half of the model and Adam state is merged; from dp2_distopt the Adam state was
    saved as two flattened slices per parameter (DistributedOptimizer, fully_sharded_model_space).
    """
    source = resume_at(layout, straight, prefix, tmp_path_factory.getbasetemp() / "resumed")
    (tmp_path / "checkpoints").mkdir()
    shutil.copytree(source / "checkpoints" / "step_0000004", tmp_path / "checkpoints" / "step_0000004")
    (tmp_path / "checkpoints" / "latest").write_text("step_0000004\n")
    out = run_torchrun(CLI, 1, "train", str(TINY_CONF), *overrides(prefix, tmp_path, "checkpoint.save_at_end=false"))
    assert "at step 4" in out
    assert_continues(metrics_lines(tmp_path / "metrics.jsonl"), metrics_lines(straight / "metrics.jsonl")[4:], [5, 6])

"""The ``pretrained`` layout Megatron-Bridge loads: built race-free by every rank of a launch (main venv, no Bridge)."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest
import torch
import yaml

from nemo_lpo.bridge.layout import CHECKPOINT_VERSION, COMMON_STATE, RUN_CONFIG, pretrained_layout

RANKS = 8
ROUNDS = 6


def converted(root):
    ckpt = root / "converted"
    ckpt.mkdir(parents=True)
    (ckpt / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))
    for name in ("nemo_lpo_model.json", "__0_0.distcp"):
        (ckpt / name).write_text(name)
    # the common state in megatron's older place (its own, inside the .distcp files, needs a real save: the
    # Megatron-Bridge LoRA resume in tests/test_bridge_loop.py reads one); nemo-lpo's has no checkpoint_version
    torch.save({"format_version": 2, "layout": {"tp": 1}}, ckpt / COMMON_STATE)
    return ckpt


def test_layout_links_the_checkpoint_and_adds_run_config(tmp_path):
    ckpt = converted(tmp_path)
    out = pretrained_layout(ckpt, tmp_path / "run", tp=2, pp=4)
    layout = tmp_path / "run" / "pretrained"
    assert out == str(layout)
    assert sorted(p.name for p in layout.iterdir()) == sorted([*(p.name for p in ckpt.iterdir()), RUN_CONFIG])
    assert all(os.readlink(layout / p.name) == str(p) for p in ckpt.iterdir() if p.name != COMMON_STATE)
    assert yaml.safe_load((layout / RUN_CONFIG).read_text())["model"] == {
        "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 4}
    assert not (ckpt / RUN_CONFIG).exists()
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["pretrained"]  # no temporary folder left behind


def test_the_common_state_gets_megatrons_checkpoint_version(tmp_path):
    """Megatron-Bridge asserts one checkpoint_version per process (base, then its own adapter checkpoint: 3.0)."""
    ckpt = converted(tmp_path)
    layout = tmp_path / "run" / "pretrained"
    pretrained_layout(ckpt, tmp_path / "run", tp=1, pp=1)
    assert not (layout / COMMON_STATE).is_symlink()
    assert torch.load(layout / COMMON_STATE, weights_only=False) == {
        "format_version": 2, "layout": {"tp": 1}, "checkpoint_version": CHECKPOINT_VERSION}
    assert "checkpoint_version" not in torch.load(ckpt / COMMON_STATE, weights_only=False)  # the source untouched
    # a checkpoint that has a version (a Megatron-Bridge / Megatron-LM save) is linked as it is
    torch.save({"checkpoint_version": 3.0, "iteration": 2}, ckpt / COMMON_STATE)
    pretrained_layout(ckpt, tmp_path / "run", tp=1, pp=1)
    assert os.readlink(layout / COMMON_STATE) == str(ckpt / COMMON_STATE)


def test_a_stale_layout_is_replaced(tmp_path):
    ckpt = converted(tmp_path)
    pretrained_layout(ckpt, tmp_path / "run", tp=1, pp=1)
    other = tmp_path / "other"
    other.mkdir()
    (other / "metadata.json").write_text((ckpt / "metadata.json").read_text())
    torch.save({"checkpoint_version": 3.0}, other / COMMON_STATE)
    pretrained_layout(other, tmp_path / "run", tp=1, pp=2)
    layout = tmp_path / "run" / "pretrained"
    assert sorted(p.name for p in layout.iterdir()) == [COMMON_STATE, "metadata.json", RUN_CONFIG]
    assert yaml.safe_load((layout / RUN_CONFIG).read_text())["model"]["pipeline_model_parallel_size"] == 2


def test_not_a_dist_checkpoint_names_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.init_checkpoint: .* \(no metadata.json\)"):
        pretrained_layout(tmp_path, tmp_path / "run", tp=1, pp=1)


def _rank(barrier, ckpt, run_dir, tp, queue):
    barrier.wait()
    try:
        queue.put(("ok", pretrained_layout(ckpt, run_dir, tp=tp, pp=1)))
    except Exception as err:  # noqa: BLE001 - the test reports every rank's failure
        queue.put(("error", f"{type(err).__name__}: {err}"))


def test_ranks_started_together_all_get_the_whole_layout(tmp_path):
    """RANKS processes released at once build the same layout, ROUNDS times (a stale one replaced every round)."""
    ckpt = converted(tmp_path)
    context = multiprocessing.get_context("fork")
    for round_ in range(ROUNDS):
        barrier, queue = context.Barrier(RANKS), context.Queue()
        procs = [context.Process(target=_rank, args=(barrier, ckpt, tmp_path / "run", 1 + round_ % 2, queue))
                 for _ in range(RANKS)]
        for proc in procs:
            proc.start()
        results = [queue.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
        assert [status for status, _ in results] == ["ok"] * RANKS, (round_, results)
        layout = tmp_path / "run" / "pretrained"
        assert len(list(layout.iterdir())) == 5
        assert yaml.safe_load((layout / RUN_CONFIG).read_text())["model"]["tensor_model_parallel_size"] == 1 + round_ % 2
        assert [p.name for p in (tmp_path / "run").iterdir()] == ["pretrained"]

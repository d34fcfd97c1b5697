"""The start-up check: every mistake in docs/troubleshooting.md's table gives one line, exit 2, and writes nothing.

The table is read from the doc (one source): each row's id names a scenario below that plants the mistake; the
test asserts the exit code, that the one stderr line names the row's setting and says the row's text, that no
traceback reaches the console, and that no file under the workspace changed. Most rows call the CLI's ``main``
in-process; the issue's four examples also run in a real process, and one under torchrun with two ranks (the line
once, not once per rank). Worker errors (a shard that cannot be read, a NaN loss) run the real trainer in-process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

from nemo_lpo.cli import main
from nemo_lpo.data import ListwiseDataset, layout
from nemo_lpo.data.dataset import write_reference_logps
from nemo_lpo.train.worker_errors import NonFiniteLoss, mark, report_worker_error
from tests.dist.train_common import DEMO_LISTS, TINY_CONF, pack_lists
from tests.torchrun import free_port

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "troubleshooting.md"
COLUMNS = ("id", "command", "setting", "says", "cause", "fix")


def doc_rows() -> list[dict]:
    """The rows of the mistakes table in docs/troubleshooting.md (backticks stripped from setting and text)."""
    lines = DOC.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| id |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        row = dict(zip(COLUMNS, cells, strict=True))
        row["setting"], row["says"] = row["setting"].strip("`"), row["says"].strip("`")
        rows.append(row)
    return rows


ROWS = doc_rows()


def _copy_dataset(src: str, dst: Path, with_sidecar: bool = False) -> str:
    for path in Path(src).parent.glob(Path(src).name + ".*"):
        suffix = path.name[len(Path(src).name):]
        if with_sidecar or layout.REF_LOGPS not in suffix:
            shutil.copy(path, str(dst) + suffix)
    return str(dst)


def _edit_manifest(prefix: str, **tokenizer) -> None:
    path = layout.manifest_path(prefix)
    manifest = json.loads(path.read_text())
    manifest.update(tokenizer.pop("top", {}))
    manifest["tokenizer"].update(tokenizer)
    path.write_text(json.dumps(manifest))


def _describe(ckpt: Path, preset) -> None:
    from nemo_lpo.model.sidecar import write_sidecar

    write_sidecar(ckpt, preset=preset, architecture="MixtralForCausalLM", hf_config=None, dtype="fp32",
                  sharded_metadata={}, source="tests/test_preflight.py")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict:
    """The workspace: a packed dataset with reference log-probs of a real tiny-Mixtral checkpoint, and its variants."""
    from megatron.core import dist_checkpointing

    from nemo_lpo.config import load_config
    from nemo_lpo.evaluate.run import build_model
    from nemo_lpo.model.parallel import destroy_parallel, initialize_parallel
    from nemo_lpo.model.presets import get_preset
    from nemo_lpo.train.checkpoint import model_sharded_state_dict, save_model_weights

    root = tmp_path_factory.mktemp("preflight")
    data = str(pack_lists(DEMO_LISTS, root / "data" / "train", 8))
    w = {"root": root, "data": data, "jsonl": str(root / "data" / "train.input.jsonl")}
    w["noside"] = _copy_dataset(data, root / "data" / "noside")
    initialize_parallel(seed=3)
    try:
        model = build_model("tiny-mixtral", None)
        save_model_weights(model, root / "ckpt")
        base = _base(w | {"ckpt": str(root / "ckpt")})
        cfg = load_config(TINY_CONF, [*base, f"logging.run_dir={root / 'run'}", "optim.lr=1e-4"])
        step = root / "run" / "checkpoints" / "step_0000002"
        step.mkdir(parents=True)
        # the common state a training save holds (train/checkpoint.py); "scheduler": OptimizerParamScheduler's
        # state_dict for this config's max_steps 20, cosine to min_lr 0 (train/optimizer.py)
        scheduler = {"max_lr": 1e-4, "lr_warmup_steps": 0, "num_steps": 2, "lr_decay_style": "cosine",
                     "lr_decay_steps": cfg.train.max_steps, "min_lr": 0.0}
        dist_checkpointing.save({"model": model_sharded_state_dict(model), "config": cfg.to_dict(), "step": 2,
                                 "scheduler": scheduler}, str(step))
    finally:
        destroy_parallel()
    (root / "run" / "checkpoints" / "latest").write_text("step_0000002\n")
    (root / "run" / "checkpoints" / "step_0000004.tmp").mkdir()
    (root / "run2" / "checkpoints").mkdir(parents=True)
    (root / "run2" / "checkpoints" / "latest").write_text("step_0000009\n")
    ckpt = root / "ckpt"
    w.update(ckpt=str(ckpt), plain=str(shutil.copytree(ckpt, root / "plain")))
    _describe(ckpt, get_preset("tiny-mixtral"))
    w["other"] = str(shutil.copytree(ckpt, root / "other"))
    w["shardless"] = str(shutil.copytree(ckpt, root / "shardless"))
    for shard in Path(w["shardless"]).glob("*.distcp"):
        shard.unlink()
    w["huge"] = str(shutil.copytree(root / "plain", root / "huge"))
    _describe(Path(w["huge"]), get_preset("tiny-mixtral").replace(name="huge", num_layers=10**8))
    k = ListwiseDataset(data).num_responses()
    write_reference_logps(data, (np.full(n, -1.0, np.float32) for n in k),
                          {"checkpoint": str(ckpt), "checkpoint_path": str(ckpt.resolve()), "init_seed": None,
                           "length_average": False, "preset": "tiny-mixtral"})
    for name, edit in (("bigvocab", {"vocab_size": 128256}), ("pad", {"pad_id": 40000}),
                       ("oldformat", {"top": {"format_version": 99}})):
        w[name] = _copy_dataset(data, root / "data" / name, with_sidecar=True)
        _edit_manifest(w[name], **edit)
    w["partial"] = _copy_dataset(data, root / "data" / "partial")
    os.remove(w["partial"] + ".rewards.bin")
    w["interrupted"] = _copy_dataset(data, root / "data" / "interrupted")
    os.remove(layout.manifest_path(w["interrupted"]))
    (root / "hf").mkdir()
    (root / "hf" / "config.json").write_text("{}\n")
    (root / "empty").mkdir()
    return w


def _base(w: dict) -> list[str]:
    return [f"data.train_prefix={w['data']}", f"model.init_checkpoint={w['ckpt']}",
            f"logging.run_dir={w['root'] / 'fresh_run'}"]


def scenario(row_id: str, w: dict) -> tuple[list[str], dict]:
    """(argv, extra environment) that plants the mistake of table row ``row_id``."""
    return scenarios(w)[row_id]


def scenarios(w: dict) -> dict[str, tuple[list[str], dict]]:
    """Each table row's id: the (argv, extra environment) that plants its mistake."""
    train = ["train", str(TINY_CONF), *_base(w)]
    ref = ["ref-logps", str(TINY_CONF), *_base(w)]
    world = {f"WORLD_SIZE={n}": {"WORLD_SIZE": str(n), "RANK": "0"} for n in (2, 3, 4)}
    table = {
        "train-prefix-missing": (train + ["data.train_prefix=/nonexistent/x"], {}),
        "train-prefix-unset": (train + ["data.train_prefix=null"], {}),
        "train-prefix-folder": (train + [f"data.train_prefix={Path(w['data']).parent}"], {}),
        "train-prefix-jsonl": (train + [f"data.train_prefix={w['jsonl']}"], {}),
        "train-prefix-interrupted": (train + [f"data.train_prefix={w['interrupted']}"], {}),
        "train-prefix-part-missing": (train + [f"data.train_prefix={w['partial']}"], {}),
        "train-prefix-old-format": (train + [f"data.train_prefix={w['oldformat']}"], {}),
        "blend-part-missing": (train + [f"data.train_prefix=[1, {w['data']}, 1, /nonexistent/b]"], {}),
        "valid-prefix-missing": (train + ["data.valid_prefix=/nonexistent/v"], {}),
        "vocab-too-large": (train + [f"data.train_prefix={w['bigvocab']}"], {}),
        "pad-id-out-of-range": (train + [f"data.train_prefix={w['pad']}"], {}),
        "no-sidecar": (train + [f"data.train_prefix={w['noside']}"], {}),
        "no-valid-sidecar": (train + [f"data.valid_prefix={w['noside']}"], {}),
        "sidecar-other-checkpoint": (train + [f"model.init_checkpoint={w['other']}"], {}),
        "sidecar-length-average": (train + ["loss.length_average=true"], {}),
        "init-checkpoint-missing": (train + ["model.init_checkpoint=/nonexistent/ck"], {}),
        "init-checkpoint-hf-folder": (train + [f"model.init_checkpoint={w['root'] / 'hf'}"], {}),
        "init-checkpoint-tmp": (train + [
            f"model.init_checkpoint={w['root'] / 'run' / 'checkpoints' / 'step_0000004.tmp'}"], {}),
        "init-checkpoint-shard-missing": (train + [f"model.init_checkpoint={w['shardless']}"], {}),
        "init-checkpoint-other-model": (train + ["model.preset=tiny-mistral"], {}),
        "from-checkpoint-no-description": (train + ["model.preset=from_checkpoint",
                                                    f"model.init_checkpoint={w['plain']}"], {}),
        "unknown-preset": (train + ["model.preset=tiny-mixtrall"], {}),
        "unknown-key": (train + ["optim.lrr=1e-4"], {}),
        "tp-world": (train + ["parallel.tp=3"], {}),
        "tp-query-groups": (train + ["parallel.tp=4", "parallel.sequence_parallel=true"], world["WORLD_SIZE=4"]),
        "pp-layers": (train + ["parallel.pp=3"], world["WORLD_SIZE=3"]),
        "vpp-layers": (train + ["parallel.pp=2", "parallel.vpp=2"], world["WORLD_SIZE=2"]),
        "ep-experts": (train + ["parallel.ep=3"], world["WORLD_SIZE=3"]),
        "ep-dense": (train + ["model.preset=tiny-mistral", "model.init_checkpoint=null", "parallel.ep=2"],
                     world["WORLD_SIZE=2"]),
        "sp-without-tp": (train + ["parallel.sequence_parallel=true"], {}),
        "moe-tp-without-sp": (train + ["parallel.tp=2"], world["WORLD_SIZE=2"]),
        "batch-vs-dp": (train + ["data.global_batch_size=6"], world["WORLD_SIZE=2"]),
        "run-dir-not-folder": (train + [f"logging.run_dir={w['jsonl']}/run"], {}),
        "no-room": (train + ["model.preset=from_checkpoint", f"model.init_checkpoint={w['huge']}",
                             "reference.mode=online"], {}),
        "resume-changed": (train + [f"logging.run_dir={w['root'] / 'run'}", "optim.lr=2e-4"], {}),
        "resume-past-schedule": (train + [f"logging.run_dir={w['root'] / 'run'}", "optim.lr=1e-4",
                                          "train.max_steps=40"], {}),
        "resume-latest-broken": (train + [f"logging.run_dir={w['root'] / 'run2'}"], {}),
        "ref-logps-prefix-missing": (ref + ["--prefix", "/nonexistent/p"], {}),
        "ref-logps-checkpoint-missing": (ref + ["--checkpoint", "/nonexistent/ck"], {}),
        "eval-ckpt-not-checkpoint": (["eval", str(w["root"] / "empty"), w["data"]], {}),
        "eval-run-folder": (["eval", str(w["root"] / "run"), w["data"]], {}),
        "eval-data-not-packed": (["eval", w["ckpt"], w["jsonl"]], {}),
        "eval-reference-missing": (["eval", w["ckpt"], w["data"], "--reference", "/nonexistent/ref"], {}),
        "convert-ckpt-hf-folder": (["convert", "mcore-to-hf", "--ckpt", str(w["root"] / "hf"), "--out",
                                    str(w["root"] / "out")], {}),
        "convert-hf-is-mcore": (["convert", "hf-to-mcore", "--hf", w["ckpt"], "--out", str(w["root"] / "out")], {}),
    }
    return table


def _snapshot(root: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _run_main(argv: list[str], env: dict, monkeypatch, capsys) -> tuple[int, str, str]:
    with monkeypatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse
            code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_table_has_a_scenario_per_row_and_enough_rows(ws):
    ids = [row["id"] for row in ROWS]
    assert len(ids) >= 25 and len(set(ids)) == len(ids)
    assert all(row["setting"] and row["says"] and row["fix"] for row in ROWS)  # an empty cell would match any line
    assert sorted(scenarios(ws)) == sorted(ids)  # a row without a scenario, or a scenario without a row, fails
    commands = {scenario(row_id, ws)[0][0] for row_id in ids}
    assert commands == {"train", "ref-logps", "eval", "convert"}


@pytest.mark.parametrize("row", ROWS, ids=[row["id"] for row in ROWS])
def test_each_mistake_gives_one_line_and_writes_nothing(row, ws, monkeypatch, capsys):
    argv, env = scenario(row["id"], ws)
    before = _snapshot(ws["root"])
    code, out, err = _run_main(argv, env, monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert row["setting"] in lines[0] and row["says"] in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert _snapshot(ws["root"]) == before


def test_a_good_config_passes_the_check(ws, monkeypatch, capsys):
    """The baseline of every row passes (so each row fails for its planted mistake); --check starts no worker."""
    code, out, err = _run_main(["train", str(TINY_CONF), *_base(ws), "--check"], {}, monkeypatch, capsys)
    assert (code, err) == (0, "") and "start-up check passed for 1 process" in out
    code, out, err = _run_main(["train", str(TINY_CONF), *_base(ws), "parallel=tp2", "--check"],
                               {"WORLD_SIZE": "2", "RANK": "0"}, monkeypatch, capsys)
    assert (code, err) == (0, "") and "for 2 process" in out
    assert not (ws["root"] / "fresh_run").exists()
    code, out, err = _run_main(["ref-logps", str(TINY_CONF), *_base(ws), "parallel.tp=2", "--check"],
                               {"WORLD_SIZE": "2", "RANK": "0"}, monkeypatch, capsys)
    assert (code, err) == (0, ""), err  # MoE at tp=2 without SP: megatron refuses it in training only


def test_a_layout_change_resumes_with_a_note_and_a_breaking_one_when_asked(ws, monkeypatch, capsys):
    run = [f"logging.run_dir={ws['root'] / 'run'}", "optim.lr=1e-4"]
    code, out, err = _run_main(["train", str(TINY_CONF), *_base(ws), *run, "parallel=tp2", "--check"],
                               {"WORLD_SIZE": "2", "RANK": "0"}, monkeypatch, capsys)
    assert code == 0 and "parallel.tp 1 -> 2" in out, out + err
    code, out, err = _run_main(["train", str(TINY_CONF), *_base(ws), *run, "optim.lr=3e-4",
                                "checkpoint.resume_despite_changes=true", "--check"], {}, monkeypatch, capsys)
    assert code == 0 and "optim.lr 0.0001 -> 0.0003 (not applied: the LR schedule is the checkpoint's)" in out, err
    code, out, err = _run_main(["train", str(TINY_CONF), *_base(ws), *run, "optim.lr=3e-4", "checkpoint.resume=false",
                                "--check"], {}, monkeypatch, capsys)
    assert code == 0 and "starting fresh" in out, out + err


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600, **kwargs)


def test_the_issue_examples_in_a_real_process(ws):
    """``data.train_prefix=/nonexistent/x`` on 1 process: one line and exit 2 (it was a 26-line rank-0 traceback)."""
    proc = _cli("-m", "nemo_lpo.cli", "train", str(TINY_CONF), "data.train_prefix=/nonexistent/x",
                f"logging.run_dir={ws['root'] / 'fresh_run'}")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nemo-lpo train: ") and "data.train_prefix" in lines[0], lines


def test_under_torchrun_the_line_comes_once(ws):
    """Two ranks, parallel.tp=3: rank 0's line once; rank 1 waits in the process group and torchrun stops it."""
    proc = _cli("-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
                f"--master-port={free_port()}", "-m", "nemo_lpo.cli", "train", str(TINY_CONF), *_base(ws),
                "parallel.tp=3")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert output.count("parallel.tp=3: tp*pp = 3*1 does not divide the 2 process(es)") == 1, output[-3000:]
    assert "[rank1]" not in output and "[rank0]" not in output


def _worker_failure(argv, monkeypatch, capsys) -> tuple[int, str]:
    code, out, err = _run_main(argv, {}, monkeypatch, capsys)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return code, lines[0]


def test_a_shard_that_cannot_be_read_is_one_line_with_rank_and_stage(ws, tmp_path, monkeypatch, capsys):
    """A truncated shard passes the start-up check (the file is there) and fails the rank that loads it."""
    broken = Path(shutil.copytree(ws["ckpt"], tmp_path / "broken"))
    shard = next(broken.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:64])
    run = tmp_path / "run"
    code, line = _worker_failure(["train", str(TINY_CONF), *_base(ws), f"model.init_checkpoint={broken}",
                                  "reference.mode=online", f"logging.run_dir={run}"], monkeypatch, capsys)
    assert code == 1 and line.startswith("nemo-lpo train: rank 0, start-up: CheckpointException: reading the "
                                         "checkpoint failed on rank 0: "), line
    log = run / "logs" / "rank0.error.log"
    assert str(log) in line and "Traceback" in log.read_text()


def test_a_nan_loss_stops_the_run_in_one_line_before_it_is_saved(ws, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    code, line = _worker_failure(["train", str(TINY_CONF), *_base(ws), f"logging.run_dir={run}", "optim.lr=1e30",
                                  "optim.warmup_steps=0", "train.max_steps=4", "checkpoint.save_interval=1"],
                                 monkeypatch, capsys)
    assert code == 1 and re.match(r"nemo-lpo train: rank 0, step \d: NonFiniteLoss: the loss is (nan|inf)", line), line
    failed_step = int(re.search(r"step (\d)", line).group(1))
    saved = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert saved == [f"step_{s:07d}" for s in range(1, failed_step)]  # every finite step, not the NaN one
    assert "optim.lr" in line


def test_worker_errors_are_printed_once_by_the_rank_that_should(tmp_path, capsys):
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    mark(oom, "step 7")
    assert report_worker_error(oom, "train", tmp_path, 3, verbose=False) == 1
    err = capsys.readouterr().err
    assert err.startswith("nemo-lpo train: rank 3, step 7: OutOfMemoryError: CUDA out of memory") and \
        "data.micro_batch_size" in err and err.count("\n") == 1
    assert "OutOfMemoryError" in (tmp_path / "logs" / "rank3.error.log").read_text()
    for error in (NonFiniteLoss("the loss is nan"), RuntimeError("[gloo] Connection closed by peer [127.0.0.1]")):
        assert report_worker_error(error, "train", tmp_path, 1, verbose=False) == 1
        assert capsys.readouterr().err == ""  # rank 0 says it
    shard = CheckpointException("read_data", {2: (EOFError("Ran out of input"), traceback.StackSummary())})
    assert report_worker_error(shard, "train", tmp_path, 0, verbose=False) == 1
    assert capsys.readouterr().err == ""  # every rank raises it; rank 2, which failed, says it
    report_worker_error(shard, "train", tmp_path, 2, verbose=False)
    assert "rank 2, start-up: CheckpointException: reading the checkpoint failed on rank 2: EOFError" in \
        capsys.readouterr().err
    try:
        raise RuntimeError("[gloo] Connection closed by peer")
    except RuntimeError as raised:
        report_worker_error(raised, "train", tmp_path, 0, verbose=True)
    err = capsys.readouterr().err
    assert "Traceback" in err and "lost contact with another rank" in err.splitlines()[-1]


def test_the_checkpoint_size_estimate_counts_every_parameter():
    """The run-folder room check's parameter count: the published sizes of Mixtral-8x7B and Mistral-7B."""
    from nemo_lpo.model.presets import get_preset
    from nemo_lpo.train.flops import parameter_count

    assert parameter_count(get_preset("mixtral-8x7b")) == 46_702_792_704  # "46.7B total parameters"
    assert parameter_count(get_preset("mistral-7b")) == 7_241_732_096  # HF model card: 7.24B


def test_ref_logps_records_its_checkpoint_and_training_accepts_it(ws, tmp_path, monkeypatch, capsys):
    """The sidecar written by `nemo-lpo ref-logps` records the reference's absolute path; the check compares it."""
    data = _copy_dataset(ws["data"], tmp_path / "train")
    args = ["ref-logps", str(TINY_CONF), *_base(ws), f"data.train_prefix={data}", f"logging.run_dir={tmp_path / 'r'}"]
    code, out, err = _run_main(args, {}, monkeypatch, capsys)
    assert code == 0, err
    meta = ListwiseDataset(data).ref_meta
    assert meta["checkpoint_path"] == str(Path(ws["ckpt"]).resolve())
    code, out, err = _run_main(["train", str(TINY_CONF), *_base(ws), f"data.train_prefix={data}", "--check"], {},
                               monkeypatch, capsys)
    assert code == 0 and err == "", err
    code, out, err = _run_main(["train", str(TINY_CONF), *_base(ws), f"data.train_prefix={data}",
                                f"model.init_checkpoint={ws['other']}", "--check"], {}, monkeypatch, capsys)
    assert code == 2 and f"were made by {Path(ws['ckpt']).resolve()}" in err, err


def test_only_a_raised_max_steps_past_the_saved_decay_is_named():
    """A run set to decay early (optim.decay_steps < max_steps) resumes as it was; raising max_steps is named."""
    from nemo_lpo.config import load_config
    from nemo_lpo.train.resume_check import _past_the_schedule

    cfg = load_config(TINY_CONF, ["train.max_steps=40"])
    schedule = {"lr_decay_steps": 10, "lr_decay_style": "cosine", "min_lr": 0.0}
    assert "reaches optim.min_lr=0.0 at step 10" in _past_the_schedule(cfg, {"train": {"max_steps": 20}}, schedule)
    assert _past_the_schedule(cfg, {"train": {"max_steps": 40}}, schedule) is None
    assert _past_the_schedule(cfg, {"train": {"max_steps": 20}}, {**schedule, "lr_decay_style": "constant"}) is None


def test_raised_epochs_past_the_saved_decay_are_named():
    """max_steps null: more epochs than saved run past a decay that ended at the saved run's last step."""
    from nemo_lpo.config import load_config
    from nemo_lpo.train.resume_check import _past_the_schedule

    cfg = load_config(TINY_CONF, ["train.max_steps=null", "train.epochs=3"])
    schedule = {"lr_decay_steps": 10, "lr_decay_style": "cosine", "min_lr": 0.0}  # 1 epoch = 10 steps when saved
    saved = {"train": {"max_steps": None, "epochs": 1}, "optim": {"decay_steps": None}}
    note = _past_the_schedule(cfg, saved, schedule)
    assert "train.epochs=3 (30 steps; 1 when saved)" in note and "min_lr=0.0 at step 10" in note
    assert _past_the_schedule(cfg, {**saved, "train": {"max_steps": None, "epochs": 3}}, schedule) is None
    assert _past_the_schedule(cfg, {**saved, "optim": {"decay_steps": 10}}, schedule) is None  # decays early by design
    fewer = load_config(TINY_CONF, ["train.max_steps=null", "train.epochs=1"])
    assert _past_the_schedule(fewer, {**saved, "train": {"max_steps": None, "epochs": 2}}, schedule) is None

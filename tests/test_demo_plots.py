"""Training plots from a synthetic metrics JSONL."""

from __future__ import annotations

import json

import pytest

from nemo_lpo.demo import plots


def _write(path, lines):
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


def test_plot_training_writes_pngs(tmp_path):
    recs = [{"run": "header"}]  # a non-training line is skipped
    for step in range(12, 0, -1):  # out of order on purpose
        recs.append({"step": step, "loss": 0.7 - 0.02 * step, "rewards/accuracies": 0.5 + 0.03 * step,
                     "logps/chosen": -20 + step, "logps/rejected": -20 - step})
    path = _write(tmp_path / "metrics.jsonl", recs)
    records, skipped = plots.read_metrics(path)
    assert skipped == 1 and [r["step"] for r in records] == list(range(1, 13))
    assert plots.series(records, "logps/rejected")[1][:2] == [-21.0, -22.0]
    written = plots.plot_training(path, tmp_path / "plots")
    assert sorted(p.name for p in written) == ["logps.png", "loss.png", "rewards_accuracies.png"]
    for p in written:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not list((tmp_path / "plots").glob(".*"))  # no temp files left behind


def test_missing_metric_is_left_out_and_nan_skipped(tmp_path):
    path = _write(tmp_path / "m.jsonl", [{"step": i, "loss": float("nan") if i == 2 else 1.0 / i} for i in range(1, 5)])
    written = plots.plot_training(path, tmp_path)
    assert [p.name for p in written] == ["loss.png"]
    assert plots.series(plots.read_metrics(path)[0], "loss")[0] == [1, 3, 4]


def test_bad_input_names_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [{"step": 1, "loss": 1.0}, "{not json"])
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        plots.read_metrics(path)
    empty = _write(tmp_path / "empty.jsonl", [{"note": "no steps"}])
    with pytest.raises(ValueError, match="no training records"):
        plots.plot_training(empty, tmp_path)


def test_validation_curve_is_drawn_beside_the_training_curve(tmp_path):
    train = [{"step": s, "loss": 1.0 / s, "rewards/accuracies": 0.5} for s in range(1, 9)]
    with_val = [{"step": 0, "val/loss": 1.2}] + [dict(r, **({"val/loss": 1.1 - 0.01 * r["step"]}
                                                          if r["step"] % 4 == 0 else {})) for r in train]
    records, _ = plots.read_metrics(_write(tmp_path / "val.jsonl", with_val))
    assert plots.series(records, "val/loss") == ([0, 4, 8], [1.2, 1.06, 1.02])
    assert plots.series(records, "loss")[0] == list(range(1, 9))  # the step-0 line has no training loss
    drawn = plots.plot_training(tmp_path / "val.jsonl", tmp_path / "with")
    plain = plots.plot_training(_write(tmp_path / "train.jsonl", train), tmp_path / "without")
    assert [p.name for p in drawn] == [p.name for p in plain] == ["loss.png", "rewards_accuracies.png"]
    assert (tmp_path / "with" / "loss.png").read_bytes() != (tmp_path / "without" / "loss.png").read_bytes()

"""Bad input: by default stop with ``file:line: reason`` and write nothing; with skip_invalid count per reason."""

import json

import pytest

from nemo_lpo.cli import main
from nemo_lpo.data import ListwiseDataset
from nemo_lpo.data.pack import PackConfig, PackError, pack


def good(i: int, k: int = 3) -> bytes:
    record = {"id": f"g{i}", "prompt": f"Question number {i}?",
              "responses": [{"text": f"Answer {j} to {i}.", "reward": float(j)} for j in range(k)]}
    return json.dumps(record).encode()


# name -> (bad line, reason of the skipped list, responses skipped by reason)
BAD_LINES = {
    "malformed_json": (b'{"id": "x", "prompt": "p", "responses": [', "malformed_json", {}),
    "missing_field": (b'{"id": "x", "prompt": "p"}', "missing_field", {}),
    "non_numeric_reward": (b'{"prompt": "p", "responses": [{"text": "a", "reward": "high"}, {"text": "b", "reward": 1}]}',
                           "too_few_responses", {"bad_reward": 1}),
    "nan_reward": (b'{"prompt": "p", "responses": [{"text": "a", "reward": NaN}, {"text": "b", "reward": 1}]}',
                   "too_few_responses", {"bad_reward": 1}),
    "inf_reward": (b'{"prompt": "p", "responses": [{"text": "a", "reward": 1e999}, {"text": "b", "reward": 1}]}',
                   "too_few_responses", {"bad_reward": 1}),
    "one_response": (b'{"prompt": "p", "responses": [{"text": "a", "reward": 1}]}', "too_few_responses", {}),
    "empty_response": (b'{"prompt": "p", "responses": [{"text": "  ", "reward": 1}, {"text": "b", "reward": 0}]}',
                       "too_few_responses", {"empty_response": 1}),
    "invalid_utf8": (b'{"prompt": "caf\xe9", "responses": []}', "invalid_utf8", {}),
    "duplicate_id": (good(3), "duplicate_id", {}),
}
BAD_LINE_NUMBER = 40  # after the first chunk of 32 lists has already been tokenised and written


def write_input(tmp_path, bad: bytes):
    lines = [good(i) for i in range(45)]
    lines.insert(BAD_LINE_NUMBER - 1, bad)
    src = tmp_path / "input.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    return src


# 2 workers: the workers parse and validate, the reading process checks ids and counts in order
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_default_stops_at_file_line_and_writes_nothing(case, workers, tmp_path, capsys):
    bad, _, response_reasons = BAD_LINES[case]
    src = write_input(tmp_path, bad)
    out_dir = tmp_path / "out"
    code = main(["pack", "--input", str(src), "--output-prefix", str(out_dir / "ds"), "--no-progress",
                 "--workers", str(workers)])
    assert code == 1
    err = capsys.readouterr().err
    first_reason = next(iter(response_reasons), BAD_LINES[case][1])
    if case == "duplicate_id":
        assert f"{src}:{BAD_LINE_NUMBER}: duplicate_id: duplicate id 'g3' (first at {src}:4)" in err
    else:
        assert f"{src}:{BAD_LINE_NUMBER}: {first_reason}" in err
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_skip_invalid_counts_per_reason(case, workers, tmp_path):
    bad, list_reason, response_reasons = BAD_LINES[case]
    src = write_input(tmp_path, bad)
    prefix = tmp_path / "out" / "ds"
    manifest = pack(PackConfig(inputs=[str(src)], output_prefix=str(prefix), skip_invalid=True, workers=workers),
                    log=lambda m: None)
    counts = manifest["counts"]
    assert counts["skipped"] == {list_reason: 1}
    assert counts["responses_skipped"] == response_reasons
    assert counts["lists_read"] == 46 == counts["lists_written"] + counts["lists_skipped"]
    assert len(ListwiseDataset(prefix)) == 45


def test_skip_invalid_keeps_a_list_that_still_has_two_responses(tmp_path):
    src = tmp_path / "in.jsonl"
    record = {"prompt": "p", "responses": [{"text": "a", "reward": 2}, {"text": "", "reward": 1},
                                           {"text": "c", "reward": "n/a"}, {"text": "d", "reward": 0}]}
    src.write_text(json.dumps(record) + "\n" + good(1).decode() + "\n")
    manifest = pack(PackConfig(inputs=[str(src)], output_prefix=str(tmp_path / "ds"), skip_invalid=True),
                    log=lambda m: None)
    assert manifest["counts"]["responses_skipped"] == {"bad_reward": 1, "empty_response": 1}
    assert manifest["counts"]["skipped"] == {}
    assert ListwiseDataset(tmp_path / "ds")[0]["rewards"].tolist() == [2.0, 0.0]


def test_failed_repack_leaves_the_previous_dataset_intact(tmp_path):
    prefix = tmp_path / "ds"
    src = write_input(tmp_path, good(100))
    pack(PackConfig(inputs=[str(src)], output_prefix=str(prefix)), log=lambda m: None)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("ds.")}
    bad_src = tmp_path / "bad.jsonl"
    bad_src.write_bytes(good(1) + b"\n{oops\n")
    with pytest.raises(PackError, match=r"bad\.jsonl:2: malformed_json"):
        pack(PackConfig(inputs=[str(bad_src)], output_prefix=str(prefix)), log=lambda m: None)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith(("ds.", ".ds."))}
    assert after == before


def test_nothing_usable_is_an_error(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"prompt": "p", "responses": []}\n')
    with pytest.raises(PackError, match="no list left"):
        pack(PackConfig(inputs=[str(src)], output_prefix=str(tmp_path / "ds"), skip_invalid=True), log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_skipped_record_leaves_the_other_lists_random_choices_unchanged(workers, tmp_path):
    """Choices are seeded by the record's position in the input, not by how many valid lists preceded it."""
    fixed = [good(i, k=6) for i in range(40)]
    broken = list(fixed)
    broken[5] = BAD_LINES["nan_reward"][0]
    written = {}
    for name, lines in (("fixed", fixed), ("broken", broken)):
        src = tmp_path / f"{name}.jsonl"
        src.write_bytes(b"\n".join(lines) + b"\n")
        pack(PackConfig(inputs=[str(src)], output_prefix=str(tmp_path / name / "ds"), max_k=3, skip_invalid=True,
                        workers=workers), log=lambda m: None)
        ds = ListwiseDataset(tmp_path / name / "ds")
        written[name] = [[r.tolist() for r in ds[i]["response_ids"]] for i in range(len(ds))]
    assert len(written["broken"]) == len(written["fixed"]) - 1
    assert written["broken"] == written["fixed"][:5] + written["fixed"][6:]
    # and the choices do differ between lists (the test would pass vacuously if max-K kept a fixed subset)
    assert len({tuple(map(tuple, lst[1:])) for lst in written["fixed"]}) > 1

"""Input edge cases: a UTF-8 BOM and CRLF line ends, a truncated gzip, lists whose rewards all tie."""

import codecs
import gzip
import json
import zlib

import pytest

from nemo_lpo.cli import main
from nemo_lpo.data.pack import PackConfig, pack
from tests.test_data_badinput import good

N_GOOD = 45  # more than one chunk of 32 lists: the edge cases must hold across chunks and workers


def tied(i: int, k: int = 3) -> bytes:
    record = {"id": f"t{i}", "prompt": f"Tied question {i}?",
              "responses": [{"text": f"Tied answer {j} to {i}.", "reward": 2.5} for j in range(k)]}
    return json.dumps(record).encode()


def written_bytes(prefix) -> dict:
    """The .bin / .idx bytes of a packed dataset by file suffix (the manifest names its inputs, so it differs)."""
    return {p.name[len(prefix.name):]: p.read_bytes() for p in prefix.parent.iterdir()
            if p.name.startswith(prefix.name + ".") and p.suffix in (".bin", ".idx")}


def pack_quietly(src, prefix, **kwargs) -> dict:
    return pack(PackConfig(inputs=[str(src)], output_prefix=str(prefix), **kwargs), log=lambda m: None)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_bom_and_crlf_give_the_same_dataset_as_plain_lf(suffix, workers, tmp_path):
    lines = [good(i) for i in range(N_GOOD)]
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(b"\n".join(lines) + b"\n")
    windows = tmp_path / f"windows{suffix}"
    data = codecs.BOM_UTF8 + b"\r\n".join(lines) + b"\r\n\r\n"  # a trailing blank CRLF line too
    windows.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    expected = pack_quietly(plain, tmp_path / "a" / "ds", workers=workers)
    got = pack_quietly(windows, tmp_path / "b" / "ds", workers=workers)  # format auto: the BOM line is sniffed
    assert got["inputs"][0]["format"] == "listwise" and got["counts"]["lists_read"] == N_GOOD
    assert got["counts"] == expected["counts"]
    assert written_bytes(tmp_path / "b" / "ds") == written_bytes(tmp_path / "a" / "ds") != {}


def complete_lines_in(truncated_gz: bytes) -> int:
    """Lines a reader can get out of a cut gzip member: decompress what is there (zlib, gzip header: wbits 31)."""
    return zlib.decompressobj(31).decompress(truncated_gz).count(b"\n")


@pytest.mark.parametrize(("workers", "progress"), [(1, False), (2, False), (1, True)])
def test_truncated_gzip_names_the_last_line_and_writes_nothing(workers, progress, tmp_path, capsys):
    whole = gzip.compress(b"\n".join(good(i) for i in range(N_GOOD)) + b"\n")
    cut = whole[:-30]  # the 8-byte trailer and the end of the deflate stream
    src = tmp_path / "cut.jsonl.gz"
    src.write_bytes(cut)
    n = complete_lines_in(cut)
    assert 32 < n < N_GOOD  # a first chunk was already processed when the stream ends
    out_dir = tmp_path / "out"
    argv = ["pack", "--input", str(src), "--output-prefix", str(out_dir / "ds"), "--workers", str(workers)]
    assert main(argv + ([] if progress else ["--no-progress"])) == 1  # progress: the count pass meets it first
    assert f"nemo-lpo pack: error: {src}: truncated gzip stream after line {n}\n" in capsys.readouterr().err
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


TIED_AT = (3, 33, 40)  # line numbers (1-based) of the lists whose rewards all tie


def input_with_ties(tmp_path):
    lines = [good(i) for i in range(N_GOOD)]
    for at in TIED_AT:
        lines.insert(at - 1, tied(at))
    # two equal rewards out of three still give ordered pairs: not a tied list
    lines.append(json.dumps({"prompt": "p", "responses": [{"text": "a", "reward": 1}, {"text": "b", "reward": 1},
                                                          {"text": "c", "reward": 0}]}).encode())
    src = tmp_path / "ties.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    return src, lines


@pytest.mark.parametrize("workers", [1, 2])
def test_tied_lists_are_kept_and_counted(workers, tmp_path):
    src, lines = input_with_ties(tmp_path)
    messages = []
    manifest = pack(PackConfig(inputs=[str(src)], output_prefix=str(tmp_path / "ds"), workers=workers),
                    log=messages.append)
    counts = manifest["counts"]
    assert counts["tied_lists"] == 3 and counts["lists_written"] == len(lines) and counts["skipped"] == {}
    assert manifest["options"]["drop_tied"] is False
    assert any(m.startswith("kept 3 lists whose rewards all tie") for m in messages)


@pytest.mark.parametrize("workers", [1, 2])
def test_drop_tied_skips_them_as_a_counted_reason(workers, tmp_path, capsys):
    src, lines = input_with_ties(tmp_path)
    prefix = tmp_path / "dropped" / "ds"
    code = main(["pack", "--input", str(src), "--output-prefix", str(prefix), "--drop-tied", "--no-progress",
                 "--workers", str(workers)])  # not --skip-invalid: a drop asked for is not an error
    assert code == 0
    assert "skipped lists by reason: {'tied_rewards': 3}" in capsys.readouterr().err
    manifest = json.loads(prefix.with_name("ds.manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["skipped"] == {"tied_rewards": 3} and counts["tied_lists"] == 0
    assert counts["lists_read"] == len(lines) == counts["lists_written"] + counts["lists_skipped"]
    untied = tmp_path / "untied.jsonl"
    untied.write_bytes(b"\n".join(line for line in lines if b'"id": "t' not in line) + b"\n")
    pack_quietly(untied, tmp_path / "untied" / "ds")
    assert written_bytes(prefix) == written_bytes(tmp_path / "untied" / "ds")

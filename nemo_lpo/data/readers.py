"""Readers: raw records of every supported format → ``ListwiseExample``.

JSONL files (optionally ``.gz``) are read line by line by this module, so that every bad record is
reported as ``file:line``; ``.json`` / ``.parquet`` files, dataset directories in the Hub's layout and hub
dataset names go through HF ``datasets`` (their rows are reported as ``input:N``, N counting rows from 1).
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator

import datasets

from nemo_lpo.data.examples import (
    INVALID_UTF8,
    MALFORMED_JSON,
    MISSING_FIELD,
    InvalidRecord,
    ListwiseExample,
)

MISMATCHED_PROMPT = "mismatched_prompt"
# What a hub dataset id looks like ("name" or "owner/name"); anything else that does not exist is a missing file.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_DATA_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".gz")


class InputError(ValueError):
    """An input file that cannot be read to its end (a truncated or corrupt gzip stream); not skippable."""


class DatasetLoadError(ValueError):
    """A dataset directory or hub dataset that HF ``datasets`` cannot load (the message names the input)."""


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One ``--input``: a data file, a dataset directory in the Hub's layout, or a hub dataset name.

    Attributes:
        path: the file, the directory or the hub name, without the selection.
        kind: ``file``, ``dataset_dir`` or ``hub``.
        config: the dataset's config (subset) or None for its default.
        split: the split, or None: the only one, else ``train``.
    """

    path: str
    kind: str
    config: str | None = None
    split: str | None = None


def parse_input(name: str, config: str | None = None, split: str | None = None) -> InputSpec:
    """Resolve an input: ``PATH`` (file or dataset directory), or ``NAME:SPLIT`` / ``NAME:CONFIG:SPLIT``.

    ``NAME`` is a local dataset directory in the Hub's layout or a hub dataset name; ``config`` / ``split``
    given here win over those in the name.

    Raises:
        FileNotFoundError: neither an existing file or directory nor something that can be a hub name.
        ValueError: a selection given with a file, or too many ``:`` parts.
    """
    name = os.fspath(name)
    base = name
    if not os.path.exists(name) and ":" in name:
        base, *selection = name.split(":")
        if len(selection) > 2:
            raise ValueError(f"{name}: expected PATH, NAME:SPLIT or NAME:CONFIG:SPLIT")
        config = config or (selection[0] if len(selection) == 2 else None) or None
        split = split or selection[-1] or None
    if os.path.isdir(base):
        return InputSpec(base, "dataset_dir", config, split)
    if os.path.exists(base):
        if config or split:
            raise ValueError(f"{name}: a config or split selects from a dataset directory or hub name, not a file")
        return InputSpec(base, "file")
    if _HUB_NAME.fullmatch(base) and not base.endswith(_DATA_FILE_SUFFIXES):
        return InputSpec(base, "hub", config, split)
    raise FileNotFoundError(f"{name}: no such input file or dataset directory")


def _load_named_dataset(spec: InputSpec, name: str):
    """Load a dataset directory or hub dataset with HF ``datasets`` (the same call for both)."""
    try:
        split = spec.split
        if split is None:
            names = datasets.get_dataset_split_names(spec.path, spec.config)
            if len(names) != 1 and "train" not in names:
                raise ValueError(f"it has splits {names}; choose one with {spec.path}:SPLIT")
            split = names[0] if len(names) == 1 else "train"
        return datasets.load_dataset(spec.path, spec.config, split=split)
    except (OSError, ValueError) as err:  # unreachable / unknown dataset (OSError), unknown config or split
        where = ("local dataset directory" if spec.kind == "dataset_dir"
                 else "not a local file or directory; as a hub dataset")
        raise DatasetLoadError(f"{name}: {where}: cannot be loaded: {err}") from None


def iter_records(path: str, config: str | None = None, split: str | None = None,
                 raw: bool = False) -> Iterator[tuple[int, dict | InvalidRecord | bytes]]:
    """Yield ``(line or row number, record)`` for every record of an input; unreadable ones as InvalidRecord.

    Args:
        path: a data file, or a dataset directory / hub name with an optional selection (``parse_input``).
        config: the dataset config (subset) to read, overriding the one in ``path``.
        split: the split to read, overriding the one in ``path``.
        raw: yield JSONL lines as their bytes, unparsed (``parse_line`` parses one), so that parsing can
            happen in the pack's worker processes; rows of other inputs come parsed either way.

    Raises:
        FileNotFoundError: no such file, and not a hub name.
        DatasetLoadError: the dataset directory or hub dataset cannot be loaded (e.g. offline).
    """
    spec = parse_input(path, config, split)
    name = spec.path
    if spec.kind == "file" and (name.endswith((".jsonl", ".jsonl.gz", ".ndjson"))
                                or (name.endswith(".gz") and ".json" in name)):
        yield from _iter_jsonl(name, raw)
        return
    if spec.kind == "file":
        kind = "parquet" if name.endswith(".parquet") else "json"
        table = datasets.load_dataset(kind, data_files=name, split="train")
    else:
        table = _load_named_dataset(spec, os.fspath(path))
    yield from enumerate(table, start=1)


def iter_lines(name: str) -> Iterator[tuple[int, bytes]]:
    """``(line number, line)`` of a JSONL file, ``.gz`` decompressed, a UTF-8 BOM before line 1 removed.

    CRLF line ends need nothing: CR is JSON whitespace, and a line of CR LF is blank.

    Raises:
        InputError: a ``.gz`` that ends before its end-of-stream marker or is corrupt, naming the last line read.
    """
    opener = gzip.open if name.endswith(".gz") else open
    number = 0
    try:
        with opener(name, "rb") as f:
            for number, line in enumerate(f, start=1):
                if number == 1 and line.startswith(codecs.BOM_UTF8):  # editors on Windows write one
                    line = line[len(codecs.BOM_UTF8):]
                yield number, line
    except EOFError:  # gzip: "Compressed file ended before the end-of-stream marker was reached"
        raise InputError(f"{name}: truncated gzip stream after line {number}") from None
    except (gzip.BadGzipFile, zlib.error) as err:
        raise InputError(f"{name}: corrupt gzip stream after line {number}: {err}") from None


def _iter_jsonl(name: str, raw: bool) -> Iterator[tuple[int, dict | InvalidRecord | bytes]]:
    for number, line in iter_lines(name):
        if line.strip():  # blank lines are not records
            yield number, line if raw else parse_line(line)


def parse_line(line: bytes) -> dict | InvalidRecord:
    """One JSONL line as its JSON object, or the InvalidRecord saying why it is not one."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return InvalidRecord(INVALID_UTF8, f"invalid UTF-8 at byte {err.start}")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        return InvalidRecord(MALFORMED_JSON, f"malformed JSON: {err.msg} (column {err.colno})")
    if not isinstance(record, dict):
        return InvalidRecord(MALFORMED_JSON, f"expected a JSON object, got {type(record).__name__}")
    return record


def _field(record: dict, key: str):
    value = record.get(key)
    if value is None:
        raise InvalidRecord(MISSING_FIELD, f"missing field {key!r}")
    return value


def _text(value, key: str) -> str:
    if not isinstance(value, str):
        raise InvalidRecord(MISSING_FIELD, f"field {key!r} is not a string")
    return value


def _messages(value, key: str) -> list[dict]:
    """Normalise chat messages (``role``/``content`` or ShareGPT-like ``from``/``value``)."""
    if not isinstance(value, list) or not value:
        raise InvalidRecord(MISSING_FIELD, f"field {key!r} is not a non-empty list of messages")
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    out = []
    for m in value:
        if not isinstance(m, dict):
            raise InvalidRecord(MISSING_FIELD, f"field {key!r}: message is not an object")
        role = roles.get(str(m.get("role", m.get("from", ""))).lower())
        content = m.get("content", m.get("value"))
        if role is None or not isinstance(content, str):
            raise InvalidRecord(MISSING_FIELD, f"field {key!r}: message without a known role and string content")
        out.append({"role": role, "content": content})
    return out


def _split_conversation(messages: list[dict], key: str) -> tuple[list[dict], str]:
    """Split ``[..., user, assistant]`` into (prompt turns, final assistant text)."""
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise InvalidRecord(MISSING_FIELD, f"field {key!r}: conversation does not end with an assistant turn")
    return messages[:-1], messages[-1]["content"]


def _response(value, key: str) -> tuple[list[dict] | None, str]:
    """A response given as plain text or as a conversation ending with the assistant turn."""
    if isinstance(value, str):
        return None, value
    if value is None:
        raise InvalidRecord(MISSING_FIELD, f"missing field {key!r}")
    return _split_conversation(_messages(value, key), key)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _pair(prompt: list[dict], chosen: str | list[dict], rejected: str | list[dict], rewards: list[float] | None, rid: str) -> ListwiseExample:
    if rewards is None:
        return ListwiseExample(prompt, [chosen, rejected], [1.0, 0.0], rid, reward_kind="order")
    return ListwiseExample(prompt, [chosen, rejected], rewards, rid)


def read_listwise(record: dict, rid: str) -> ListwiseExample:
    """``{"prompt" | "messages", "responses": [{"text" | "messages", "reward"}], "id"?}``."""
    prompt = _user(_text(record["prompt"], "prompt")) if "prompt" in record else _messages(
        _field(record, "messages"), "messages")
    responses = _field(record, "responses")
    if not isinstance(responses, list):
        raise InvalidRecord(MISSING_FIELD, "field 'responses' is not a list")
    texts, rewards = [], []
    for k, item in enumerate(responses):
        if not isinstance(item, dict):
            raise InvalidRecord(MISSING_FIELD, f"responses[{k}] is not an object")
        if "text" in item:
            texts.append(_text(item["text"], f"responses[{k}].text"))
        else:
            texts.append(_response(item.get("messages"), f"responses[{k}].messages")[1])
        rewards.append(item.get("reward"))  # checked per response by ListwiseExample.validate
    return ListwiseExample(prompt, texts, rewards, str(record.get("id", rid)))


ULTRAFEEDBACK_SCORES = ("overall", "fine_grained", "helpfulness", "honesty", "instruction_following", "truthfulness")


def make_ultrafeedback_reader(score: str = "overall") -> Callable[[dict, str], ListwiseExample]:
    """Reader of raw UltraFeedback (``instruction`` + ``completions``) using the chosen score."""
    if score not in ULTRAFEEDBACK_SCORES:
        raise ValueError(f"ultrafeedback score {score!r} not in {ULTRAFEEDBACK_SCORES}")

    def read_ultrafeedback(record: dict, rid: str) -> ListwiseExample:
        prompt = _user(_text(_field(record, "instruction"), "instruction"))
        completions = _field(record, "completions")
        texts, rewards = [], []
        for k, c in enumerate(completions):
            texts.append(_text(c.get("response"), f"completions[{k}].response"))
            if score == "overall":
                rewards.append(c.get("overall_score"))
            elif score == "fine_grained":
                rewards.append(c.get("fine-grained_score"))
            else:  # the aspect ratings are strings, "N/A" where the annotator gave none
                rewards.append(((c.get("annotations") or {}).get(score) or {}).get("Rating"))
        return ListwiseExample(prompt, texts, rewards, str(record.get("prompt_id", record.get("id", rid))))

    return read_ultrafeedback


def read_ultrafeedback_binarized(record: dict, rid: str) -> ListwiseExample:
    """HuggingFaceH4 (message lists) and trl-lib (plain strings or messages) variants, with scores."""
    chosen_prompt, chosen = _response(record.get("chosen"), "chosen")
    rejected_prompt, rejected = _response(record.get("rejected"), "rejected")
    if isinstance(record.get("prompt"), str) and chosen_prompt is None:
        prompt = _user(record["prompt"])
    elif chosen_prompt is not None:
        if rejected_prompt is not None and rejected_prompt != chosen_prompt:
            raise InvalidRecord(MISMATCHED_PROMPT, "chosen and rejected conversations have different prompts")
        prompt = chosen_prompt
    elif isinstance(record.get("prompt"), list):
        prompt = _messages(record["prompt"], "prompt")
    else:
        raise InvalidRecord(MISSING_FIELD, "missing field 'prompt'")
    scores = record if "score_chosen" in record else (record.get("metadata") or {})
    rewards = [scores.get("score_chosen"), scores.get("score_rejected")]
    rid = str(record.get("prompt_id", record.get("source_index", rid)))
    return _pair(prompt, chosen, rejected, rewards, rid)


def read_ultrainteract(record: dict, rid: str) -> ListwiseExample:
    """UltraInteract pairs: multi-turn ``trajectory`` prompt, ``chosen`` > ``rejected``."""
    prompt = _messages(_field(record, "trajectory"), "trajectory")
    if prompt[-1]["role"] != "user":
        raise InvalidRecord(MISSING_FIELD, "trajectory does not end with a user turn")
    chosen = _text(_field(record, "chosen"), "chosen")
    rejected = _text(_field(record, "rejected"), "rejected")
    return _pair(prompt, chosen, rejected, None, str(record.get("id", rid)))


def _hh_turns(transcript: str, key: str) -> list[dict]:
    r"""The turns of a ``\n\nHuman: … \n\nAssistant: …`` transcript.

    Consecutive turns of one speaker (a few transcripts have two ``Assistant:`` turns in a row) are merged
    into one, joined by a blank line: that is how mistral-common encodes them, and chat templates need the
    roles to alternate. ``Human:`` written inside a reply without the ``\n\n`` before it is text of that reply.
    """
    if not transcript.startswith("\n\nHuman:"):
        raise InvalidRecord(MISSING_FIELD, f"field {key!r} does not start with '\\n\\nHuman:'")
    turns = []
    for block in transcript.split("\n\nHuman:")[1:]:
        human, *assistants = block.split("\n\nAssistant:")
        for role, content in [("user", human), *(("assistant", a) for a in assistants)]:
            if turns and turns[-1]["role"] == role:
                turns[-1]["content"] = f"{turns[-1]['content']}\n\n{content.strip()}".strip()
            else:
                turns.append({"role": role, "content": content.strip()})
    if turns[-1]["role"] != "assistant":
        raise InvalidRecord(MISSING_FIELD, f"field {key!r} does not end with an Assistant turn")
    return turns


def read_hh_rlhf(record: dict, rid: str) -> ListwiseExample:
    """Anthropic HH-RLHF transcripts, split at their shared turns.

    The prompt is the longest run of turns both transcripts begin with, up to and including the last shared
    Human turn; each response is the rest of its transcript: usually the last reply alone (text), but a pair
    that differs earlier gets responses of several turns (messages: assistant, user, …, assistant). A pair
    whose first Human turns already differ has no prompt and is ``mismatched_prompt``.
    """
    chosen = _hh_turns(_text(_field(record, "chosen"), "chosen"), "chosen")
    rejected = _hh_turns(_text(_field(record, "rejected"), "rejected"), "rejected")
    same = 0
    while same < min(len(chosen), len(rejected)) and chosen[same] == rejected[same]:
        same += 1
    cut = next((j for j in range(same, 0, -1) if chosen[j - 1]["role"] == "user"), 0)
    if cut == 0:
        raise InvalidRecord(MISMATCHED_PROMPT, "chosen and rejected transcripts share no Human turn")
    responses = [rest[0]["content"] if len(rest) == 1 else rest for rest in (chosen[cut:], rejected[cut:])]
    return _pair(chosen[:cut], *responses, None, str(record.get("id", rid)))


def read_nemo_dpo(record: dict, rid: str) -> ListwiseExample:
    """NeMo-Aligner DPO jsonl: ``prompt``, ``chosen_response``, ``rejected_response``, optional rewards."""
    prompt = _user(_text(_field(record, "prompt"), "prompt"))
    chosen = _text(_field(record, "chosen_response"), "chosen_response")
    rejected = _text(_field(record, "rejected_response"), "rejected_response")
    rewards = None
    if "chosen_reward" in record or "rejected_reward" in record:
        rewards = [record.get("chosen_reward"), record.get("rejected_reward")]
    return _pair(prompt, chosen, rejected, rewards, str(record.get("id", rid)))


FORMATS = ("ultrafeedback", "ultrafeedback_binarized", "ultrainteract", "hh_rlhf", "nemo_dpo", "listwise")


def get_reader(fmt: str, ultrafeedback_score: str = "overall") -> Callable[[dict, str], ListwiseExample]:
    """Return the record → ListwiseExample function of ``fmt``."""
    readers = {"ultrafeedback_binarized": read_ultrafeedback_binarized, "ultrainteract": read_ultrainteract,
               "hh_rlhf": read_hh_rlhf, "nemo_dpo": read_nemo_dpo, "listwise": read_listwise}
    if fmt == "ultrafeedback":
        return make_ultrafeedback_reader(ultrafeedback_score)
    if fmt not in readers:
        raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")
    return readers[fmt]


def detect_format(record: dict) -> tuple[str, str]:
    """Guess the format of a record; returns (format, why) or raises ValueError."""
    keys = set(record)
    if "responses" in keys:
        return "listwise", "has 'responses'"
    if {"instruction", "completions"} <= keys:
        return "ultrafeedback", "has 'instruction' and 'completions'"
    if {"chosen_response", "rejected_response"} <= keys:
        return "nemo_dpo", "has 'chosen_response' and 'rejected_response'"
    if "trajectory" in keys and {"chosen", "rejected"} <= keys:
        return "ultrainteract", "has 'trajectory', 'chosen' and 'rejected'"
    if {"chosen", "rejected"} <= keys:
        chosen = record["chosen"]
        if "prompt" not in keys and isinstance(chosen, str) and chosen.startswith("\n\nHuman:"):
            return "hh_rlhf", "'chosen' is a '\\n\\nHuman:' transcript"
        return "ultrafeedback_binarized", "has 'chosen' and 'rejected' with a separate prompt or messages"
    raise ValueError(f"cannot detect the format from keys {sorted(keys)}")


def sniff_format(path: str, config: str | None = None, split: str | None = None) -> tuple[str, str]:
    """Detect the format of ``path`` from its first readable record; returns (format, explanation)."""
    for number, record in iter_records(path, config, split):
        if isinstance(record, dict):
            fmt, why = detect_format(record)
            return fmt, f"{path}:{number} {why}"
    raise ValueError(f"{path}: no readable record to detect the format from")

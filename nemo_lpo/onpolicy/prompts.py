"""The prompts to sample from: a prompts JSONL (``prompt`` or ``messages``) or the prompts of any format ``pack`` reads."""

from __future__ import annotations

import dataclasses

from nemo_lpo.data.examples import InvalidRecord
from nemo_lpo.data.readers import _messages, get_reader, iter_records, sniff_format


class PromptError(ValueError):
    """A prompts file that cannot be read (the message names the file and line)."""


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt to sample K responses for.

    Attributes:
        index: position in the input (0-based): its shard, its seed and its place in the output.
        id: the record's ``id`` (or ``FILE:LINE``), carried to the output lists.
        messages: chat messages ending with a user turn.
        source: ``file:line`` it was read from (for error messages).
    """

    index: int
    id: str
    messages: list[dict]
    source: str


def _prompt_record(record: dict, where: str) -> list[dict] | None:
    """The messages of a prompts-JSONL record (``prompt`` text or ``messages``), or None if it is not one."""
    if "responses" in record or not ({"prompt", "messages"} & set(record)):
        return None
    if isinstance(record.get("prompt"), str):
        messages = [{"role": "user", "content": record["prompt"]}]
    else:
        messages = _messages(record.get("messages"), "messages")
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise InvalidRecord("missing_field", "the prompt must end with a non-empty user turn")
    return messages


def read_prompts(path: str, fmt: str = "auto") -> list[Prompt]:
    """Every prompt of ``path`` in input order.

    A record with ``prompt`` (text) or ``messages`` and no ``responses`` is a prompt; anything else is read with
    ``pack``'s reader of ``fmt`` (``auto``: detected from the first record) and its prompt kept.

    Raises:
        PromptError: a bad record (``file:line: reason``), a duplicate id, or no prompt at all.
    """
    reader, prompts, seen = None, [], {}
    for number, record in iter_records(path):
        where = f"{path}:{number}"
        try:
            if isinstance(record, InvalidRecord):
                raise record
            messages = _prompt_record(record, where)
            if messages is None:
                if reader is None:
                    reader = get_reader(sniff_format(path)[0] if fmt == "auto" else fmt)
                messages = reader(record, where).prompt
            rid = str(record.get("id", where))
        except (InvalidRecord, ValueError, KeyError, TypeError) as err:
            raise PromptError(f"{where}: {getattr(err, 'message', err)}") from None
        if rid in seen:
            raise PromptError(f"{where}: duplicate id {rid!r} (first at {seen[rid]})")
        seen[rid] = where
        prompts.append(Prompt(len(prompts), rid, messages, where))
    if not prompts:
        raise PromptError(f"{path}: no prompts")
    return prompts


def prompt_text(messages: list[dict]) -> str:
    """The last user turn's text (what a reward function is given as the prompt)."""
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")

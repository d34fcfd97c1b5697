"""What a ``nemo-lpo pack`` worker does to one chunk of input records: parse, convert, validate, select, tokenise.

The main process only reads raw records (JSONL lines as bytes), checks ids for duplicates in input order and
writes; everything per record runs here, in the worker processes and in the main process alike
(``workers.ordered_map``), so that the main process's own share stays small as the worker count grows.
"""

from __future__ import annotations

import numpy as np

from nemo_lpo.data.examples import TIED_REWARDS, TOKENIZER_ERROR, TOO_LONG, InvalidRecord
from nemo_lpo.data.pack_config import PackConfig
from nemo_lpo.data.readers import get_reader, parse_line
from nemo_lpo.data.templates import load_tokenizer
from nemo_lpo.data.transforms import keep_indices, list_rng, pair_indices

_STATE = {}


def init(config: PackConfig) -> None:
    """Load the tokenizer for ``config``: before the pool forks, so that its processes inherit it."""
    _STATE["config"] = config
    _STATE["tokenizer"] = load_tokenizer(config.tokenizer, config.chat_template)
    _STATE["readers"] = {}


def tokenizer():
    """The tokenizer ``init`` loaded."""
    return _STATE["tokenizer"]


def _read(fmt: str, source: str, raw) -> tuple:
    """Parse, convert and validate one record: (example, responses dropped), or raises InvalidRecord."""
    config = _STATE["config"]
    record = parse_line(raw) if isinstance(raw, bytes) else raw
    if isinstance(record, InvalidRecord):
        raise record
    readers = _STATE["readers"]
    if fmt not in readers:
        readers[fmt] = get_reader(fmt, config.ultrafeedback_score)
    example = readers[fmt](record, source)  # the source is the id when the record has none
    example.source = source
    dropped = example.validate(config.skip_invalid)
    if config.drop_tied and _all_tied(example.rewards):
        raise InvalidRecord(TIED_REWARDS, f"all {len(example.rewards)} rewards are {example.rewards[0]:g} "
                                          f"(no ordered pair; --drop-tied)", dropped)
    return example, dropped


def _all_tied(rewards: list[float]) -> bool:
    """No strictly ordered pair: every reward equal (the validated rewards, before any conversion)."""
    return len(set(rewards)) == 1


def _selections(config: PackConfig, example, ordinal: int) -> tuple[list[list[int]], int]:
    """The response indices of every list written for ``example`` (pairs, max-K, or all), and the ties left out."""
    if config.pairs is not None:
        pairs, tied = pair_indices(example.rewards, config.pairs, list_rng(config.seed, ordinal))
        return [list(pair) for pair in pairs], tied
    if config.max_k is not None:
        return [keep_indices(example.rewards, config.max_k, list_rng(config.seed, ordinal))], 0
    return [list(range(len(example.responses)))], 0


def _finish(config: PackConfig, bos_id, rewards: list[float], prompt, responses) -> tuple:
    """Reward transform and length limits of one list to write: (ids, lengths, rewards, prompt cut, cuts)."""
    rewards = np.asarray(config.reward_transform(rewards), dtype=np.float32)
    limited = config.limits.apply(prompt, responses, bos_id)
    if limited is None:
        raise InvalidRecord(TOO_LONG, "exceeds the length limits (overflow policy 'drop' or no room)")
    prompt, responses, prompt_cut, response_cuts = limited
    lengths = [len(prompt), *map(len, responses)]
    ids = np.concatenate([prompt, *responses], dtype=np.int32)
    return ids, lengths, rewards, prompt_cut, response_cuts


def _encode_sequentially(config: PackConfig, tokenizer, example, selections: list[list[int]], verify: bool):
    """One list the batched encoding refused, list by list as before batching, for the same error (or result)."""
    encoded = []
    for keep in selections:
        rewards = [example.rewards[i] for i in keep]
        # the reward transform before the encoding: its error is the one reported when both fail
        config.reward_transform(rewards)
        prompt, responses = tokenizer.encode_list(example.prompt, [example.responses[i] for i in keep],
                                                  verify=verify)
        verify = False
        encoded.append(_finish(config, tokenizer.bos_id, rewards, prompt, responses))
    return encoded


def process_chunk(chunk: list) -> list:
    """Read and tokenise a chunk of ``(format, source, position, raw record)``, in order.

    Returns, per record, ``(kind, source, id, responses dropped, payload)``: kind "ok" with payload
    (encoded lists, tied pairs left out, whether all its rewards tie), or "error" with payload (reason, message); id is None when the
    record failed before it had one. The responses a list's pairs / max-K selection use are tokenised once,
    with its prompt, and all the chunk's texts in one batched tokenizer call; the tokenizer's own chat
    encoding re-checks the chunk's first prompt. Random choices are seeded by (seed, the record's position).
    """
    config, tok = _STATE["config"], _STATE["tokenizer"]
    plans, requests = [], []
    for fmt, source, position, raw in chunk:
        try:
            example, dropped = _read(fmt, source, raw)
        except InvalidRecord as err:
            plans.append(("error", source, None, err.dropped, (err.reason, err.message)))
            continue
        selections, tied = _selections(config, example, position)
        used = sorted({i for keep in selections for i in keep})
        plans.append((example, dropped, selections, tied, used, len(requests)))
        if used:  # a list without pairs (all tied) is kept with nothing to write: not tokenised
            requests.append((example.prompt, [example.responses[i] for i in used]))
    batch = tok.encode_lists(requests, verify_first=True) if requests else []
    out = []
    for plan in plans:
        if plan[0] == "error":
            out.append(plan)
            continue
        example, dropped, selections, tied, used, request = plan
        try:
            if used and isinstance(batch[request], ValueError):
                encoded = _encode_sequentially(config, tok, example, selections, verify=request == 0)
            else:
                encoded = []
                if used:
                    prompt, responses = batch[request]
                    by_index = dict(zip(used, responses, strict=True))
                for keep in selections:
                    encoded.append(_finish(config, tok.bos_id, [example.rewards[i] for i in keep], prompt,
                                           [by_index[i] for i in keep]))
        except InvalidRecord as err:
            out.append(("error", example.source, example.id, dropped, (err.reason, err.message)))
            continue
        except ValueError as err:  # the chat template or tokenizer refused the list
            out.append(("error", example.source, example.id, dropped, (TOKENIZER_ERROR, str(err))))
            continue
        out.append(("ok", example.source, example.id, dropped, (encoded, tied, _all_tied(example.rewards))))
    return out

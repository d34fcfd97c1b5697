"""Collate listwise items into shared-prompt rows: one sequence ``[prompt, y_1, ..., y_K]`` per list.

The unpacked batch (``nemo_lpo.batch.collate.ListwiseCollator``) computes every prompt K times; here it is
computed once. Three things make the result equal to the unpacked computation
(docs/megatron-notes.md, measured):

- positions: the prompt has ``0 .. Lp-1`` and EVERY response continues at ``Lp, Lp+1, ...`` (RoPE must
  honour per-token positions: ``GPTModelWithPositions``);
- the mask: causal, and a response token sees the prompt and its own response only (True = masked);
  megatron's local attention takes it as an explicit ``[R, 1, S, S]`` boolean mask;
- the gather: the first token of every response is predicted from the LAST prompt position (not from
  the token before it in the row), the next ones from their predecessor in the same response; the
  batch carries those source positions so the log-probs are gathered from the logits there.

Batch keys (R rows, S row length, B lists, K = largest list, N valid responses, M response tokens):

| key | shape | meaning |
|---|---|---|
| tokens, position_ids | [R, S] int64 | row tokens (pad_id after the end) and per-token RoPE positions |
| segment_ids | [R, S] int64 | list (0..B-1) of each token; -1 at padding |
| part_ids | [R, S] int64 | 0 = prompt (and padding), k+1 = response slot k |
| row_lengths | [R] int64 | unpadded length of each row |
| gather_index | [M] int64 | flat index (row * S + position) of the logits that predict each response token |
| gather_labels | [M] int64 | the predicted response token |
| gather_seq | [M] int64 | the response (0..N-1) each gathered token belongs to |
| list_index, slot_index, seq_lengths | [N] int64 | list, slot and UNPACKED length (prompt + response) |
| prompt_lengths | [B] int64 | prompt length of each list |
| rewards, response_mask, response_lengths, list_ids, (ref_logps) | | as docs/architecture.md "Batch layouts" |
"""

from __future__ import annotations

import numpy as np
import torch

from nemo_lpo.batch.collate import list_keys


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _checked(items: list[dict]) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """(prompt, responses) as int64 arrays; a clear error naming the list and field for bad input."""
    out = []
    for b, item in enumerate(items):
        where = f"list {b} (dataset index {item.get('index', '?')})"
        prompt = np.asarray(item["prompt_ids"], dtype=np.int64).reshape(-1)
        responses = [np.asarray(r, dtype=np.int64).reshape(-1) for r in item["response_ids"]]
        if len(prompt) == 0:
            raise ValueError(f"{where}: prompt_ids is empty; the first response token is predicted from the "
                             "last prompt position, so a shared-prompt row needs at least one prompt token")
        if not responses:
            raise ValueError(f"{where}: response_ids is empty")
        for k, r in enumerate(responses):
            if len(r) == 0:
                raise ValueError(f"{where}: response_ids[{k}] is empty")
        if len(np.asarray(item["rewards"]).reshape(-1)) != len(responses):
            raise ValueError(f"{where}: {len(np.asarray(item['rewards']).reshape(-1))} rewards for "
                             f"{len(responses)} responses")
        out.append((prompt, responses))
    return out


def collate_shared_prompt(items: list[dict], pad_id: int, pad_to_multiple_of: int = 1,
                          packed: bool = False) -> dict[str, torch.Tensor]:
    """Collate ``ListwiseDataset`` items into shared-prompt rows (see the module docstring for the keys).

    Args:
        items: dataset items (``prompt_ids``, ``response_ids`` (K_i arrays), ``rewards``, optional
            ``ref_logps`` and ``index``).
        pad_id: padding token (never predicted, never attended to by real tokens).
        pad_to_multiple_of: round S up to a multiple of this (tensor-parallel size under sequence parallel).
        packed: put all lists of the micro-batch into ONE row ``[1, S]`` back to back (the mask keeps the
            lists apart); default: one row per list, right-padded to the longest, ``[B, S]``.

    Returns:
        The batch dict.

    Raises:
        ValueError: an empty micro-batch, an empty prompt or response, or rewards not matching K.
    """
    if not items:
        raise ValueError("cannot collate an empty micro-batch")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    lists = _checked(items)
    keys = list_keys(items)
    list_lengths = [len(p) + sum(len(r) for r in rs) for p, rs in lists]
    if packed:
        rows_of_list, offsets = [0] * len(lists), list(np.cumsum([0, *list_lengths[:-1]]))
        row_lengths = [sum(list_lengths)]
    else:
        rows_of_list, offsets = list(range(len(lists))), [0] * len(lists)
        row_lengths = list_lengths
    r_size, s = len(row_lengths), _round_up(max(row_lengths), pad_to_multiple_of)

    tokens = np.full((r_size, s), pad_id, dtype=np.int64)
    segment_ids = np.full((r_size, s), -1, dtype=np.int64)
    part_ids = np.zeros((r_size, s), dtype=np.int64)
    position_ids = np.zeros((r_size, s), dtype=np.int64)
    gather_index, gather_labels, gather_seq = [], [], []
    list_index, slot_index, seq_lengths = [], [], []
    for b, (prompt, responses) in enumerate(lists):
        row, o = rows_of_list[b], int(offsets[b])
        lp = len(prompt)
        tokens[row, o:o + lp] = prompt
        segment_ids[row, o:o + lp] = b
        position_ids[row, o:o + lp] = np.arange(lp)
        last_prompt = row * s + o + lp - 1
        start = o + lp
        for k, resp in enumerate(responses):
            n, lr = len(list_index), len(resp)
            tokens[row, start:start + lr] = resp
            segment_ids[row, start:start + lr] = b
            part_ids[row, start:start + lr] = k + 1
            position_ids[row, start:start + lr] = np.arange(lp, lp + lr)
            # token j of the response is predicted at the row position of token j-1; token 0 at the prompt's end
            gather_index.append(np.concatenate([[last_prompt], row * s + np.arange(start, start + lr - 1)]))
            gather_labels.append(resp)
            gather_seq.append(np.full(lr, n, dtype=np.int64))
            list_index.append(b)
            slot_index.append(k)
            seq_lengths.append(lp + lr)
            start += lr
    for row, length in enumerate(row_lengths):  # padding: positions continue so RoPE stays finite and tidy
        position_ids[row, length:] = np.arange(s - length)

    batch = {
        "tokens": torch.from_numpy(tokens),
        "position_ids": torch.from_numpy(position_ids),
        "segment_ids": torch.from_numpy(segment_ids),
        "part_ids": torch.from_numpy(part_ids),
        "row_lengths": torch.tensor(row_lengths, dtype=torch.int64),
        "gather_index": torch.from_numpy(np.concatenate(gather_index).astype(np.int64)),
        "gather_labels": torch.from_numpy(np.concatenate(gather_labels).astype(np.int64)),
        "gather_seq": torch.from_numpy(np.concatenate(gather_seq)),
        "list_index": torch.tensor(list_index, dtype=torch.int64),
        "slot_index": torch.tensor(slot_index, dtype=torch.int64),
        "seq_lengths": torch.tensor(seq_lengths, dtype=torch.int64),
        "prompt_lengths": torch.tensor([len(p) for p, _ in lists], dtype=torch.int64),
        **keys,
    }
    return batch


class SharedPromptCollator:
    """``collate_shared_prompt`` as a callable, drop-in where a ``ListwiseCollator`` is used.

    Args:
        pad_id: padding token.
        pad_to_multiple_of: round S up to a multiple of this.
        packed: all lists of a micro-batch in one row (see ``collate_shared_prompt``).
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1, packed: bool = False) -> None:
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_id, self.pad_to_multiple_of, self.packed = int(pad_id), pad_to_multiple_of, packed

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        """Collate ``items`` into a shared-prompt batch."""
        return collate_shared_prompt(items, self.pad_id, self.pad_to_multiple_of, self.packed)

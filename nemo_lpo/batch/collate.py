"""Turn dataset items (lists of K responses) into model inputs: padded [N, T] or padding-free packed [1, S]."""

from __future__ import annotations

import numpy as np
import torch


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def list_keys(items: list[dict]) -> dict[str, torch.Tensor]:
    """The per-list batch keys of docs/architecture.md: rewards, response_mask, response_lengths, list_ids, ref_logps.

    ``ref_logps`` is present only when every item has one. Shared by every batch layout (padded, packed,
    the shared-prompt rows of ``nemo_lpo.batch.shared_prompt``).
    """
    b_size = len(items)
    k_max = max(len(item["response_ids"]) for item in items)
    rewards = torch.zeros(b_size, k_max, dtype=torch.float32)
    response_mask = torch.zeros(b_size, k_max, dtype=torch.bool)
    response_lengths = torch.zeros(b_size, k_max, dtype=torch.int64)
    has_ref = all(item.get("ref_logps") is not None for item in items)
    ref_logps = torch.zeros(b_size, k_max, dtype=torch.float32) if has_ref else None
    for b, item in enumerate(items):
        k = len(item["response_ids"])
        rewards[b, :k] = torch.as_tensor(np.asarray(item["rewards"], dtype=np.float32))
        response_mask[b, :k] = True
        response_lengths[b, :k] = torch.tensor([len(r) for r in item["response_ids"]], dtype=torch.int64)
        if has_ref:
            ref_logps[b, :k] = torch.as_tensor(np.asarray(item["ref_logps"], dtype=np.float32))
    keys = {"rewards": rewards, "response_mask": response_mask, "response_lengths": response_lengths,
            "list_ids": torch.tensor([int(item.get("index", b)) for b, item in enumerate(items)], dtype=torch.int64)}
    if has_ref:
        keys["ref_logps"] = ref_logps
    return keys


class ListwiseCollator:
    """Build the batch dict of docs/architecture.md from a micro-batch of dataset items.

    Every (list, slot) becomes one sequence ``prompt + response``; all K sequences of a list stay in the
    batch. ``labels[t] = tokens[t + 1]`` and ``loss_mask[t] = 1`` where that label is a response token
    (EOS included), so summing ``token_logps * loss_mask`` per sequence gives log p(response | prompt).

    Args:
        pad_id: token used for padding (masked out everywhere).
        pad_to_multiple_of: round T (padded) or S (packed) up to a multiple of this.
        packed: put all sequences back to back in one row ``[1, S]`` with ``cu_seqlens``; padding, if any,
            sits after the last sequence, belongs to no sequence and has loss_mask 0.
        keep_empty_slots: emit B*K sequences; a missing slot becomes a one-token dummy sequence
            (``pad_id``, loss_mask 0, response_mask False) so shapes are static per K.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1, packed: bool = False,
                 keep_empty_slots: bool = False) -> None:
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_id = int(pad_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.packed = packed
        self.keep_empty_slots = keep_empty_slots

    def _sequences(self, items: list[dict], k_max: int):
        """Yield (list, slot, token ids, prompt length, valid) in list-major, slot-minor order."""
        for b, item in enumerate(items):
            prompt = np.asarray(item["prompt_ids"], dtype=np.int64)
            for k in range(k_max):
                if k < len(item["response_ids"]):
                    response = np.asarray(item["response_ids"][k], dtype=np.int64)
                    yield b, k, np.concatenate([prompt, response]), len(prompt), True
                elif self.keep_empty_slots:
                    yield b, k, np.array([self.pad_id], dtype=np.int64), 1, False

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        """Collate ``items`` (``ListwiseDataset`` outputs) into the batch dict."""
        if not items:
            raise ValueError("cannot collate an empty micro-batch")
        per_list = list_keys(items)
        k_max = per_list["rewards"].shape[1]

        sequences = list(self._sequences(items, k_max))
        lengths = [len(s[2]) for s in sequences]
        if self.packed:
            batch = self._packed(sequences, lengths)
        else:
            batch = self._padded(sequences, lengths)
        batch.update(
            seq_lengths=torch.tensor(lengths, dtype=torch.int64),
            list_index=torch.tensor([s[0] for s in sequences], dtype=torch.int64),
            slot_index=torch.tensor([s[1] for s in sequences], dtype=torch.int64),
        )
        batch.update(per_list)
        return batch

    def _padded(self, sequences, lengths) -> dict[str, torch.Tensor]:
        n, t = len(sequences), _round_up(max(lengths), self.pad_to_multiple_of)
        tokens = np.full((n, t), self.pad_id, dtype=np.int64)
        labels = np.full((n, t), self.pad_id, dtype=np.int64)
        loss_mask = np.zeros((n, t), dtype=np.float32)
        for i, (_, _, ids, prompt_len, valid) in enumerate(sequences):
            length = len(ids)
            tokens[i, :length] = ids
            labels[i, :length - 1] = ids[1:]
            if valid:
                # labels[t] is a response token for t in [prompt_len - 1, length - 2]
                loss_mask[i, prompt_len - 1:length - 1] = 1.0
        position_ids = np.broadcast_to(np.arange(t, dtype=np.int64), (n, t)).copy()
        return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
                "loss_mask": torch.from_numpy(loss_mask), "position_ids": torch.from_numpy(position_ids)}

    def _packed(self, sequences, lengths) -> dict[str, torch.Tensor]:
        total = sum(lengths)
        s = _round_up(total, self.pad_to_multiple_of)
        tokens = np.full(s, self.pad_id, dtype=np.int64)
        labels = np.full(s, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        position_ids = np.zeros(s, dtype=np.int64)
        cu_seqlens = np.zeros(len(sequences) + 1, dtype=np.int32)
        offset = 0
        for i, (_, _, ids, prompt_len, valid) in enumerate(sequences):
            length = len(ids)
            tokens[offset:offset + length] = ids
            labels[offset:offset + length - 1] = ids[1:]  # the last label of a sequence stays pad_id
            if valid:
                loss_mask[offset + prompt_len - 1:offset + length - 1] = 1.0
            position_ids[offset:offset + length] = np.arange(length)
            offset += length
            cu_seqlens[i + 1] = offset
        position_ids[offset:] = np.arange(s - offset)  # trailing padding: its own positions, no loss
        return {"tokens": torch.from_numpy(tokens)[None], "labels": torch.from_numpy(labels)[None],
                "loss_mask": torch.from_numpy(loss_mask)[None], "position_ids": torch.from_numpy(position_ids)[None],
                "cu_seqlens": torch.from_numpy(cu_seqlens)}

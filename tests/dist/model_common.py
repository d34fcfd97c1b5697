"""Hand-built batches (docs/architecture.md "Batch layouts") and a tiny model for the model / log-prob tests."""

from __future__ import annotations

import torch

PAD = 0


def make_items(seed: int = 0, vocab: int = 32000, ks=(3, 2, 1)) -> list[dict]:
    """Ragged lists: item b has ks[b] responses; prompts 3-6 tokens, responses 2-5 tokens (EOS=2 last)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for b, k in enumerate(ks):
        prompt = torch.randint(3, vocab, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g)
        responses = []
        for _ in range(k):
            r = torch.randint(3, vocab, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
            r[-1] = 2
            responses.append(r)
        items.append({"prompt_ids": prompt, "response_ids": responses,
                      "rewards": torch.rand(k, generator=g), "index": b})
    return items


def _list_keys(items: list[dict]) -> tuple[dict, list]:
    b, k = len(items), max(len(it["response_ids"]) for it in items)
    response_mask = torch.zeros(b, k, dtype=torch.bool)
    response_lengths = torch.zeros(b, k, dtype=torch.int64)
    rewards = torch.zeros(b, k)
    seqs = []
    for i, it in enumerate(items):
        for j, r in enumerate(it["response_ids"]):
            response_mask[i, j] = True
            response_lengths[i, j] = len(r)
            rewards[i, j] = it["rewards"][j]
            seqs.append((i, j, torch.cat([it["prompt_ids"], r]), len(it["prompt_ids"])))
    keys = {"response_mask": response_mask, "response_lengths": response_lengths, "rewards": rewards,
            "list_index": torch.tensor([s[0] for s in seqs]), "slot_index": torch.tensor([s[1] for s in seqs]),
            "seq_lengths": torch.tensor([len(s[2]) for s in seqs]),
            "list_ids": torch.tensor([it["index"] for it in items])}
    return keys, seqs


def padded_batch(items: list[dict], multiple: int = 1) -> dict:
    """[N, T] right-padded batch."""
    keys, seqs = _list_keys(items)
    n = len(seqs)
    t = -(-max(len(s[2]) for s in seqs) // multiple) * multiple
    tokens = torch.full((n, t), PAD)
    labels = torch.full((n, t), PAD)
    loss_mask = torch.zeros(n, t)
    for i, (_, _, ids, lp) in enumerate(seqs):
        tokens[i, :len(ids)] = ids
        labels[i, :len(ids) - 1] = ids[1:]
        loss_mask[i, lp - 1:len(ids) - 1] = 1.0
    pos = torch.arange(t)[None].expand(n, t).clone()
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": pos, **keys}


def packed_batch(items: list[dict], multiple: int = 1) -> dict:
    """[1, S] packed batch with cu_seqlens; positions restart at 0 per sequence."""
    keys, seqs = _list_keys(items)
    total = sum(len(s[2]) for s in seqs)
    s_len = -(-total // multiple) * multiple
    tokens = torch.full((s_len,), PAD)
    labels = torch.full((s_len,), PAD)
    loss_mask = torch.zeros(s_len)
    pos = torch.arange(s_len)
    cu = [0]
    for _, _, ids, lp in seqs:
        o, n = cu[-1], len(ids)
        tokens[o:o + n] = ids
        labels[o:o + n - 1] = ids[1:]
        loss_mask[o + lp - 1:o + n - 1] = 1.0
        pos[o:o + n] = torch.arange(n)
        cu.append(o + n)
    pos[cu[-1]:] = torch.arange(s_len - cu[-1])
    return {"tokens": tokens[None], "labels": labels[None], "loss_mask": loss_mask[None], "position_ids": pos[None],
            "cu_seqlens": torch.tensor(cu, dtype=torch.int32), **keys}


def build_tiny(preset_name: str = "tiny-mixtral", **config_kwargs):
    """Build the tiny preset's GPTModel in eval mode (parallel state must be initialised)."""
    from nemo_lpo.model.build import build_gpt_model
    from nemo_lpo.model.presets import PRESETS, transformer_config

    preset = PRESETS[preset_name]
    model = build_gpt_model(preset, transformer_config(preset, **config_kwargs))
    return model.eval()

"""Virtual pipeline batches: every micro-batch of a step gets one shape, and the per-response log-probs stay."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nemo_lpo.batch.logps import sequence_logps
from nemo_lpo.config import CONF_DIR, load_config
from nemo_lpo.train.feeder import collate_uniform, run_pad_multiple
from nemo_lpo.train.lpo_model import layout_of

PAD = 0


def _item(index: int, prompt_len: int, response_lens: list[int]) -> dict:
    rng = np.random.default_rng(index)
    return {"prompt_ids": rng.integers(1, 100, prompt_len).astype(np.int32),
            "response_ids": [rng.integers(1, 100, n).astype(np.int32) for n in response_lens],
            "rewards": np.arange(len(response_lens), dtype=np.float32), "ref_logps": None, "index": index}


@pytest.mark.parametrize("overrides", [[], ["data.shared_prompt=true"], ["data.packed=true"]])
def test_collate_uniform_one_shape_same_logps(overrides):
    cfg = load_config(CONF_DIR / "tiny_cpu.yaml", ["data.pad_to_multiple_of=1", *overrides])
    # micro-batches of 2 lists: different lengths, and K = 4 + 2 vs 3 + 3 lists (6 vs 6 sequences) and
    # 2 + 2 (4 sequences: the padded layout gets 2 empty rows)
    groups = [[_item(0, 5, [3, 4, 2, 6]), _item(1, 3, [2, 2])], [_item(2, 9, [7, 1, 2]), _item(3, 4, [3, 3, 3])],
              [_item(4, 2, [1, 2]), _item(5, 3, [4, 2])]]
    layout = layout_of(cfg)
    plain = [layout.collator(PAD, run_pad_multiple(cfg))(items) for items in groups]
    uniform = collate_uniform(layout, PAD, run_pad_multiple(cfg), groups)
    assert len({tuple(b["tokens"].shape) for b in uniform}) == 1
    assert len({tuple(b["tokens"].shape) for b in plain}) > 1  # the case really needed padding
    if not (cfg.data.shared_prompt or cfg.data.packed):
        assert int(uniform[2]["empty_rows"]) == 2 and "empty_rows" not in uniform[0]
    gen = torch.Generator().manual_seed(0)
    for before, after in zip(plain, uniform, strict=True):
        if cfg.data.shared_prompt:  # per-response log-probs are gathered by index: compare what they address
            flat_before = before["tokens"].reshape(-1)[before["gather_index"]]
            flat_after = after["tokens"].reshape(-1)[after["gather_index"]]
            assert torch.equal(flat_before, flat_after)
            continue
        n, t = before["tokens"].shape
        logps = -torch.rand(after["tokens"].shape, generator=gen)
        expected = sequence_logps(logps[:n, :t], before)
        assert torch.allclose(sequence_logps(logps, after), expected, atol=0, rtol=0)
        assert torch.allclose(sequence_logps(logps, after, length_average=True),
                              sequence_logps(logps[:n, :t], before, length_average=True))
        assert int(after["seq_lengths"].sum() - after.get("empty_rows", 0)) == int(before["seq_lengths"].sum())


@pytest.mark.parametrize(("num_lists", "mbs", "dp"), [(9, 2, 2), (8, 2, 2), (3, 4, 2), (10, 1, 4)])
def test_microbatch_plan_gives_every_rank_the_same_count(num_lists, mbs, dp):
    """Equal micro-batch counts per data-parallel rank (EP all-to-alls span them); every list exactly once."""
    from nemo_lpo.train.feeder import microbatch_plan

    plans = [microbatch_plan(num_lists, mbs, rank, dp) for rank in range(dp)]
    assert len({len(plan) for plan in plans}) == 1
    rows = sorted(i for plan in plans for entry in plan if entry is not None for i in entry)
    assert rows == list(range(num_lists))
    assert sum(entry is None for plan in plans for entry in plan) == len(plans[0]) * dp - -(-num_lists // mbs)


def test_empty_rows_are_padding_for_the_moe_router():
    """The filler rows' one pad token is padding in the router mask too (else the MoE aux loss routes it).

    Found by the ragged parity lists: PP2 x VPP2 differed from 1 process by 4.8e-4 in loss at step 3 while
    its micro-batches of K = 2 lists got filler rows.
    """
    from nemo_lpo.batch.masks import padding_token_mask

    cfg = load_config(CONF_DIR / "tiny_cpu.yaml", ["data.pad_to_multiple_of=1"])
    groups = [[_item(0, 2, [3, 1, 2])], [_item(1, 2, [1])]]  # 3 sequences vs 1: two filler rows
    batch = collate_uniform(layout_of(cfg), PAD, run_pad_multiple(cfg), groups)[1]
    assert int(batch["empty_rows"]) == 2 and batch["tokens"].shape == (3, 5)
    assert padding_token_mask(batch).tolist() == [[False, False, False, True, True], [True] * 5, [True] * 5]

import numpy as np
import pytest
import torch

from nemo_lpo.batch.collate import ListwiseCollator

PAD = 0


def item(index, prompt, responses, rewards, ref=None):
    return {"prompt_ids": np.array(prompt, np.int32), "response_ids": [np.array(r, np.int32) for r in responses],
            "rewards": np.array(rewards, np.float32), "ref_logps": None if ref is None else np.array(ref, np.float32),
            "index": index}


ITEMS = [
    item(7, [1, 5, 6], [[7, 8, 2], [9, 2]], [1.0, -1.0]),
    item(3, [1, 4], [[10, 11, 12, 2], [13, 2], [14, 2]], [0.5, 0.25, 2.0]),
]


def test_padded_batch_by_hand():
    batch = ListwiseCollator(PAD)(ITEMS)
    assert batch["tokens"].shape == (5, 6) and batch["tokens"].dtype == torch.int64
    assert batch["tokens"][0].tolist() == [1, 5, 6, 7, 8, 2]
    assert batch["labels"][0].tolist() == [5, 6, 7, 8, 2, PAD]
    # labels 7, 8, 2 (the response incl. EOS) are at positions 2, 3, 4
    assert batch["loss_mask"][0].tolist() == [0, 0, 1, 1, 1, 0]
    assert batch["tokens"][1].tolist() == [1, 5, 6, 9, 2, PAD]
    assert batch["labels"][1].tolist() == [5, 6, 9, 2, PAD, PAD]
    assert batch["loss_mask"][1].tolist() == [0, 0, 1, 1, 0, 0]
    assert batch["tokens"][2].tolist() == [1, 4, 10, 11, 12, 2]
    assert batch["loss_mask"][2].tolist() == [0, 1, 1, 1, 1, 0]
    assert batch["seq_lengths"].tolist() == [6, 5, 6, 4, 4]
    assert batch["list_index"].tolist() == [0, 0, 1, 1, 1]
    assert batch["slot_index"].tolist() == [0, 1, 0, 1, 2]
    assert batch["position_ids"][3].tolist() == [0, 1, 2, 3, 4, 5]
    assert batch["rewards"].tolist() == [[1.0, -1.0, 0.0], [0.5, 0.25, 2.0]]
    assert batch["response_mask"].tolist() == [[True, True, False], [True, True, True]]
    assert batch["response_lengths"].tolist() == [[3, 2, 0], [4, 2, 2]]
    assert batch["list_ids"].tolist() == [7, 3]
    assert "ref_logps" not in batch and "cu_seqlens" not in batch
    # the loss mask counts exactly the response tokens of each sequence
    lengths = batch["response_lengths"][batch["list_index"], batch["slot_index"]]
    assert batch["loss_mask"].sum(1).tolist() == lengths.float().tolist()


def test_pad_to_multiple_and_empty_slots():
    batch = ListwiseCollator(PAD, pad_to_multiple_of=8, keep_empty_slots=True)(ITEMS)
    assert batch["tokens"].shape == (6, 8)
    assert batch["list_index"].tolist() == [0, 0, 0, 1, 1, 1]
    assert batch["slot_index"].tolist() == [0, 1, 2, 0, 1, 2]
    dummy = 2
    assert batch["tokens"][dummy].tolist() == [PAD] * 8
    assert batch["loss_mask"][dummy].sum() == 0
    assert batch["seq_lengths"][dummy] == 1
    assert not batch["response_mask"][0, 2]


def test_packed_matches_padded():
    padded = ListwiseCollator(PAD)(ITEMS)
    packed = ListwiseCollator(PAD, pad_to_multiple_of=16, packed=True)(ITEMS)
    assert packed["tokens"].shape == (1, 32)
    cu = packed["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 6, 11, 17, 21, 25]
    for n, length in enumerate(padded["seq_lengths"].tolist()):
        start = int(cu[n])
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert packed[key][0, start:start + length].tolist() == padded[key][n, :length].tolist(), key
    # nothing after the sequences is trained on; a sequence's last label never leaks into the next one
    assert packed["loss_mask"][0, 25:].sum() == 0
    assert packed["labels"][0, 5] == PAD
    for key in ("rewards", "response_mask", "response_lengths", "list_index", "slot_index", "seq_lengths"):
        assert torch.equal(packed[key], padded[key])


def test_ref_logps_only_when_every_item_has_them():
    with_ref = [item(0, [1], [[2], [3, 2]], [1, 0], ref=[-1.5, -2.5]), item(1, [1], [[4, 2], [2]], [0, 1], [-3, -4])]
    batch = ListwiseCollator(PAD)(with_ref)
    assert batch["ref_logps"].tolist() == [[-1.5, -2.5], [-3.0, -4.0]]
    assert "ref_logps" not in ListwiseCollator(PAD)([with_ref[0], ITEMS[0]])


def test_rejects_empty_batch():
    with pytest.raises(ValueError):
        ListwiseCollator(PAD)([])


def random_items(seed):
    rng = np.random.default_rng(seed)
    items = []
    for b in range(int(rng.integers(1, 4))):
        k = int(rng.integers(1, 5))
        prompt = rng.integers(3, 50, size=int(rng.integers(1, 6))).tolist()
        responses = [rng.integers(3, 50, size=int(rng.integers(1, 7))).tolist() + [2] for _ in range(k)]
        items.append(item(b, prompt, responses, rng.normal(size=k).tolist()))
    return items


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("keep_empty_slots", [False, True])
def test_random_lists_padded_and_packed_agree(seed, keep_empty_slots):
    items = random_items(seed)
    padded = ListwiseCollator(PAD, 4, keep_empty_slots=keep_empty_slots)(items)
    packed = ListwiseCollator(PAD, 4, packed=True, keep_empty_slots=keep_empty_slots)(items)
    assert padded["tokens"].shape[1] % 4 == 0 and packed["tokens"].shape[1] % 4 == 0
    b, k = padded["rewards"].shape
    assert padded["tokens"].shape[0] == (b * k if keep_empty_slots else int(padded["response_mask"].sum()))
    # per sequence: loss on exactly the response tokens, whose labels are the response ids
    for n in range(padded["tokens"].shape[0]):
        lst, slot = int(padded["list_index"][n]), int(padded["slot_index"][n])
        mask = padded["loss_mask"][n].bool()
        if slot < len(items[lst]["response_ids"]):
            assert padded["labels"][n][mask].tolist() == items[lst]["response_ids"][slot].tolist()
        else:
            assert not mask.any() and not padded["response_mask"][lst, slot]
        start, stop = int(packed["cu_seqlens"][n]), int(packed["cu_seqlens"][n + 1])
        assert packed["labels"][0, start:stop].tolist() == padded["labels"][n, :stop - start].tolist()
        assert packed["loss_mask"][0, start:stop].tolist() == padded["loss_mask"][n, :stop - start].tolist()
    assert packed["loss_mask"].sum() == padded["loss_mask"].sum() == padded["response_lengths"].sum()

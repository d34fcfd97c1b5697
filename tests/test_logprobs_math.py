"""sequence_logps and the attention masks on hand-worked numbers (no model, no process group)."""

from __future__ import annotations

import torch

from nemo_lpo.batch.logps import sequence_logps
from nemo_lpo.batch.masks import causal_padding_mask, packed_causal_mask
from nemo_lpo.model.gpt import rotary_angles


def _padded_batch():
    # 2 lists: list 0 has slots 0 and 1, list 1 has slot 0 only (K = 2).
    return {
        "tokens": torch.zeros(3, 4, dtype=torch.long),
        "loss_mask": torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1], [1, 1, 1, 0]], dtype=torch.float32),
        "list_index": torch.tensor([0, 0, 1]),
        "slot_index": torch.tensor([0, 1, 0]),
        "response_mask": torch.tensor([[True, True], [True, False]]),
    }


def test_sequence_logps_sums_over_loss_mask_and_scatters():
    tok = torch.tensor([[-9.0, -1.0, -2.0, float("nan")],
                        [-9.0, -9.0, -0.5, -0.25],
                        [-1.0, -1.0, -1.0, float("-inf")]])
    out = sequence_logps(tok, _padded_batch())
    assert torch.equal(out, torch.tensor([[-3.0, -0.75], [-3.0, 0.0]]))
    avg = sequence_logps(tok, _padded_batch(), length_average=True)
    assert torch.allclose(avg, torch.tensor([[-1.5, -0.375], [-1.0, 0.0]]))


def test_sequence_logps_is_differentiable():
    tok = torch.zeros(3, 4, requires_grad=True)
    sequence_logps(tok, _padded_batch())[0, 1].backward()
    expected = torch.zeros(3, 4)
    expected[1, 2:] = 1.0
    assert torch.equal(tok.grad, expected)


def test_sequence_logps_packed_uses_cu_seqlens():
    batch = _padded_batch()
    # the same three sequences back to back (lengths 3, 4, 3) plus 2 tail padding tokens
    batch.update(
        tokens=torch.zeros(1, 12, dtype=torch.long),
        loss_mask=torch.tensor([[0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.float32),
        cu_seqlens=torch.tensor([0, 3, 7, 10], dtype=torch.int32),
    )
    tok = torch.tensor([[-9.0, -1.0, -2.0, -9.0, -9.0, -0.5, -0.25, -1.0, -1.0, -9.0, -7.0, -7.0]])
    assert torch.equal(sequence_logps(tok, batch), torch.tensor([[-3.0, -0.75], [-2.0, 0.0]]))


def test_causal_padding_mask():
    mask = causal_padding_mask(torch.tensor([3, 2]), 3)  # True = masked
    assert mask.shape == (2, 1, 3, 3)
    assert torch.equal(mask[0, 0], torch.tensor([[0, 1, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.bool))
    # second sequence: key 2 is padding; the padded query row 2 keeps its causal prefix (no empty row)
    assert torch.equal(mask[1, 0], torch.tensor([[0, 1, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.bool))
    mask = causal_padding_mask(torch.tensor([1]), 3)
    assert torch.equal(mask[0, 0], torch.tensor([[0, 1, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.bool))
    mask = causal_padding_mask(torch.tensor([2]), 4)
    assert torch.equal(mask[0, 0, :2], torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool))


def test_packed_causal_mask_is_block_diagonal():
    mask = packed_causal_mask(torch.tensor([0, 2, 3], dtype=torch.int32), 5)
    allowed = torch.tensor([[1, 0, 0, 0, 0],
                            [1, 1, 0, 0, 0],
                            [0, 0, 1, 0, 0],
                            [0, 0, 0, 1, 0],
                            [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert mask.shape == (1, 1, 5, 5)
    assert torch.equal(mask[0, 0], ~allowed)


def test_rotary_angles_match_megatron_layout():
    inv_freq = torch.tensor([1.0, 0.1])
    angles = rotary_angles(torch.tensor([[0, 1, 2], [5, 0, 1]]), inv_freq)
    assert angles.shape == (3, 2, 1, 4)
    assert torch.allclose(angles[1, 0, 0], torch.tensor([1.0, 0.1, 1.0, 0.1]))
    assert torch.allclose(angles[0, 1, 0], torch.tensor([5.0, 0.5, 5.0, 0.5]))
    inter = rotary_angles(torch.tensor([[2]]), inv_freq, interleaved=True)
    assert torch.allclose(inter[0, 0, 0], torch.tensor([2.0, 2.0, 0.2, 0.2]))


def test_model_inputs_refuses_what_the_model_cannot_do():
    from types import SimpleNamespace

    import pytest

    from nemo_lpo.batch.layouts import sequence_layout_of

    batch = {"tokens": torch.zeros(1, 5, dtype=torch.long), "labels": torch.zeros(1, 5, dtype=torch.long),
             "position_ids": torch.arange(5)[None], "cu_seqlens": torch.tensor([0, 2, 5], dtype=torch.int32)}
    te_model = SimpleNamespace(module=SimpleNamespace(config=SimpleNamespace(), uses_transformer_engine=True))
    with pytest.raises(ValueError, match="batch layout 'packed' cannot run on attention backend 'te'"):
        sequence_layout_of(batch).model_inputs(batch, te_model)
    sp_model = SimpleNamespace(config=SimpleNamespace(sequence_parallel=True, tensor_model_parallel_size=2))
    with pytest.raises(ValueError, match="pad_to_multiple_of a multiple of 2"):
        sequence_layout_of(batch).model_inputs(batch, sp_model)
    inputs = sequence_layout_of(batch, dense_masks=True).model_inputs(
        batch, SimpleNamespace(config=SimpleNamespace(num_moe_experts=4)))
    assert torch.equal(inputs["padding_mask"], torch.zeros(1, 5, dtype=torch.bool))
    assert inputs["attention_mask"].shape == (1, 1, 5, 5) and torch.equal(inputs["labels"], batch["labels"])

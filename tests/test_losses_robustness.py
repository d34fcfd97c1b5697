"""Gradients, numerical extremes, dtypes, host-sync freedom and input errors of nemo_lpo.losses."""

import pytest
import torch

from nemo_lpo.losses import LOSSES, listwise_loss

PAIR_ONLY = {"dpo", "ipo"}


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def batch(k, dtype=torch.float64, seed=0):
    """Three lists, distinct log-ratios and rewards (so LiPO ranks are stable under gradcheck's steps)."""
    gen = torch.Generator().manual_seed(seed)
    logratios = torch.stack([torch.randperm(5 * k, generator=gen)[:k] for _ in range(3)]).to(dtype) / 4 - k / 2
    rewards = torch.stack([torch.randperm(3 * k, generator=gen)[:k] for _ in range(3)]).to(dtype) / 2
    reference = -3 * torch.rand(3, k, generator=gen, dtype=dtype)
    mask = torch.ones(3, k, dtype=torch.bool)
    mask[2, 0] = False  # one ragged list
    lengths = torch.randint(1, 20, (3, k), generator=gen)
    return reference + logratios, reference, rewards, mask, lengths


def options(loss_type, lengths, sft=True):
    opts = {"sft_weight": 0.5, "response_lengths": lengths} if sft else {}
    if loss_type == "sft":  # the loss itself is a per-token NLL
        opts["response_lengths"] = lengths
    if loss_type == "kto":
        opts["kto_z"] = 0.2  # a fixed point: gradcheck's finite differences must not move z
    return opts


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
@pytest.mark.parametrize("sft", [False, True])
def test_gradcheck_float64(loss_type, sft):
    """Analytic gradients w.r.t. the policy log-probs match finite differences (float64, incl. SFT term)."""
    k = 2 if loss_type in PAIR_ONLY else 4
    policy, reference, rewards, mask, lengths = batch(k)
    opts = options(loss_type, lengths, sft)

    def fn(p):
        return listwise_loss(loss_type, p, reference, rewards, mask, 0.3, **opts)[0]

    assert torch.autograd.gradcheck(fn, (policy.clone().requires_grad_(),), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_no_inf_or_nan_at_extremes(loss_type, beta):
    """No inf or nan at extremes.

    float32, |log-ratio| up to 1e4 and rewards up to +-1e3 (m = |r_i^2 - r_j^2| up to 1e6): finite losses,
    metrics and gradients, and the sign of the gradient still pushes the right way for the pair losses.
    """
    k = 2 if loss_type in PAIR_ONLY else 4
    logratios = torch.tensor([[1e4, -1e4, 5e3, -3e3], [-1e4, 1e4, 0.0, 1.0], [-1e4, -1e4, 1e4, 1e4]])[:, :k]
    rewards = torch.tensor([[1e3, -1e3, 999.0, 0.0], [1e3, -1e3, 1e3, -999.0], [1e3, 999.5, -1e3, 0.5]])[:, :k]
    reference = torch.full_like(logratios, -2e4)
    policy = (reference + logratios).requires_grad_()
    mask = torch.ones_like(logratios, dtype=torch.bool)
    lengths = torch.full_like(logratios, 100, dtype=torch.long)
    loss, metrics = listwise_loss(loss_type, policy, reference, rewards, mask, beta, **options(loss_type, lengths))
    loss.sum().backward()
    assert torch.isfinite(loss).all(), loss
    assert torch.isfinite(policy.grad).all(), policy.grad
    assert all(torch.isfinite(v) for v in metrics.values()), metrics
    if loss_type in ("lpo", "dpo", "dpo_pw", "dpo_1vs0"):
        # list 1: the best response (slot 0) has log-ratio -1e4: descending the loss must raise it.
        assert policy.grad[1, 0] < 0


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_bfloat16_inputs(loss_type):
    """Bfloat16 inputs.

    bf16 inputs are upcast: float32 loss and metrics equal to the float32 computation on the same
    (bf16-rounded) values; gradients reach the bf16 leaf in bf16.
    """
    k = 2 if loss_type in PAIR_ONLY else 4
    policy, reference, rewards, mask, lengths = batch(k, dtype=torch.float32, seed=3)
    policy_bf16 = policy.to(torch.bfloat16).requires_grad_()
    reference_bf16, rewards_bf16 = reference.to(torch.bfloat16), rewards.to(torch.bfloat16)
    opts = options(loss_type, lengths)
    loss, metrics = listwise_loss(loss_type, policy_bf16, reference_bf16, rewards_bf16, mask, 0.1, **opts)
    loss.sum().backward()
    expected, expected_metrics = listwise_loss(loss_type, policy_bf16.detach().float(), reference_bf16.float(),
                                               rewards_bf16.float(), mask, 0.1, **opts)
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in metrics.values())
    torch.testing.assert_close(loss, expected)
    for key in metrics:
        torch.testing.assert_close(metrics[key], expected_metrics[key])
    assert policy_bf16.grad.dtype == torch.bfloat16 and torch.isfinite(policy_bf16.grad.float()).all()


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_no_host_sync_or_value_branching(loss_type):
    """No host sync or value branching.

    Forward and backward run on the meta device, where .item(), bool(tensor), .tolist() and any other
    read of tensor values raise: so the loss never syncs with the host or branches on data.
    """
    k = 2 if loss_type in PAIR_ONLY else 4
    meta = {"device": "meta"}
    policy = torch.empty(3, k, requires_grad=True, **meta)
    lengths = torch.empty(3, k, dtype=torch.long, **meta)
    loss, metrics = listwise_loss(loss_type, policy, torch.empty(3, k, **meta), torch.empty(3, k, **meta),
                                  torch.empty(3, k, dtype=torch.bool, **meta), 0.1, sft_weight=0.1,
                                  response_lengths=lengths)
    loss.sum().backward()
    assert loss.shape == (3,) and policy.grad.shape == (3, k)
    assert all(v.shape == () for v in metrics.values())
    with pytest.raises(RuntimeError):  # the premise: reading a meta value fails
        loss.sum().item()


def test_integer_mask_equals_bool_mask():
    """A 0/1 integer mask means the same as the bool mask."""
    policy, reference, rewards, mask, _ = batch(4)
    as_bool, _ = listwise_loss("lpo", policy, reference, rewards, mask, 0.1)
    as_int, _ = listwise_loss("lpo", policy, reference, rewards, mask.long(), 0.1)
    assert torch.equal(as_bool, as_int)


def test_garbage_in_invalid_slots_is_ignored():
    """Garbage in invalid slots is ignored.

    inf / nan log-probs and rewards in invalid slots change nothing and produce no nan gradient.
    """
    policy, reference, rewards, mask, _ = batch(4)
    clean, _ = listwise_loss("lpo_abs", policy, reference, rewards, mask, 0.1)
    dirty_policy = policy.clone()
    dirty_policy[2, 0] = float("nan")
    dirty_rewards = rewards.clone()
    dirty_rewards[2, 0] = float("inf")
    leaf = dirty_policy.requires_grad_()
    dirty, _ = listwise_loss("lpo_abs", leaf, reference, dirty_rewards, mask, 0.1)
    dirty.sum().backward()
    assert torch.equal(clean, dirty)
    assert torch.isfinite(leaf.grad).all() and leaf.grad[2, 0] == 0


def test_unknown_loss_type_lists_registry():
    """The error names the bad loss_type and every registered one."""
    policy, reference, rewards, mask, _ = batch(2)
    with pytest.raises(ValueError, match="unknown loss_type 'lpoo'") as err:
        listwise_loss("lpoo", policy, reference, rewards, mask, 0.1)
    assert all(name in str(err.value) for name in LOSSES)


@pytest.mark.parametrize("loss_type", ["dpo", "ipo"])
def test_pair_losses_reject_lists(loss_type):
    """Dpo / ipo need the K dimension to be exactly 2 (prune lists to pairs first)."""
    policy, reference, rewards, mask, _ = batch(3)
    with pytest.raises(ValueError, match=rf"{loss_type}.*K=2.*got K=3"):
        listwise_loss(loss_type, policy, reference, rewards, mask, 0.1)


def test_shape_mismatch():
    """Inputs of different shapes, 1-D inputs, and bad response_lengths shapes are rejected by name."""
    policy, reference, rewards, mask, _ = batch(4)
    with pytest.raises(ValueError, match=r"rewards has shape \(3, 3\)"):
        listwise_loss("lpo", policy, reference, rewards[:, :3], mask, 0.1)
    with pytest.raises(ValueError, match="mask has shape"):
        listwise_loss("lpo", policy, reference, rewards, mask[:2], 0.1)
    with pytest.raises(ValueError, match=r"must be \[B, K\]"):
        listwise_loss("lpo", policy[0], reference[0], rewards[0], mask[0], 0.1)
    with pytest.raises(ValueError, match="response_lengths must be a"):
        listwise_loss("lpo", policy, reference, rewards, mask, 0.1, sft_weight=1.0,
                      response_lengths=torch.ones(3, 2))
    with pytest.raises(TypeError, match="rewards must be a torch.Tensor"):
        listwise_loss("lpo", policy, reference, [[1.0] * 4] * 3, mask, 0.1)


def test_bad_options():
    """Bad options.

    sft without lengths, unknown options, non-positive beta and alpha raise clear errors.
    """
    policy, reference, rewards, mask, _ = batch(4)
    with pytest.raises(ValueError, match="sft_weight > 0 needs response_lengths"):
        listwise_loss("lpo", policy, reference, rewards, mask, 0.1, sft_weight=0.5)
    with pytest.raises(TypeError, match="unknown option.*prefrence"):
        listwise_loss("lpo", policy, reference, rewards, mask, 0.1, prefrence=True)
    with pytest.raises(ValueError, match="beta must be a positive number"):
        listwise_loss("lpo", policy, reference, rewards, mask, 0.0)
    with pytest.raises(ValueError, match="alpha"):
        listwise_loss("nca", policy, reference, rewards, mask, 0.1, alpha=0.0)

"""Hand-worked values and properties of the Plackett-Luce losses ``listmle`` and ``kpo`` (nemo_lpo.losses).

Most cases pick implicit rewards s = ln(w) (beta = 1, reference 0), so that exp(s) = w are small integers and
each Plackett-Luce factor exp(s_i) / sum exp(s_j) is a fraction worked by hand in the docstrings: 9 tests hold
hand-worked values (13 lists; 4 of them with ties, 2 ragged). Independent references over whole permutations
(itertools), not over the loss code's formula: :func:`top_k_probability` (the probability of the annotated top-k
prefix; 5 cases, K = 5, distinct rewards) and :func:`tied_reference` (with ties and ragged lists: each term is the
probability that a response is placed before every response rewarded below it; 8 lists of K = 2..6 valid
responses, with ties, for listmle and kpo k = 1, 2, 3: 32 cases).
"""

import itertools
import math

import pytest
import torch

from nemo_lpo.losses import listwise_loss

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def run(loss_type, weights, rewards, mask=None, **options):
    """One list (or a batch of nested lists) with implicit rewards s = ln(weights): beta = 1, reference 0."""
    policy = torch.log(torch.tensor(weights, dtype=torch.float64))
    policy = policy.unsqueeze(0) if policy.dim() == 1 else policy
    rew = torch.tensor(rewards, dtype=torch.float64).view_as(policy)
    valid = torch.ones_like(policy, dtype=torch.bool) if mask is None else torch.tensor(mask).view_as(policy)
    return listwise_loss(loss_type, policy, torch.zeros_like(policy), rew, valid, 1.0, **options)[0]


def random_lists(batch, k, seed, ties=False):
    """float64 lists with a ragged mask; distinct rewards unless ``ties`` (then rewards drawn from 3 levels)."""
    gen = torch.Generator().manual_seed(seed)
    if ties:
        rewards = torch.randint(0, 3, (batch, k), generator=gen).double()
    else:
        rewards = torch.stack([torch.randperm(3 * k, generator=gen)[:k] for _ in range(batch)]).double() / 2
    reference = -5 * torch.rand(batch, k, generator=gen, dtype=torch.float64)
    policy = reference + 3 * torch.randn(batch, k, generator=gen, dtype=torch.float64)
    mask = torch.rand(batch, k, generator=gen) < 0.75
    mask[0] = True
    return policy, reference, rewards, mask


def top_k_probability(scores, order, k):
    """Plackett-Luce probability that the first k places are ``order[:k]``, summed over whole permutations."""
    total = 0.0
    for perm in itertools.permutations(range(len(scores))):
        if list(perm[:k]) != list(order[:k]):
            continue
        prob = 1.0
        for place in range(len(perm)):
            prob *= math.exp(scores[perm[place]]) / sum(math.exp(scores[j]) for j in perm[place:])
        total += prob
    return total


def _placement_probability(scores, perm) -> float:
    prob = 1.0
    for place in range(len(perm)):
        prob *= math.exp(scores[perm[place]]) / sum(math.exp(scores[j]) for j in perm[place:])
    return prob


def tied_reference(scores, rewards, valid, k=None) -> float:
    """-log of the Plackett-Luce probabilities that each response is placed before every response rewarded below it.

    Over all orders of the list's VALID responses (whole permutations, each with its Plackett-Luce probability);
    tied responses are not ordered against each other. Only responses at positions <= k count (position: 1 + the
    number rewarded above it; ties share one), as top-k. With distinct rewards the terms multiply to the
    probability of the annotated order (of its top-k prefix).
    """
    slots = [i for i in range(len(scores)) if valid[i]]
    orders = [(perm, _placement_probability(scores, perm)) for perm in itertools.permutations(slots)]
    assert sum(prob for _, prob in orders) == pytest.approx(1.0, abs=1e-12)
    loss = 0.0
    for i in slots:
        position = 1 + sum(rewards[j] > rewards[i] for j in slots)
        if k is not None and position > k:
            continue
        below = [j for j in slots if rewards[j] < rewards[i]]
        loss -= math.log(sum(prob for perm, prob in orders if all(perm.index(i) < perm.index(j) for j in below)))
    return loss


def test_listmle_k3_hand_worked():
    """exp(s) = (1, 2, 3), rewards (2, 3, 1): order slot 1, slot 0, slot 2.

    P = 2/(2+1+3) * 1/(1+3) * 3/3 = 1/12, listmle = ln 12 = 2.4849066498.
    """
    assert run("listmle", [1.0, 2.0, 3.0], [2.0, 3.0, 1.0]).item() == pytest.approx(2.4849066498, abs=1e-9)


def test_kpo_k4_hand_worked_for_every_k():
    """exp(s) = (1, 2, 3, 4), rewards (1, 4, 2, 3): order slot 1 (w 2), slot 3 (4), slot 2 (3), slot 0 (1).

    Place terms: -ln 2/(2+4+3+1) = ln 5; -ln 4/(4+3+1) = ln 2; -ln 3/(3+1) = ln 4/3; -ln 1/1 = 0.
    k=1: ln 5 = 1.6094379124; k=2: ln 10 = 2.3025850930; k=3 and k=4: ln 40/3 = 2.5902671654 = listmle.
    """
    expected = {1: 1.6094379124, 2: 2.3025850930, 3: 2.5902671654, 4: 2.5902671654}
    for k, value in expected.items():
        assert run("kpo", [1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 2.0, 3.0], k=k).item() == pytest.approx(value, abs=1e-9)
    assert run("listmle", [1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 2.0, 3.0]).item() == pytest.approx(2.5902671654, abs=1e-9)


def test_kpo_k1_is_softmax_dpo():
    """Top-1 (k = 1): the best response against all others in one softmax (S-DPO), the same list as above.

    -log softmax(s)_best = -ln 2/(1+2+3+4) = ln 5. KPO's code writes it -log sigma(-log sum_{j != b} exp(s_j - s_b)):
    sum = (1+3+4)/2 = 4, -log sigma(-ln 4) = ln(1 + 4) = ln 5 = 1.6094379124. The default k is 1.
    """
    assert run("kpo", [1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 2.0, 3.0], k=1).item() == pytest.approx(1.6094379124, abs=1e-9)
    assert run("kpo", [1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 2.0, 3.0]).item() == pytest.approx(1.6094379124, abs=1e-9)


def test_step_one_closed_forms():
    """Policy == reference: every factor is 1 / (responses left), so with K = 5 distinct rewards.

    listmle = ln 5 + ln 4 + ln 3 + ln 2 + ln 1 = ln 120 = 4.7874917428; kpo (k = 2) = ln 5 + ln 4 = ln 20 = 2.9957322736.
    """
    policy = torch.full((1, 5), -7.0, dtype=torch.float64)
    rewards, mask = torch.tensor([[0.3, 0.9, 0.1, 0.5, 0.7]], dtype=torch.float64), torch.ones(1, 5, dtype=torch.bool)
    assert listwise_loss("listmle", policy, policy, rewards, mask, 0.1)[0].item() == pytest.approx(4.7874917428, abs=1e-9)
    assert listwise_loss("kpo", policy, policy, rewards, mask, 0.1, k=2)[0].item() == pytest.approx(2.9957322736,
                                                                                                   abs=1e-9)


def test_ties_share_a_position_with_no_term_between_them():
    """Tied responses share a position; neither enters the other's denominator.

    exp(s) = (1, 2, 3), rewards (2, 2, 1): slots 0 and 1 at position 1, slot 2 at position 3.
    slot 0: -ln 1/(1+3) = ln 4; slot 1: -ln 2/(2+3) = ln 5/2; slot 2: 0 -> ln 10 = 2.3025850930.
    Tied last: rewards (3, 1, 1): slot 0: -ln 1/(1+2+3) = ln 6 = 1.7917594692, the tied pair nothing.
    All tied: 0.
    """
    assert run("listmle", [1.0, 2.0, 3.0], [2.0, 2.0, 1.0]).item() == pytest.approx(2.3025850930, abs=1e-9)
    assert run("listmle", [1.0, 2.0, 3.0], [3.0, 1.0, 1.0]).item() == pytest.approx(1.7917594692, abs=1e-9)
    assert run("kpo", [1.0, 2.0, 3.0], [3.0, 1.0, 1.0], k=1).item() == pytest.approx(1.7917594692, abs=1e-9)
    assert run("listmle", [1.0, 2.0, 3.0], [5.0, 5.0, 5.0]).item() == 0.0


def test_kpo_with_tied_positions():
    """exp(s) = (1, 2, 3, 4), rewards (4, 3, 3, 1): positions 1, 2, 2, 4 (no position 3).

    k=1: slot 0: -ln 1/(1+2+3+4) = ln 10 = 2.3025850930.
    k=2: + slot 1: -ln 2/(2+4) = ln 3, + slot 2: -ln 3/(3+4) = ln 7/3 -> ln 70 = 4.2484952420.
    k=3 adds nothing (no response at position 3); k=4 adds slot 3's term 0; listmle = ln 70.
    """
    w, r = [1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 3.0, 1.0]
    assert run("kpo", w, r, k=1).item() == pytest.approx(2.3025850930, abs=1e-9)
    for k in (2, 3, 4, 7):
        assert run("kpo", w, r, k=k).item() == pytest.approx(4.2484952420, abs=1e-9)
    assert run("listmle", w, r).item() == pytest.approx(4.2484952420, abs=1e-9)


def test_ragged_lists_use_their_valid_slots_only():
    """A batch: the K = 4 list above; a list whose slot 1 is invalid (nan weight, reward 99); a one-response list.

    List 2 over slots 0, 2, 3: exp(s) = (1, 2, 3), rewards (2, 3, 1): the 3-list of test_listmle_k3 -> ln 12.
    List 3 has one valid response: loss 0.
    """
    weights = [[1.0, 2.0, 3.0, 4.0], [1.0, float("nan"), 2.0, 3.0], [5.0, 1.0, 1.0, 1.0]]
    rewards = [[1.0, 4.0, 2.0, 3.0], [2.0, 99.0, 3.0, 1.0], [1.0, 0.0, 0.0, 0.0]]
    mask = [[True] * 4, [True, False, True, True], [True, False, False, False]]
    loss = run("listmle", weights, rewards, mask)
    torch.testing.assert_close(loss, torch.tensor([2.5902671654, 2.4849066498, 0.0], dtype=torch.float64),
                               rtol=0, atol=1e-9)
    top1 = run("kpo", weights, rewards, mask, k=1)  # list 2: -ln 2/(2+1+3) = ln 3 = 1.0986122887
    torch.testing.assert_close(top1, torch.tensor([1.6094379124, 1.0986122887, 0.0], dtype=torch.float64),
                               rtol=0, atol=1e-9)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_kpo_equals_the_top_k_marginal_of_whole_permutations(k):
    """kpo(k) = -log of the probability of the annotated top-k prefix, summed over all 5! permutations."""
    gen = torch.Generator().manual_seed(k)
    scores = torch.randn(5, generator=gen, dtype=torch.float64) * 2
    rewards = torch.randperm(5, generator=gen).double()
    order = torch.argsort(rewards, descending=True).tolist()
    assert top_k_probability(scores.tolist(), order, 0) == pytest.approx(1.0, abs=1e-12)  # the reference sums to 1
    expected = -math.log(top_k_probability(scores.tolist(), order, k))
    loss = listwise_loss("kpo", scores.unsqueeze(0), torch.zeros(1, 5, dtype=torch.float64), rewards.unsqueeze(0),
                         torch.ones(1, 5, dtype=torch.bool), 1.0, k=k)[0]
    assert loss.item() == pytest.approx(expected, abs=1e-10)


def test_two_responses_with_distinct_rewards_equal_dpo():
    """K = 2: exp(s) = (e^0.5, e^-0.5) i.e. s = (0.5, -0.5), rewards (0, 1): slot 1 is preferred.

    listmle = -ln e^-0.5/(e^-0.5 + e^0.5) = ln(1 + e^1) = 1.3132616875 = dpo = -log sigma(-0.5 - 0.5).
    On a random batch of pairs (distinct rewards) listmle, kpo (k = 1) and dpo agree to rounding.
    """
    hand = run("listmle", [math.exp(0.5), math.exp(-0.5)], [0.0, 1.0])
    assert hand.item() == pytest.approx(1.3132616875, abs=1e-9)
    assert run("dpo", [math.exp(0.5), math.exp(-0.5)], [0.0, 1.0]).item() == pytest.approx(1.3132616875, abs=1e-9)
    gen = torch.Generator().manual_seed(3)
    policy, reference = torch.randn(64, 2, generator=gen) * 4, torch.randn(64, 2, generator=gen) * 4
    rewards = torch.stack([torch.randperm(2, generator=gen) for _ in range(64)]).float()
    mask = torch.ones(64, 2, dtype=torch.bool)
    dpo, _ = listwise_loss("dpo", policy, reference, rewards, mask, 0.1)
    for loss_type in ("listmle", "kpo"):
        loss, _ = listwise_loss(loss_type, policy, reference, rewards, mask, 0.1)
        torch.testing.assert_close(loss, dpo, rtol=1e-6, atol=1e-7)


def test_kpo_with_k_at_least_list_size_minus_one_is_listmle():
    """With distinct rewards the last place's term is -ln 1 = 0, so kpo(k >= K - 1) = listmle (K = 6, ragged)."""
    policy, reference, rewards, mask = random_lists(16, 6, seed=5)
    listmle, _ = listwise_loss("listmle", policy, reference, rewards, mask, 0.3)
    for k in (5, 6, 11):
        kpo, _ = listwise_loss("kpo", policy, reference, rewards, mask, 0.3, k=k)
        torch.testing.assert_close(kpo, listmle, rtol=1e-12, atol=1e-12)
    kpo2, _ = listwise_loss("kpo", policy, reference, rewards, mask, 0.3, k=2)
    assert (kpo2 <= listmle + 1e-12).all() and (kpo2 < listmle).any()  # fewer (non-negative) terms


@pytest.mark.parametrize(("loss_type", "options"), [("listmle", {}), ("kpo", {"k": 1}), ("kpo", {"k": 2})])
@pytest.mark.parametrize("ties", [False, True])
def test_permuting_slots_with_rewards_and_mask_changes_nothing(loss_type, options, ties):
    policy, reference, rewards, mask = random_lists(20, 5, seed=9, ties=ties)
    loss, _ = listwise_loss(loss_type, policy, reference, rewards, mask, 0.2, **options)
    gen = torch.Generator().manual_seed(1)
    perm = torch.stack([torch.randperm(5, generator=gen) for _ in range(20)])
    moved = [t.gather(1, perm) for t in (policy, reference, rewards, mask)]
    loss_p, _ = listwise_loss(loss_type, *moved, 0.2, **options)
    torch.testing.assert_close(loss_p, loss, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("loss_type", "options"), [("listmle", {}), ("kpo", {"k": 1}), ("kpo", {"k": 2})])
def test_gradcheck_float64_with_ties_and_ragged_lists(loss_type, options):
    policy, reference, rewards, mask = random_lists(6, 5, seed=13, ties=True)

    def fn(p):
        return listwise_loss(loss_type, p, reference, rewards, mask, 0.4, **options)[0]

    assert torch.autograd.gradcheck(fn, (policy.clone().requires_grad_(),), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["listmle", "kpo"])
def test_huge_margins_stay_finite(loss_type):
    """float32, log-ratios +-1e4, beta = 1: s = (1e4, 0, -1e4).

    Annotated order = the model's order: every term log(1 + e^-1e4 ...) rounds to 0, loss 0.
    Reversed rewards: slot 2 first: log(1 + e^1e4 + e^2e4) = 2e4; then slot 1: log(1 + e^1e4) = 1e4; listmle
    3e4 with gradient d/ds = (1 + 1, -1, -1) = (2, -1, -1). kpo (k = 1) keeps only the first term: 2e4,
    gradient (1, 0, -1).
    """
    policy = torch.tensor([[1e4, 0.0, -1e4]], requires_grad=True)
    zeros, mask = torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool)
    agree, _ = listwise_loss(loss_type, policy, zeros, torch.tensor([[3.0, 2.0, 1.0]]), mask, 1.0)
    assert agree.item() == 0.0
    loss, metrics = listwise_loss(loss_type, policy, zeros, torch.tensor([[1.0, 2.0, 3.0]]), mask, 1.0)
    loss.sum().backward()
    expected_loss, expected_grad = (3e4, [2.0, -1.0, -1.0]) if loss_type == "listmle" else (2e4, [1.0, 0.0, -1.0])
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    torch.testing.assert_close(policy.grad, torch.tensor([expected_grad]), rtol=0, atol=1e-6)
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("k", [0, -2, 1.5, True, None])
def test_bad_k_is_a_clear_error(k):
    policy = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="option k"):
        listwise_loss("kpo", policy, policy, torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3, dtype=torch.bool), 0.1,
                      k=k)


@pytest.mark.parametrize(("loss_type", "k"), [("listmle", None), ("kpo", 1), ("kpo", 2), ("kpo", 3)])
def test_ties_and_ragged_lists_equal_the_whole_permutation_reference(loss_type, k):
    """8 lists with rewards from 3 levels (ties) and ragged masks (K = 2..6 valid) against ``tied_reference``."""
    policy, reference, rewards, _ = random_lists(8, 6, seed=21, ties=True)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 0, 0, 1, 0], [1, 0, 1, 0, 1, 0], [1, 1, 0, 1, 0, 1],
                         [0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 0, 0, 1, 1, 1], [1, 1, 1, 0, 1, 1]]).bool()
    beta = 0.7
    loss, _ = listwise_loss(loss_type, policy, reference, rewards, mask, beta, **({"k": k} if k else {}))
    scores = (beta * (policy - reference)).tolist()
    expected = [tied_reference(scores[b], rewards[b].tolist(), mask[b].tolist(), k) for b in range(8)]
    assert sorted({int(m.sum()) for m in mask}) == [2, 3, 4, 5, 6]  # ragged: every K from 2 to 6
    assert sum(len(set(r[m].tolist())) < int(m.sum()) for r, m in zip(rewards, mask, strict=True)) >= 4  # ties
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-10)

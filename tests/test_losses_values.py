"""Hand-worked values of every loss and metric in nemo_lpo.losses.

Shared case A (unless a test says otherwise): beta = 0.1, policy - reference log-ratios (1, 0, -1),
rewards (3, 1, 2) (unsorted on purpose), all three slots valid. Implicit rewards r_theta = (0.1, 0, -0.1).
Ordered pairs with r_i > r_j: (0,1) m=|9-1|=8, margin 0.1; (0,2) m=|9-4|=5, margin 0.2;
(2,1) m=|4-1|=3, margin -0.1. sp(x) = log(1 + e^x) = -log sigma(-x): sp(-0.1) = 0.6443966601,
sp(-0.2) = 0.5981388694, sp(0.1) = 0.7443966601, ln 2 = 0.6931471806.
"""

import math

import pytest
import torch

from nemo_lpo.losses import listwise_loss

LN2 = math.log(2.0)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def run(loss_type, logratios, rewards, mask=None, beta=0.1, reference=None, **options):
    """One list (or a batch when given nested lists), float64, reference = 0 unless given."""
    policy = torch.tensor(logratios, dtype=torch.float64)
    policy = policy.unsqueeze(0) if policy.dim() == 1 else policy
    ref = torch.zeros_like(policy) if reference is None else torch.tensor(reference, dtype=torch.float64).view_as(policy)
    rew = torch.tensor(rewards, dtype=torch.float64).view_as(policy)
    valid = torch.ones_like(policy, dtype=torch.bool) if mask is None else torch.tensor(mask).view_as(policy)
    return listwise_loss(loss_type, policy + ref, ref, rew, valid, beta, **options)


CASE_A = ([1.0, 0.0, -1.0], [3.0, 1.0, 2.0])


def test_lpo_case_a():
    """Lpo case a.

    lpo = 8*sp(-0.1) + 5*sp(-0.2) + 3*sp(0.1) = 5.1551733 + 2.9906943 + 2.2331900 = 10.3790576.
    """
    loss, _ = run("lpo", *CASE_A)
    assert loss.item() == pytest.approx(10.379057608, abs=1e-6)


def test_lpo_preference_uses_unit_weights():
    """Lpo preference uses unit weights.

    preference=True: m = 1, lpo = sp(-0.1) + sp(-0.2) + sp(0.1) = 1.9869322.
    """
    loss, _ = run("lpo", *CASE_A, preference=True)
    assert loss.item() == pytest.approx(1.986932190, abs=1e-6)


def test_lpo_abs_eq8_case_a():
    """Lpo abs eq8 case a.

    lpo_abs = lpo + (1/3)(log s(-0.1) + log s(0) + log s(0.1)) = 10.3790576 - (1/3)(0.7443967 + 0.6931472
    + 0.6443967) = 10.3790576 - 0.6939802 = 9.6850774.
    """
    loss, _ = run("lpo_abs", *CASE_A)
    assert loss.item() == pytest.approx(9.685077441, abs=1e-6)


def test_lpo_abs_table1_case_a():
    """Lpo abs table1 case a.

    lpo_abs_table1 = lpo + (1/3)(s(-0.1) + s(0) + s(0.1)) = 10.3790576 + (1/3)(1 + 0.5) = 10.8790576
    (s(-x) + s(x) = 1).
    """
    loss, _ = run("lpo_abs_table1", *CASE_A)
    assert loss.item() == pytest.approx(10.879057608, abs=1e-6)


def test_lpo_abs_uses_valid_count_of_each_list():
    """Lpo abs uses valid count of each list.

    Ragged: slots (1, 0, -1) with rewards (3, -, 2), slot 1 invalid; K = 2 for eq. 8. lpo: pair (0,2)
    m = 5, margin 0.2 -> 5*sp(-0.2) = 2.9906943; anchor (1/2)(log s(-0.1) + log s(0.1)) = -(0.7443967 +
    0.6443967)/2 = -0.6943967 -> 2.2962977.
    """
    loss, _ = run("lpo_abs", [1.0, 0.0, -1.0], [3.0, 7.0, 2.0], mask=[True, False, True])
    assert loss.item() == pytest.approx(5 * 0.5981388694 - (0.7443966601 + 0.6443966601) / 2, abs=1e-6)


def test_dpo_unsorted_pair():
    """Dpo unsorted pair.

    beta = 0.5, log-ratios (2, -1), rewards (0, 1): winner is slot 1. r_theta = (1, -0.5);
    dpo = -log s(-0.5 - 1) = sp(1.5) = 1.7014133.
    """
    loss, _ = run("dpo", [2.0, -1.0], [0.0, 1.0], beta=0.5)
    assert loss.item() == pytest.approx(1.701413278, abs=1e-6)


def test_dpo_1vs0_case_a():
    """Dpo 1vs0 case a.

    Best = slot 0 (reward 3); pairs (0,1), (0,2): sp(-0.1) + sp(-0.2) = 1.2425355.
    """
    loss, _ = run("dpo_1vs0", *CASE_A)
    assert loss.item() == pytest.approx(1.242535529, abs=1e-6)


def test_dpo_pw_case_a():
    """Dpo pw case a.

    All three ordered pairs, weight 1: sp(-0.1) + sp(-0.2) + sp(0.1) = 1.9869322.
    """
    loss, _ = run("dpo_pw", *CASE_A)
    assert loss.item() == pytest.approx(1.986932190, abs=1e-6)


def test_ipo_pair():
    """Ipo pair.

    beta = 0.5, log-ratios (2, -1), rewards (0, 1): h = lr_w - lr_l = -1 - 2 = -3; 1/(2 beta) = 1;
    ipo = (-3 - 1)^2 = 16.
    """
    loss, _ = run("ipo", [2.0, -1.0], [0.0, 1.0], beta=0.5)
    assert loss.item() == pytest.approx(16.0, abs=1e-9)


def test_kto_batch_reference_point_clamped_at_zero():
    """Kto batch reference point clamped at zero.

    Case A: z = clamp(mean(1, 0, -1), 0) = 0. Desirable slot 0: s(-0.1 (1 - 0)) = 0.4750208;
    undesirable slot 1: s(-0.1 (0 - 0)) = 0.5; slot 2: s(-0.1 (0 - (-1))) = 0.4750208 -> 1.4500416.
    """
    loss, _ = run("kto", *CASE_A)
    assert loss.item() == pytest.approx(1.450041625, abs=1e-6)


def test_kto_positive_reference_point():
    """Kto positive reference point.

    Log-ratios (3, 1, -1), rewards (3, 1, 2): z = mean = 1. Desirable: s(-0.1 (3 - 1)) = s(-0.2) =
    0.4501660; slot 1: s(-0.1 (1 - 1)) = 0.5; slot 2: s(-0.1 (1 + 1)) = 0.4501660 -> 1.4003320. Passing
    kto_z=1 explicitly gives the same; kto_z=0 gives s(-0.3) + s(0.1) + s(-0.1) = 0.4255575 + 1 = 1.4255575.
    """
    loss, _ = run("kto", [3.0, 1.0, -1.0], [3.0, 1.0, 2.0])
    explicit, _ = run("kto", [3.0, 1.0, -1.0], [3.0, 1.0, 2.0], kto_z=1.0)
    other, _ = run("kto", [3.0, 1.0, -1.0], [3.0, 1.0, 2.0], kto_z=0.0)
    assert loss.item() == pytest.approx(1.400332005, abs=1e-6)
    assert explicit.item() == pytest.approx(1.400332005, abs=1e-6)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert other.item() == pytest.approx(sig(-0.3) + sig(0.1) + sig(-0.1), abs=1e-6)
    assert other.item() == pytest.approx(1.4255575, abs=1e-6)


def test_kto_weights():
    """Kto weights.

    Case A with desirable_weight 2, undesirable_weight 0.5: 2*0.4750208 + 0.5*(0.5 + 0.4750208) = 1.4375520.
    """
    loss, _ = run("kto", *CASE_A, desirable_weight=2.0, undesirable_weight=0.5)
    assert loss.item() == pytest.approx(2 * 0.4750208125 + 0.5 * 0.9750208125, abs=1e-6)


def test_infonca_case_a():
    """Infonca case a.

    p = softmax(3, 1, 2) = (0.6652410, 0.0900306, 0.2447285); log softmax(r_theta) = r_theta - lse,
    lse = log(e^0.1 + 1 + e^-0.1) = 1.1019428; infonca = lse - sum p_i r_theta_i = 1.1019428 -
    (0.0665241 - 0.0244728) = 1.0598916.
    """
    loss, _ = run("infonca", *CASE_A)
    assert loss.item() == pytest.approx(1.059891600, abs=1e-6)


def test_infonca_alpha_temperature():
    """Infonca alpha temperature.

    alpha = 2: p = softmax(1.5, 0.5, 1) = e^(1.5, .5, 1)/S, S = 4.4816891 + 1.6487213 + 2.7182818 =
    8.8486922 -> p = (0.5064804, 0.1863237, 0.3071959); loss = 1.1019428 - 0.1*(0.5064804 - 0.3071959)
    = 1.0820144.
    """
    loss, _ = run("infonca", *CASE_A, alpha=2.0)
    assert loss.item() == pytest.approx(1.1019428482 - 0.1 * (0.5064804 - 0.3071959), abs=1e-6)


def test_nca_case_a():
    """Nca case a.

    nca = sum p_i sp(-r_theta_i) + (1/3) sum sp(r_theta_i) = 0.6652410*0.6443967 + 0.0900306*0.6931472
    + 0.2447285*0.7443967 + 0.6939802 = 0.4286819 + 0.0624043 + 0.1821751 + 0.6939802 = 1.3672387.
    """
    loss, _ = run("nca", *CASE_A)
    assert loss.item() == pytest.approx(1.367238711, abs=1e-6)


def test_lipo_lambda_case_a():
    """Lipo lambda case a.

    Ranks under r_theta (0.1, 0, -0.1): tau = (1, 2, 3); 1/D = 1/ln(1+tau) = (1.4426950, 0.9102392,
    0.7213475); G = 2^r - 1 = (7, 1, 3). Weights: (0,1) 6*0.5324558 = 3.1947349; (0,2) 4*0.7213475 =
    2.8853901; (2,1) 2*0.1888917 = 0.3777834. Loss = 3.1947349*sp(-0.1) + 2.8853901*sp(-0.2) +
    0.3777834*sp(0.1) = 2.0586788 + 1.7258653 + 0.2812171 = 4.0657612.
    """
    loss, _ = run("lipo_lambda", *CASE_A)
    assert loss.item() == pytest.approx(4.065761162, abs=1e-6)


def test_lipo_lambda_ranks_follow_model_not_slots():
    """Lipo lambda ranks follow model not slots.

    Log-ratios (-1, 0, 1) (reversed model order), rewards (3, 1, 2): tau = (3, 2, 1), 1/D = (0.7213475,
    0.9102392, 1.4426950); weights (0,1) 6*0.1888917 = 1.1333502; (0,2) 4*0.7213475 = 2.8853901; (2,1)
    2*0.5324558 = 1.0649116; margins (0,1) -0.1, (0,2) -0.2, (2,1) 0.1 -> 1.1333502*sp(0.1) +
    2.8853901*sp(0.2) + 1.0649116*sp(-0.1) = 0.8436619 + 2.3029418 + 0.6862260 = 3.8328296.
    """
    loss, _ = run("lipo_lambda", [-1.0, 0.0, 1.0], [3.0, 1.0, 2.0])
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    d = [1 / math.log(4), 1 / math.log(3), 1 / math.log(2)]
    expected = 6 * (d[1] - d[0]) * sp(0.1) + 4 * (d[2] - d[0]) * sp(0.2) + 2 * (d[2] - d[1]) * sp(-0.1)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(3.8328296, abs=1e-6)


def test_sft_term_on_best_response():
    """Sft term on best response.

    policy (-4, -6, -8), reference (-5, -6, -7): log-ratios (1, 0, -1) = case A, lpo = 10.3790576. Best
    = slot 0, length 2: NLL = -(-4)/2 = 2; sft_weight 0.5 adds 1 -> 11.3790576.
    """
    lengths = torch.tensor([[2, 5, 4]])
    loss, _ = run("lpo", CASE_A[0], CASE_A[1], reference=[-5.0, -6.0, -7.0], sft_weight=0.5,
                  response_lengths=lengths)
    assert loss.item() == pytest.approx(11.379057608, abs=1e-6)


def test_sft_loss_is_the_best_responses_nll_per_token():
    """Sft loss is the best response's NLL per token.

    policy (-4, -6, -8), reference (-5, -6, -7), rewards (3, 1, 2) = case A, lengths (2, 5, 4): best = slot 0,
    sft = -(-4)/2 = 2. The reference and β play no part: reference 0 or β = 1 give 2 as well. sft_weight 0.5
    adds its own 0.5 * 2 -> 3. The gradient is -1/length(best) = -0.5 at the best slot and 0 elsewhere.
    """
    lengths = torch.tensor([[2, 5, 4]])
    loss, metrics = run("sft", CASE_A[0], CASE_A[1], reference=[-5.0, -6.0, -7.0], response_lengths=lengths)
    assert loss.item() == pytest.approx(2.0, abs=1e-12)
    assert metrics["logps/chosen"].item() == pytest.approx(-4.0) and metrics["lists/valid"].item() == 1.0
    other_ref, _ = run("sft", [-4.0, -6.0, -8.0], CASE_A[1], beta=1.0, response_lengths=lengths)
    assert other_ref.item() == pytest.approx(2.0, abs=1e-12)
    with_weight, _ = run("sft", CASE_A[0], CASE_A[1], reference=[-5.0, -6.0, -7.0], sft_weight=0.5,
                         response_lengths=lengths)
    assert with_weight.item() == pytest.approx(3.0, abs=1e-12)
    policy = torch.tensor([[-4.0, -6.0, -8.0]], dtype=torch.float64, requires_grad=True)
    out, _ = listwise_loss("sft", policy, torch.zeros(1, 3, dtype=torch.float64), torch.tensor([[3.0, 1.0, 2.0]]),
                           torch.ones(1, 3, dtype=torch.bool), 0.1, response_lengths=lengths)
    out.sum().backward()
    assert policy.grad.tolist() == [[-0.5, 0.0, 0.0]]


def test_sft_loss_respects_invalid_slots_and_ties():
    """Sft loss respects invalid slots and ties.

    Three lists, lengths (7, 2, 5) / (3, 4, 1) / (6, 6, 6):
    1. policy (nan, -3, -5), rewards (9, 1, 2), slot 0 invalid (its reward 9 and its nan ignored): best = slot 2,
       sft = 5/5 = 1.
    2. policy (-6, -2, -9), rewards (1, 1, 0), a tie for best: the lowest slot, 0, -> 6/3 = 2.
    3. only slot 1 valid: fewer than 2 valid responses, loss exactly 0 and no gradient (as every loss).
    The invalid slots' lengths (7 in list 1) are never read; gradients: -1/5, -1/3 at the best slots.
    """
    policy = torch.tensor([[float("nan"), -3.0, -5.0], [-6.0, -2.0, -9.0], [-1.0, -2.0, -3.0]],
                          dtype=torch.float64, requires_grad=True)
    rewards = torch.tensor([[9.0, 1.0, 2.0], [1.0, 1.0, 0.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    mask = torch.tensor([[False, True, True], [True, True, True], [False, True, False]])
    lengths = torch.tensor([[7, 2, 5], [3, 4, 1], [6, 6, 6]])
    loss, metrics = listwise_loss("sft", policy, torch.zeros_like(policy), rewards, mask, 0.1, response_lengths=lengths)
    assert loss.tolist() == pytest.approx([1.0, 2.0, 0.0], abs=1e-12)
    assert metrics["lists/valid"].item() == 2.0
    loss.sum().backward()
    expected = torch.tensor([[0.0, 0.0, -1 / 5], [-1 / 3, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(policy.grad, expected, rtol=0, atol=1e-15)


def test_sft_loss_needs_response_lengths():
    """Without response_lengths there is no per-token NLL: a clear error naming the loss."""
    with pytest.raises(ValueError, match="loss_type='sft' needs response_lengths"):
        run("sft", *CASE_A)


def test_ties_contribute_nothing_to_lpo():
    """Ties contribute nothing to lpo.

    Rewards (2, 2, 1), log-ratios (1, 0, -1): the tie (0,1) gives no pair; (0,2) m = 3, margin 0.2;
    (1,2) m = 3, margin 0.1 -> 3*sp(-0.2) + 3*sp(-0.1) = 3.7276066. All rewards tied -> 0 (list valid).
    """
    loss, metrics = run("lpo", [1.0, 0.0, -1.0], [2.0, 2.0, 1.0])
    assert loss.item() == pytest.approx(3.727606588, abs=1e-6)
    tied, metrics = run("lpo", [1.0, 0.0, -1.0], [2.0, 2.0, 2.0])
    assert tied.item() == 0.0 and metrics["lists/valid"].item() == 1.0


def test_metrics_case_a():
    """Metrics case a.

    r_theta = (0.1, 0, -0.1); chosen = slot 0 = 0.1; rejected = mean(0, -0.1) = -0.05; margin 0.15;
    accuracy: (0,1) 0.1 > 0 yes, (0,2) 0.2 > 0 yes, (2,1) -0.1 no -> 2/3. Policy (-4, -6, -8): logps/chosen
    -4, logps/rejected -7. Kendall tau-b: (0,1) C, (0,2) C, (1,2) D, no ties -> (2 - 1)/3 = 1/3.
    """
    _, m = run("lpo", CASE_A[0], CASE_A[1], reference=[-5.0, -6.0, -7.0])
    expected = {"rewards/chosen": 0.1, "rewards/rejected": -0.05, "rewards/margins": 0.15,
                "rewards/accuracies": 2 / 3, "logps/chosen": -4.0, "logps/rejected": -7.0,
                "rewards/kendall_tau": 1 / 3, "lists/valid": 1.0}
    assert set(m) == set(expected)
    for name, value in expected.items():
        assert m[name].dim() == 0 and not m[name].requires_grad
        assert m[name].item() == pytest.approx(value, abs=1e-9), name


def test_kendall_tau_b_with_annotated_ties():
    """Kendall tau b with annotated ties.

    Rewards (2, 2, 1), r_theta (0.1, 0, -0.1): n0 = 3 pairs, (0,1) tied in rewards (n1 = 1), no implicit
    ties; concordant (0,2), (1,2) -> tau-b = 2 / sqrt((3 - 1)(3 - 0)) = 2/sqrt(6) = 0.8164966. Accuracy: 2 of 2
    annotated pairs -> 1.
    """
    _, m = run("lpo", [1.0, 0.0, -1.0], [2.0, 2.0, 1.0])
    assert m["rewards/kendall_tau"].item() == pytest.approx(0.8164965809, abs=1e-9)
    assert m["rewards/accuracies"].item() == 1.0


def test_metrics_average_over_valid_lists_only():
    """Metrics average over valid lists only.

    Batch: case A (chosen 0.1, accuracy 2/3), a pair with rewards (1, 0), log-ratios (0.5, 0.2) (chosen
    0.05, accuracy 1), and a list with one valid slot (invalid: loss 0, not averaged). lists/valid = 2;
    rewards/chosen = (0.1 + 0.05)/2 = 0.075; accuracies = (2/3 + 1)/2 = 5/6.
    """
    loss, m = run("lpo", [[1.0, 0.0, -1.0], [0.5, 0.2, 0.0], [9.0, 0.0, 0.0]],
                  [[3.0, 1.0, 2.0], [1.0, 0.0, 0.0], [5.0, 0.0, 0.0]],
                  mask=[[True, True, True], [True, True, False], [True, False, False]])
    assert m["lists/valid"].item() == 2.0
    assert m["rewards/chosen"].item() == pytest.approx(0.075, abs=1e-9)
    assert m["rewards/accuracies"].item() == pytest.approx(5 / 6, abs=1e-9)
    assert loss[2].item() == 0.0
    assert loss[1].item() == pytest.approx(math.log1p(math.exp(-0.03)), abs=1e-9)  # m = 1, margin 0.03


def test_no_valid_list_gives_zero_metrics():
    """No valid list gives zero metrics.

    Every list has < 2 valid responses: losses 0, every metric 0, lists/valid 0.
    """
    loss, m = run("nca", [[1.0, 2.0], [3.0, 4.0]], [[1.0, 0.0], [0.0, 1.0]], mask=[[True, False], [False, False]])
    assert torch.equal(loss, torch.zeros(2, dtype=torch.float64))
    assert all(value.item() == 0.0 for value in m.values())

"""Ranking metrics on hand-worked lists."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from nemo_lpo import metrics as M

# one list: scores rank 0 > 2 > 1, rewards rank 0 > 1 > 2; pairs (0,1) and (0,2) right, (1,2) wrong
SCORES = torch.tensor([[3.0, 1.0, 2.0]])
REWARDS = torch.tensor([[1.0, 0.5, 0.0]])
FULL = torch.ones(1, 3, dtype=torch.bool)


def test_pairwise_accuracy_hand_worked():
    assert M.pairwise_accuracy(SCORES, REWARDS, FULL).tolist() == pytest.approx([2 / 3])
    # a score tie is half a pair: (0,1) right, (0,2) right, (1,2) tied -> 2.5 / 3
    assert M.pairwise_accuracy(torch.tensor([[3.0, 1.0, 1.0]]), REWARDS, FULL).item() == pytest.approx(2.5 / 3)
    # reward ties are not pairs: only (0,1) and (0,2) count, both right
    assert M.pairwise_accuracy(SCORES, torch.tensor([[1.0, 0.0, 0.0]]), FULL).item() == pytest.approx(1.0)


def test_masked_slots_and_undefined_lists():
    scores = torch.tensor([[3.0, 1.0, 9.0], [0.0, 0.0, 0.0]])
    rewards = torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.2, 0.7]])
    mask = torch.tensor([[True, True, False], [True, True, False]])  # slot 2 padded: its 9.0 must not count
    acc = M.pairwise_accuracy(scores, rewards, mask)
    assert acc[0].item() == 1.0 and math.isnan(acc[1].item())  # list 1: only a reward tie is left
    assert math.isnan(M.kendall_tau(scores, rewards, mask)[1].item())
    assert math.isnan(M.ndcg(scores, rewards, mask)[1].item())
    assert M.num_ordered_pairs(rewards, mask).tolist() == [1, 0]


def test_kendall_tau_hand_worked():
    # C = 2, D = 1, no ties: (2 - 1) / 3
    assert M.kendall_tau(SCORES, REWARDS, FULL).item() == pytest.approx(1 / 3)
    assert M.kendall_tau(REWARDS * 5, REWARDS, FULL).item() == pytest.approx(1.0)
    assert M.kendall_tau(-REWARDS, REWARDS, FULL).item() == pytest.approx(-1.0)
    # tau-b with a score tie: scores [2,1,1], rewards [1,.5,0]: C = 2, D = 0, n0 = 3, n1 = 1 -> 2 / sqrt(2 * 3)
    assert M.kendall_tau(torch.tensor([[2.0, 1.0, 1.0]]), REWARDS, FULL).item() == pytest.approx(2 / math.sqrt(6))
    assert M.kendall_tau(torch.zeros(1, 3), REWARDS, FULL).item() == 0.0  # constant scores: no association


def test_ndcg_hand_worked():
    # gains = r - min r = [1, .5, 0]; order by score: 0, 2, 1 -> DCG = 1/log2(2) + 0/log2(3) + .5/log2(4) = 1.25
    # ideal: 1/log2(2) + .5/log2(3)
    ideal = 1 + 0.5 / math.log2(3)
    assert M.ndcg(SCORES, REWARDS, FULL).item() == pytest.approx(1.25 / ideal)
    assert M.ndcg(REWARDS, REWARDS, FULL).item() == pytest.approx(1.0)
    # @1: only the top item counts; the best is on top
    assert M.ndcg(SCORES, REWARDS, FULL, k=1).item() == pytest.approx(1.0)
    assert M.ndcg(torch.tensor([[0.0, 1.0, 2.0]]), REWARDS, FULL, k=1).item() == pytest.approx(0.0)
    # shifting all rewards changes nothing (gains are relative to the worst)
    assert M.ndcg(SCORES, REWARDS - 7, FULL).item() == pytest.approx(1.25 / ideal)


def test_ndcg_ties_are_the_mean_over_orders():
    scores = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    rewards = torch.tensor([[0.3, 1.0, 0.0, 0.6]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    values = []
    for perm in itertools.permutations(range(3)):  # every order of the tied top three
        tie_break = torch.tensor([[3.0 - perm.index(0), 3.0 - perm.index(1), 3.0 - perm.index(2), 0.0]])
        values.append(M.ndcg(tie_break, rewards, mask).item())
    assert M.ndcg(scores, rewards, mask).item() == pytest.approx(sum(values) / len(values))


def test_best_worst_logps():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    rewards = torch.tensor([[0.1, 0.9, 0.5], [0.1, 0.9, 2.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    best, worst = M.best_worst_logps(logps, rewards, mask)
    assert best.tolist() == [-2.0, -5.0] and worst.tolist() == [-1.0, -4.0]


def test_ranking_metrics_before_training_is_chance():
    # the policy equals the reference: every implicit reward is 0, so ranking by it is a coin flip
    logps = torch.tensor([[-3.0, -1.0, -2.0, -9.0]])
    rewards = torch.tensor([[0.0, 1.0, 0.5, 0.2]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    out = M.ranking_metrics(logps, logps.clone(), rewards, mask, beta=0.1)
    assert out["implicit/accuracy"] == 0.5 and out["implicit/kendall_tau"] == 0.0
    assert out["likelihood/accuracy"] == pytest.approx(5 / 6)
    # pairs by reward: (1,2) (1,3) (1,0) (2,3) (2,0) (3,0); log pi order 1 > 2 > 0 > 3: (3,0) is wrong
    assert out["logps/best"] == -1.0 and out["logps/worst"] == -3.0
    assert out["lists"] == 1 and out["pairs"] == 6


def test_ranking_metrics_uses_beta_and_reference():
    policy = torch.tensor([[-1.0, -1.0]])
    reference = torch.tensor([[-2.0, -0.5]])  # implicit rewards: +beta, -0.5 beta
    rewards = torch.tensor([[0.0, 1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    out = M.ranking_metrics(policy, reference, rewards, mask, beta=0.5)
    assert out["implicit/accuracy"] == 0.0 and out["implicit/kendall_tau"] == -1.0
    assert M.implicit_rewards(policy, reference, 0.5).tolist() == [[0.5, -0.25]]

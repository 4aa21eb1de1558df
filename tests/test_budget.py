"""gfnet.budget against straightforward per-sample loops written from the reference's semantics
(MSDNet's dynamic_find_threshold / dynamic_eval_with_threshold)."""
import math

import pytest
import torch

from gfnet import budget


def loop_find_thresholds(probs, proportions):
    """The reference's loops: scan samples by descending max prob at step k, count those not yet
    exited, the out_n-th gives the threshold; then everybody >= it is marked exited."""
    n_stage, n_sample, _ = probs.shape
    max_preds, _ = probs.max(dim=2)
    _, sorted_idx = max_preds.sort(dim=1, descending=True)
    filtered = torch.zeros(n_sample)
    thresholds = torch.full((n_stage,), 1e8, dtype=probs.dtype)
    for k in range(n_stage - 1):
        count = 0
        out_n = math.floor((torch.tensor(float(n_sample), dtype=torch.float32) * proportions[k]).item())
        for i in range(n_sample):
            ori_idx = sorted_idx[k][i]
            if filtered[ori_idx] == 0:
                count += 1
                if count == out_n:
                    thresholds[k] = max_preds[k][ori_idx]
                    break
        filtered.add_(max_preds[k].ge(thresholds[k]).type_as(filtered))
    thresholds[n_stage - 1] = -1e8
    return thresholds


def loop_evaluate(probs, targets, flops, thresholds):
    n_stage, n_sample, _ = probs.shape
    max_preds, argmax_preds = probs.max(dim=2)
    correct, exits = 0, [0] * n_stage
    for i in range(n_sample):
        for k in range(n_stage):
            if max_preds[k][i].item() >= thresholds[k]:
                correct += int(int(targets[i]) == int(argmax_preds[k][i]))
                exits[k] += 1
                break
    expected = sum(exits[k] / n_sample * flops[k] for k in range(n_stage))
    return correct * 100.0 / n_sample, expected


def random_probs(T, N, C, seed, quantise=None):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, N, C, generator=g) * 2.0
    if quantise:
        # few distinct logit values: many exactly tied max probabilities across samples
        logits = torch.round(logits * quantise) / quantise
    return torch.softmax(logits, dim=2)


CASES = [(5, 200, 10, None), (3, 97, 7, 1), (4, 64, 3, 2), (2, 31, 5, None), (1, 10, 4, None), (5, 1000, 20, 1)]


@pytest.mark.parametrize("T,N,C,quantise", CASES)
def test_find_thresholds_matches_loop(T, N, C, quantise):
    probs = random_probs(T, N, C, seed=T * 1000 + N, quantise=quantise)
    for p in (1, 7, 20, 33, 39):
        proportions = budget.exit_proportions(p / 20.0, T)
        got = budget.find_thresholds(probs, None, proportions)
        want = loop_find_thresholds(probs, proportions)
        assert torch.equal(got, want), (p, got, want)


def test_find_thresholds_sentinels_and_counts():
    probs = random_probs(3, 50, 6, seed=3)
    # nobody at step 0 (floor(50 * 0.01) = 0), more than the remaining at step 1
    got = budget.find_thresholds(probs, None, torch.tensor([0.01, 0.99, 0.0]))
    assert got[0] == budget.NO_EXIT_THRESHOLD and got[2] == budget.LAST_STEP_THRESHOLD
    assert torch.equal(got, loop_find_thresholds(probs, torch.tensor([0.01, 0.99, 0.0])))
    # exactly the wanted number exits at step 0 when there are no ties
    got = budget.find_thresholds(probs, None, torch.tensor([0.2, 0.5, 0.3]))
    assert int((probs[0].max(1).values >= got[0]).sum()) == 10


@pytest.mark.parametrize("T,N,C,quantise", CASES)
def test_evaluate_matches_loop(T, N, C, quantise):
    probs = random_probs(T, N, C, seed=7 * T + N, quantise=quantise)
    targets = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(N))
    flops = [float(100 * (k + 1) + 3 * k * k) for k in range(T)]
    train = random_probs(T, 2 * N, C, seed=N + 1, quantise=quantise)
    for p in (2, 15, 39):
        thresholds = budget.find_thresholds(train, None, budget.exit_proportions(p / 20.0, T))
        accuracy, cost = budget.evaluate(probs, targets, flops, thresholds)
        want_accuracy, want_cost = loop_evaluate(probs, targets, flops, thresholds)
        assert accuracy == pytest.approx(want_accuracy, abs=1e-12)
        assert cost == pytest.approx(want_cost, rel=1e-12)


def test_exit_steps_first_step_that_passes():
    probs = torch.tensor([[[0.6, 0.4], [0.5, 0.5], [0.9, 0.1]],
                          [[0.3, 0.7], [0.8, 0.2], [0.5, 0.5]],
                          [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]])
    steps = budget.exit_steps(probs, torch.tensor([0.6, 0.8, -1e8]))
    assert steps.tolist() == [0, 1, 0]
    # the compact (max_probs, preds) form gives the same
    assert torch.equal(budget.exit_steps(budget.confidences(probs), torch.tensor([0.6, 0.8, -1e8])), steps)
    # without the -1e8 sentinel, a sample that never passes stops at the last step anyway
    assert budget.exit_steps(probs, torch.tensor([0.95, 0.95, 0.95])).tolist() == [2, 2, 2]


def test_exit_proportions_reference_formula():
    for T in (1, 3, 5):
        for p in (1, 20, 39):
            q = torch.tensor([p / 20.0], dtype=torch.float32)
            want = torch.exp(torch.log(q) * torch.arange(1, T + 1, dtype=torch.float32))
            want = want / want.sum()
            got = budget.exit_proportions(p / 20.0, T)
            assert got.dtype == torch.float32 and torch.equal(got, want)
    with pytest.raises(ValueError):
        budget.exit_proportions(0.0, 3)


def test_budget_curve_fit_and_stored():
    T, C = 4, 8
    train = random_probs(T, 300, C, seed=11)
    val = random_probs(T, 120, C, seed=12)
    val_targets = torch.randint(0, C, (120,), generator=torch.Generator().manual_seed(5))
    flops = [10.0, 25.0, 40.0, 55.0]
    thresholds, accuracies, costs = budget.budget_curve(train, None, val, val_targets, flops)
    assert thresholds.shape == (39, T) and len(accuracies) == len(costs) == 39
    for p in (1, 20, 39):
        row = loop_find_thresholds(train, budget.exit_proportions(p / 20.0, T))
        assert torch.equal(thresholds[p - 1], row)
        acc, cost = loop_evaluate(val, val_targets, flops, row)
        assert accuracies[p - 1] == pytest.approx(acc) and costs[p - 1] == pytest.approx(cost)
    # larger q puts more exits late: the expected cost grows (weakly) along the curve on the train set
    train_costs = budget.budget_curve(train, None, train, torch.zeros(300, dtype=torch.long), flops)[2]
    assert all(b >= a - 1e-9 for a, b in zip(train_costs, train_costs[1:]))
    # stored thresholds (eval mode 1) are used as given; the compact form gives the same numbers
    again = budget.budget_curve(None, None, budget.confidences(val), val_targets, flops, thresholds=thresholds)
    assert again[1] == accuracies and again[2] == costs
    with pytest.raises(ValueError):
        budget.budget_curve(None, None, val, val_targets, flops)

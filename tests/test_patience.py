"""The `patience` policy (PABEE): stop when the last k exits an example passed agree.

A graph whose three exits are set by hand (exit i predicts the sign of feature i) pins
the exact answers: each example's agreeing streaks, where each patience stops it, and
which k the calibration picks for a budget that admits k = 2 but not k = 3. Calibration
is checked against what the returned policy does when the executor runs it."""

from __future__ import annotations

import types

import pytest
import torch
from torch.utils.data import TensorDataset

import d2graph
from d2graph.check import check_text
from d2graph.diagnostics import D2GraphError
from d2graph.policies import load_policy, run_policy, save_policy
from d2graph.trainers.baselines import PatienceTrainer, agreeing_streaks, exit_chains

from .conftest import ROOT

GRAPH = """graph signs {
  input x [3]
  output y [merge=select]
  node B1 [cost=10] = identity
  node B2 [cost=10] = identity
  node B3 [cost=10] = identity
  node E1 = fc(2)
  node E2 = fc(2)
  node E3 = fc(2)
  control D1 = confidence, fc(2)
  control D2 [merge=concat] = confidence(exits=2), fc(2)
  x -> B1 -> B2 -> B3
  B1 -> E1
  B2 -> E2
  B3 -> E3
  E1 -> D1
  E1, E2 -> D2
  D1 => skip | B2
  D2 => skip | B3
  E3, E2, E1 -> y
}"""

# Sign patterns of the three features, i.e. what exits 1, 2 and 3 predict (1 for +).
PATTERNS = torch.tensor([[1., 1., 1.],     # agree from the start: streaks D1 1, D2 2
                         [1., -1., -1.],   # exit 2 disagrees with exit 1: D2 streak 1
                         [-1., -1., 1.]])  # exits 1 and 2 agree on class 0: D2 streak 2


def executor_and_splits():
    graph = check_text(GRAPH, "signs.d2")
    executor = d2graph.compile(graph).eval()
    with torch.no_grad():
        for i, name in enumerate(("E1", "E2", "E3")):
            fc = executor.nodes[name][0]
            fc.weight.zero_()
            fc.bias.zero_()
            fc.weight[0, i], fc.weight[1, i] = -1.0, 1.0  # class 1 iff feature i > 0
    x = PATTERNS.repeat(4, 1) * torch.arange(1, 13, dtype=torch.float32)[:, None]  # scaled: same signs
    y = (x[:, 2] > 0).long()  # the last exit is always right
    ds = TensorDataset(x, y)
    splits = types.SimpleNamespace(train=ds, val=ds, test=ds, classes=2)
    return executor, splits


def stage(logs):
    return types.SimpleNamespace(batch=5, device=torch.device("cpu"), seed=0, log=lambda **m: logs.append(m),
                                 generator=lambda *key: torch.Generator().manual_seed(0))


def test_chains_and_streaks_are_the_exits_passed():
    executor, splits = executor_and_splits()
    chains = exit_chains(executor.graph, 2)
    assert chains == {"D1": ["E1"], "D2": ["E1", "E2"]}
    assert exit_chains(d2graph.load(ROOT / "examples" / "bert_early_exit.d2"), 4)["D3"] == ["E1", "E2", "E3"]
    predictions = {f"E{i + 1}": (PATTERNS[:, i] > 0).long() for i in range(3)}
    streaks = agreeing_streaks(predictions, {"D1": ["E1"], "D2": ["E1", "E2"], "D3": ["E1", "E2", "E3"]})
    assert streaks["D1"].tolist() == [1, 1, 1]
    assert streaks["D2"].tolist() == [2, 1, 2]
    assert streaks["D3"].tolist() == [3, 2, 1]  # exits 2 and 3 agree on the second


# Costs per path (full = 3·10 + 3 exits of 6 + 2 decisions of 6 = 60): stop at D1 costs
# 10 + 6 + 6 = 22, at D2 22 + 10 + 6 + 6 = 44, the end 60. Patterns 1 and 3 agree at D2.
@pytest.mark.parametrize("budget,patience,cost", [
    (0.30, 1, 22 / 60),                          # not even k = 1 (22/60) fits: the cheapest, k = 1
    (0.40, 1, 22 / 60),                          # k = 1: everyone leaves at the first exit
    ((2 * 44 + 60) / 3 / 60, 2, (2 * 44 + 60) / 3 / 60),  # exactly k = 2's cost
    (0.99, 2, (2 * 44 + 60) / 3 / 60),           # k = 3 (never stop) costs 1.0: not within 0.99
    (1.0, 3, 1.0),
])
def test_calibration_picks_the_longest_patience_within_the_budget(budget, patience, cost):
    executor, splits = executor_and_splits()
    logs = []
    policy = PatienceTrainer(budget=budget).fit(executor, splits, stage(logs))
    assert policy.patience == patience
    assert logs[0]["patience"] == patience and logs[0]["val_cost_fraction"] == pytest.approx(cost)
    x, y = splits.val.tensors
    with torch.inference_mode():
        result = run_policy(executor, policy, x)
    assert float(result.cost_fraction.mean()) == pytest.approx(cost)  # what it does = what it logged
    again = load_policy(executor.graph, save_policy(policy))
    assert again.patience == patience and again.decide(executor, x)["D2"].tolist() == policy.decide(executor, x)["D2"].tolist()


def test_where_each_example_leaves_under_patience_two():
    executor, splits = executor_and_splits()
    policy = PatienceTrainer(budget=0.9).fit(executor, splits, stage([]))
    assert policy.patience == 2
    x, _ = splits.val.tensors
    with torch.inference_mode():
        result = run_policy(executor, policy, x[:3])
    assert result.cost.tolist() == [44, 60, 44]


def test_patience_needs_a_head_per_decision():
    graph = d2graph.load(ROOT / "examples" / "high_low.d2")
    with pytest.raises(D2GraphError) as e:
        PatienceTrainer(budget=0.5).check_graph(graph)
    assert "a patience rule needs" in e.value.diagnostics[0].render()

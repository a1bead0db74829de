"""The calibrated baselines (threshold, uniform, oracle, static) on trained and hand-set graphs.

Each calibration is checked twice: against the number the trainer logs, and against what
the returned policy actually does when the executor runs it (mode="force"), so a policy
whose `decide` disagrees with its calibration fails here. A tiny graph with weights set by
hand pins the exact answers (which examples stop, which τ, which cost)."""

from __future__ import annotations

import io
import math
import types

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import d2graph
from d2graph import data as datasets
from d2graph.paths import heads
from d2graph.policies import load_policy, run_policy, save_policy
from d2graph.trainers.baselines import (
    NEVER_STOP, OraclePolicy, OracleTrainer, StaticTrainer, ThresholdTrainer, UniformPolicy, UniformTrainer,
    confidence, static_path_results,
)

from .conftest import ROOT

BUDGETS = (0.2, 0.4, 0.6)


def make_stage(logs: list | None = None):
    sink = logs if logs is not None else []
    return types.SimpleNamespace(batch=256, device=torch.device("cpu"), seed=0, log=lambda **m: sink.append(m),
                                 generator=lambda *key: torch.Generator().manual_seed(0))


def fit(trainer, executor, splits):
    """The policy and the one set of metrics the trainer logged."""
    logs: list[dict] = []
    policy = trainer.fit(executor, splits, make_stage(logs))
    assert len(logs) == 1
    return policy, logs[0]


def routed(executor, policy, dataset, with_labels: bool = False):
    """Mean cost fraction and accuracy of `policy` on a whole split, run as one batch."""
    x, y = dataset.tensors
    executor.eval()
    with torch.inference_mode():
        result = run_policy(executor, policy, x, y if with_labels else None)
    return float(result.cost_fraction.mean()), float((result.output.argmax(1) == y).double().mean())


def compiled(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return d2graph.compile(d2graph.load(ROOT / "examples" / f"{name}.d2"))


@pytest.fixture(scope="module")
def splits():
    return datasets.load("cluttered_digits", seed=0, n=2000)


@pytest.fixture(scope="module")
def early_exit(splits):
    """early_exit.d2 with every head trained briefly (cross-entropy on each head, all mode)."""
    executor = compiled("early_exit")
    names = heads(executor.graph)
    optimizer = torch.optim.Adam(executor.parameters(), lr=3e-3)
    x, y = splits.train.tensors
    g = torch.Generator().manual_seed(0)
    executor.train()
    for _ in range(200):
        i = torch.randint(len(y), (64,), generator=g)
        result = executor(x[i], mode="all", keep=names)
        loss = sum(torch.nn.functional.cross_entropy(result.values[h][1], y[i]) for h in names)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return executor.eval()


@pytest.fixture(scope="module")
def untrained():
    # Calibration hits a budget whatever the weights; these graphs are too slow to train here.
    return {name: compiled(name).eval() for name in ("cascade", "guan_cascade", "ann_network_selection")}


def executor_for(name, early_exit, untrained):
    return early_exit if name == "early_exit" else untrained[name]


# --- budgets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("trainer", [ThresholdTrainer, UniformTrainer])
@pytest.mark.parametrize("name", ["early_exit", "cascade", "guan_cascade"])
def test_calibration_meets_the_budget(name, trainer, budget, splits, early_exit, untrained):
    executor = executor_for(name, early_exit, untrained)
    policy, logged = fit(trainer(budget=budget), executor, splits)
    assert budget - 0.02 <= logged["val_cost_fraction"] <= budget + 1e-9  # a cap, reached closely
    # The policy does what was calibrated: run on the validation split, cost and accuracy
    # agree — exactly for the threshold; for random routing up to the luck of one draw
    # (it was calibrated on the expected cost over many draws).
    cost, accuracy = routed(executor, policy, splits.val)
    # Per-example costs lie in [0, 1] (sd ≤ 0.5), so one draw's mean is within 4 sd/√n.
    tolerance = 1e-9 if trainer is ThresholdTrainer else 4 * 0.5 / len(splits.val) ** 0.5
    assert cost == pytest.approx(logged["val_cost_fraction"], abs=tolerance)
    assert accuracy == pytest.approx(logged["val_accuracy"], abs=max(tolerance, 0.05))


@pytest.mark.parametrize("measure", ["maxprob", "entropy", "margin"])
def test_every_confidence_measure_meets_the_budget(measure, splits, early_exit):
    policy, logged = fit(ThresholdTrainer(measure=measure, budget=0.4), early_exit, splits)
    assert 0.38 <= logged["val_cost_fraction"] <= 0.4 + 1e-9
    assert routed(early_exit, policy, splits.val)[0] == pytest.approx(logged["val_cost_fraction"], abs=1e-9)


def test_uniform_routes_across_three_actions(splits, untrained):
    # ann_network_selection's Q1 has three actions (exit, B, jump to C): p moves through all.
    executor = untrained["ann_network_selection"]
    policy, logged = fit(UniformTrainer(budget=0.7), executor, splits)
    assert 0.68 <= logged["val_cost_fraction"] <= 0.7 + 1e-9
    actions = policy.decide(executor, splits.val.tensors[0])
    assert policy.orders["Q1"] == [0, 1, 2] and 0.5 < policy.p < 1.0
    assert set(actions["Q1"].tolist()) == {1, 2}  # t = p·2 lies between B and C
    assert set(actions["Q2"].tolist()) == {0, 1}


def test_budget_below_the_cheapest_path_gives_the_cheapest_routing(splits, early_exit):
    _, logged = fit(ThresholdTrainer(budget=0.05), early_exit, splits)
    cheapest = min(r["cost_fraction"] for r in static_path_results(early_exit, splits.val, 256))
    assert logged["tau"] == 0.0 and logged["val_cost_fraction"] == pytest.approx(cheapest)


def test_threshold_beats_uniform_at_the_same_budget(splits, early_exit):
    for budget in (0.3, 0.5):
        threshold, _ = fit(ThresholdTrainer(budget=budget), early_exit, splits)
        uniform, _ = fit(UniformTrainer(budget=budget), early_exit, splits)
        t_cost, t_accuracy = routed(early_exit, threshold, splits.test)
        u_cost, u_accuracy = routed(early_exit, uniform, splits.test)
        # 300 test examples and a full path 17× the first exit: 30 examples more or less past
        # an exit than on validation move the test cost by 0.07.
        assert abs(t_cost - budget) < 0.1 and abs(u_cost - budget) < 0.1
        assert t_accuracy > u_accuracy + 0.02, (budget, t_accuracy, u_accuracy)


def test_drop_keeps_accuracy_within_the_drop_at_less_cost(splits, early_exit):
    _, logged = fit(ThresholdTrainer(drop=0.02), early_exit, splits)
    assert logged["val_accuracy"] >= logged["val_full_accuracy"] - 0.02 - 1e-9  # accuracies are k/300
    assert logged["val_cost_fraction"] < 1.0
    _, strict = fit(ThresholdTrainer(drop=0.0), early_exit, splits)
    assert strict["val_accuracy"] >= strict["val_full_accuracy"]
    assert strict["val_cost_fraction"] >= logged["val_cost_fraction"]  # a smaller drop never costs less


# --- oracle and static ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["early_exit", "cascade", "ann_network_selection"])
def test_oracle_is_at_least_as_accurate_as_every_static_path(name, splits, early_exit, untrained):
    executor = executor_for(name, early_exit, untrained)
    policy, logged = fit(OracleTrainer(), executor, splits)
    cost, accuracy = routed(executor, policy, splits.test, with_labels=True)
    paths = static_path_results(executor, splits.test, 256)
    assert accuracy >= max(r["accuracy"] for r in paths)
    assert cost <= 1.0
    assert logged["val_accuracy"] >= max(r["accuracy"] for r in static_path_results(executor, splits.val, 256))


def test_oracle_with_a_budget_spends_at_most_it(splits, early_exit):
    unlimited, full = fit(OracleTrainer(budget=1.0), early_exit, splits)
    policy, logged = fit(OracleTrainer(budget=0.2), early_exit, splits)
    assert 0.18 <= logged["val_cost_fraction"] <= 0.2 + 1e-9  # equal-priced upgrades are split
    assert logged["val_accuracy"] < full["val_accuracy"]
    cost, accuracy = routed(early_exit, policy, splits.val, with_labels=True)
    assert cost == pytest.approx(logged["val_cost_fraction"]) and accuracy == pytest.approx(logged["val_accuracy"])
    with pytest.raises(ValueError, match="labels"):
        policy.decide(early_exit, splits.val.tensors[0][:4])


def test_static_picks_the_most_accurate_path_within_the_budget(splits, early_exit):
    paths = static_path_results(early_exit, splits.val, 256)
    assert [round(r["cost_fraction"], 3) for r in paths] == [1.0, 0.289, 0.058]  # dearest first
    assert paths[0]["nodes"] == ["B1", "H1", "Q1", "B2", "H2", "Q2", "B3"]
    full, logged = fit(StaticTrainer(budget=1.0), early_exit, splits)
    assert full.actions == paths[0]["actions"] == {"Q1": 1, "Q2": 1}  # trained: the deepest exit wins
    assert logged["val_accuracy"] == max(r["accuracy"] for r in paths)
    middle, _ = fit(StaticTrainer(budget=0.6), early_exit, splits)
    assert middle.actions == {"Q1": 1, "Q2": 0}
    cheapest, _ = fit(StaticTrainer(budget=0.01), early_exit, splits)  # nothing fits: the cheapest
    assert cheapest.actions == {"Q1": 0}
    assert routed(early_exit, middle, splits.val) == pytest.approx((paths[1]["cost_fraction"], paths[1]["accuracy"]))


# --- the protocol -----------------------------------------------------------------------------


def test_policies_round_trip_through_plain_state(splits, early_exit):
    x, y = splits.val.tensors[0][:64], splits.val.tensors[1][:64]
    for trainer in (ThresholdTrainer(budget=0.4, measure="entropy"), UniformTrainer(budget=0.4),
                    OracleTrainer(budget=0.5), StaticTrainer(budget=0.6)):
        policy, _ = fit(trainer, early_exit, splits)
        buffer = io.BytesIO()
        torch.save(save_policy(policy), buffer)
        buffer.seek(0)
        back = load_policy(early_exit.graph, torch.load(buffer, weights_only=True))
        assert type(back) is type(policy) and back.state() == policy.state()
        mine = policy.decide(early_exit, x, y, torch.Generator().manual_seed(3))
        theirs = back.decide(early_exit, x, y, torch.Generator().manual_seed(3))
        assert set(mine) == {"Q1", "Q2"}  # every control node, reached or not
        for q in mine:
            assert mine[q].dtype == torch.long and mine[q].shape == (64,)
            assert torch.equal(mine[q], theirs[q]), (trainer.name, q)


def test_calibration_is_deterministic_and_leaves_the_executor_alone(splits, early_exit):
    weights = {k: v.clone() for k, v in early_exit.state_dict().items()}
    early_exit.train()
    rng = torch.random.get_rng_state()
    try:
        first = [fit(t(budget=0.3), early_exit, splits) for t in (ThresholdTrainer, UniformTrainer, OracleTrainer)]
        assert early_exit.training  # the mode it was in
        second = [fit(t(budget=0.3), early_exit, splits) for t in (ThresholdTrainer, UniformTrainer, OracleTrainer)]
    finally:
        early_exit.eval()
    assert torch.equal(torch.random.get_rng_state(), rng)  # the global random stream is untouched
    for (p1, log1), (p2, log2) in zip(first, second):
        assert p1.state() == p2.state() and log1 == log2
    assert first[0][0].tau == second[0][0].tau
    for k, v in early_exit.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_threshold_needs_a_head_before_every_control_node(splits):
    graph = d2graph.load(ROOT / "examples" / "high_low.d2")
    with pytest.raises(d2graph.D2GraphError) as caught:
        ThresholdTrainer().check_graph(graph)
    (diagnostic,) = caught.value.diagnostics
    assert diagnostic.code == "E921" and "`Q1`" in diagnostic.message and diagnostic.help
    with pytest.raises(d2graph.D2GraphError, match="Q1"):
        ThresholdTrainer().fit(d2graph.compile(graph), splits, make_stage())
    for name in ("early_exit", "cascade", "guan_cascade", "ann_network_selection"):
        ThresholdTrainer().check_graph(d2graph.load(ROOT / "examples" / f"{name}.d2"))  # no error


@pytest.mark.parametrize("trainer", [ThresholdTrainer, UniformTrainer, OracleTrainer, StaticTrainer])
def test_a_zero_budget_is_refused(trainer):
    with pytest.raises(d2graph.D2GraphError) as caught:
        trainer(budget=0)
    assert caught.value.diagnostics[0].code == "E921"
    with pytest.raises(d2graph.D2GraphError) as caught:
        trainer(budgett=0.5)
    assert caught.value.diagnostics[0].code == "E804"


def test_confidence_measures():
    scores = torch.tensor([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0], [50.0, 0.0, 0.0]])
    assert confidence(scores, "maxprob").tolist() == pytest.approx([1 / 3, 0.5, 1.0])
    assert confidence(scores, "margin").tolist() == pytest.approx([0.0, 0.25, 1.0])
    entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(3)
    assert confidence(scores, "entropy").tolist() == pytest.approx([0.0, 1 - entropy, 1.0])
    assert confidence(scores, "entropy").dtype == torch.float64


# --- a graph whose right answers are known exactly -----------------------------------------------

TINY = """graph tiny {
  input x [2]
  output y [merge=select]
  node H1 [cost=1] = fc(2)
  node H2 [cost=3] = fc(2)
  control Q1 [cost=0] = fc(2)
  x -> H1 -> Q1
  x -> H2
  Q1 => skip | H2
  H2, H1 -> y
}"""

# x = [s, t]. H1's scores are (s, 0): it says class 0 when s > 0, with max probability
# sigmoid(|s|). H2's are (t, −t): it says class 0 when t > 0, always right (y = 0 iff t > 0).
# H1 is wrong where s and t differ in sign: at |s| = 2 and |s| = 6.
S = [1.0, -2.0, 3.0, -4.0, 5.0, 6.0, -7.0, 8.0]
T = [1.0, 1.0, 1.0, -1.0, 1.0, -1.0, -1.0, 1.0]


@pytest.fixture(scope="module")
def tiny():
    graph, diagnostics = d2graph.check(TINY)
    assert graph is not None, diagnostics
    executor = d2graph.compile(graph).eval()
    with torch.no_grad():
        executor.nodes["H1"][0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        executor.nodes["H2"][0].weight.copy_(torch.tensor([[0.0, 1.0], [0.0, -1.0]]))
        executor.nodes["H1"][0].bias.zero_()
        executor.nodes["H2"][0].bias.zero_()
    x = torch.tensor([S, T]).T.contiguous()
    y = (torch.tensor(T) < 0).long()
    data = TensorDataset(x, y)
    return executor, datasets.Splits("tiny", data, data, data, 2, (2,))


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_tiny_threshold_continues_the_least_confident(tiny):
    executor, splits = tiny
    # Stopping costs 1 of 4, continuing 4 of 4: budget 0.625 lets exactly 4 of 8 continue,
    # the four with the smallest |s|.
    policy, logged = fit(ThresholdTrainer(budget=0.625), executor, splits)
    assert sigmoid(4.0) < policy.tau <= sigmoid(5.0)
    assert logged["val_cost_fraction"] == 0.625
    assert policy.decide(executor, splits.val.tensors[0])["Q1"].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert logged["val_accuracy"] == 7 / 8  # only |s| = 6 stops at H1 and is wrong
    assert logged["val_full_accuracy"] == 1.0


def test_tiny_threshold_with_no_drop_continues_every_mistake(tiny):
    executor, splits = tiny
    policy, logged = fit(ThresholdTrainer(drop=0.0), executor, splits)
    # Every example H1 gets wrong must continue; the last is |s| = 6: τ lies between the
    # confidences at |s| = 6 and 7 (halfway, so that recomputing them cannot flip a route).
    assert policy.tau == pytest.approx((sigmoid(6.0) + sigmoid(7.0)) / 2, abs=1e-12)
    assert logged["val_accuracy"] == 1.0
    assert logged["val_cost_fraction"] == pytest.approx((2 * 1 + 6 * 4) / 32)


def test_tiny_uniform_and_oracle_and_static(tiny):
    executor, splits = tiny
    uniform, logged = fit(UniformTrainer(budget=0.625), executor, splits)
    # p is bisected on the exact expected cost (the budget is a cap on the expectation)
    assert 0.625 - 1e-9 <= logged["val_cost_fraction"] <= 0.625
    assert isinstance(uniform, UniformPolicy)
    # The oracle continues exactly H1's two mistakes.
    oracle, logged = fit(OracleTrainer(), executor, splits)
    assert isinstance(oracle, OraclePolicy)
    assert oracle.decide(executor, *splits.val.tensors)["Q1"].tolist() == [0, 1, 0, 0, 0, 1, 0, 0]
    assert logged["val_accuracy"] == 1.0 and logged["val_cost_fraction"] == (6 * 1 + 2 * 4) / 32
    # Each upgrade costs 3/4 of the full cost: budget 0.4 pays for one of the two (ties are
    # split at random), not both.
    oracle, logged = fit(OracleTrainer(budget=0.4), executor, splits)
    assert logged["val_cost_fraction"] == (7 * 1 + 1 * 4) / 32 and logged["val_accuracy"] == 7 / 8
    assert oracle.decide(executor, *splits.val.tensors)["Q1"].sum() == 1
    static, logged = fit(StaticTrainer(budget=0.5), executor, splits)
    assert static.actions == {"Q1": 0} and logged["val_accuracy"] == 6 / 8
    static, logged = fit(StaticTrainer(budget=1.0), executor, splits)
    assert static.actions == {"Q1": 1} and logged["val_accuracy"] == 1.0
    rows = static_path_results(executor, splits.val, 3)  # batches smaller than the data
    assert [(r["cost"], r["cost_fraction"], r["accuracy"]) for r in rows] == [(4.0, 1.0, 1.0), (1.0, 0.25, 0.75)]


def test_threshold_never_stop_is_above_every_confidence():
    assert NEVER_STOP > 1.0
    assert np.all(confidence(torch.tensor([[1e6, 0.0]]), "maxprob").numpy() < NEVER_STOP)


# --- heads and decisions on each example's own route -------------------------------------------

# Q1 picks branch B or C; M reads whichever ran (default 0 for the other), so H2, Q2 and D
# depend on the route: a pass of every node feeds them B + C, which no example meets.
ROUTED = """
graph routed {
  input x [6]
  output y [merge=select]
  node A = fc(8), relu
  node H1 = fc(3)
  control Q1 = confidence, fc(2)
  node B = fc(8), relu
  node C = fc(8), relu
  node M = relu
  node H2 = fc(3)
  control Q2 = fc(2)
  node D = fc(32), relu, fc(3)
  x -> A -> H1 -> Q1
  Q1 => B | C
  A -> B, C
  B, C -> M [default=0]
  M -> H2
  M -> Q2
  Q2 => skip | D
  M -> D
  D, H2 -> y
}
"""


def test_route_dependent_nodes_and_heads():
    from d2graph.paths import current_head, route_dependent
    graph, diagnostics = d2graph.check(ROUTED)
    assert graph is not None, diagnostics
    assert route_dependent(graph) >= {"M", "H2", "Q2", "D"} and not route_dependent(graph) & {"A", "H1", "Q1", "B", "C"}
    assert current_head(graph, "Q1", 3) == "H1" and current_head(graph, "Q2", 3) is None  # H2 reads the merge
    chain = d2graph.load(ROOT / "examples" / "chain.d2")
    assert {"Q2", "Q3", "N4", "N7"} <= route_dependent(chain) and "Q1" not in route_dependent(chain)
    for name in ("early_exit", "cascade", "hierarchy", "eenet_resnet"):
        assert not route_dependent(d2graph.load(ROOT / "examples" / f"{name}.d2")) & {
            n.name for n in d2graph.load(ROOT / "examples" / f"{name}.d2").nodes if n.kind != "output"}


def test_threshold_refuses_a_head_that_depends_on_the_route():
    graph, _ = d2graph.check(ROUTED.replace("M -> Q2", "H2 -> Q2"))
    with pytest.raises(d2graph.D2GraphError) as caught:
        ThresholdTrainer().check_graph(graph)
    (diagnostic,) = caught.value.diagnostics
    assert diagnostic.code == "E921" and "`Q2`" in diagnostic.message
    assert "`H2` cannot be read" in diagnostic.message and "route" in diagnostic.message


def test_head_term_policy_decides_on_each_examples_route():
    from d2graph.trainers.baselines import HeadTermPolicy, head_confidences
    graph, _ = d2graph.check(ROUTED)
    torch.manual_seed(0)
    executor = d2graph.compile(graph).eval()
    x = torch.randn(400, 6)
    with torch.no_grad():
        # A steep term on H1's max probability, centred on its median: half the examples each way.
        middle = float(head_confidences(executor, x, ["H1"])[1]["H1"][:, 0].median())
        policy = HeadTermPolicy({"Q1": "H1"}, {"Q1": [[1e3, 0, 0], [-1e3, 0, 0]]}, {"Q1": [-1e3 * middle, 1e3 * middle]})
        actions = policy.decide(executor, x)
        # Each decision is the node's choice on what its own route computes ...
        result, found = head_confidences(executor, x, ["H1"], actions=actions)
        again = policy.choose(result, found)
        for q in ("Q1", "Q2"):
            ran = result.actions[q] >= 0
            assert torch.equal(again[q][ran], actions[q][ran])
        # ... which one pass of every node gets wrong for some examples (Q2 reads B + C there).
        everything, found = head_confidences(executor, x, ["H1"])
        assert not torch.equal(policy.choose(everything, found)["Q2"], actions["Q2"])
        assert 0 < int((actions["Q1"] == 0).sum()) < len(x)  # both branches in use
        # ... and the same as deciding one example at a time.
        for i in range(0, len(x), 37):
            single = policy.decide(executor, x[i:i + 1])
            assert all(int(single[q][0]) == int(actions[q][i]) for q in ("Q1", "Q2"))

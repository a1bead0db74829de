"""The `costsensitive` trainer (Bolukbasi et al., ICML 2017) on tasks whose answer is known.

- two exits, where the cheap exit is right exactly on a recognisable subset (s > −0.4):
  at the budget that subset costs, the learned policy must stop that subset and only it;
- every budget is met on validation (a cap, within 0.02 below it);
- a three-way selection with hand-set heads, where each of three groups needs its own
  network: the learned policy (each multiclass reduction) beats `uniform` at the same budget;
- the ANN network-selection example (a DAG: Q1 with 3 actions, Q2 below it) trains end to end;
- the same inputs give the same weights, and the caller's random state is left alone;
- a control node whose input depends on the route above it is flagged, learns from every
  input a route feeds it, and the simulation prices the routing the executor takes;
- where what predicts the cheap exit's errors is its own confidence, which the control node's
  linear scores cannot express, the head term (`heads=true`) learns it: at least as good as
  the max-probability threshold, far better than the node alone (`heads=false`)."""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch

import d2graph
from d2graph import runs
from d2graph.diagnostics import D2GraphError
from d2graph.evaluate import per_example
from d2graph.policies import evaluating
from d2graph.trainers import LearnedPolicy, load_policy, save_policy
from d2graph.trainers.baselines import HeadTermPolicy
from d2graph.trainers.costsensitive import CostSensitiveTrainer, _filter_tree, lambda_at

from .conftest import ROOT

# The cheap exit H1 costs 10, the policy nothing, the deep branch B 90: stopping costs 0.1 of
# the full graph, continuing 1.0.
TWO_EXIT = """
graph two_exit {
  input x [2]
  output y [merge=select]
  node H1 [cost=10] = fc(2)
  node B [cost=90] = fc(32), relu, fc(32), relu, fc(2)
  control Q [cost=0] = fc(2)
  x -> H1, B, Q
  Q => skip | B
  B, H1 -> y
  train {
    data = npz(path="PATH")
    lr = 0.01
    stage backbone = supervised(epochs=15)
    stage policy = costsensitive(budget=0.37)
  }
}
"""

# Q1 picks a network; Q2 (which runs after B) returns B's answer or runs C too.
# Paths: A (0.1), B then E2 (0.3), B then C (0.9), C (0.6).
SELECTION = """
graph selection {
  input x [6]
  output y [merge=select]
  node A [cost=10] = fc(2)
  node B [cost=30] = fc(2)
  node C [cost=60] = fc(2)
  node E2 = identity
  control Q1 [cost=0] = fc(3)
  control Q2 [merge=concat, cost=0] = fc(2)
  x -> Q1, A, B, C
  x, B -> Q2
  B -> E2
  Q1 => A | B | C
  Q2 => E2 | C
  E2, C, A -> y
  train {
    data = npz(path="PATH")
    stage policy = costsensitive(budget=0.34)
  }
}
"""


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks (conftest.py)


def subset(x: torch.Tensor) -> np.ndarray:
    """The examples the cheap exit gets right."""
    return (x[:, 0] > -0.4).numpy()


def stage(logs: list | None = None):
    sink = logs if logs is not None else []
    return types.SimpleNamespace(batch=64, device=torch.device("cpu"), seed=0, log=lambda **m: sink.append(m),
                                 generator=lambda *key: torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def two_exit(tmp_path_factory):
    """(graph, the result of running the whole train block at the subset's budget).

    x = (s, u) with s uniform in [−1, 1], u normal; the label is [u > 0] where s > −0.4
    (70% of the examples) and [u < 0] elsewhere. A linear head trained on all of them learns
    sign(u) (flipping u flips every label, so the best line ignores s): right exactly on the
    subset. The deep branch learns the whole rule."""
    rng = np.random.default_rng(0)
    n = 4000
    s, u = rng.uniform(-1, 1, n), rng.normal(size=n)
    y = np.where(s > -0.4, u > 0, u < 0).astype(np.int64)
    path = tmp_path_factory.mktemp("two_exit") / "two.npz"
    np.savez(path, x=np.stack([s, u], 1).astype(np.float32), y=y)
    graph, diags = d2graph.check(TWO_EXIT.replace("PATH", str(path)))
    assert not diags
    x_val = runs.load_data(runs.resolve(graph), graph, None).val.tensors[0]
    budget = round(float(np.where(subset(x_val), 0.1, 1.0).mean()), 4)  # every example on its cheapest right exit
    trained = runs.train(graph, runs.resolve(graph, [f"stage.policy.budget={budget}"]), None, quiet=True, echo=None)
    return graph, trained, budget


def policy_run(graph, backbone: runs.Trained, **params) -> runs.Trained:
    """The policy stage alone, with `params`, on a copy of a trained backbone."""
    config = runs.resolve(graph, [f"stage.policy.{k}={v}" for k, v in params.items()])
    start = runs.Trained(copy.deepcopy(backbone.executor), LearnedPolicy(), backbone.data, config, None)
    return runs.train(graph, config, None, quiet=True, echo=None, start=start, stages=slice(1, 2))


def test_the_cheap_exits_subset_and_only_it_stops(two_exit):
    graph, trained, budget = two_exit
    assert isinstance(trained.policy, HeadTermPolicy)  # Q reads x; H1 is its current head
    assert trained.policy.heads == {"Q": "H1"}
    assert trained.reports["val"].cost_fraction <= budget + 1e-9
    for split in ("val", "test"):
        rows = per_example(trained.executor, trained.data[split], trained.policy)
        stops = rows["action.Q"] == 0
        easy = subset(trained.data[split].tensors[0])
        assert np.mean(stops == easy) >= 0.9, split
        assert stops[easy].mean() >= 0.9 and (~stops[~easy]).mean() >= 0.9, split
    assert trained.reports["test"].accuracy >= 0.95


@pytest.mark.parametrize("budget", [0.2, 0.5, 0.8])
def test_budgets_are_met_on_validation(two_exit, budget):
    graph, trained, _ = two_exit
    cost = policy_run(graph, trained, budget=budget).reports["val"].cost_fraction
    assert budget - 0.02 <= cost <= budget + 1e-9


def test_lambda_sets_the_trade_off_without_a_budget(two_exit):
    graph, trained, _ = two_exit
    # λ = 0: only cost counts, so every example stops at the cheap exit.
    cheap = policy_run(graph, trained, budget="none", **{"lambda": 0})
    assert cheap.reports["val"].cost_fraction == pytest.approx(0.1)
    # λ = 2: an error costs more than the deep branch (0.9), so the subset stops and the rest continue.
    run = policy_run(graph, trained, budget="none", **{"lambda": 2})
    rows = per_example(run.executor, trained.data.test, run.policy)
    assert np.mean((rows["action.Q"] == 0) == subset(trained.data.test.tensors[0])) >= 0.9


def test_the_same_inputs_give_the_same_policy(two_exit):
    _, trained, _ = two_exit
    results = []
    for _ in range(2):
        executor, logs = copy.deepcopy(trained.executor), []
        before = torch.random.get_rng_state()
        policy = CostSensitiveTrainer(budget=0.5, loss="cross_entropy").fit(executor, trained.data, stage(logs))
        assert torch.equal(before, torch.random.get_rng_state())  # the caller's random stream is untouched
        (row,) = logs
        row.pop("seconds")
        results.append((executor.nodes["Q"].state_dict(), row, save_policy(policy)))
    (a, row_a, policy_a), (b, row_b, policy_b) = results
    assert row_a == row_b and policy_a == policy_b
    # The policy is plain data and loads back into one that decides the same.
    x = trained.data.val.tensors[0]
    reloaded = load_policy(trained.executor.graph, policy_a)
    with evaluating(executor):
        assert torch.equal(reloaded.decide(executor, x)["Q"], policy.decide(executor, x)["Q"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The cached tables predict what the executor does (no control input depends on the route).
    assert row_a["simulated_val_cost_fraction"] == pytest.approx(row_a["val_cost_fraction"], abs=1e-12)
    assert row_a["route_dependent"] == ""


@pytest.fixture(scope="module")
def selection(tmp_path_factory):
    """Three groups (one-hot in x[:3]) and the label [z > 0]. A reads x[3], B x[4], C x[5]
    (hand-set), and the data make A right on group 0, B on groups 0–1, C on all: the best
    routing sends each group to the cheapest network that is right (cost 1/3, accuracy 1)."""
    rng = np.random.default_rng(1)
    n = 3000
    g = rng.integers(0, 3, n)
    z = rng.normal(size=n)
    z = np.where(np.abs(z) < 0.05, 0.05, z)
    xa, xb = np.where(g >= 1, -z, z), np.where(g >= 2, -z, z)
    x = np.concatenate([np.eye(3)[g], np.stack([xa, xb, z], 1)], 1).astype(np.float32)
    path = tmp_path_factory.mktemp("selection") / "three.npz"
    np.savez(path, x=x, y=(z > 0).astype(np.int64))
    graph, diags = d2graph.check(SELECTION.replace("PATH", str(path)))
    assert not diags
    torch.manual_seed(0)
    executor = d2graph.compile(graph)
    with torch.no_grad():
        for name, column in (("A", 3), ("B", 4), ("C", 5)):
            weight = torch.zeros(2, 6)
            weight[0, column], weight[1, column] = -1.0, 1.0
            executor.nodes[name][0].weight.copy_(weight)
            executor.nodes[name][0].bias.zero_()
    return graph, executor, runs.load_data(runs.resolve(graph), graph, None)


def selection_run(graph, executor, splits, trainer: str, **params) -> runs.Trained:
    config = runs.resolve(graph)
    config.stages[0].update(trainer=trainer, params=params)
    start = runs.Trained(copy.deepcopy(executor), LearnedPolicy(), splits, config, None)
    return runs.train(graph, config, None, quiet=True, echo=None, start=start)


@pytest.mark.parametrize("multiclass", ["expected", "argmin", "filter_tree"])
def test_three_way_selection_beats_uniform_at_the_same_budget(selection, multiclass):
    graph, executor, splits = selection
    learned = selection_run(graph, executor, splits, "costsensitive", budget=0.34, multiclass=multiclass)
    uniform = selection_run(graph, executor, splits, "uniform", budget=0.34)
    assert learned.reports["val"].cost_fraction <= 0.34 + 1e-9
    assert learned.reports["test"].accuracy >= 0.95
    assert learned.reports["test"].accuracy >= uniform.reports["test"].accuracy + 0.2
    # Q1 uses all three of its actions (A, B, C) on the test split.
    rates = learned.reports["test"].action_rates["Q1"]
    assert min(rates[:3]) >= 0.2


def test_ann_network_selection_trains_end_to_end():
    text = (ROOT / "examples" / "ann_network_selection.d2").read_text(encoding="utf-8")
    text = text.replace("threshold(measure=maxprob, budget=0.5)", "costsensitive(budget=0.5)")
    graph, _ = d2graph.check(text)
    config = runs.resolve(graph, ["data.n=600", "stage.backbone.epochs=1", "batch=128"])
    trained = runs.train(graph, config, None, quiet=True, echo=None)
    assert isinstance(trained.policy, HeadTermPolicy)
    assert trained.policy.heads == {"Q1": "A", "Q2": "B"}  # the networks whose scores E1, E2 pass on
    assert trained.reports["val"].cost_fraction <= 0.5 + 1e-9


def test_graphs_and_parameters_it_refuses():
    no_control, _ = d2graph.check("""
graph plain {
  input x [4]
  output y
  node A = fc(2)
  x -> A -> y
}""")
    with pytest.raises(D2GraphError, match="no control node"):
        CostSensitiveTrainer().check_graph(no_control)
    fixed, _ = d2graph.check("""
graph fixed {
  input x [2]
  output y [merge=select]
  node A = fc(2)
  node B = fc(2)
  control Q = identity
  x -> A, B, Q
  Q => skip | B
  B, A -> y
}""")
    with pytest.raises(D2GraphError, match="no parameters"):
        CostSensitiveTrainer().check_graph(fixed)
    with pytest.raises(D2GraphError, match="nothing to spend"):
        CostSensitiveTrainer(budget=0)
    CostSensitiveTrainer(**{"lambda": 1.0})  # a fixed λ needs no budget
    with pytest.raises(D2GraphError, match="give one"):
        CostSensitiveTrainer(budget=0.3, **{"lambda": 1.0})  # two answers to one question
    with pytest.raises(D2GraphError):
        CostSensitiveTrainer(multiclass="tree")
    with pytest.raises(D2GraphError, match="`decay` must not be negative"):
        CostSensitiveTrainer(decay=-1)


def test_filter_tree_labels_the_cheaper_of_each_pair():
    costs = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    right = torch.tensor([[5.0, 0.0, -5.0], [-5.0, 0.0, 5.0]])  # argmax = the cheapest action
    wrong = right.flip(1)
    assert _filter_tree(right, costs, [0, 1, 2]) < 0.05 < _filter_tree(wrong, costs, [0, 1, 2])
    assert lambda_at(0.0) == 0.0 and lambda_at(1.0) == pytest.approx(1000, rel=1e-5)


def _route_dependent(tmp_path):
    """A graph whose Q2 reads M, A's output or B's depending on Q1, trained one epoch: (graph, Trained).
    Costs: A 1, B 2, H 20 of 23."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 2)).astype(np.float32)
    np.savez(tmp_path / "dep.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    graph, diags = d2graph.check(f"""
graph dep {{
  input x [2]
  output y [merge=select]
  node A [cost=1] = fc(2)
  node B [cost=2] = fc(2)
  node M [merge=select] = identity
  node H [cost=20] = fc(8), relu, fc(2)
  control Q1 [cost=0] = fc(2)
  control Q2 [cost=0] = fc(2)
  x -> Q1, A, B
  Q1 => A | B
  A, B -> M
  M -> Q2, H
  Q2 => skip | H
  H, M -> y
  train {{
    data = npz(path="{tmp_path / 'dep.npz'}")
    stage backbone = supervised(epochs=1)
  }}
}}""")
    assert not diags
    return graph, runs.train(graph, runs.resolve(graph), None, quiet=True, echo=None, evaluate=False)


def test_a_route_dependent_control_input_is_flagged(tmp_path):
    _, trained = _route_dependent(tmp_path)
    logs: list = []
    CostSensitiveTrainer(**{"lambda": 1.0}).fit(trained.executor, trained.data, stage(logs))
    assert logs[0]["route_dependent"] == "Q2"


@pytest.mark.parametrize("budget", [0.1, 0.3])
def test_the_simulation_routes_a_route_dependent_input_as_the_executor_does(tmp_path, budget):
    # Q2 reads M: A's output on the cheapest route (zeros), B's on the other (its outputs sum
    # to 10, which Q2's weights turn into "run H"). B is right and A is not. Reading Q2's
    # input on the cheapest route only, the simulation would see Q2 skip H on every example
    # and send everyone through B for 2/23 of the cost, where the executor then runs H
    # (22/23). Read on the route taken, the budget holds with no correction afterwards.
    _, trained = _route_dependent(tmp_path)
    executor = trained.executor
    with torch.no_grad():
        a, b, q2 = executor.nodes["A"][0], executor.nodes["B"][0], executor.nodes["Q2"][0]
        a.weight.zero_()
        a.bias.zero_()
        b.weight.zero_()
        b.weight[0, 0], b.weight[1, 0] = -5.0, 5.0
        b.bias.fill_(5.0)
        q2.weight.zero_()
        q2.weight[1] = 10.0
    logs: list = []
    # heads=false: M feeds the output, so it is Q2's head, and a head term decides on the
    # inputs of a pass of every node (`HeadTermPolicy`), which the simulation does not read.
    policy = CostSensitiveTrainer(budget=budget, heads=False).fit(executor, trained.data, stage(logs))
    (log,) = logs
    assert log["route_dependent"] == "Q2" and log["real_shift"] == 0
    assert log["simulated_val_cost_fraction"] == pytest.approx(log["val_cost_fraction"], abs=1e-9)
    real = per_example(executor, trained.data.val, policy)
    assert real["cost"].mean() / 23 == pytest.approx(log["val_cost_fraction"])
    assert budget - 0.05 <= log["val_cost_fraction"] <= budget


def test_the_head_term_learns_what_only_the_heads_confidence_shows(tmp_path):
    """y = [u > 0] where |u| > 0.5, else [v > 0]. The cheap linear exit H1 learns (mostly) the
    sign of u, so it is right where |u| is large and guesses where it is small: its errors are
    predicted by its confidence, not by any line in (u, v), which is all Q's own fc can draw.
    At the budget that the small-|u| examples cost, the head term finds them."""
    rng = np.random.default_rng(3)
    n = 4000
    u, v = rng.normal(size=n), rng.normal(size=n)
    y = np.where(np.abs(u) > 0.5, u > 0, v > 0).astype(np.int64)
    np.savez(tmp_path / "inner.npz", x=np.stack([u, v], 1).astype(np.float32), y=y)
    graph, diags = d2graph.check(TWO_EXIT.replace("PATH", str(tmp_path / "inner.npz")))
    assert not diags
    backbone = runs.train(graph, runs.resolve(graph), None, quiet=True, echo=None, stages=slice(0, 1))
    u_val = backbone.data.val.tensors[0][:, 0].numpy()
    budget = round(float(np.where(np.abs(u_val) > 0.5, 0.1, 1.0).mean()) + 0.02, 4)
    runs_by = {name: policy_run(graph, backbone, budget=budget, **params)
               for name, params in (("heads", {}), ("alone", {"heads": "false"}))}
    config = runs.resolve(graph, [f"stage.policy.budget={budget}"])
    config.stages[1].update(trainer="threshold", params={"measure": "maxprob", "budget": budget, "drop": -1})
    start = runs.Trained(copy.deepcopy(backbone.executor), LearnedPolicy(), backbone.data, config, None)
    threshold = runs.train(graph, config, None, quiet=True, echo=None, start=start, stages=slice(1, 2))
    assert isinstance(runs_by["heads"].policy, HeadTermPolicy)
    assert isinstance(runs_by["alone"].policy, LearnedPolicy)
    accuracy = {name: run.reports["test"].accuracy for name, run in {**runs_by, "threshold": threshold}.items()}
    for run in (*runs_by.values(), threshold):
        assert run.reports["val"].cost_fraction <= budget + 1e-9
    assert accuracy["heads"] >= accuracy["threshold"] - 0.005, accuracy
    assert accuracy["heads"] >= accuracy["alone"] + 0.05, accuracy


def test_lr_auto_keeps_the_rate_whose_scores_rank_validation_best():
    # One control node (fc, relu, fc) on 512 examples whose cheaper action depends on x[0]:
    # `lr=auto` trains it at each rate from the same start and must end where the fixed
    # rate whose scores rank 512 other examples best ends.
    from d2graph.trainers.costsensitive import LEARNING_RATES, _ranking_area, _scores, _Scorer

    torch.manual_seed(0)

    def examples(n):
        x = torch.randn(n, 4)
        fraction = np.tile([0.0, 0.5], (n, 1))  # action 1 costs half the graph more
        extra = np.stack([np.where(x[:, 0].numpy() > 0, 0.0, 1.0), np.zeros(n)], axis=1)  # action 0 errs on x0 ≤ 0
        return x, None, fraction, extra

    train, val = examples(512), examples(512)
    node = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    start = copy.deepcopy(node.state_dict())

    def trained(lr) -> float:
        node.load_state_dict(start)
        trainer = CostSensitiveTrainer(budget=0.5, lr=lr)  # a budget: ranked, the offset set later
        trainer.seed = 0
        module = _Scorer(node, 2, with_term=False)
        trainer._train(module, "Q", train, val, 1.0, [0, 1], 0)
        return _ranking_area(_scores(module, val[0], None), torch.from_numpy(val[2]), torch.from_numpy(val[3]), [0, 1])

    fixed = [trained(lr) for lr in LEARNING_RATES]
    assert trained("auto") == pytest.approx(min(fixed), abs=1e-12)
    # x[0] decides: ranked perfectly, the loss (0.5 at no cost) falls to 0 by cost 0.25 of
    # the span 0.5, an area of 0.125 (`test_the_ranking_area_...`).
    assert min(fixed) < 0.15


def test_the_ranking_area_orders_perfect_random_and_tied_scores():
    # Action 1 costs 1 more and saves a loss of 1 on the half of the examples that need it.
    # Ranked perfectly, the loss falls from 0.5 to 0 while the cost rises to 0.5: area
    # 0.125. Ranked at random it falls along the straight line to cost 1: 0.25. Tied scores
    # switch every example at once: the loss stays 0.5 until the dearest end, 0.5.
    from d2graph.trainers.costsensitive import _ranking_area

    n = 2000
    g = torch.Generator().manual_seed(0)
    needs = (torch.rand(n, generator=g) < 0.5).float()
    fraction = torch.tensor([0.0, 1.0], dtype=torch.float64).repeat(n, 1)
    extra = torch.stack([needs.double(), torch.zeros(n, dtype=torch.float64)], 1)

    def area(margin):
        return _ranking_area(torch.stack([torch.zeros(n), margin], 1), fraction, extra, [0, 1])

    assert area(needs + 0.5 * torch.rand(n, generator=g)) == pytest.approx(0.125, abs=0.02)
    assert area(torch.rand(n, generator=g)) == pytest.approx(0.25, abs=0.02)
    assert area(torch.zeros(n)) == pytest.approx(float(needs.double().mean()), abs=1e-9)  # the share that needs it

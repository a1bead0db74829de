"""The `reinforce` trainer (Guan et al.): known answers on a task built for it, and the examples.

The task: 8 numbers per example and 4 classes. Half the examples are *flagged* (x0 = +1):
their class is the quadrant of (x6, x7), placed far from the axes, which the cheap linear
exit A answers perfectly. The others (x0 = −1) have (x6, x7) near zero and their class is
which of x2..x5 is largest in magnitude: no linear rule beats chance there, the expensive
MLP B learns it. The control node Q reads x, so it can see the flag. Stopping at A costs
about 0.7% of the full graph, continuing to B 100%. With α = 0.5 the reward-maximising
policy stops exactly the flagged examples; with α = 0 nothing pays for stopping and with
α = 2 nothing pays for continuing."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import d2graph
from d2graph.diagnostics import D2GraphError
from d2graph.paths import heads
from d2graph.evaluate import evaluate, per_example
from d2graph.runs import Config, Interrupted, Run, Trained, load_checkpoint, load_data, resolve, train
from d2graph.policies import LearnedPolicy, load_policy, save_policy
from d2graph.trainers.reinforce import OffsetPolicy, ReinforceTrainer

from .conftest import ROOT, ctrl_c_after

TEXT = """
graph flagged {
  input x [8]
  output y [merge=select]
  node A = fc(4)                                # cheap exit: linear
  node B = fc(64), relu, fc(64), relu, fc(4)    # expensive classifier
  control Q = fc(2)                             # action 1 = stop at A, action 2 = run B
  x -> A, B, Q
  Q => skip | B
  B, A -> y
  train {
    data = npz(path="PATH")
    lr = 0.03
    stage backbone = supervised(epochs=4)
    stage policy = reinforce(epochs=4, alpha=0.5)
  }
}
"""


def _task(path, n: int = 2000, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    flag = rng.random(n) < 0.5
    x[:, 0] = np.where(flag, 1.0, -1.0)
    x[:, 6:8] = np.where(flag[:, None], np.sign(x[:, 6:8]) * (2 + np.abs(x[:, 6:8])), 0.1 * x[:, 6:8])
    easy = 2 * (x[:, 6] > 0) + (x[:, 7] > 0)
    hard = np.abs(x[:, 2:6]).argmax(1)
    np.savez(path, x=x, y=np.where(flag, easy, hard).astype(np.int64))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks (conftest.py)


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    path = tmp_path_factory.mktemp("reinforce") / "flagged.npz"
    _task(path)
    text = TEXT.replace("PATH", str(path))
    graph, diags = d2graph.check(text)
    assert graph is not None, [d.message for d in diags]
    return graph


@pytest.fixture(scope="module")
def backbone(graph):
    """The supervised warm start, trained once; its weights are put back before each policy."""
    config = resolve(graph)
    base = train(graph, config, None, quiet=True, echo=None, evaluate=False, stages=slice(0, 1))
    return base, copy.deepcopy(base.executor.state_dict())


def fit(graph, backbone, **params):
    """The reinforce stage alone, from the backbone's weights: (trained, its validation report)."""
    base, weights = backbone
    base.executor.load_state_dict(weights)
    config = resolve(graph)
    config.stages = [{"name": "policy", "trainer": "reinforce", "params": {"epochs": 4, "alpha": 0.5, **params}}]
    trained = train(graph, config, None, quiet=True, echo=None, evaluate=False, start=base)
    report = evaluate(trained.executor, trained.data.val, trained.policy, classes=trained.data.classes, split="val")
    return trained, report


def on_validation(graph, backbone, n: int):
    """The backbone's executor in eval mode, the first n validation examples and the static paths."""
    from d2graph.paths import static_paths

    base, weights = backbone
    base.executor.load_state_dict(weights)
    base.executor.eval()
    x, y = base.data.val.tensors[0][:n], base.data.val.tensors[1][:n]
    return base.executor, x, y, [actions for actions, _ in static_paths(graph)]


def flagged(dataset) -> np.ndarray:
    return dataset.tensors[0][:, 0].numpy() > 0


# --- known answers ---------------------------------------------------------------------------


def test_the_policy_stops_exactly_the_examples_the_cheap_exit_answers(graph, backbone):
    trained, report = fit(graph, backbone, alpha=0.5)
    assert isinstance(trained.policy, LearnedPolicy)
    rows = per_example(trained.executor, trained.data.val, trained.policy)
    stop = rows["action.Q"] == 0
    agreement = float(np.mean(stop == flagged(trained.data.val)))
    print(f"agreement {agreement:.3f}, accuracy {report.accuracy:.3f}, cost {report.cost_fraction:.3f}")
    assert agreement >= 0.9
    assert report.accuracy >= 0.85  # both halves are answered by the classifier that knows them


def test_with_held_out_examples_the_rewards_come_from_them(graph, backbone):
    # Held out: the training examples with the unflagged ones' labels shuffled, so B, which
    # alone answers those, is no better than A on them. Rewarded there, running B never
    # pays and the policy stops every example, where rewarded on the training split it runs
    # B on the unflagged half (the test above).
    base, weights = backbone
    base.executor.load_state_dict(weights)
    x, y = base.data.train.tensors
    unflagged = torch.nonzero(x[:, 0] < 0).squeeze(1)
    shuffled = y.clone()
    shuffled[unflagged] = y[unflagged[torch.randperm(len(unflagged), generator=torch.Generator().manual_seed(0))]]
    held = Trained(base.executor, base.policy,
                   dataclasses.replace(base.data, holdout=TensorDataset(x, shuffled)), base.config, None)
    config = resolve(graph)
    config.stages = [{"name": "policy", "trainer": "reinforce", "params": {"epochs": 4, "alpha": 0.5}}]
    trained = train(graph, config, None, quiet=True, echo=None, evaluate=False, start=held)
    stop = per_example(trained.executor, trained.data.val, trained.policy)["action.Q"] == 0
    print(f"share of validation examples stopped at A: {stop.mean():.3f}")
    assert stop.mean() >= 0.85  # rewarded on the training split: about half (the flagged ones)


def test_a_dearer_computation_never_buys_more_of_it(graph, backbone):
    costs = [fit(graph, backbone, alpha=a)[1].cost_fraction for a in (0.0, 0.5, 2.0)]
    print("alpha 0, 0.5, 2 -> validation cost", [round(c, 4) for c in costs])
    assert costs[0] >= costs[1] >= costs[2]
    assert costs[0] > 0.6 and costs[2] < 0.1  # the two ends are what the rewards say


@pytest.mark.parametrize("budget", [0.25, 0.7])
def test_a_budget_is_met_on_validation_as_a_cap(graph, backbone, budget):
    trained, report = fit(graph, backbone, budget=budget, epochs=2)
    assert isinstance(trained.policy, OffsetPolicy)
    print(f"budget {budget}: validation cost {report.cost_fraction:.4f}, accuracy {report.accuracy:.3f}, "
          f"offset {trained.policy.offset:+.3f}")
    assert budget - 0.02 <= report.cost_fraction <= budget + 1e-9
    # saved as plain data, it routes the same after loading
    again = load_policy(graph, save_policy(trained.policy))
    assert evaluate(trained.executor, trained.data.val, again, classes=trained.data.classes).to_json()["cost_fraction"] \
        == report.cost_fraction


def test_offset_policy_favours_the_cheapest_action_by_rank():
    policy = OffsetPolicy(0.0, {"Q": [2, 0, 1]})  # 2 is the cheapest action, 1 the dearest
    scores = {"Q": torch.tensor([[0.9, 1.0, -2.0]])}  # + t·[1, 0, 2]
    assert [int(policy.actions_at(t, scores)["Q"]) for t in (0.0, 0.5, 3.0, -2.0)] == [1, 0, 2, 1]


# --- determinism, freezing, numerics -----------------------------------------------------------


def test_same_seed_same_weights(graph, backbone):
    # Sampled gradients: the baseline changes them (the exact gradient needs none).
    a = fit(graph, backbone, epochs=1, baseline="learned", gradient="sampled")[0].executor.state_dict()
    a = {k: v.clone() for k, v in a.items()}
    b = fit(graph, backbone, epochs=1, baseline="learned", gradient="sampled")[0].executor.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = fit(graph, backbone, epochs=1, baseline="moving", gradient="sampled")[0].executor.state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the test can tell runs apart


def test_freeze_trains_the_control_nodes_only(graph, backbone):
    _, weights = backbone
    trained, report = fit(graph, backbone, freeze=True)
    after = trained.executor.state_dict()
    for k, v in after.items():
        if k.startswith("nodes.Q."):
            assert not torch.equal(v, weights[k]), k
        else:
            assert torch.equal(v, weights[k]), k
    agreement = float(np.mean((per_example(trained.executor, trained.data.val)["action.Q"] == 0)
                              == flagged(trained.data.val)))
    print(f"freeze: agreement {agreement:.3f}, accuracy {report.accuracy:.3f}, cost {report.cost_fraction:.3f}")
    assert agreement >= 0.9  # the classifiers are good enough already: the policy alone learns the split


@pytest.mark.parametrize("params", [
    {"alpha": 1000.0, "baseline": "none"},
    {"alpha": 0.5, "baseline": "learned", "entropy": 0.1},
    {"budget": 0.01, "alpha_step": 50.0},
])
def test_extreme_settings_stay_finite(graph, backbone, params):
    trained, report = fit(graph, backbone, epochs=1, **params)
    assert all(torch.isfinite(v).all() for v in trained.executor.state_dict().values() if v.is_floating_point())
    assert math.isfinite(report.accuracy) and math.isfinite(report.cost_fraction)


def test_mistakes_are_E921():
    with pytest.raises(D2GraphError) as e:
        ReinforceTrainer(alpha=-1)
    assert e.value.diagnostics[0].code == "E921"
    plain, _ = d2graph.check("graph g {\n input x [4]\n output y\n node A = fc(2)\n x -> A -> y\n}\n")
    with pytest.raises(D2GraphError) as e:
        ReinforceTrainer().check_graph(plain)
    assert e.value.diagnostics[0].code == "E921"


# --- resume --------------------------------------------------------------------------------------


def test_an_interrupted_run_resumes_to_the_same_weights(graph, tmp_path, monkeypatch):
    overrides = ["stage.backbone.epochs=1", "stage.policy.epochs=2", "stage.policy.budget=0.4",
                 "stage.policy.baseline=learned"]
    source = TEXT  # the copy in the run folder is not read back here
    config = resolve(graph, overrides)
    whole = train(graph, config, Run.create(graph, source, config, tmp_path / "whole"), quiet=True, echo=None,
                  evaluate=False)
    run = Run.create(graph, source, config, tmp_path / "cut")
    ctrl_c_after(monkeypatch, stage=1, epoch=0, step=5)  # in the middle of the policy stage's first epoch
    with pytest.raises(Interrupted):
        train(graph, config, run, quiet=True, echo=None, evaluate=False)
    monkeypatch.undo()
    state = load_checkpoint(run.folder / "last.pt")
    assert (state["stage_index"], state["epoch"], state["step"]) == (1, 0, 6)
    assert {"alpha", "values"} <= set(state["extra"])
    resumed = train(graph, config, Run.open(run.folder), resume=True, quiet=True, echo=None, evaluate=False)
    a, b = whole.executor.state_dict(), resumed.executor.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert save_policy(whole.policy) == save_policy(resumed.policy)
    assert (tmp_path / "whole" / "metrics.jsonl").read_text() == (run.folder / "metrics.jsonl").read_text()
    rows = [r for r in Run.open(run.folder).rows() if r["stage"] == "policy"]
    assert [r.get("epoch") for r in rows] == [1, 2, None]  # two epochs, then the calibration
    assert all({"val_accuracy", "val_cost_fraction", "alpha"} <= set(r) for r in rows)
    assert rows[-1]["val_cost_fraction"] <= 0.4


# --- the examples ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, params", [
    ("guan_cascade", {"budget": 0.4, "freeze": True}),
    ("cascade", {"alpha": 1.0, "baseline": "learned"}),
    ("early_exit", {"budget": 0.5, "entropy": 0.01}),
])
def test_a_couple_of_steps_on_each_example(name, params):
    graph = d2graph.load(ROOT / "examples" / f"{name}.d2")
    config = Config(graph.name, {"name": "cluttered_digits", "args": {"n": 240}},
                    {**resolve(graph).settings, "batch": 64},
                    [{"name": "policy", "trainer": "reinforce", "params": {"epochs": 1, **params}}])
    torch.manual_seed(0)
    start = d2graph.compile(graph)
    before = {k: v.clone() for k, v in start.state_dict().items()}
    base = Trained(start, LearnedPolicy(), load_data(config, graph, None), config, None)
    trained = train(graph, config, None, quiet=True, echo=None, evaluate=False, start=base)
    after = trained.executor.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    controls = {q.name for q in graph.control_nodes}
    changed = {k.split(".")[1] for k in after if not torch.equal(after[k], before[k])}
    assert changed & controls  # the policies learned something in three steps
    if params.get("freeze"):  # weights and batch-norm statistics of the classifiers as they were
        assert changed <= controls
    report = evaluate(trained.executor, trained.data.val, trained.policy, classes=trained.data.classes)
    if "budget" in params:
        assert isinstance(trained.policy, OffsetPolicy)
        assert report.cost_fraction <= params["budget"] + 1e-9
    else:
        assert isinstance(trained.policy, LearnedPolicy)


def test_the_exact_gradient_is_the_gradient_of_the_expected_reward(graph, backbone):
    # Two paths: stop at A (Q = 0) or run B (Q = 1). expected_reward must be
    # π(0)·R_A + π(1)·R_B per example, with R from forced passes and π from Q's softmax.
    from d2graph.trainers.reinforce import expected_reward

    executor, x, y, paths = on_validation(graph, backbone, 64)
    got = expected_reward(executor, x, y, paths, ["Q"], "y", 0.5)
    pi = torch.softmax(executor.nodes["Q"](x).float(), 1)
    want = 0.0
    for a in (0, 1):
        r = executor(x, mode="force", actions={"Q": torch.full((64,), a)})
        reward = -torch.nn.functional.cross_entropy(r.outputs["y"].float(), y, reduction="none") \
            - 0.5 * r.cost_fraction.float()
        want = want + pi[:, a] * reward.detach()
    assert torch.allclose(got, want, atol=1e-5)
    # and it is differentiable in the policy's weights (the rewards are constants)
    executor.zero_grad()
    got.mean().backward()
    assert executor.nodes["Q"][0].weight.grad is not None
    assert float(executor.nodes["Q"][0].weight.grad.abs().sum()) > 0


def test_the_best_path_loss_pulls_on_examples_the_expected_reward_has_given_up(graph, backbone):
    # Q made sure of "run B" for every example. On the flagged examples stopping at A is the
    # better path (A answers them, B costs 140× more), yet the expected reward's gradient there
    # carries π(stop)·π(run) ≈ 0: no example could ever move back. The best-path loss is the
    # cross-entropy to softmax(R / τ) over the paths, and pulls on exactly those.
    from d2graph.trainers.reinforce import best_path_loss, expected_reward

    executor, x, y, paths = on_validation(graph, backbone, 256)
    easy = x[:, 0] > 0
    fc = executor.nodes["Q"][0]
    with torch.no_grad():
        fc.weight.zero_()
        fc.bias.copy_(torch.tensor([-12.0, 12.0]))  # action 0 = stop, action 1 = run B
    pulls = {}
    for name, objective in (("reward", lambda: -expected_reward(executor, x[easy], y[easy], paths, ["Q"], "y", 0.5)),
                            ("best_path", lambda: best_path_loss(executor, x[easy], y[easy], paths, ["Q"], "y",
                                                                 0.5, 0.05))):
        executor.zero_grad()
        objective().mean().backward()
        pulls[name] = float(fc.bias.grad[0])  # descending moves the stop score up by −grad
    print(pulls)
    assert abs(pulls["reward"]) < 1e-6
    assert pulls["best_path"] < -0.5
    # The loss itself: the cross-entropy from softmax(R / τ), one-hot on the best path at τ = 0.
    with torch.no_grad():
        rewards = []
        for a in (0, 1):
            r = executor(x, mode="force", actions={"Q": torch.full((len(y),), a)})
            rewards.append(-torch.nn.functional.cross_entropy(r.outputs["y"].float(), y, reduction="none")
                           - 0.5 * r.cost_fraction.float())
        rewards = torch.stack(rewards, 1)
        log_pi = torch.log_softmax(executor.nodes["Q"](x).float(), 1)
        for tau, target in ((0.05, (rewards / 0.05).softmax(1)),
                            (0.0, torch.nn.functional.one_hot(rewards.argmax(1), 2).float())):
            want = -(target * log_pi).sum(1)
            assert torch.allclose(best_path_loss(executor, x, y, paths, ["Q"], "y", 0.5, tau), want, atol=1e-4)


def test_objective_best_path_needs_every_path():
    graph = d2graph.load(ROOT / "examples" / "early_exit.d2")
    ReinforceTrainer(objective="best_path").check_graph(graph)  # 3 paths: auto takes them all
    with pytest.raises(D2GraphError, match="needs every static path"):
        ReinforceTrainer(objective="best_path", gradient="sampled").check_graph(graph)


@pytest.mark.parametrize("name, params, every_head", [
    ("guan_cascade", {}, True),            # best_path (3 paths) and an output that selects one head
    ("guan_cascade", {"objective": "reward"}, False),
    ("guan_cascade", {"classifiers": "routed"}, False),
    ("guan_cascade", {"freeze": True, "classifiers": "all"}, False),
    ("high_low", {}, False),               # the output sums its branches: each learns on its route
    ("high_low", {"classifiers": "all"}, True),
])
def test_which_examples_the_classifiers_learn_from(name, params, every_head, monkeypatch):
    graph = d2graph.load(ROOT / "examples" / f"{name}.d2")
    config = Config(graph.name, {"name": "cluttered_digits", "args": {"n": 240}},
                    {**resolve(graph).settings, "batch": 64, "holdout": 0.0},
                    [{"name": "policy", "trainer": "reinforce", "params": {"epochs": 1, **params}}])
    torch.manual_seed(0)
    start = d2graph.compile(graph)
    before = {k: v.clone() for k, v in start.state_dict().items()}
    trainer_of = {}
    original = ReinforceTrainer.fit

    def spy(self, *args, **kwargs):  # keep the trainer the run builds, to read what it chose
        trainer_of["it"] = self
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ReinforceTrainer, "fit", spy)
    trained = train(graph, config, None, quiet=True, echo=None, evaluate=False,
                    start=Trained(start, LearnedPolicy(), load_data(config, graph, None), config, None))
    assert trainer_of["it"].every_head is every_head
    if every_head:  # every head learned, whichever route the examples took
        after = trained.executor.state_dict()
        for h in heads(graph):
            assert any(not torch.equal(after[k], before[k]) for k in after if k.split(".")[1] == h), h

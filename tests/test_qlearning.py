"""The `qlearning` trainer (D²NN): the mini-bag reward and the ε schedule, a known answer on a
synthetic task, λ trading cost for accuracy, determinism and exact resume, parameter
mistakes, and a few steps of every D²NN example."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import d2graph
from d2graph.data import Splits
from d2graph.diagnostics import D2GraphError
from d2graph.evaluate import evaluate, per_example
from d2graph.executor import compile
from d2graph.paths import current_head
from d2graph.runs import Interrupted, Run, Trained, derive_seed, resolve, train
from d2graph.runs import load_data as runs_load_data_root
from d2graph.trainers import LearnedPolicy
from d2graph.trainers.baselines import HeadTermPolicy, head_decay
from d2graph.trainers.qlearning import (QLearningTrainer, bag_reward, epsilon_at, f1_weights, full_targets,
                                        minibag_size, offset_route, search_offsets)

from .conftest import ROOT, ctrl_c_after


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks (conftest.py)


# --- the reward and the schedule ------------------------------------------------------------


def test_bag_reward_is_lambda_accuracy_plus_efficiency_per_bag():
    prediction = torch.tensor([1, 0, 2, 2, 0, 0, 9])  # the 7th example is left over (m = 3)
    label = torch.tensor([1, 0, 0, 2, 1, 1, 9])
    cost = torch.tensor([0.2, 0.2, 0.8, 1.0, 0.1, 0.1, 0.5], dtype=torch.float64)
    r = bag_reward(prediction, label, cost, 3, 0.25, "accuracy")
    expected = [0.25 * 2 / 3 + 0.75 * (1 - 0.4), 0.25 * 1 / 3 + 0.75 * (1 - 0.4)]
    assert r.dtype == torch.float32 and r.tolist() == pytest.approx(expected)


def test_bag_reward_f1_is_per_bag_and_an_errorless_bag_without_positives_scores_one():
    prediction = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0])
    label = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    zero = torch.zeros(12, dtype=torch.float64)
    # bag 1: tp 1, one false positive -> 2/3; bag 2: nothing to find, nothing wrong -> 1;
    # bag 3: no true positive -> 0
    assert bag_reward(prediction, label, zero, 4, 1.0, "f1").tolist() == pytest.approx([2 / 3, 1.0, 0.0])
    assert bag_reward(prediction, label, zero, 4, 1.0, "accuracy").tolist() == pytest.approx([0.75, 1.0, 0.0])


def test_epsilon_falls_linearly_per_step_then_stays():
    assert epsilon_at(0, 10, 1.0, 0.1, 2) == 1.0
    assert epsilon_at(10, 10, 1.0, 0.1, 2) == pytest.approx(0.55)
    assert epsilon_at(20, 10, 1.0, 0.1, 2) == pytest.approx(0.1)
    assert epsilon_at(500, 10, 1.0, 0.1, 2) == pytest.approx(0.1)
    assert epsilon_at(0, 10, 1.0, 0.1, 0) == 0.1  # no decay: ε_end from the start


# --- a synthetic task with a known answer ---------------------------------------------------

# x = [flag, the one-hot class A sees (4), the true class one-hot (4), 4 distractors].
# A, cheap, reads the first one-hot: the true class on flagged examples, a wrong one elsewhere.
# B, three times dearer, reads the true class. Their weights are set by hand and `mix=0`
# keeps them so, so the best routing is known exactly: with cost fractions 0.25 (A) and
# 0.75 (B) an example's share of the reward is λ·correct + (1 − λ)·(1 − cost):
#   λ = 0.1: A everywhere;  λ = 0.5 and 0.9: A on flagged examples, B on the others.
SYNTHETIC = """
graph bag {
  input x [13]
  output y
  node A [cost=1] = fc(4)
  node B [cost=3] = fc(4)
  control Q [cost=0] = fc(2)
  x -> A, B, Q
  Q => A | B
  A, B -> y [default=0]
  train {
    data = npz(path="bag.npz")  # not read: the tests hand the arrays in (`start`)
    lr = 0.01
    batch = 64
    stage policy = qlearning(epochs=24, lambda=0.5, minibag=8, epsilon_end=0.1, epsilon_decay=12, mix=0)
  }
}
"""


def runs_load_data(config, graph):
    return runs_load_data_root(config, graph, None)


def _examples(n: int, rng: np.random.Generator):
    y = rng.integers(0, 4, n)
    flag = rng.random(n) < 0.5
    shown = np.where(flag, y, (y + 1 + rng.integers(0, 3, n)) % 4)  # never the true class when unflagged
    x = np.zeros((n, 13), np.float32)
    x[:, 0] = flag
    x[np.arange(n), 1 + shown] = 1
    x[np.arange(n), 5 + y] = 1
    x[:, 9:] = rng.normal(size=(n, 4))
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), flag


@functools.lru_cache(maxsize=1)
def _synthetic():
    rng = np.random.default_rng(0)
    (train_set, _), (val_set, val_flag), (test_set, _) = (_examples(n, rng) for n in (1024, 512, 256))
    graph, diags = d2graph.check(SYNTHETIC)
    assert not [d for d in diags if d.severity == "error"], diags
    return graph, Splits("synthetic", train_set, val_set, test_set, 4, (13,)), val_flag


def _hand_set(graph, seed: int):
    torch.manual_seed(derive_seed(seed, -1))  # as `train` initialises a fresh executor
    executor = compile(graph)
    with torch.no_grad():
        for name, first in (("A", 1), ("B", 5)):
            fc = executor.nodes[name][0]
            fc.weight.zero_()
            fc.bias.zero_()
            fc.weight[:, first:first + 4] = torch.eye(4)
    return executor


def _fit(lam: float = 0.5, *, seed: int = 0, overrides=(), run: Run | None = None, resume: bool = False):
    graph, data, _ = _synthetic()
    config = resolve(graph, [f"seed={seed}", f"policy.lambda={lam}", *overrides])
    start = Trained(_hand_set(graph, seed), LearnedPolicy(), data, config, None)
    return train(graph, config, run, resume=resume, quiet=True, echo=None, start=start)


def _agreement(lam: float, overrides) -> float:
    """The share of validation examples routed as the known answer says (A exactly on the flagged ones)."""
    trained = _fit(lam, overrides=overrides)
    cheap = per_example(trained.executor, trained.data.val)["action.Q"] == 0
    return float(np.mean(cheap == _synthetic()[2]))


@functools.lru_cache(maxsize=None)
def _sweep(lam: float):
    trained = _fit(lam)
    rows = per_example(trained.executor, trained.data.val)
    return trained, rows


def test_the_policy_learns_the_known_routing():
    trained, rows = _sweep(0.5)
    _, _, flag = _synthetic()
    assert isinstance(trained.policy, LearnedPolicy)
    cheap = rows["action.Q"] == 0
    agreement = float(np.mean(cheap == flag))
    print(f"agreement with the known routing at λ=0.5: {agreement:.1%}")
    assert agreement >= 0.95
    assert trained.reports["val"].accuracy >= 0.95  # so it is right where it is cheap
    # mix=0 froze the function nodes: still the hand-set weights
    reference = _hand_set(_synthetic()[0], 0)
    for name in ("A", "B"):
        assert torch.equal(trained.executor.nodes[name][0].weight, reference.nodes[name][0].weight)


def test_more_weight_on_accuracy_never_makes_the_policy_cheaper():
    costs = [_sweep(lam)[0].reports["val"].cost_fraction for lam in (0.1, 0.5, 0.9)]
    print("validation cost fraction at λ = 0.1, 0.5, 0.9:", [round(c, 4) for c in costs])
    assert costs[0] <= costs[1] + 0.01 <= costs[2] + 0.02
    assert costs[0] <= 0.27 and costs[2] >= 0.45  # λ = 0.1 takes A everywhere; 0.9 pays for B


def test_bags_of_one_learn_the_routing_that_bags_of_eight_do_not_in_as_many_steps():
    # `minibag=auto` means 1 for accuracy: each example fits its own outcome, where in a
    # bag of 8 it fits the outcome of 7 others too (same expectation, 8× the noise).
    short = ["policy.epochs=12", "policy.epsilon_decay=6", "policy.offsets=none"]  # the values as learnt
    agreement = {minibag: _agreement(0.5, [*short, f"policy.minibag={minibag}"]) for minibag in ("auto", "8")}
    print("agreement with the known routing after 12 epochs:", agreement)
    assert agreement["auto"] >= 0.95
    assert agreement["8"] <= 0.85


def test_full_backups_learn_the_known_routing_sooner_than_sampled_ones():
    # `backup=full` fits every action's value on every example (one forced pass per path);
    # `sampled` only the action the exploring run took, so the other waits for exploration.
    short = ["policy.epochs=4", "policy.epsilon_decay=2", "policy.minibag=1", "policy.offsets=none"]
    agreement = {backup: _agreement(0.5, [*short, f"policy.backup={backup}"])
                 for backup in ("full", "greedy", "sampled")}
    print("agreement with the known routing after 4 epochs:", agreement)
    assert agreement["full"] >= 0.75 and agreement["sampled"] <= 0.70
    assert agreement["greedy"] == agreement["full"]  # one control node: nothing below it to follow


@pytest.mark.parametrize("offsets", ["auto", "epochs"])
def test_offsets_keep_every_example_on_the_cheap_branch_where_the_dear_one_answers_the_same(offsets):
    # B is set to read what A reads: the two answer every example alike, B at three times the
    # cost. At λ = 0.99 their values differ by 0.005, less than the noise of values fitted in
    # a few epochs, so the argmax of the values as learnt sends examples to B for nothing;
    # the searched offsets (`offsets=auto`, which searches when the branches are frozen, as
    # `mix=0` keeps them here) move the node to A, where validation says it loses nothing.
    graph, data, _ = _synthetic()
    # `epochs` searches after every epoch once ε has stopped falling (here after epochs 4-6).
    share, accuracy = {}, {}
    for searched in ("none", offsets):
        config = resolve(graph, ["policy.lambda=0.99", "policy.epochs=6", "policy.epsilon_decay=3",
                                 "policy.minibag=1", f"policy.offsets={searched}"])
        executor = _hand_set(graph, 0)
        with torch.no_grad():
            executor.nodes["B"][0].weight.copy_(executor.nodes["A"][0].weight)
        trained = train(graph, config, None, quiet=True, echo=None,
                        start=Trained(executor, LearnedPolicy(), data, config, None))
        share[searched] = {split: float(np.mean(per_example(trained.executor, getattr(data, split))["action.Q"] == 1))
                           for split in ("val", "test")}
        accuracy[searched] = trained.reports["val"].accuracy
    print("share sent to B:", share)
    assert share["none"]["val"] >= 0.05  # the values as learnt route on noise
    assert share[offsets]["val"] == 0.0 and share[offsets]["test"] <= 0.01
    assert accuracy[offsets] == accuracy["none"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_searched_offsets_margin_keeps_them_from_following_one_validation_sets_noise(seed):
    # Six actions; each one but the first pays 0.05 less on average, every example with noise
    # of 1, and the values as learnt send everyone to the first. Searched on 1,000 examples,
    # the offsets move groups whose noise happened to favour another action; on fresh
    # examples those moves lose. The margin keeps only moves that clear their standard error.
    k = 6
    paths = [{"Q": a} for a in range(k)]
    g = torch.Generator().manual_seed(seed)

    def draw(n):
        rewards = torch.randn(k, n, generator=g, dtype=torch.float64) - 0.05
        rewards[0] = 0.0
        values = torch.randn(n, k, generator=g, dtype=torch.float64)
        values[:, 0] += 3.0
        return rewards, [{"Q": values}] * k

    (searched, values), (fresh, fresh_values) = draw(1000), draw(20000)
    on_fresh = {}
    for margin in (0.0, 1.0):
        offsets, _ = search_offsets(lambda route: searched[route, torch.arange(1000)], paths, values, {"Q": k},
                                    margin=margin)
        on_fresh[margin] = float(fresh[offset_route(paths, fresh_values, offsets), torch.arange(20000)].mean())
    print("mean reward on fresh examples (0 = the values as learnt):", on_fresh)
    assert on_fresh[1.0] > on_fresh[0.0]


@pytest.mark.parametrize("random_routes", [0.0, 0.5])
def test_random_routes_train_a_branch_that_no_example_is_routed_to(random_routes):
    # Q is set to send everyone to A and kept so (no exploration, a learning rate of ~0): the
    # routed cross-entropy never reaches B; `random_routes` adds one on a route drawn at random.
    graph, data, _ = _synthetic()
    config = resolve(graph, ["policy.epochs=1", "policy.epsilon_start=0", "policy.epsilon_end=0", "policy.mix=1",
                             "policy.lr_scale=1e-9", "policy.offsets=none", f"policy.random_routes={random_routes}"])
    executor = _hand_set(graph, 0)
    with torch.no_grad():
        executor.nodes["Q"][0].weight.zero_()
        executor.nodes["Q"][0].bias.copy_(torch.tensor([10.0, -10.0]))
    before = {name: executor.nodes[name][0].weight.clone() for name in ("A", "B")}
    trained = train(graph, config, None, quiet=True, echo=None,
                    start=Trained(executor, LearnedPolicy(), data, config, None))
    assert float(np.mean(per_example(trained.executor, data.val)["action.Q"] == 0)) == 1.0  # still everyone to A
    assert not torch.equal(trained.executor.nodes["A"][0].weight, before["A"])
    assert torch.equal(trained.executor.nodes["B"][0].weight, before["B"]) == (random_routes == 0)


def test_rewards_on_held_out_examples_do_not_trust_what_a_branch_memorised():
    # B "memorised" the training examples: there its input shows the true class, on every
    # other example a random one (right a quarter of the time). Rewarded on the training
    # split, B looks perfect, and λ = 0.5 sends the unflagged half to it; rewarded on held-out
    # examples (`data.holdout`, which the function nodes never saw) it is worse than A
    # everywhere, and A takes every example.
    graph, data, flag = _synthetic()
    rng = np.random.default_rng(1)
    held, _ = _examples(1024, rng)
    for dataset in (held, data.val):  # examples B did not learn: its input is noise
        x, y = dataset.tensors
        x[:, 5:9] = torch.nn.functional.one_hot(torch.from_numpy(rng.integers(0, 4, len(y))), 4).float()
    try:
        shares = {}
        for name, holdout in (("train", None), ("held out", held)):
            splits = Splits("synthetic", data.train, data.val, data.test, 4, (13,), holdout=holdout)
            # keep=last, offsets=none: what the rewards taught, without validation's corrections
            config = resolve(graph, ["policy.lambda=0.5", "policy.keep=last", "policy.offsets=none"])
            trained = train(graph, config, None, quiet=True, echo=None,
                            start=Trained(_hand_set(graph, 0), LearnedPolicy(), splits, config, None))
            shares[name] = float(np.mean(per_example(trained.executor, data.val)["action.Q"] == 1))
    finally:
        _synthetic.cache_clear()  # the validation inputs were overwritten
    print("share of validation examples sent to B, rewarded on:", shares)
    assert shares["train"] >= 0.4 and shares["held out"] <= 0.05


def test_a_fifth_of_the_training_examples_is_held_out_with_qlearning_and_never_trained_on(tmp_path):
    graph = d2graph.load(ROOT / "examples" / "high_low.d2")
    config = resolve(graph, ["data.n=300", "stage.backbone.epochs=1", "stage.policy.epochs=1"])
    assert config.settings["holdout"] == "auto"
    data = runs_load_data(config, graph)
    x_train, x_held = data.train.tensors[0], data.holdout.tensors[0]
    assert len(x_held) == pytest.approx(0.2 * (len(x_train) + len(x_held)), abs=5)
    assert not (x_train.flatten(1)[:, None, :] == x_held.flatten(1)[None, :, :]).all(-1).any()  # disjoint
    same = runs_load_data(config, graph)
    assert torch.equal(same.holdout.tensors[0], x_held)  # drawn from the seed
    # `holdout = 0`, or a trainer that asks for none: every training example trains the nodes
    assert runs_load_data(resolve(graph, ["data.n=300", "holdout=0"]), graph).holdout is None
    config.stages = config.stages[:1]
    assert runs_load_data(config, graph).holdout is None


HEADS = """
graph heads {
  input x [13]
  output y [merge=select]
  node H1 [cost=1] = fc(4)  # the cheap classifier: confident exactly where it is right
  node F [cost=0] = fc(3)   # what Q reads: noise (not 4 wide, which would make it a classifier)
  node H2 [cost=3] = fc(4)  # the dear classifier: always right
  control Q [cost=0] = fc(2)
  x -> H1, F, H2
  F -> Q
  Q => H2 | skip
  H2, H1 -> y
  train {
    data = npz(path="heads.npz")  # not read: the tests hand the arrays in (`start`)
    lr = 0.01
    batch = 64
    stage policy = qlearning(epochs=12, lambda=0.5, epsilon_decay=6, mix=0)
  }
}
"""


@functools.lru_cache(maxsize=1)
def _heads_task():
    """A task where only the cheap head's confidence tells when it may stop: H1 sees the class
    it shows at full strength on the flagged examples (it is right and sure) and at a fifth of
    it on the others (wrong, and unsure); Q's own input is noise."""
    rng = np.random.default_rng(1)
    sets, flags = [], []
    for n in (1024, 512, 256):
        data, flag = _examples(n, rng)
        x = data.tensors[0].clone()
        x[:, 1:5] *= torch.from_numpy(np.where(flag, 1.0, 0.2)).float()[:, None]
        sets.append(TensorDataset(x, data.tensors[1]))
        flags.append(flag)
    graph, diags = d2graph.check(HEADS)
    assert not [d for d in diags if d.severity == "error"], diags
    return graph, Splits("confidence", *sets, 4, (13,)), flags[1]


def _train_heads(overrides=(), run: Run | None = None, resume: bool = False) -> Trained:
    graph, data, _ = _heads_task()
    config = resolve(graph, ["seed=0", *overrides])
    torch.manual_seed(derive_seed(0, -1))
    executor = compile(graph)
    with torch.no_grad():
        for name, first, width in (("H1", 1, 4), ("H2", 5, 4), ("F", 9, 3)):
            fc = executor.nodes[name][0]
            fc.weight.zero_()
            fc.bias.zero_()
            fc.weight[:, first:first + width] = 5 * torch.eye(width)
    return train(graph, config, run, resume=resume, quiet=True, echo=None,
                 start=Trained(executor, LearnedPolicy(), data, config, None))


@functools.lru_cache(maxsize=None)
def _fit_heads(heads: bool) -> tuple[Trained, float]:
    """The run, and the share of validation examples it routes as the known answer says."""
    graph, data, flag = _heads_task()
    trained = _train_heads([f"policy.heads={str(heads).lower()}"])
    stops = per_example(trained.executor, data.val, trained.policy)["action.Q"] == 1
    return trained, float(np.mean(stops == flag))


def test_a_head_term_learns_the_rule_that_only_the_heads_confidence_can_tell():
    # λ = 0.5: stopping at H1 is worth 0.5·right + 0.375, going on to H2 0.5, so the best
    # routing stops exactly on the flagged examples, which only H1's confidence reveals.
    trained, agreement = _fit_heads(True)
    _, without = _fit_heads(False)
    print(f"agreement with the known routing: {agreement:.1%} with the head term, {without:.1%} without")
    assert isinstance(trained.policy, HeadTermPolicy) and trained.policy.heads == {"Q": "H1"}
    assert agreement >= 0.95 and without <= 0.75
    assert trained.reports["val"].accuracy >= 0.95


def test_full_targets_take_the_best_continuation_that_agrees_with_the_choices_above():
    # Two binary nodes in a chain, Q1 then Q2; four paths; rewards for two examples.
    paths = [{"Q1": 0, "Q2": 0}, {"Q1": 0, "Q2": 1}, {"Q1": 1, "Q2": 0}, {"Q1": 1, "Q2": 1}]
    rewards = torch.tensor([[0.1, 0.5], [0.4, 0.2], [0.3, 0.9], [0.6, 0.0]])
    taken = {"Q1": torch.tensor([0, 1]), "Q2": torch.tensor([1, 0])}
    t = full_targets(rewards, paths, taken, ["Q1", "Q2"], [2, 2])
    # Q1: the best over Q2's actions for each of its own
    assert t["Q1"].tolist() == [[pytest.approx(0.4), pytest.approx(0.6)], [pytest.approx(0.5), pytest.approx(0.9)]]
    # Q2: only the paths with the Q1 action each example took
    assert t["Q2"].tolist() == [[pytest.approx(0.1), pytest.approx(0.4)], [pytest.approx(0.9), pytest.approx(0.0)]]


def test_full_targets_follow_the_greedy_choices_below_when_given():
    # The same chain; Q2's greedy choice on each path (as its forced pass scored it). Q1's
    # target for an action is then the reward of the path Q2 will really take, not the
    # best one: E[max] would credit Q1 with continuations that Q2 cannot pick out.
    paths = [{"Q1": 0, "Q2": 0}, {"Q1": 0, "Q2": 1}, {"Q1": 1, "Q2": 0}, {"Q1": 1, "Q2": 1}]
    rewards = torch.tensor([[0.1, 0.5], [0.4, 0.2], [0.3, 0.9], [0.6, 0.0]])
    taken = {"Q1": torch.tensor([0, 1]), "Q2": torch.tensor([1, 0])}
    # Q2 prefers action 0 for example 0 and action 1 for example 1, on every path
    # (on one input its choice is the same whichever action is forced on it).
    q2 = torch.tensor([0, 1])
    greedy = [{"Q1": torch.tensor([-1, -1]), "Q2": q2} for _ in paths]
    t = full_targets(rewards, paths, taken, ["Q1", "Q2"], [2, 2], greedy)
    assert t["Q1"].tolist() == [[pytest.approx(0.1), pytest.approx(0.3)], [pytest.approx(0.2), pytest.approx(0.0)]]
    # Q2 is the last node: its targets are those of the best-continuation backup
    assert t["Q2"].tolist() == [[pytest.approx(0.1), pytest.approx(0.4)], [pytest.approx(0.9), pytest.approx(0.0)]]


def test_full_backup_refuses_a_bag_of_several():
    with pytest.raises(D2GraphError, match="minibag=1"):
        _fit(0.5, overrides=["policy.epochs=1", "policy.minibag=8", "policy.backup=full"])


def test_minibag_auto_is_one_whatever_the_metric():
    assert minibag_size("auto") == 1
    assert minibag_size(8) == 8


@pytest.mark.parametrize("tp, fp, fn", [(30, 10, 20), (5, 1, 40), (80, 30, 2)])
def test_f1_weights_are_f1s_change_when_one_answer_turns_right(tp, fp, fn):
    """Turning one wrong answer right moves F1 by ΔF1; the weights are in the same ratio
    (positive: a false negative becomes a true positive; negative: a false positive goes)."""
    def f1(tp, fp, fn):
        return 2 * tp / (2 * tp + fp + fn)
    gain_positive = f1(tp + 1, fp, fn - 1) - f1(tp, fp, fn)
    gain_negative = f1(tp, fp - 1, fn) - f1(tp, fp, fn)
    w = f1_weights(torch.tensor([1, 0]), f1(tp, fp, fn), 0.3)
    # First order: exact as the counts grow, within the second-order term here.
    assert float(w[0] / w[1]) == pytest.approx(gain_positive / gain_negative, rel=0.1)
    labels = torch.tensor([1] * 3 + [0] * 7)  # 30% positives: the mean weight is 1
    assert float(f1_weights(labels, f1(tp, fp, fn), 0.3).mean()) == pytest.approx(1.0)


def test_bag_reward_with_weights_scales_each_right_answer():
    prediction, label = torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 0, 1])
    cost = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64)
    weight = torch.tensor([2.0, 0.5, 0.5, 2.0])
    r = bag_reward(prediction, label, cost, 1, 0.5, "f1", weight)
    assert r.tolist() == pytest.approx([0.5 * 2.0 + 0.25, 0.25, 0.5 * 0.5 + 0.5, 0.5])


def test_the_same_seed_gives_the_same_weights_and_another_seed_does_not():
    short = ["policy.epochs=2"]
    a, b, c = _fit(overrides=short), _fit(overrides=short), _fit(seed=1, overrides=short)
    sa, sb, sc = (t.executor.state_dict() for t in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["nodes.Q.0.weight"], sc["nodes.Q.0.weight"])
    assert not torch.equal(sa["nodes.Q.0.weight"], _hand_set(_synthetic()[0], 0).state_dict()["nodes.Q.0.weight"])


def _resumes_exactly(tmp_path, monkeypatch, make_run, fit, epoch: int, step: int):
    """Train once whole and once cut by Ctrl-C at (epoch, step) then resumed; assert the two
    end with the same weights and metrics rows. Returns (whole, resumed)."""
    whole = fit(run=make_run("whole"))
    cut = make_run("cut")
    ctrl_c_after(monkeypatch, stage=0, epoch=epoch, step=step)
    with pytest.raises(Interrupted):
        fit(run=cut)
    monkeypatch.undo()
    resumed = fit(run=Run.open(cut.folder), resume=True)
    sw, sr = whole.executor.state_dict(), resumed.executor.state_dict()
    assert all(torch.equal(sw[k], sr[k]) for k in sw)
    assert (tmp_path / "whole" / "metrics.jsonl").read_text() == (cut.folder / "metrics.jsonl").read_text()
    return whole, resumed


def test_an_interrupted_run_resumes_exactly(tmp_path, monkeypatch):
    graph = _synthetic()[0]
    short = ["policy.epochs=3", "policy.epsilon_decay=2", "policy.mix=0.5"]  # ε changes within epochs

    def run(name):
        config = resolve(graph, ["policy.lambda=0.5", *short])
        return Run.create(graph, SYNTHETIC, config, out=tmp_path / name)

    # cut during the 6th step of the second epoch
    _resumes_exactly(tmp_path, monkeypatch, run, functools.partial(_fit, overrides=short), epoch=1, step=5)
    logged = [r for r in Run.open(tmp_path / "whole").rows() if r.get("trainer") == "qlearning" and "epsilon" in r]
    assert [r["epsilon"] for r in logged] == pytest.approx([0.1 + 0.9 * 17 / 32, 0.1 + 0.9 / 32, 0.1])  # ε_end = 0.1 in SYNTHETIC
    assert all(r["train_reward"] is not None for r in logged)


def test_an_interrupted_run_resumes_its_searched_offsets_exactly(tmp_path, monkeypatch):
    # offsets=epochs: searched after epochs 2 and 3 (ε stops falling after the first); the run
    # is cut in the third, while the training routes follow the constants found after the second.
    graph = _synthetic()[0]
    short = ["policy.epochs=3", "policy.epsilon_decay=1", "policy.mix=0.5", "policy.offsets=epochs"]

    def run(name):
        config = resolve(graph, ["policy.lambda=0.5", *short])
        return Run.create(graph, SYNTHETIC, config, out=tmp_path / name)

    _resumes_exactly(tmp_path, monkeypatch, run, functools.partial(_fit, overrides=short), epoch=2, step=5)
    assert len([r for r in Run.open(tmp_path / "whole").rows() if "val_reward_after_offsets" in r]) == 2


def test_an_interrupted_run_resumes_its_head_term_exactly(tmp_path, monkeypatch):
    graph = _heads_task()[0]
    short = ["policy.epochs=2", "policy.mix=0.5"]

    def run(name):
        return Run.create(graph, HEADS, resolve(graph, ["seed=0", *short]), out=tmp_path / name)

    whole, resumed = _resumes_exactly(tmp_path, monkeypatch, run, functools.partial(_train_heads, short),
                                      epoch=1, step=3)
    assert whole.policy.state() == resumed.policy.state() and whole.policy.weight["Q"].abs().sum() > 0


@pytest.mark.parametrize("example, expected", [
    ("cascade", {"Q1": 10.0, "Q2": 10.0, "Q3": 10.0}),  # they read features; their heads are N2, N4, N6
    ("early_exit", {"Q1": 0.0, "Q2": 0.0}),  # they read their heads H1, H2 themselves
])
def test_decay_auto_penalises_only_nodes_that_do_not_read_their_head(example, expected):
    graph = d2graph.load(ROOT / "examples" / f"{example}.d2")
    heads = {q.name: h for q in graph.control_nodes if (h := current_head(graph, q.name, 10))}
    assert head_decay(graph, heads, "auto") == expected
    assert set(head_decay(graph, heads, 0.5).values()) == {0.5}


# --- mistakes -------------------------------------------------------------------------------


def _codes(excinfo) -> list[str]:
    return [d.code for d in excinfo.value.diagnostics]


@pytest.mark.parametrize("override, fragment", [
    ("policy.minibag=65", "does not fit in a batch of 64"),
    ("policy.metric=f1", "needs a binary task"),
    ("policy.mix=-1", "`mix` must not be negative"),
    ("policy.lr_scale=0", "`lr_scale` must be positive"),
    ("policy.decay=-1", "`decay` must not be negative"),
    ("policy.random_routes=-0.5", "`random_routes` must not be negative"),
])
def test_mistakes_are_E921_before_any_step(override, fragment):
    with pytest.raises(D2GraphError) as e:
        _fit(overrides=[override])
    assert _codes(e) == ["E921"] and fragment in e.value.diagnostics[0].message


def test_a_graph_without_control_nodes_is_refused():
    graph, _ = d2graph.check("graph g {\n input x [4]\n output y\n node A = fc(2)\n x -> A -> y\n}\n")
    with pytest.raises(D2GraphError) as e:
        QLearningTrainer().check_graph(graph)
    assert _codes(e) == ["E921"] and "no control node" in e.value.diagnostics[0].message


def test_unknown_parameters_are_caught_by_the_checker():
    text = SYNTHETIC.replace("lambda=0.5", "lamda=0.5")
    _, diags = d2graph.check(text)
    assert any("did you mean `lambda`" in d.message for d in diags)


# --- the D²NN examples ------------------------------------------------------------------------


@pytest.mark.parametrize("example, data", [
    ("high_low", []),
    ("high_low", ["data.binary=3"]),  # two classes: the reward's A is F1
    ("cascade", []),
    ("chain", []),
    ("hierarchy", []),  # several leaves may run for one example
])
def test_every_d2nn_example_trains_a_few_steps(example, data, tmp_path):
    path = ROOT / "examples" / f"{example}.d2"
    graph = d2graph.load(path)
    config = resolve(graph, ["data.n=300", "batch=32", *data])
    # Two classes: bags of one with F1's per-example weights (`minibag=auto`), else bags of 16.
    params = {"epochs": 1, "minibag": "auto" if data else 16, "offsets": "end"}
    config.stages = [{"name": "policy", "trainer": "qlearning", "params": params}]
    before = {k: v.clone() for k, v in _fresh_weights(graph, config).items()}
    run = Run.create(graph, path.read_text(), config, out=tmp_path / "run")
    trained = train(graph, config, run, quiet=True, echo=None)
    (row,) = [r for r in run.rows() if r.get("trainer") == "qlearning" and "epoch" in r]
    (kept,) = [r for r in run.rows() if "kept_epoch" in r]  # keep=best, the default: the only epoch
    assert kept["kept_epoch"] == 1 and kept["kept_val_reward"] == pytest.approx(row["val_reward"])
    assert math.isfinite(row["train_loss"]) and row["train_loss"] >= 0
    assert 0 <= row["val_cost_fraction"] <= 1 and 0 <= row["val_accuracy"] <= 1
    steps = math.ceil(len(trained.data.train) / 32)  # the training examples not held out (a fifth is)
    assert len(trained.data.holdout) == pytest.approx(0.25 * len(trained.data.train), abs=10)
    assert row["epsilon"] == pytest.approx(1 - 0.95 * (steps - 1) / (5 * steps))  # the last step; the decay spans 5 epochs
    assert ("val_f1" in row) == bool(data)
    # The cascade's control nodes have a stage classifier to read (a head term each); the others none.
    assert isinstance(trained.policy, HeadTermPolicy if example == "cascade" else LearnedPolicy)
    if example == "cascade":
        assert trained.policy.heads == {"Q1": "N2", "Q2": "N4", "Q3": "N6"}
    report = trained.reports["val"]
    # offsets=end: the searched routing is what the policy does on validation, and never worse
    (searched,) = [r for r in run.rows() if "val_reward_after_offsets" in r]
    assert searched["val_reward_before_offsets"] == pytest.approx(kept["kept_val_reward"], abs=1e-6)
    a = report.f1 if data else report.accuracy
    assert searched["val_reward_after_offsets"] == pytest.approx(0.5 * a + 0.5 * (1 - report.cost_fraction), abs=1e-6)
    assert searched["val_reward_after_offsets"] >= searched["val_reward_before_offsets"]
    for q in graph.control_nodes:  # the control nodes route every example they reach
        assert sum(report.action_rates[q.name]) == pytest.approx(1.0)
        assert not torch.equal(_first_weight(before, q.name), _first_weight(trained.executor.state_dict(), q.name))
    # mix=1 (the default): the function nodes learned on the routed runs too
    assert not torch.equal(_first_weight(before, "N1"), _first_weight(trained.executor.state_dict(), "N1"))


def _fresh_weights(graph, config):
    torch.manual_seed(derive_seed(int(config.settings["seed"]), -1))  # what `train` starts from
    return compile(graph).state_dict()


def _first_weight(state, node: str) -> torch.Tensor:
    return next(v for k, v in state.items() if k.startswith(f"nodes.{node}.") and k.endswith("weight"))


@pytest.mark.parametrize("keep", ["best", "last"])
def test_the_stage_ends_with_the_weights_of_the_epoch_it_keeps(keep, tmp_path):
    # The branches learn jointly (mix) with a high learning rate and the exploration stays
    # wide, so the validation reward moves from epoch to epoch and its best is not the last.
    overrides = ["policy.epochs=5", "policy.epsilon_end=0.5", "policy.mix=1", "policy.lr_scale=30",
                 f"policy.keep={keep}", "policy.offsets=none"]
    graph = _synthetic()[0]
    config = resolve(graph, ["policy.lambda=0.5", *overrides])
    trained = _fit(overrides=overrides, run=Run.create(graph, SYNTHETIC, config, out=tmp_path / "run"))
    rows = Run.open(tmp_path / "run").rows()
    rewards = [r["val_reward"] for r in rows if "val_reward" in r]
    assert len(rewards) == 5 and max(rewards) > rewards[-1]  # the test means something
    report = evaluate(trained.executor, trained.data.val, trained.policy, classes=4, split="val")
    reward = 0.5 * report.accuracy + 0.5 * (1 - report.cost_fraction)  # as the stage scores an epoch
    if keep == "best":
        kept = [r for r in rows if "kept_epoch" in r]
        assert len(kept) == 1 and kept[0]["kept_epoch"] == 1 + rewards.index(max(rewards))
        assert reward == pytest.approx(max(rewards), abs=1e-6)
        best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["weights"]
        assert all(torch.equal(v, best[k]) for k, v in trained.executor.state_dict().items())
    else:
        assert not any("kept_epoch" in r for r in rows)
        assert reward == pytest.approx(rewards[-1], abs=1e-6)

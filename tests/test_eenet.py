"""EENet on cached per-exit predictions: the exits of a graph, the predictions folder, the
learned exit rule on synthetic problems whose right answer is known, its budgets, its
numerics, and the trainer end to end on early_exit.d2."""

from __future__ import annotations

import io
import math
import json

import numpy as np
import pytest
import torch

import d2graph
from d2graph.diagnostics import D2GraphError
from d2graph.executor import compile
from d2graph.predictions import (
    Exit, Predictions, actions_for_exits, exit_costs, exits_of, from_executor, load, save,
)
from d2graph.paths import path_costs
from d2graph.policies import load_policy, save_policy
from d2graph.runs import make_trainers, resolve, train
from d2graph.trainers.eenet import (
    EENetPolicy, EENetRule, EENetTrainer, PatienceRule, confidence_features, eenet_losses, exit_of,
    fit_on_predictions, patience_on_predictions, scorer_inputs, search_thresholds, threshold_on_predictions, thresholds_for,
)

from .conftest import ROOT

EXAMPLES = ROOT / "examples"
EPOCHS = 40  # enough for the synthetic problems below; the default (200) is for real ones


def _codes(excinfo) -> list[str]:
    return [d.code for d in excinfo.value.diagnostics]


# --- synthetic predictions --------------------------------------------------------------------


def _peaked(rng, predicted: np.ndarray, top: np.ndarray, classes: int) -> np.ndarray:
    """Softmax-like rows: `top` (plus a little) on `predicted`, the rest spread at random."""
    n = len(predicted)
    p = rng.random((n, classes)) * 0.1
    p = p / p.sum(1, keepdims=True) * (1 - top)[:, None]
    p[np.arange(n), predicted] += top
    return p


def _wrong(rng, y: np.ndarray, classes: int) -> np.ndarray:
    return (y + 1 + rng.integers(0, classes - 1, len(y))) % classes


def two_exits(n: int, seed: int, by: str = "maxprob", classes: int = 10):
    """Exit 1 is right exactly on a subset S; exit 2 is always right. S is recognisable by
    exit 1's max probability (by="maxprob": ≥ 0.75 on S, ≤ 0.6 elsewhere) or only by the
    class exit 1 predicts (by="class": S = labels below C/2, every max probability drawn
    from the same range). Returns (probs [2, n, C], labels, S)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    if by == "maxprob":
        s = rng.random(n) < 0.4
        top = np.where(s, rng.uniform(0.75, 0.95, n), rng.uniform(0.2, 0.5, n))
        first = _peaked(rng, np.where(s, y, _wrong(rng, y, classes)), top, classes)
    else:
        half = classes // 2
        s = y < half
        # wrong answers all name an upper-half class: the class predicted tells S apart
        upper = half + (y + 1 + rng.integers(0, half - 1, n)) % half
        first = _peaked(rng, np.where(s, y, upper), rng.uniform(0.3, 0.95, n), classes)
    last = _peaked(rng, y, rng.uniform(0.6, 0.95, n), classes)
    return np.stack([first, last]).astype(np.float32), y, s


def synthetic(by: str = "maxprob", n: int = 1000):
    (vp, vy, vs), (tp, ty, ts) = two_exits(n, 1, by), two_exits(n, 2, by)
    return Predictions(vp, tp, vy, ty, np.array([1.0, 3.0]), ["early", "late"]), vs, ts


def three_exits(n: int = 1000, seed: int = 0) -> Predictions:
    """Harder examples are right only at deeper exits, and less sure where they are wrong."""
    rng = np.random.default_rng(seed)
    classes = 10

    def split(m):
        y = rng.integers(0, classes, m)
        level = rng.integers(0, 3, m)  # the first exit that is right
        probs = [_peaked(rng, np.where(level <= k, y, _wrong(rng, y, classes)),
                         np.where(level <= k, rng.uniform(0.5, 0.95, m), rng.uniform(0.2, 0.7, m)), classes)
                 for k in range(3)]
        return np.stack(probs).astype(np.float32), y

    (vp, vy), (tp, ty) = split(n), split(n)
    return Predictions(vp, tp, vy, ty, np.array([2.0, 5.0, 10.0]))


# --- the exits of a graph -----------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("early_exit", [("Q1", "H1"), ("Q2", "H2"), (None, "B3")]),
    ("eenet_resnet", [("D1", "E1"), ("D2", "E2"), (None, "E3")]),
    ("cascade", [("Q1", "N2"), ("Q2", "N4"), ("Q3", "N6"), (None, "N7")]),  # skip is action 2 there
])
def test_exits_of_finds_the_exits_shallow_to_deep(name, expected):
    graph = d2graph.load(EXAMPLES / f"{name}.d2")
    exits = exits_of(graph)
    assert [(e.control, e.head) for e in exits] == expected
    for e in exits[:-1]:
        assert graph[e.control].actions[e.stop] is None and graph[e.control].actions[e.go] is not None
    costs = exit_costs(graph)
    assert costs == sorted(costs) and costs[-1] == graph.full_cost
    assert sorted(costs) == sorted(c for _, _, c in path_costs(graph))


@pytest.mark.parametrize("name, fragment", [
    ("high_low", "has no `skip` action"),
    ("chain", "has no `skip` action"),
    ("hierarchy", "reads no exit head"),
    ("ann_network_selection", "has 3 actions"),
])
def test_other_shapes_are_refused_with_E921_before_training(name, fragment):
    graph = d2graph.load(EXAMPLES / f"{name}.d2")
    with pytest.raises(D2GraphError) as e:
        exits_of(graph)
    assert _codes(e) == ["E921"] and fragment in e.value.diagnostics[0].message
    assert e.value.diagnostics[0].help
    config = resolve(graph)
    config.stages[1] = {"name": "policy", "trainer": "eenet", "params": {"budget": 0.5}}
    with pytest.raises(D2GraphError) as e:
        make_trainers(config, graph)  # what `train` calls before any stage runs
    assert _codes(e) == ["E921"]


def test_forced_actions_take_each_example_out_at_its_exit():
    graph = d2graph.load(EXAMPLES / "early_exit.d2")
    exits = exits_of(graph)
    actions = actions_for_exits(exits, [0, 1, 2, 1])
    assert {q: a.tolist() for q, a in actions.items()} == {"Q1": [0, 1, 1, 1], "Q2": [0, 0, 1, 0]}
    torch.manual_seed(0)
    executor = compile(graph).eval()
    with torch.no_grad():
        result = executor(torch.randn(4, 1, 32, 32), mode="force", actions=actions)
    ran = {h: result.ran_mask(h).tolist() for h in ("H1", "H2", "B3")}
    assert ran == {"H1": [True] * 4, "H2": [False, True, True, True], "B3": [False, False, True, False]}
    assert result.cost.tolist() == [exit_costs(graph)[k] for k in (0, 1, 2, 1)]
    with pytest.raises(ValueError):
        actions_for_exits(exits, [3])


# --- the learned rule on synthetic predictions --------------------------------------------------


def test_eenet_sends_exactly_the_recognisable_subset_to_the_first_exit():
    pred, val_subset, test_subset = synthetic("maxprob")
    share = val_subset.mean()
    budget = share * pred.fractions[0] + (1 - share) + 1e-6  # the cost of exactly S exiting early
    rule, report = fit_on_predictions(pred, budget, seed=0, epochs=EPOCHS)
    early = rule.exit_index(pred.val_probs) == 0
    assert (early == val_subset).all()  # that subset, and only it
    assert report["val"]["accuracy"] == 1.0 and report["val"]["cost_fraction"] <= budget
    assert ((rule.exit_index(pred.test_probs) == 0) == test_subset).mean() >= 0.99  # and on unseen examples
    # max probability separates S here, so the threshold baseline finds it too
    threshold, baseline = threshold_on_predictions(pred, budget)
    assert ((threshold.exit_index(pred.val_probs) == 0) == val_subset).all()
    # a budget that pays for one more late exit sends the least sure example of S on
    rule, _ = fit_on_predictions(pred, budget + (1 - pred.fractions[0]) / len(early), seed=0, epochs=EPOCHS)
    early = rule.exit_index(pred.val_probs) == 0
    assert early.sum() == val_subset.sum() - 1 and not (early & ~val_subset).any()


def test_eenet_learns_what_max_probability_cannot_see():
    pred, val_subset, test_subset = synthetic("class")
    share = val_subset.mean()
    budget = share * pred.fractions[0] + (1 - share) + 1e-6
    rule, report = fit_on_predictions(pred, budget, seed=0, epochs=EPOCHS)
    _, baseline = threshold_on_predictions(pred, budget)
    assert ((rule.exit_index(pred.test_probs) == 0) == test_subset).mean() >= 0.98
    assert report["test"]["accuracy"] >= 0.98 > baseline["test"]["accuracy"] + 0.15
    assert abs(report["val"]["cost_fraction"] - baseline["val"]["cost_fraction"]) < 0.02


def fixable_or_hopeless(n: int, seed: int, classes: int = 10):
    """Two exits. 40% of the examples: exit 1 right and sure. The rest, exit 1 wrong and as
    unsure on each: half are fixed by exit 2 (exit 1 then names a lower-half class), half are
    wrong everywhere (an upper-half class). Returns (probs [2, n, C], labels, fixable)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    group = rng.choice(3, n, p=[0.4, 0.3, 0.3])  # 0 easy, 1 fixable, 2 hopeless
    half = classes // 2
    wrong_low = (y + 1 + rng.integers(0, half, n)) % half
    wrong_low = np.where(wrong_low == y, (wrong_low + 1) % half, wrong_low)
    wrong_high = half + (y + 1 + rng.integers(0, half, n)) % half
    wrong_high = np.where(wrong_high == y, half + (wrong_high + 1 - half) % half, wrong_high)
    named = np.select([group == 0, group == 1], [y, wrong_low], wrong_high)
    first = _peaked(rng, named, np.where(group == 0, rng.uniform(0.7, 0.95, n), rng.uniform(0.3, 0.6, n)), classes)
    last = _peaked(rng, np.where(group == 2, _wrong(rng, y, classes), y), rng.uniform(0.6, 0.95, n), classes)
    return np.stack([first, last]).astype(np.float32), y, group == 1


def test_the_no_loss_utility_sends_on_the_examples_a_later_exit_fixes():
    # With a budget that pays exit 2 for 30% of the examples, the best rule sends exactly the
    # fixable ones. "Exit 1 is right" (the paper's utility, and max probability) cannot tell
    # them from the hopeless ones; "leaving loses nothing" can.
    (vp, vy, vf), (tp, ty, tf) = fixable_or_hopeless(1500, 1), fixable_or_hopeless(1500, 2)
    pred = Predictions(vp, tp, vy, ty, np.array([1.0, 4.0]))
    budget = (1 + 3 * vf.mean()) / 4 + 1e-6
    rule, report = fit_on_predictions(pred, budget, seed=0, epochs=EPOCHS)
    paper, paper_report = fit_on_predictions(pred, budget, seed=0, epochs=EPOCHS, utility="right")
    _, threshold = threshold_on_predictions(pred, budget)
    assert ((rule.exit_index(pred.test_probs) == 1) == tf).mean() >= 0.97
    assert report["test"]["accuracy"] >= 0.4 + tf.mean() - 0.02
    assert report["test"]["accuracy"] > paper_report["test"]["accuracy"] + 0.08
    assert report["test"]["accuracy"] > threshold["test"]["accuracy"] + 0.08


def test_scorer_inputs_add_the_sorted_probabilities_and_old_rules_load_without_them():
    probs = torch.softmax(torch.randn(3, 5, 4), 2)
    plain, ranked = scorer_inputs(probs, sorted_probs=False), scorer_inputs(probs, sorted_probs=True)
    assert [x.shape[1] for x in plain] == [7] * 3 and [x.shape[1] for x in ranked] == [11] * 3
    assert torch.equal(ranked[1][:, 4:8], probs[1].sort(1, descending=True).values)
    pred = three_exits(200)
    rule, _ = fit_on_predictions(pred, 0.5, seed=0, epochs=5, sorted_probs=False)
    state = rule.state()
    del state["sorted_probs"]  # a rule saved before the option existed
    back = EENetRule.from_state(state)
    assert not back.sorted_probs
    assert np.array_equal(back.exit_index(pred.test_probs), rule.exit_index(pred.test_probs))


@pytest.mark.parametrize("budget", [0.35, 0.55, 0.8])
def test_budgets_are_caps_met_within_two_points_on_validation(budget):
    pred = three_exits()
    rule, report = fit_on_predictions(pred, budget, seed=0, epochs=EPOCHS)
    val = report["val"]
    assert budget - 0.02 <= val["cost_fraction"] <= budget
    # the rule routes the predictions as the report says, and the thresholds give the shares
    index = rule.exit_index(pred.val_probs)
    assert pred.outcome("val", index) == (val["accuracy"], val["cost_fraction"])
    assert np.allclose(np.bincount(index, minlength=3) / len(index), rule.shares, atol=2 / len(index))
    assert report["test"]["cost_fraction"] == pytest.approx(budget, abs=0.05)
    if budget == 0.55:  # deterministic in the seed
        again, _ = fit_on_predictions(pred, budget, seed=0, epochs=EPOCHS)
        assert again.state() == rule.state()


def test_a_budget_below_the_first_exit_sends_everyone_out_there():
    pred = three_exits(300)
    rule, report = fit_on_predictions(pred, 0.1, seed=0, epochs=5)
    assert report["val"]["exit_shares"] == [1.0, 0.0, 0.0]
    with pytest.raises(D2GraphError) as e:
        fit_on_predictions(pred, 0.0)
    assert _codes(e) == ["E921"]


# --- numerics -----------------------------------------------------------------------------------


def test_no_nan_when_every_score_of_an_example_clamps_to_zero():
    n, k = 6, 3
    utility = torch.full((n, k - 1), -1e4, requires_grad=True)  # q̂ = σ(−1e4) = exactly 0
    assert torch.sigmoid(utility).eq(0).all()
    assignment = torch.tensor([[1e4, 0.0, 0.0]] * n, requires_grad=True)  # r̂ = [1, 0, 0]: nobody reaches exit 2
    correct = torch.zeros(n, k)  # every exit wrong for every example: r = 1/K
    correct[0] = 1
    losses = eenet_losses(utility, assignment, correct, torch.tensor([0.2, 0.5, 1.0]), budget=0.5)
    losses["total"].backward()
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert torch.isfinite(utility.grad).all() and torch.isfinite(assignment.grad).all()
    # probabilities at exactly 0 (one-hot rows) and all-zero rows give finite features
    probs = torch.zeros(3, 4, 5)
    probs[:, :2, 1] = 1.0
    assert torch.isfinite(confidence_features(probs)).all()
    # scores that are all equal, or NaN, still route every example somewhere
    assert exit_of(np.zeros((2, 5)), thresholds_for(np.zeros((2, 5)), [0.4, 0.4, 0.2])).tolist() == [0] * 5
    assert exit_of(np.full((2, 3), np.nan), [0.0, 0.0]).tolist() == [2, 2, 2]


def test_no_nan_when_every_exit_is_wrong_and_every_probability_is_one_hot():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    probs = np.zeros((3, 200, 4), np.float32)
    probs[:, np.arange(200), (y + 1) % 4] = 1.0  # sure, and always wrong
    pred = Predictions(probs, probs, y, y, np.array([1.0, 2.0, 4.0]))
    rule, report = fit_on_predictions(pred, 0.5, seed=0, epochs=5)
    assert not any(np.isnan(t) for t in rule.thresholds)
    assert np.isfinite([report["val"]["cost_fraction"], report["losses"]["g"], report["losses"]["ce"]]).all()
    assert report["val"]["cost_fraction"] <= 0.5


# --- the predictions folder ---------------------------------------------------------------------


def test_predictions_round_trip_through_a_folder_in_the_msdnet_layout(tmp_path):
    pred, _, _ = synthetic(n=50)
    save(pred, tmp_path / "p")
    back = load(tmp_path / "p")
    for name in ("val_probs", "test_probs", "val_targets", "test_targets", "costs"):
        assert np.array_equal(getattr(back, name), getattr(pred, name)), name
    assert back.exit_names == ["early", "late"] and back.full_cost == 3.0 and back.notes == []
    # the public code's own reading: a 4-tuple of tensors, and a list of cumulative costs
    val_pred, val_target, test_pred, test_target = torch.load(tmp_path / "p" / "logits_single.pth",
                                                              weights_only=True)
    assert val_pred.shape == (2, 50, 10) and val_pred.dtype == torch.float32 and test_target.dtype == torch.int64
    assert torch.load(tmp_path / "p" / "flops.pth", weights_only=True) == [1.0, 3.0]
    # their folders have no costs.json: flops.pth, else seconds.csv, gives the costs
    (tmp_path / "p" / "costs.json").unlink()
    assert load(tmp_path / "p").costs.tolist() == [1.0, 3.0]
    (tmp_path / "p" / "flops.pth").unlink()
    (tmp_path / "p" / "seconds.csv").write_text("2.31\n4.15\n")
    assert load(tmp_path / "p").costs.tolist() == [2.31, 4.15]


def test_logits_are_softmaxed_with_a_note(tmp_path):
    pred, _, _ = synthetic(n=20)
    folder = save(pred, tmp_path / "p")
    logits = torch.randn(2, 20, 10) * 3
    torch.save({"val_probs": logits, "val_targets": torch.from_numpy(pred.val_targets).float(),
                "test_probs": logits, "test_targets": torch.from_numpy(pred.test_targets).float()},
               folder / "logits_single.pth")
    back = load(folder)
    assert np.allclose(back.val_probs, logits.softmax(-1).numpy(), atol=1e-6)
    assert back.val_targets.dtype == np.int64 and len(back.notes) == 2 and "logits" in back.notes[0]


def _write(folder, data=None, costs=None):
    folder.mkdir(exist_ok=True)
    if data is not None:
        torch.save(data, folder / "logits_single.pth")
    if costs is not None:
        (folder / "costs.json").write_text(json.dumps({"costs": costs}))
    return folder


P = torch.full((2, 5, 3), 1 / 3)
T = torch.zeros(5, dtype=torch.long)


@pytest.mark.parametrize("case, fragment", [
    ("missing folder", "no predictions folder"),
    ("missing file", "has no logits_single.pth"),
    ("not torch", "damaged"),
    ("three tensors", "does not hold four tensors"),
    ("2-D probs", "not [exits, examples, classes]"),
    ("targets too short", "targets have shape"),
    ("label out of range", "outside [0, 3)"),
    ("NaN", "NaN"),
    ("no costs", "has no exit costs"),
    ("K mismatch", "3 exit costs but the predictions have 2 exits"),
    ("decreasing costs", "non-decreasing"),
    ("test exits differ", "test has 3"),
])
def test_malformed_predictions_are_E924_with_a_hint(tmp_path, case, fragment):
    folder = tmp_path / "p"
    if case == "missing folder":
        pass
    elif case == "missing file":
        _write(folder, costs=[1, 2])
    elif case == "not torch":
        _write(folder, costs=[1, 2])
        (folder / "logits_single.pth").write_bytes(b"not a tensor file")
    elif case == "three tensors":
        _write(folder, (P, T, P), [1, 2])
    elif case == "2-D probs":
        _write(folder, (P[0], T, P[0], T), [1, 2])
    elif case == "targets too short":
        _write(folder, (P, T[:3], P, T), [1, 2])
    elif case == "label out of range":
        _write(folder, (P, T + 3, P, T), [1, 2])
    elif case == "NaN":
        _write(folder, (P * float("nan"), T, P, T), [1, 2])
    elif case == "no costs":
        _write(folder, (P, T, P, T))
    elif case == "K mismatch":
        _write(folder, (P, T, P, T), [1, 2, 3])
    elif case == "decreasing costs":
        _write(folder, (P, T, P, T), [2, 1])
    elif case == "test exits differ":
        _write(folder, (P, T, torch.full((3, 5, 3), 1 / 3), T), [1, 2])
    with pytest.raises(D2GraphError) as e:
        load(folder)
    assert _codes(e) == ["E924"]
    assert fragment in e.value.diagnostics[0].message and e.value.diagnostics[0].help


# --- the trainer end to end -----------------------------------------------------------------------


def test_eenet_stage_on_early_exit_meets_its_budget_and_survives_a_checkpoint():
    graph = d2graph.load(EXAMPLES / "early_exit.d2")
    config = resolve(graph, ["data.n=400", "batch=32", "stage.backbone.epochs=1"])
    config.stages[1] = {"name": "policy", "trainer": "eenet", "params": {"budget": 0.5, "epochs": EPOCHS}}
    trained = train(graph, config, None, quiet=True, echo=None)
    policy = trained.policy
    assert isinstance(policy, EENetPolicy)
    val = trained.reports["val"]
    assert val.cost_fraction <= 0.5  # a cap: the search may stop short of it (a cheaper routing answers more)
    # the executor, routed by the policy, does what the fit computed on the cached predictions
    pred = from_executor(trained.executor, trained.data)
    index = policy.rule.exit_index(pred.val_probs)
    assert pred.outcome("val", index) == pytest.approx((val.accuracy, val.cost_fraction), abs=1e-12)
    # plain data: through torch.save / torch.load(weights_only=True) and back, the same routing
    buffer = io.BytesIO()
    torch.save(save_policy(policy), buffer)
    buffer.seek(0)
    back = load_policy(graph, torch.load(buffer, weights_only=True))
    x = trained.data.test.tensors[0][:64]
    with torch.inference_mode():
        first, second = policy.decide(trained.executor, x), back.decide(trained.executor, x)
    assert all(torch.equal(first[q], second[q]) for q in ("Q1", "Q2"))
    assert isinstance(back.rule, EENetRule) and back.exits == [Exit("Q1", "H1", 0, 1), Exit("Q2", "H2", 0, 1),
                                                               Exit(None, "B3")]


def test_eenet_parameters_are_checked():
    assert EENetTrainer().params["budget"] == 0.5
    for bad in ({"lr": 0}, {"budget_weight": -1}, {"budget": 0}):
        with pytest.raises(D2GraphError) as e:
            EENetTrainer(**bad)
        assert _codes(e) == ["E921"]
    with pytest.raises(D2GraphError):
        EENetTrainer(budgt=0.5)  # the schema's "did you mean"


def test_the_threshold_search_spends_the_budget_on_a_middle_exit():
    # Exit 1 is always wrong, exits 2 and 3 always right; the budget pays for exit 2 for
    # everyone. A start that splits the examples between the cheapest and the dearest exit
    # (all a share tilt or one shared threshold can do) answers 35% right; the search moves
    # everyone past exit 1, the budget left over taking some to exit 3 (ties spend it).
    rng = np.random.default_rng(0)
    n = 200
    scores = rng.random((2, n))
    correct = np.zeros((n, 3), bool)
    correct[:, 1:] = True
    costs = [0.1, 0.4, 1.0]
    start = [float(np.quantile(scores[0], 0.35)), math.inf]  # 65% leave at exit 1, 35% run to 3
    assert np.mean(np.asarray(costs)[exit_of(scores, start)]) <= 0.45
    found = search_thresholds(scores, correct, costs, 0.45, [start])
    index = exit_of(scores, found)
    assert (index >= 1).all() and (index == 1).mean() > 0.85
    assert 0.4 <= np.mean(np.asarray(costs)[index]) <= 0.45


def test_the_threshold_search_leaves_budget_unspent_where_the_dearest_exit_is_worse():
    # Exit 1 is always wrong, exit 2 always right, exit 3 (the deepest, overfitted) right on
    # 80%. The start spends the budget, sending 85% to exit 3; the budget is a cap, so the
    # search stops everyone at exit 2, all right at 0.4 of the cost.
    rng = np.random.default_rng(0)
    n = 200
    scores = rng.random((2, n))
    correct = np.zeros((n, 3), bool)
    correct[:, 1] = True
    correct[:, 2] = rng.random(n) < 0.8
    costs = [0.1, 0.4, 1.0]
    start = [math.inf, float(np.quantile(scores[1], 0.85))]
    assert np.mean(np.asarray(costs)[exit_of(scores, start)]) <= 0.95
    found = search_thresholds(scores, correct, costs, 0.95, [start])
    index = exit_of(scores, found)
    assert correct[np.arange(n), index].all()
    assert np.mean(np.asarray(costs)[index]) == pytest.approx(0.4)


def test_the_threshold_search_keeps_a_start_it_cannot_beat_and_refuses_none():
    scores = np.array([[0.9, 0.8, 0.2, 0.1]])
    correct = np.array([[1, 1], [1, 1], [0, 1], [0, 1]], bool)
    best = [0.5]  # the two sure ones leave early: all right at cost (2·0.2 + 2·1) / 4 = 0.6
    assert search_thresholds(scores, correct, [0.2, 1.0], 0.6, [best]) == best
    # no start within the budget: the first is returned as it is
    assert search_thresholds(scores, correct, [0.2, 1.0], 0.1, [[0.85]]) == [0.85]


def test_patience_on_predictions_leaves_where_the_last_exits_agree():
    # Four exits (costs 1, 2, 3, 4 of 4) on six examples, one-hot predictions per exit:
    # examples 0–1 agree from exit 1 on, 2–3 from exit 2 on, 4–5 never before the last.
    classes = [[0, 1, 2, 3, 4, 5], [0, 1, 3, 4, 5, 0], [0, 1, 3, 4, 2, 1], [0, 1, 3, 4, 3, 2]]
    probs = np.eye(6, dtype=np.float32)[np.array(classes)]  # [K=4, N=6, C=6]
    y = np.array([0, 1, 3, 4, 3, 2])
    pred = Predictions(probs, probs, y, y, np.array([1.0, 2.0, 3.0, 4.0]))
    # patience 2: 0–1 leave at exit 2 (index 1), 2–3 at exit 3, 4–5 at the last.
    assert PatienceRule(2).exit_index(probs).tolist() == [1, 1, 2, 2, 3, 3]
    assert PatienceRule(1).exit_index(probs).tolist() == [0] * 6
    assert PatienceRule(4).exit_index(probs).tolist() == [3] * 6  # never before the last
    # The largest patience within the budget: patience 2 costs (2+2+3+3+4+4)/6/4 = 0.75 of the full cost.
    rule, report = patience_on_predictions(pred, 0.75)
    assert rule.patience == 2 and report["val"]["cost_fraction"] == pytest.approx(0.75)
    assert report["test"]["accuracy"] == 1.0
    rule, _ = patience_on_predictions(pred, 0.5)
    assert rule.patience == 1  # patience 1 (everyone at exit 1) is the only one within 0.5
    # A budget out of range is refused in the name of the rule that was asked for.
    for fit, name in [(patience_on_predictions, "patience"), (threshold_on_predictions, "threshold"),
                      (fit_on_predictions, "eenet")]:
        with pytest.raises(D2GraphError, match=f"trainer `{name}`"):
            fit(pred, 0.0)

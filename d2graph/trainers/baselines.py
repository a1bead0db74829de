"""Calibrated baseline policies: confidence thresholds, random routing, the label oracle, static paths.

In:  a compiled `Executor` whose function nodes are already trained (the backbone stage), the
     data (`d2graph.data.Splits`; only `data.val` is used, for calibration) and a stage context
     (`batch`, `device`, `seed`, `log(**metrics)`, `generator(*key)`).
Out: five policy trainers, registered by name (`role = "policy"`): each `fit` calibrates one
     number on the validation split, logs it once with the validation cost and accuracy it
     gives, and returns a `Policy` that routes every example with mode="force":
       threshold(measure, budget, drop)  BranchyNet / SDN / MSDNet: stop at a control node when
                                         its current head is confident enough (one τ for all)
       patience(budget)                  PABEE: stop when the last k exits passed agree (one k)
       uniform(budget)                   the ANN paper's random baseline: one parameter p moves
                                         every control node's random choice from cheapest to dearest
       oracle(budget)                    reads the labels: the cheapest static path that answers
                                         right (an upper bound, not a deployable policy)
       static(budget)                    the most accurate single static path that fits the budget
     and `static_path_results(executor, dataset, batch)`, every static path's actions, nodes,
     cost and accuracy on a data set (the sweep plots them next to the policies).
Guarantees:
  - Budgets are caps: the calibrated policy's mean cost on the validation split, as a fraction
    of the full graph's cost, is at most `budget` (the closest below it that the calibrated
    parameter can reach). A budget below the cheapest path's cost gives the cheapest routing.
    `budget` must be above 0 (E921 otherwise).
  - Calibration never changes the executor's weights; it runs in eval mode and puts back the
    mode the executor was in. Everything is deterministic: the same weights, data and
    stage seed give the same calibrated numbers.
  - `decide` returns an int64 CPU tensor [B] for every control node of the graph (a node that
    an example does not reach gets an action too: mode="force" needs all), and `state()`
    is plain data (numbers, strings, lists, dicts), so checkpoints load with
    `weights_only=True`.
  - Accuracy is the argmax of the graph's output against the label, routed with mode="force".
    Costs are priced with `route` (no layer is called); the accuracy of a routing is read from
    a table of what every static path predicts for every validation example (examples are
    independent in eval mode, so an example routed along a path predicts what that path does).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Mapping

import networkx as nx
import numpy as np
import torch
from torch import Tensor

from ..executor import Executor, Result
from ..ir import Graph
from ..paths import MAX_COMBINATIONS, action_order, current_head, heads, nodes_run, path_costs, route_dependent
from ..policies import POLICIES, Policy, StaticPolicy, register_policy
from ..schema import Param, Schema
from .base import Trainer, register, trainer_error
from .toolkit import (
    PathTable, batches, budget_param, calibrate, check_budget, drop_param, evaluating, every_control, path_table,
)

__all__ = ["HEAD_DECAY", "HeadTermPolicy", "MEASURES", "OraclePolicy", "OracleTrainer", "PatiencePolicy",
           "PatienceTrainer", "StaticTrainer", "ThresholdPolicy", "ThresholdTrainer", "UniformPolicy",
           "UniformTrainer", "WIDE", "agreeing_streaks", "confidence", "decay_param", "decide_on_route",
           "exit_chains", "head_confidences", "head_decay", "static_path_results", "uniform_expected_cost",
           "weight_penalty"]

MEASURES = ("maxprob", "entropy", "margin")

# A threshold no confidence reaches (they all lie in [0, 1]): every control node continues.
NEVER_STOP = 1.0 + 1e-9

# (threshold, example) rows scored at once while scanning thresholds (bounds the memory).
_ROWS_PER_SCAN = 1 << 20

# The drop search tries at most this many thresholds (evenly spread over the sorted
# confidences); below it every distinct confidence is tried, which is exact.
_MAX_THRESHOLDS = 4096


# --- shared machinery -----------------------------------------------------------------------


def _current_heads(graph: Graph, classes: int | None) -> dict[str, str | None]:
    return {q.name: current_head(graph, q.name, classes) for q in graph.control_nodes}


def _output_classes(graph: Graph) -> int | None:
    """The number of class scores, read from the graph's single output (check_graph has no data)."""
    outputs = graph.outputs
    return outputs[0].out_shape[0] if len(outputs) == 1 and len(outputs[0].out_shape) == 1 else None


def _predictions(result: Result) -> Tensor:
    return result.output.argmax(1)


def confidence(scores: Tensor, measure: str) -> Tensor:
    """How sure a head is, in [0, 1], from its class scores [B, C] (float64 [B]).

    maxprob  the largest softmax probability
    entropy  1 − entropy / log C (1: all mass on one class, 0: uniform)
    margin   the largest probability minus the second largest

    Example:
        >>> confidence(torch.tensor([[0.0, 0.0], [10.0, 0.0]]), "maxprob").tolist()
        [0.5, 0.9999546021312976]
    """
    # float64: trained heads put many examples within 1e-7 of probability 1, where float32
    # would make ties that no threshold can split.
    p = scores.double().softmax(1)
    if measure == "maxprob":
        return p.max(1).values
    if measure == "entropy":
        return 1.0 - torch.special.entr(p).sum(1) / math.log(p.shape[1])
    if measure == "margin":
        top = p.topk(2, dim=1).values
        return top[:, 0] - top[:, 1]
    raise ValueError(f"unknown confidence measure {measure!r}; the measures are {', '.join(MEASURES)}")


def head_confidences(executor: Executor, x: Tensor, heads, measures=MEASURES,
                     actions: Mapping[str, Tensor] | None = None) -> tuple[Result, dict[str, Tensor]]:
    """One pass of the whole graph (mode="all": every node on every example; or the forced
    `actions`, when given) and each named head's `confidence` by each of `measures`, float64
    CPU [B, len(measures)] by head name (zero rows where a head did not run)."""
    wanted = sorted(set(heads))
    result = (executor(x, mode="all", keep=wanted) if actions is None
              else executor(x, mode="force", actions=actions, keep=wanted))
    found = {}
    for head in wanted:
        index, scores = result.values[head]
        conf = torch.zeros(result.batch_size, len(measures), dtype=torch.float64)
        conf[index.cpu()] = torch.stack([confidence(scores, m) for m in measures], dim=1).cpu()
        found[head] = conf
    return result, found


def decide_on_route(executor: Executor, x: Tensor, heads, choose) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The actions a rule picks from what each example meets on its own route, and the heads'
    confidences (`head_confidences`, from the pass of every node: they never depend on it).

    `choose(result, found)` maps a pass (`Result`: each control node's scores) and the heads'
    confidences (`head_confidences`) to every control node's actions, int64 CPU [B]. A pass of
    every node gives each node the inputs of the example's route unless the node's input
    depends on the route (`paths.route_dependent`: the chain's Q2 reads the merge of the
    branch Q1 chose; current heads never do). Then the chosen actions are forced and chosen
    again from what that pass computed, keeping the old action where a node did not run,
    until they stop changing: each round makes one more level of control nodes decide on
    its true input, so there are at most as many rounds as control nodes."""
    graph = executor.graph
    result, found = head_confidences(executor, x, heads)
    actions = choose(result, found)
    dependent = route_dependent(graph)
    if not any(q.name in dependent for q in graph.control_nodes):
        return actions, found
    for _ in graph.control_nodes:
        result, routed = head_confidences(executor, x, heads, actions=actions)
        ran, again = result.actions, choose(result, routed)
        settled = {q: torch.where(ran[q].cpu() >= 0, again[q], a) if q in again and q in ran else a
                   for q, a in actions.items()}
        if all(torch.equal(settled[q], a) for q, a in actions.items()):
            break
        actions = settled
    return actions, found


# `decay=auto` of the trainers that learn a head term (`qlearning`, `costsensitive`): the L2
# weight on the own weights of a control node that has a term, does not read its head itself
# and reads at least WIDE numbers. It leaves many weak features only what the head's
# confidence does not already say: without it the D²NN cascade's linear nodes (98 to 512
# features of a stage) fitted the examples they learnt from and ranked unseen ones no better
# than chance (docs/trainers.md). A node reading a few numbers is left alone: on
# costsensitive's two-exit task one of its two inputs tells the answer, and the penalty hid it.
HEAD_DECAY = 10.0
WIDE = 32


def decay_param() -> Param:
    """The `decay` parameter of a trainer that learns a head term: one meaning for both."""
    return Param("decay", "number", "auto", also=("auto",),
                 doc="L2 penalty on the control nodes' own weights (not biases, not the head term) in their training "
                     f"objective; `auto`: {HEAD_DECAY:g} on nodes with a head term that read at least {WIDE} features "
                     "(not their head), 0 on the others")


def weight_penalty(module: torch.nn.Module, decay: float) -> Tensor | float:
    """decay · Σ ‖W‖² over a control node's weight matrices (biases are not penalised); 0 when decay is 0."""
    if decay <= 0:
        return 0.0
    return decay * sum((w ** 2).sum() for w in module.parameters() if w.dim() > 1)


def head_decay(graph: Graph, heads: Mapping[str, str], decay: float | str) -> dict[str, float]:
    """Each control node's L2 weight: `decay` as given, or for `auto` HEAD_DECAY on the nodes
    with a head term (`heads`) that do not read that head themselves and read at least WIDE
    numbers, 0 on the others."""
    if decay != "auto":
        return {q.name: float(decay) for q in graph.control_nodes}
    return {q.name: HEAD_DECAY if (q.name in heads and heads[q.name] not in {e.source for e in q.inputs}
                                   and math.prod(q.in_shape) >= WIDE) else 0.0
            for q in graph.control_nodes}


@register_policy
class HeadTermPolicy(Policy):
    """Each control node's own scores plus a linear term on its current head's confidence:
    s_q(input) + W_q · features(head_q) + b_q, argmax. `costsensitive` and `qlearning` learn
    both; the term lets a node express a confidence threshold when it reads only features.

    The heads' and control nodes' scores come from one mode="all" pass (every node on every
    example), so deciding costs a full forward pass (more where a control node's input depends
    on the route: `decide_on_route`); the cost reported for the routing is that of the forced
    pass that follows, as for `threshold` and `eenet`. Runs saved before the class had this
    name load through its old kind, `costsensitive`."""

    kind = "head_term"

    def __init__(self, heads: Mapping[str, str], weight: Mapping[str, list], bias: Mapping[str, list]):
        self.heads = {str(q): str(h) for q, h in heads.items()}
        self.weight = {q: torch.tensor(w, dtype=torch.float64) for q, w in weight.items()}
        self.bias = {q: torch.tensor(b, dtype=torch.float64) for q, b in bias.items()}

    def decide(self, executor, x, y=None, generator=None):
        with torch.no_grad():
            return decide_on_route(executor, x, self.heads.values(), self.choose)[0]

    def choose(self, result: Result, found: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Argmax of each control node's scores in `result` plus its head term on `found`."""
        actions = {}
        for q, scores in result.scores.items():
            s = scores.double().cpu()
            if q in self.heads:
                s = s + found[self.heads[q]] @ self.weight[q].T + self.bias[q]
            actions[q] = s.argmax(1)
        return actions

    def state(self) -> dict[str, Any]:
        return {"heads": dict(self.heads), "weight": {q: w.tolist() for q, w in self.weight.items()},
                "bias": {q: b.tolist() for q, b in self.bias.items()}}

    def describe(self) -> str:
        return ("the control nodes' scores plus a learned term on the confidence of "
                + ", ".join(f"{h} (for {q})" for q, h in self.heads.items()))


POLICIES["costsensitive"] = HeadTermPolicy  # its kind before it was shared with `qlearning`


def _require_heads(trainer: str, rule: str, graph: Graph, classes: int | None) -> None:
    """E921 unless every control node has a current head (for `classes` class scores)."""
    current = _current_heads(graph, classes)
    missing = [q for q, h in current.items() if h is None]
    if missing:
        q = missing[0]
        after, dependent = nx.descendants(graph.to_networkx(), q), route_dependent(graph)
        routed = [h for h in heads(graph) if h in dependent and h not in after]
        why = (f"; {', '.join(f'`{h}`' for h in routed)} cannot be read, as {'its' if len(routed) == 1 else 'their'} "
               "value depends on the route (computed from a merge of branches)" if routed else "")
        raise trainer_error(
            trainer, f"control node `{q}` has no classifier to read: no head's class scores are "
                     f"known when `{q}` decides{why}",
            help=f"{rule} needs, for each control node, a head (a node that feeds an output) "
                 f"that runs before it on the same examples and reads the same inputs on every route: "
                 f"feed one into `{q}` (e.g. `H1 -> {q}`) or run a classifier before it; otherwise use "
                 f"`uniform`, `static` or a learned policy (`costsensitive` learns on every route)")
    if not graph.control_nodes:
        raise trainer_error(trainer, f"the graph has no control node for {rule} to decide",
                            help="use `static` (or no policy stage) for a graph without control nodes")


# --- threshold ------------------------------------------------------------------------------


@register_policy
class ThresholdPolicy(Policy):
    """Stop at a control node (its cheapest action) when its current head's confidence is at
    least `tau`, else continue (its next cheapest action).

    The heads' scores come from one mode="all" pass (every node on every example), so
    deciding costs a full forward pass; the cost reported for the routing is that of the
    forced pass that follows, as for a cascade that computes only what it needs."""

    kind = "threshold"

    def __init__(self, measure: str, tau: float, heads: Mapping[str, str], stop: Mapping[str, int],
                 go: Mapping[str, int]):
        if measure not in MEASURES:
            raise ValueError(f"unknown confidence measure {measure!r}; the measures are {', '.join(MEASURES)}")
        self.measure, self.tau = str(measure), float(tau)  # str: a checked `measure` is a Symbol
        self.heads = dict(heads)
        self.stop = {q: int(a) for q, a in stop.items()}
        self.go = {q: int(a) for q, a in go.items()}

    def confidences(self, executor: Executor, x: Tensor) -> dict[str, Tensor]:
        """Each control node's confidence, float64 CPU [B]."""
        with torch.no_grad():
            _, by_head = head_confidences(executor, x, self.heads.values(), (self.measure,))
        return {q: by_head[h][:, 0] for q, h in self.heads.items()}

    def actions_at(self, tau: float | Tensor, conf: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The actions at threshold `tau` (a number, or one per example) given the confidences."""
        return {q: torch.where(c >= tau, self.stop[q], self.go[q]) for q, c in conf.items()}

    def decide(self, executor, x, y=None, generator=None):
        return self.actions_at(self.tau, self.confidences(executor, x))

    def state(self) -> dict[str, Any]:
        return {"measure": str(self.measure), "tau": self.tau, "heads": dict(self.heads),
                "stop": dict(self.stop), "go": dict(self.go)}

    def describe(self) -> str:
        return f"threshold: stop where the head's {self.measure} ≥ {self.tau:.6g}"


@register
class ThresholdTrainer(Trainer):
    """One confidence threshold τ for every control node, calibrated on validation."""

    name, role = "threshold", "policy"
    schema = Schema("threshold", (
        Param("measure", "choice", "maxprob", choices=MEASURES,
              doc="confidence of the control node's current head: max probability, 1 − normalised "
                  "entropy, or the margin between the two likeliest classes"),
        budget_param(0.5, alternative="drop"),
        drop_param(),
    ), doc="stop at a control node when its current head is confident (BranchyNet, SDN, MSDNet)")

    def __init__(self, **params: Any):
        super().__init__(**params)
        check_budget(self, "drop")

    def check_graph(self, graph: Graph) -> None:
        self._check_heads(graph, _output_classes(graph))

    def _check_heads(self, graph: Graph, classes: int | None) -> None:
        _require_heads(self.name, "a threshold rule", graph, classes)

    def fit(self, executor: Executor, data, stage) -> ThresholdPolicy:
        graph = executor.graph
        self._check_heads(graph, data.classes)
        heads = _current_heads(graph, data.classes)
        order = action_order(graph)
        measure = str(self.params["measure"])
        policy = ThresholdPolicy(measure, NEVER_STOP, heads,
                                 stop={q: o[0] for q, o in order.items()},
                                 go={q: o[min(1, len(o) - 1)] for q, o in order.items()})
        executor.to(stage.device)
        with evaluating(executor):
            parts = [policy.confidences(executor, x.to(stage.device)) for x, _ in batches(data.val, stage.batch)]
            conf = {q: torch.cat([p[q] for p in parts]) for q in heads}
            n = len(data.val)
            table = path_table(executor, data.val, stage)
            examples = np.arange(n)

            def outcome(tau: float) -> tuple[float, float]:
                cost, right = table.outcome(policy.actions_at(tau, conf), examples)
                return float(cost.mean()), float(right.mean())

            full_accuracy = outcome(NEVER_STOP)[1]
            if self.params["drop"] >= 0:
                tau = self._cheapest_within(table, policy, conf, n, full_accuracy - self.params["drop"])
            else:
                # Confidences lie in [0, 1]: τ = 0 stops everyone at the first control node,
                # NEVER_STOP runs everyone to the end; a higher τ never makes an example cheaper.
                tau, _ = calibrate(lambda t: table.mean_cost(policy.actions_at(t, conf)),
                                   self.params["budget"], 0.0, NEVER_STOP)
            cost, accuracy = outcome(tau)
        policy.tau = float(tau)
        stage.log(tau=policy.tau, val_cost_fraction=cost, val_accuracy=accuracy,
                  val_full_accuracy=full_accuracy)
        return policy

    @staticmethod
    def _cheapest_within(table: PathTable, policy: ThresholdPolicy, conf: Mapping[str, Tensor], n: int,
                         target: float) -> float:
        """The τ of least validation cost whose validation accuracy is at least `target`.

        Accuracy does not move monotonically with τ, so this is a scan, not a bisection: every
        distinct confidence (each one a place where some example changes its route), priced
        and scored many at a time. The τ returned lies halfway between the chosen confidence
        and the next lower one: it routes the validation split the same, and a confidence
        recomputed in another batch (different rounding) does not fall on the other side."""
        every = torch.unique(torch.cat(list(conf.values())))  # sorted
        values = every
        if len(values) > _MAX_THRESHOLDS:
            values = values[torch.linspace(0, len(values) - 1, _MAX_THRESHOLDS).round().long()]
        candidates = values.tolist() + [NEVER_STOP]
        per_call = max(1, _ROWS_PER_SCAN // n)
        best: tuple[float, float, float] | None = None  # (cost, -accuracy, τ)
        for start in range(0, len(candidates), per_call):
            taus = torch.tensor(candidates[start:start + per_call], dtype=torch.float64)
            actions = policy.actions_at(taus.repeat_interleave(n), {q: c.repeat(len(taus)) for q, c in conf.items()})
            cost, right = table.outcome(actions, np.tile(np.arange(n), len(taus)))
            cost = cost.reshape(len(taus), n).mean(1)
            accuracy = right.reshape(len(taus), n).mean(1)
            for t, c, a in zip(taus.tolist(), cost.tolist(), accuracy.tolist()):
                if a >= target - 1e-12 and (best is None or (c, -a, t) < best):
                    best = (c, -a, t)
        assert best is not None  # NEVER_STOP scores the full accuracy itself
        tau = best[2]
        below = every[every < tau]
        return (float(below[-1]) + tau) / 2 if len(below) else 0.0


# --- patience (PABEE) -----------------------------------------------------------------------


def exit_chains(graph: Graph, classes: int | None) -> dict[str, list[str]]:
    """For each control node, the heads an example has passed when it decides, earliest
    first: the current heads of the control nodes above it (its ancestors), then its own.
    `early_exit.d2`: {"Q1": ["H1"], "Q2": ["H1", "H2"]}. A control node without a current
    head is left out (`PatienceTrainer.check_graph` refuses such a graph).

    Example:
        >>> exit_chains(d2graph.load("examples/bert_early_exit.d2"), 4)["D3"]   # doctest: +SKIP
        ['E1', 'E2', 'E3']
    """
    heads = _current_heads(graph, classes)
    dag = graph.to_networkx()
    position = {n.name: i for i, n in enumerate(graph.nodes)}
    chains = {}
    for q, head in heads.items():
        if head is None:
            continue
        above = sorted((p for p in nx.ancestors(dag, q) if p in heads and heads[p] is not None), key=position.get)
        chain = [heads[p] for p in above]
        chains[q] = [h for i, h in enumerate(chain) if h not in chain[:i] and h != head] + [head]
    return chains


def agreeing_streaks(predictions: Mapping[str, Tensor], chains: Mapping[str, list[str]]) -> dict[str, Tensor]:
    """For each control node, how many consecutive heads of its chain, ending with its
    current head, predict the same class as that head (int64 [B], at least 1).

    Example:
        >>> p = {"E1": torch.tensor([0, 1]), "E2": torch.tensor([0, 2]), "E3": torch.tensor([0, 2])}
        >>> agreeing_streaks(p, {"D3": ["E1", "E2", "E3"]})["D3"].tolist()
        [3, 2]
    """
    out = {}
    for q, chain in chains.items():
        last = predictions[chain[-1]]
        streak = torch.ones_like(last)
        going = torch.ones_like(last, dtype=torch.bool)
        for head in reversed(chain[:-1]):
            going &= predictions[head] == last
            streak += going.long()
        out[q] = streak
    return out


@register_policy
class PatiencePolicy(Policy):
    """PABEE's patience rule: stop at a control node (its cheapest action) when the last
    `patience` heads an example has passed, its current head included, all predict the
    same class; else continue. `patience` = 1 stops everyone at the first control node;
    a patience longer than every chain never stops (PABEE's patience t is `patience` − 1:
    t agreements after the first exit).

    As with `threshold`, the heads' predictions come from one mode="all" pass; the cost
    reported for the routing is that of the forced pass that follows."""

    kind = "patience"

    def __init__(self, patience: int, chains: Mapping[str, list[str]], stop: Mapping[str, int],
                 go: Mapping[str, int]):
        self.patience = int(patience)
        self.chains = {q: list(c) for q, c in chains.items()}
        self.stop = {q: int(a) for q, a in stop.items()}
        self.go = {q: int(a) for q, a in go.items()}

    def streaks(self, executor: Executor, x: Tensor) -> dict[str, Tensor]:
        """Each control node's agreeing streak, int64 CPU [B]."""
        wanted = sorted({h for chain in self.chains.values() for h in chain})
        with torch.no_grad():
            result = executor(x, mode="all", keep=wanted)
        predictions = {h: result.values[h][1].argmax(1).cpu() for h in wanted}  # every head ran on every row
        return agreeing_streaks(predictions, self.chains)

    def actions_at(self, patience: int, streaks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {q: torch.where(s >= patience, self.stop[q], self.go[q]) for q, s in streaks.items()}

    def decide(self, executor, x, y=None, generator=None):
        return self.actions_at(self.patience, self.streaks(executor, x))

    def state(self) -> dict[str, Any]:
        return {"patience": self.patience, "chains": {q: list(c) for q, c in self.chains.items()},
                "stop": dict(self.stop), "go": dict(self.go)}

    def describe(self) -> str:
        return f"patience: stop where the last {self.patience} exits agree"


@register
class PatienceTrainer(Trainer):
    """PABEE (Zhou et al., NeurIPS 2020): stop when k consecutive exits agree; k calibrated on validation."""

    name, role = "patience", "policy"
    schema = Schema("patience", (budget_param(0.5),),
                    doc="stop at a control node when the last k exits agree (PABEE); k is the largest whose "
                        "validation cost fits the budget")

    def __init__(self, **params: Any):
        super().__init__(**params)
        check_budget(self)

    def check_graph(self, graph: Graph) -> None:
        _require_heads(self.name, "a patience rule", graph, _output_classes(graph))

    def fit(self, executor: Executor, data, stage) -> PatiencePolicy:
        graph = executor.graph
        _require_heads(self.name, "a patience rule", graph, data.classes)
        chains = exit_chains(graph, data.classes)
        order = action_order(graph)
        policy = PatiencePolicy(1, chains, stop={q: o[0] for q, o in order.items()},
                                go={q: o[min(1, len(o) - 1)] for q, o in order.items()})
        executor.to(stage.device)
        with evaluating(executor):
            parts = [policy.streaks(executor, x.to(stage.device)) for x, _ in batches(data.val, stage.batch)]
            streaks = {q: torch.cat([p[q] for p in parts]) for q in chains}
            table = path_table(executor, data.val, stage)
            examples = np.arange(len(data.val))
            # A longer patience never makes an example cheaper: the outcomes of every k, from
            # stopping everyone at the first exit (k = 1) to never stopping (k = longest + 1).
            outcomes = {}
            for k in range(1, max(len(c) for c in chains.values()) + 2):
                cost, right = table.outcome(policy.actions_at(k, streaks), examples)
                outcomes[k] = (float(cost.mean()), float(right.mean()))
        budget = self.params["budget"]
        within = [k for k, (cost, _) in outcomes.items() if cost <= budget + 1e-12]
        policy.patience = max(within) if within else 1
        cost, accuracy = outcomes[policy.patience]
        stage.log(patience=policy.patience, val_cost_fraction=cost, val_accuracy=accuracy,
                  val_full_accuracy=outcomes[max(outcomes)][1])
        return policy


# --- uniform --------------------------------------------------------------------------------


def _policy_seed(stage, name: str) -> int:
    """A seed for a random policy, from the stage's deterministic generators."""
    g = stage.generator(name, "seed")
    return int(torch.randint(0, 2**31 - 1, (1,), generator=g, device=g.device))


UNIFORM_REPLICAS = 32  # random draws per validation example when calibrating `uniform`


def _uniform_choice(p: float, order: list[int]) -> tuple[int, int, float]:
    """(order[⌊t⌋], order[⌈t⌉], frac(t)) at position t = p·(k−1) of an action order."""
    k = len(order)
    t = min(max(p, 0.0), 1.0) * (k - 1)
    low = min(int(math.floor(t)), k - 1)
    return order[low], order[min(low + 1, k - 1)], t - low


def _uniform_actions(p: float, orders: Mapping[str, list[int]], u: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Position t = p·(k−1) in a control node's action order: order[⌊t⌋] with probability
    1 − frac(t), order[⌈t⌉] with frac(t). The same u for every p makes each example's cost
    grow with p (common random numbers), so p can be bisected."""
    out = {}
    for q, order in orders.items():
        low, high, frac = _uniform_choice(p, order)
        out[q] = torch.where(u[q] < frac, high, low)
    return out


def uniform_expected_cost(graph: Graph, orders: Mapping[str, list[int]]):
    """The exact mean cost (a fraction of the full cost) of uniform routing as a function of
    p, or None when the graph has more than MAX_COMBINATIONS action combinations. Each
    control node takes order[⌊t⌋] or order[⌈t⌉] independently (`_uniform_actions`), and a
    combination's cost is the same for every example, so the mean over examples is the
    mean over combinations weighted by their probability: no sampling error, so the budget
    is a cap on the expected cost itself.

    Example:
        >>> g = d2graph.load("examples/early_exit.d2")                        # doctest: +SKIP
        >>> cost = uniform_expected_cost(g, action_order(g)); cost(0.0), cost(1.0)  # doctest: +SKIP
        (0.107, 1.0)
    """
    controls = graph.control_nodes
    if math.prod(len(q.actions) for q in controls) > MAX_COMBINATIONS:
        return None
    price = {n.name: n.cost for n in graph.nodes}
    full = float(graph.full_cost) or 1.0
    combos = []
    for combination in itertools.product(*(range(len(q.actions)) for q in controls)):
        actions = dict(zip((q.name for q in controls), combination))
        combos.append((actions, sum(price[name] for name in nodes_run(graph, actions)) / full))

    def cost(p: float) -> float:
        chance = {}
        for q, order in orders.items():
            low, high, frac = _uniform_choice(p, order)
            chance[q] = {low: 1.0 - frac}
            chance[q][high] = chance[q].get(high, 0.0) + frac
        return float(sum(math.prod(chance[q].get(a, 0.0) for q, a in actions.items()) * c
                         for actions, c in combos))

    return cost


def _draw(graph: Graph, n: int, generator: torch.Generator) -> dict[str, Tensor]:
    # One [controls, n] draw, in the graph's order of control nodes, on the generator's device.
    u = torch.rand((len(graph.control_nodes), n), generator=generator, device=generator.device,
                   dtype=torch.float64).cpu()
    return {q.name: u[i] for i, q in enumerate(graph.control_nodes)}


@register_policy
class UniformPolicy(Policy):
    """Every control node picks at random, cheapest action at p = 0, dearest at p = 1."""

    kind = "uniform"

    def __init__(self, p: float, orders: Mapping[str, list[int]], seed: int):
        self.p = float(p)
        self.orders = {q: [int(a) for a in o] for q, o in orders.items()}
        self.seed = int(seed)

    def decide(self, executor, x, y=None, generator=None):
        n = next(iter(x.values())).shape[0] if isinstance(x, Mapping) else x.shape[0]
        g = generator if generator is not None else torch.Generator().manual_seed(self.seed)
        return _uniform_actions(self.p, self.orders, _draw(executor.graph, n, g))

    def state(self) -> dict[str, Any]:
        return {"p": self.p, "orders": {q: list(o) for q, o in self.orders.items()}, "seed": self.seed}

    def describe(self) -> str:
        return f"uniform random routing, p = {self.p:.6g}"


@register
class UniformTrainer(Trainer):
    """Random routing whose one parameter p is calibrated to the budget on validation."""

    name, role = "uniform", "policy"
    schema = Schema("uniform", (budget_param(0.5),),
                    doc="random routing at the budget (the ANN paper's baseline)")

    def __init__(self, **params: Any):
        super().__init__(**params)
        check_budget(self)

    def fit(self, executor: Executor, data, stage) -> UniformPolicy:
        graph = executor.graph
        order = action_order(graph)
        # A random policy meets its budget in expectation: p is calibrated on REPLICAS draws
        # per validation example (common random numbers, so cost still grows with p), which
        # prices the expected cost rather than the luck of one draw.
        seed = _policy_seed(stage, "uniform")
        n = len(data.val)
        examples = np.tile(np.arange(n), UNIFORM_REPLICAS)
        u = _draw(graph, len(examples), torch.Generator().manual_seed(seed))
        executor.to(stage.device)
        with evaluating(executor):
            table = path_table(executor, data.val, stage)

            def outcome(p: float) -> tuple[np.ndarray, np.ndarray]:
                return table.outcome(_uniform_actions(p, order, u), examples)

            # The exact expected cost where the combinations can be listed; else the draws'.
            expected = uniform_expected_cost(graph, order) or (lambda p: float(outcome(p)[0].mean()))
            p, cost = calibrate(expected, self.params["budget"], 0.0, 1.0)
            _, right = outcome(p)
        stage.log(p=float(p), val_cost_fraction=float(cost), val_accuracy=float(right.mean()))
        return UniformPolicy(p, order, seed)


# --- oracle ---------------------------------------------------------------------------------

# Examples whose upgrades cost the same (one path's price) would all be upgraded or none, and
# the oracle's cost would jump from one path's price to the next: a budget between them would
# buy nothing. Each upgrade's price is raised by TIE · u (u uniform per example) so that the
# cap c* takes a share of the equal-priced upgrades; TIE is far below any difference in
# path costs worth telling apart.
_TIE = 1e-6


def _oracle_choice(correct: np.ndarray, fraction: np.ndarray, max_extra: float, u: np.ndarray) -> np.ndarray:
    """Each example's path: the cheapest correct one when it costs at most `max_extra` more
    than the cheapest path (ties split by u), else the cheapest path. correct [P, N], u [N]
    → path index [N]."""
    cheapest = int(np.argmin(fraction))  # first of equals
    by_cost = np.argsort(fraction, kind="stable")
    ordered = correct[by_cost]  # [P, N], cheapest path first
    any_right = ordered.any(0)
    first_right = by_cost[ordered.argmax(0)]  # argmax: the first True
    extra = fraction[first_right] - fraction[cheapest]
    upgrade = any_right & ((extra == 0) | (extra + _TIE * u <= max_extra))
    return np.where(upgrade, first_right, cheapest)


@register_policy
class OraclePolicy(Policy):
    """Looks at the label: each example takes the cheapest static path that classifies it
    right, when that costs at most `max_extra` (a fraction of the full cost) more than the
    cheapest path; otherwise, or when no path is right, the cheapest path. Equal-priced
    upgrades are split at random (the generator, else one seeded with `seed`)."""

    kind = "oracle"

    def __init__(self, paths: list[Mapping[str, int]], fractions: list[float], max_extra: float, seed: int):
        self.paths = [{q: int(a) for q, a in p.items()} for p in paths]
        self.fractions = [float(f) for f in fractions]
        self.max_extra = float(max_extra)
        self.seed = int(seed)

    def decide(self, executor, x, y=None, generator=None):
        if y is None:
            raise ValueError("the oracle policy reads the labels: pass y to decide() / run_policy()")
        graph = executor.graph
        n = y.shape[0]
        with torch.no_grad():
            correct = np.stack([
                (_predictions(executor(x, mode="force", actions=every_control(graph, p, n))).cpu()
                 == y.cpu()).numpy() for p in self.paths])
        g = generator if generator is not None else torch.Generator().manual_seed(self.seed)
        u = torch.rand(n, generator=g, device=g.device, dtype=torch.float64).cpu().numpy()
        choice = torch.from_numpy(_oracle_choice(correct, np.array(self.fractions), self.max_extra, u))
        table = torch.tensor([[p.get(q.name, 0) for q in graph.control_nodes] for p in self.paths],
                             dtype=torch.long)  # [P, controls]
        chosen = table[choice]
        return {q.name: chosen[:, i].contiguous() for i, q in enumerate(graph.control_nodes)}

    def state(self) -> dict[str, Any]:
        return {"paths": [dict(p) for p in self.paths], "fractions": list(self.fractions),
                "max_extra": self.max_extra, "seed": self.seed}

    def describe(self) -> str:
        return f"oracle (reads the labels), upgrades costing at most {self.max_extra:.6g} of the full cost"


@register
class OracleTrainer(Trainer):
    """The label-reading upper bound; with budget < 1 the accuracy-maximising way to spend it."""

    name, role = "oracle", "policy"
    schema = Schema("oracle", (budget_param(1.0),),
                    doc="the cheapest correct static path per example (reads the labels; an upper bound)")

    def __init__(self, **params: Any):
        super().__init__(**params)
        check_budget(self)

    def fit(self, executor: Executor, data, stage) -> OraclePolicy:
        executor.to(stage.device)
        with evaluating(executor):
            table = path_table(executor, data.val, stage)
        correct, fraction = table.correct, np.array(table.fraction)
        n = correct.shape[1]
        # As for `uniform`, the policy's seed draws the calibration's numbers too.
        seed = _policy_seed(stage, "oracle")
        u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()

        def cost_at(max_extra: float) -> float:
            return float(fraction[_oracle_choice(correct, fraction, max_extra, u)].mean())

        # Each upgrade buys one correct example; taking them cheapest first buys the most
        # correct examples for the budget. A higher cap never makes an example cheaper.
        max_extra, cost = calibrate(cost_at, self.params["budget"], 0.0, 1.0 + _TIE)
        accuracy = float(correct[_oracle_choice(correct, fraction, max_extra, u), np.arange(n)].mean())
        stage.log(max_extra=float(max_extra), val_cost_fraction=cost, val_accuracy=accuracy)
        return OraclePolicy(table.actions, table.fraction, max_extra, seed)


# --- static ---------------------------------------------------------------------------------


def static_path_results(executor: Executor, dataset, batch: int) -> list[dict[str, Any]]:
    """Every static path of the graph (dearest first) with its accuracy on `dataset`.

    Each row: actions ({control: 0-based action} for the control nodes on the path), nodes
    (those that run), cost (per example), cost_fraction (of the full graph's cost) and
    accuracy. Runs on the executor's device, in eval mode (its mode is put back).

    Example:
        >>> rows = static_path_results(executor, splits.test, 256)            # doctest: +SKIP
        >>> [(r["cost_fraction"], r["accuracy"]) for r in rows]               # doctest: +SKIP
    """
    device = next((t.device for t in [*executor.parameters(), *executor.buffers()]), torch.device("cpu"))
    paths = path_costs(executor.graph)
    with evaluating(executor):
        table = PathTable(executor, dataset, batch, device, paths)
    return [{"actions": dict(table.actions[p]), "nodes": list(table.nodes[p]), "cost": table.costs[p],
             "cost_fraction": table.fraction[p], "accuracy": float(table.correct[p].mean())}
            for p in range(len(table.actions))]


@register
class StaticTrainer(Trainer):
    """The most accurate static path on validation among those within the budget."""

    name, role = "static", "policy"
    schema = Schema("static", (budget_param(1.0),),
                    doc="the same path for every example: the most accurate one within the budget")

    def __init__(self, **params: Any):
        super().__init__(**params)
        check_budget(self)

    def fit(self, executor: Executor, data, stage) -> StaticPolicy:
        executor.to(stage.device)
        rows = static_path_results(executor, data.val, stage.batch)
        fits = [r for r in rows if r["cost_fraction"] <= self.params["budget"] + 1e-12]
        if fits:  # most accurate; among equals the cheaper
            best = max(fits, key=lambda r: (r["accuracy"], -r["cost_fraction"]))
        else:
            best = min(rows, key=lambda r: r["cost_fraction"])
        stage.log(val_cost_fraction=best["cost_fraction"], val_accuracy=best["accuracy"],
                  path=" ".join(best["nodes"]))
        return StaticPolicy(best["actions"])

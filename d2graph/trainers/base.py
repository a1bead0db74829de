"""The trainer protocol, policies, and the facts about a graph that trainers share.

In:  a compiled `Executor`, the data (`d2graph.data.Splits`) and a stage context (`Stage`,
     from d2graph.runs: settings, optimiser, epochs and steps that resume, the metrics log).
Out: `Trainer.fit(executor, data, stage)` trains the executor's weights in place and returns
     the `Policy` that routes examples from then on (None: keep the current one).
Guarantees:
  - A trainer declares its parameters as a `Schema` (so the checker rejects an unknown
    parameter of a `stage` with a hint) and is registered by name in `TRAINERS`.
  - Trainers only use the executor's public modes (`all`, `force`, `explore`, `sample`,
    `argmax`) and `route` (pricing a routing without computing it) — never its internals.
  - A `Policy` chooses the actions of the control nodes. `LearnedPolicy` is the graph's own
    control nodes (argmax of their scores); the calibrated baselines (threshold, uniform,
    oracle, static) decide from the heads' outputs instead and are saved as plain data
    (`state()`, numbers and strings only), so checkpoints load with `weights_only=True`.

Vocabulary (docs/trainers.md):
  head          a function node whose output feeds an output node directly: an exit or a
                branch classifier (`heads(graph)`).
  current head  of a control node: the classifier whose scores it can see when it decides
                (`current_head(graph, q)`), which threshold rules read.
  action order  of a control node: its actions from cheapest to dearest, priced by the
                cheapest path that takes each (`action_order(graph)`); the first is "stop".
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import Tensor

from ..diagnostics import D2GraphError, Diagnostic
from ..executor import Executor, Result
from ..ir import Graph
from ..schema import TRAINERS, Param, Schema

__all__ = ["POLICIES", "LearnedPolicy", "Policy", "StaticPolicy", "Trainer", "action_order", "budget_param", "calibrate",
           "current_head", "drop_param", "heads", "load_policy", "path_costs", "register", "run_policy",
           "save_policy", "trainer_error"]


# --- trainers -------------------------------------------------------------------------------


class Trainer:
    """Base class of trainers. Subclasses set `name`, `schema` and `role`, and implement `fit`.

    `role` is "backbone" for trainers that train the function nodes (the `supervised` stage)
    and "policy" for those that decide the routing; `d2graph sweep` trains the backbone
    stages once and repeats the policy stages for every budget.

    Example (a complete trainer):
        >>> class Always(Trainer):
        ...     name, role = "always", "policy"
        ...     schema = Schema("always", (Param("action", "nonneg", 0),))
        ...     def fit(self, executor, data, stage):
        ...         return StaticPolicy({q.name: self.params["action"] for q in executor.graph.control_nodes})
        >>> register(Always)                                    # doctest: +SKIP
    """

    name: ClassVar[str]
    schema: ClassVar[Schema]
    role: ClassVar[str] = "policy"

    def __init__(self, **params: Any):
        # Bound to the schema with defaults filled in, so a trainer built from Python behaves
        # as one from a .d2 file, and a wrong parameter raises the checker's diagnostic (a
        # trainer built from Python skips the checker).
        bound, diags = self.schema.bind([], [(k, v, None, None) for k, v in params.items()], what="trainer")
        if any(d.is_error for d in diags):
            raise D2GraphError(diags)
        self.params = bound

    def check_graph(self, graph: Graph) -> None:
        """Raise `trainer_error(...)` when this trainer cannot handle `graph` (called before
        any training, so a wrong pairing fails in a second, not after the backbone stage)."""

    def fit(self, executor: Executor, data, stage) -> Policy | None:  # pragma: no cover - protocol
        raise NotImplementedError


def register(trainer: type[Trainer]) -> type[Trainer]:
    """Make a trainer known to the checker and to `d2graph train` (usable as a decorator)."""
    if trainer.role not in ("backbone", "policy"):
        raise ValueError(f"trainer {trainer.name!r}: role must be 'backbone' or 'policy', not {trainer.role!r}")
    TRAINERS.register(trainer.name, trainer)
    return trainer


def trainer_error(trainer: str, message: str, help: str) -> D2GraphError:
    """The error a trainer raises when the graph or the data do not suit it (E921)."""
    return D2GraphError([Diagnostic("E921", f"trainer `{trainer}`: {message}", None, "", help=help)])


def budget_param(default: float = 0.5) -> Param:
    return Param("budget", "fraction", default,
                 doc="target mean cost on validation, as a fraction of the full graph's cost")


def drop_param() -> Param:
    return Param("drop", "number", -1,
                 doc="if ≥ 0: instead of a budget, the cheapest policy whose validation accuracy is at "
                     "most this much below the full graph's (0.01 = one point)")


# --- policies -------------------------------------------------------------------------------


class Policy:
    """Chooses the actions of the control nodes for a batch.

    `decide` returns {control: int64 [B]} for mode="force", or None to let the control nodes
    decide themselves (mode="argmax"). `y` is given to policies that look at the labels
    (the oracle); `generator` to random ones."""

    kind: ClassVar[str]
    needs_labels: ClassVar[bool] = False

    def decide(self, executor: Executor, x: Tensor, y: Tensor | None = None,
               generator: torch.Generator | None = None) -> dict[str, Tensor] | None:
        raise NotImplementedError  # pragma: no cover - protocol

    def state(self) -> dict[str, Any]:
        """Plain data (numbers, strings, lists, dicts) that `from_state` turns back into the policy."""
        return {}

    @classmethod
    def from_state(cls, graph: Graph, state: Mapping[str, Any]) -> Policy:
        return cls(**state)

    def describe(self) -> str:
        return self.kind


POLICIES: dict[str, type[Policy]] = {}


def _policy(cls: type[Policy]) -> type[Policy]:
    POLICIES[cls.kind] = cls
    return cls


@_policy
class LearnedPolicy(Policy):
    """The graph's own control nodes decide (argmax of their scores)."""

    kind = "learned"

    def decide(self, executor, x, y=None, generator=None):
        return None

    def describe(self) -> str:
        return "the control nodes' own scores (argmax)"


@_policy
class StaticPolicy(Policy):
    """Every example takes the same actions: one static path of the graph."""

    kind = "static"

    def __init__(self, actions: Mapping[str, int]):
        self.actions = {q: int(a) for q, a in actions.items()}

    def decide(self, executor, x, y=None, generator=None):
        n = x.shape[0]
        # Control nodes the path does not reach still need an action for mode="force".
        return {q.name: torch.full((n,), self.actions.get(q.name, 0), dtype=torch.long)
                for q in executor.graph.control_nodes}

    def state(self) -> dict[str, Any]:
        return {"actions": dict(self.actions)}

    def describe(self) -> str:
        return "static path " + (", ".join(f"{q}={a + 1}" for q, a in self.actions.items()) or "(no control)")


def load_policy(graph: Graph, state: Mapping[str, Any]) -> Policy:
    """A policy back from `{"kind": ..., **policy.state()}`; ValueError if unknown."""
    state = dict(state)
    kind = state.pop("kind", None)
    if kind not in POLICIES:
        raise ValueError(f"unknown policy kind {kind!r}")
    return POLICIES[kind].from_state(graph, state)


def save_policy(policy: Policy) -> dict[str, Any]:
    return {"kind": policy.kind, **policy.state()}


def run_policy(executor: Executor, policy: Policy | None, x: Tensor, y: Tensor | None = None, *,
               keep=(), generator: torch.Generator | None = None) -> Result:
    """One forward pass routed by `policy` (None or a LearnedPolicy: the control nodes)."""
    actions = None if policy is None else policy.decide(executor, x, y, generator)
    if actions is None:
        return executor(x, keep=keep)
    return executor(x, mode="force", actions=actions, keep=keep)


# --- facts about a graph --------------------------------------------------------------------


def heads(graph: Graph) -> list[str]:
    """The function nodes that feed an output node directly, in the order of the output's
    edges (an output with `merge=select` lists the deepest exit first in our examples)."""
    found: list[str] = []
    for out in graph.outputs:
        for edge in out.inputs:
            if graph[edge.source].kind == "node" and edge.source not in found:
                found.append(edge.source)
    return found


def path_costs(graph: Graph) -> list[tuple[dict[str, int], tuple[str, ...], float]]:
    """The static paths of the graph (see `d2graph.bench.static_paths`) with their cost per
    example: (the actions of the control nodes that run, the nodes that run, cost)."""
    return list(_path_costs(graph))


@functools.lru_cache(maxsize=16)
def _path_costs(graph: Graph) -> tuple:
    from ..bench import static_paths  # a sibling stage; imported late to keep start-up light

    cost = {n.name: n.cost for n in graph.nodes}
    with torch.random.fork_rng(devices=[]):  # the throwaway executor must not move the caller's seed
        paths = static_paths(graph)
    return tuple((actions, nodes, sum(cost[n] for n in nodes)) for actions, nodes in paths)


def action_order(graph: Graph) -> dict[str, list[int]]:
    """For each control node, its actions from cheapest to dearest, each priced by the
    cheapest static path that takes it (ties keep the declared order)."""
    paths = path_costs(graph)
    order: dict[str, list[int]] = {}
    for q in graph.control_nodes:
        price = [math.inf] * len(q.actions)
        for actions, _, cost in paths:
            if q.name in actions:
                price[actions[q.name]] = min(price[actions[q.name]], cost)
        order[q.name] = sorted(range(len(q.actions)), key=lambda a: (price[a], a))
    return order


def _descendants(graph: Graph, name: str) -> set[str]:
    import networkx as nx

    return nx.descendants(graph.to_networkx(), name)


def current_head(graph: Graph, control: str, classes: int | None = None) -> str | None:
    """The classifier a control node can read when it decides, or None.

    1. Among the control node's own data inputs, the last one that is (or is computed
       from) class scores: a head, or a node with `classes` outputs (`early_exit.d2`'s Q2
       reads H1 and H2: H2 is current).
    2. Otherwise the head that runs on exactly the examples the control node runs on and
       does not depend on its decision, latest in the graph's order (`cascade.d2`: Q1
       reads features of N1; N2, the stage's classifier, is current)."""
    q = graph[control]
    head_names = heads(graph)
    for edge in reversed(q.inputs):
        src = graph[edge.source]
        if edge.source in head_names or (classes is not None and src.out_shape == (classes,)):
            return edge.source
    after_q = _descendants(graph, control)
    paths = path_costs(graph)
    with_q = [set(nodes) for _, nodes, _ in paths if control in nodes]
    without_q = [set(nodes) for _, nodes, _ in paths if control not in nodes]
    order = [n.name for n in graph.nodes]
    candidates = [h for h in head_names if h not in after_q
                  and all(h in p for p in with_q) and not any(h in p for p in without_q)]
    return max(candidates, key=order.index) if candidates else None


# --- calibration ----------------------------------------------------------------------------


def calibrate(cost_at: Callable[[float], float], target: float, lo: float, hi: float,
              steps: int = 40) -> tuple[float, float]:
    """Find a parameter t in [lo, hi] whose mean cost `cost_at(t)` meets `target`, for a
    cost that does not decrease as t grows. Bisection; returns (t, cost), choosing among
    the points tried the dearest that is within the target (budgets are caps), or the
    cheapest when none is."""
    tried = [(lo, cost_at(lo)), (hi, cost_at(hi))]
    a, b = lo, hi
    for _ in range(steps):
        mid = (a + b) / 2
        c = cost_at(mid)
        tried.append((mid, c))
        if c <= target:
            a = mid
        else:
            b = mid
    within = [p for p in tried if p[1] <= target + 1e-12]
    if within:
        return max(within, key=lambda p: (p[1], p[0]))
    return min(tried, key=lambda p: (p[1], p[0]))

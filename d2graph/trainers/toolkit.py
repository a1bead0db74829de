"""The toolkit of policy trainers: what every trainer that learns or calibrates a routing shares.

In:  a compiled `Executor` (its function nodes trained), a data split (a `TensorDataset` of
     (x, y)), a stage context (`batch`, `device`) and a trainer's bound parameters.
Out:
  budget_param(default)      the one `budget` parameter: a cap on the mean validation cost,
                             as a fraction of the full graph's cost, 0 < budget ≤ 1
  drop_param()               the threshold trainer's alternative to a budget
  check_budget(trainer, alternative)
                             the one validator of `budget` (E921, through `validate_budget`):
                             the budget, or None when the trainer runs without one
  calibrate(cost_at, target, lo, hi)
                             bisection of one parameter until the mean cost meets a budget
  search_under_budget(outcome, grids, bounds, budget, starts)
                             several knobs (per-exit thresholds, per-node offsets) searched
                             together for the most right answers within a budget
  final_bias(module, k)      the bias of a control node's final `fc`, which shifts its scores
  evaluating(executor)       eval mode, no autograd, the train/eval mode put back on leaving
  batches(dataset, batch)    (x, y) slices of a split, in order
  every_control(graph, actions, n)
                             forced actions for every control node (mode="force" needs all)
  PathTable / path_table(executor, dataset, stage)
                             what every static path predicts for every example of a split and
                             what any routing costs, so that calibrating a policy is table
                             lookups instead of forward passes
Guarantees:
  - Budgets are caps: `calibrate` returns, among the points it tried, the dearest within the
    target (the cheapest when none is).
  - Nothing here changes an executor's weights or draws from torch's random streams; every
    forward pass runs under `evaluating`, so the executor's mode is what it was.
  - A `PathTable` prices a routing with `executor.route` (no layer is called) and scores it
    from the paths' recorded predictions: examples are independent in eval mode, so an
    example routed along a path predicts what that path predicts for it.

How to write a policy trainer against it: docs/trainers.md ("Add your own trainer").

Example:
    >>> with evaluating(executor):                                                # doctest: +SKIP
    ...     table = path_table(executor, data.val, stage)
    ...     t, cost = calibrate(lambda t: table.mean_cost(actions_at(t)), 0.5, 0.0, 1.0)
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor

from ..executor import Executor, route
from ..paths import path_costs
from ..policies import evaluating
from ..schema import Param, trainer_error

__all__ = ["BUDGET_NONE", "PathTable", "batches", "budget_param", "calibrate", "check_budget", "drop_param",
           "evaluating", "every_control", "final_bias", "held_out", "held_out_batch", "path_table",
           "search_under_budget", "validate_budget"]

# The word that turns a trainer's budget off where the trainer can run without one (`reinforce`).
BUDGET_NONE = "none"


# --- the budget -----------------------------------------------------------------------------


def budget_param(default: float | None = 0.5, *, alternative: str | None = None) -> Param:
    """The `budget` parameter of a policy trainer: one meaning for every trainer.

    A budget is a cap on the policy's mean cost on the validation split, as a fraction of the
    full graph's cost (every node running): 0 < budget ≤ 1. It also accepts `none` (no
    budget) where the trainer can do without one: `default=None` (its default is then
    `none`), or an `alternative` parameter that says how much to spend another way (`drop`,
    `lambda`; `check_budget` refuses both at once)."""
    doc = "cap on the mean cost on validation, as a fraction of the full graph's cost (0 < budget ≤ 1)"
    if default is None:
        return Param("budget", "fraction", BUDGET_NONE, also=(BUDGET_NONE,), doc=doc + "; `none`: no budget")
    if alternative is not None:
        return Param("budget", "fraction", default, also=(BUDGET_NONE,),
                     doc=doc + f"; `none` (or the default) with `{alternative}` instead")
    return Param("budget", "fraction", default, doc=doc)


def drop_param() -> Param:
    """The alternative to a budget of trainers that can target an accuracy instead (`threshold`)."""
    return Param("drop", "number", -1,
                 doc="if ≥ 0: instead of a budget, the cheapest policy whose validation accuracy is at "
                     "most this much below the full graph's (0.01 = one point)")


def check_budget(trainer, alternative: str | None = None) -> float | None:
    """Validate `trainer.params["budget"]` (E921) and return it as a float, or None when the
    trainer runs without a budget: its budget is `none`, or its `alternative` parameter (a
    number, ≥ 0 when in use, e.g. `drop`, `lambda`) is in use.

    Giving the budget and the alternative both is an error, not a silent choice: with the
    alternative in use, the budget must be `none` or its default (the bound parameters hold
    every default, so a budget left out reads as its default).

    Example:
        >>> check_budget(ThresholdTrainer(budget=0.3))                    # doctest: +SKIP
        0.3
    """
    params, name = trainer.params, trainer.name
    budget = params["budget"]
    default = next(p.default for p in trainer.schema.params if p.name == "budget")
    if alternative is not None and params[alternative] >= 0:
        if budget not in (default, BUDGET_NONE):
            raise trainer_error(name, f"budget={budget} and {alternative}={params[alternative]} are two ways to "
                                      f"say how much to spend: give one",
                                help=f"to use `{alternative}`, leave `budget` out or set budget={BUDGET_NONE}; to "
                                     f"use the budget, leave `{alternative}` out (it is off below 0)")
        return None
    if budget == BUDGET_NONE:
        if default == BUDGET_NONE:
            return None
        raise trainer_error(name, f"budget={BUDGET_NONE} leaves nothing to spend",
                            help=f"give a budget (0 < budget ≤ 1, e.g. budget=0.5) or `{alternative}` ≥ 0")
    instead = f", or give `{alternative}` instead" if alternative else (
        f", or leave it out (budget={BUDGET_NONE}) to run without one" if default == BUDGET_NONE else "")
    return validate_budget(name, budget, instead)


def validate_budget(trainer: str, budget: float, instead: str = "") -> float:
    """`budget` as a float, or E921 in the name of `trainer` unless 0 < budget ≤ 1 (`instead`
    ends the help with the trainer's other options). `check_budget` calls it; functions that
    take a budget without a trainer (`eenet.fit_on_predictions`) call it directly.

    Example:
        >>> validate_budget("eenet", 0.5)
        0.5
    """
    if not 0 < budget <= 1:
        raise trainer_error(trainer, f"budget={budget} leaves nothing to spend" if budget <= 0 else
                            f"budget={budget} is not a fraction of the full cost",
                            help="`budget` is a cap on the mean cost on validation, as a fraction of the full "
                                 f"graph's cost: give a number above 0 and at most 1, e.g. budget=0.5{instead}")
    return float(budget)


def calibrate(cost_at: Callable[[float], float], target: float, lo: float, hi: float,
              steps: int = 40) -> tuple[float, float]:
    """Find a parameter t in [lo, hi] whose mean cost `cost_at(t)` meets `target`, for a
    cost that does not decrease as t grows. Bisection; returns (t, cost), choosing among
    the points tried the dearest that is within the target (budgets are caps), or the
    cheapest when none is.

    Example:
        >>> calibrate(lambda t: t, 0.3, 0.0, 1.0)[1] <= 0.3
        True
    """
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
    within = [p for p in tried if p[1] <= target]
    if within:
        return max(within, key=lambda p: (p[1], p[0]))
    return min(tried, key=lambda p: (p[1], p[0]))


def search_under_budget(outcome: Callable[[list[float]], tuple[float, float]], grids: list[np.ndarray],
                        bounds: list[tuple[float, float]], budget: float, starts: list[list[float]],
                        rounds: int = 4) -> list[float]:
    """Several knobs of a policy (one per exit or control node) set together: the values that
    score best with a mean cost at most `budget`, by coordinate search from the best of
    `starts`. `outcome(knobs)` → (score, mean cost), the score a count of examples answered
    right (or any "more is better" number); raising a knob must not lower the cost, as
    raising a threshold or a node's bias towards dearer actions does.

    Why: one global knob (a shared threshold, a tilt of the exit shares, one offset on every
    node) can only trade the cheapest exits against the dearest; the budget is often best
    spent by sending more examples to a middle exit or path. Each knob in turn takes every
    value of its grid (`grids[i]`, e.g. quantiles of the scores it compares), alone or with
    one other knob re-bisected in `bounds[j]` to the dearest cost within the budget; a move
    is kept when it scores more (ties: the dearer) at any cost within the budget. The budget
    is a cap, not a target: where the dearest exit or path answers fewer examples right than
    a cheaper one (an overfitted deep network), the policy stops spending. The result is
    never worse on these examples than the best start, and within the budget when a start
    is; when none is, the first start comes back unchanged.

    Example:
        >>> right = np.array([[1, 1], [1, 1], [0, 1], [0, 1]], bool)
        >>> def outcome(k):  # one threshold: examples scoring at least k[0] leave early
        ...     early = np.array([0.9, 0.8, 0.2, 0.1]) >= k[0]
        ...     return float(np.where(early, right[:, 0], right[:, 1]).sum()), float(np.where(early, 0.2, 1.0).mean())
        >>> search_under_budget(outcome, [np.array([0.15, 0.5, 0.85])], [(0.0, 1.0)], 0.6, [[0.15]])
        [0.5]
    """
    def better(a: tuple[float, float], b: tuple[float, float]) -> bool:
        # Ties spend more of the budget: on unseen examples a dearer route is rarely worse.
        return a[0] > b[0] or (a[0] == b[0] and a[1] > b[1] + 1e-12)

    best_knobs, best = None, (-math.inf, math.inf)
    for start in starts:
        r = outcome(list(start))
        if r[1] <= budget and (best_knobs is None or better(r, best)):
            best_knobs, best = [float(v) for v in start], r
    if best_knobs is None:
        return [float(v) for v in starts[0]]
    n = len(best_knobs)
    for _ in range(rounds):
        moved = False
        for i in range(n):
            for j in [None, *(j for j in range(n) if j != i)]:
                for v in grids[i]:
                    knobs = list(best_knobs)
                    knobs[i] = float(v)
                    if j is not None:
                        def cost_at(u: float, knobs=knobs, j=j) -> float:
                            return outcome(knobs[:j] + [u] + knobs[j + 1:])[1]
                        knobs[j], _ = calibrate(cost_at, budget, *bounds[j], steps=24)
                    r = outcome(knobs)
                    if r[1] <= budget and better(r, best):
                        best_knobs, best, moved = knobs, r, True
        if not moved:
            break
    return best_knobs


def final_bias(module: torch.nn.Module, k: int) -> Tensor | None:
    """The bias of a control node's final `fc`, where its k scores come straight from one:
    what a trainer moves to shift the node's scores by a constant per action (None when the
    pipeline ends otherwise, or its last `fc` has no bias)."""
    last = module[-1] if isinstance(module, torch.nn.Sequential) and len(module) else module
    if isinstance(last, torch.nn.Linear) and last.bias is not None and last.bias.shape == (k,):
        return last.bias
    return None


# --- data and routing -----------------------------------------------------------------------


def batches(dataset, batch: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(x, y) slices of `batch` examples of a TensorDataset, in order (the last may be shorter)."""
    x, y = dataset.tensors[0], dataset.tensors[1]
    for start in range(0, len(y), batch):
        yield x[start:start + batch], y[start:start + batch]


def held_out(data):
    """The run's held-out training examples (`data.holdout`, a TensorDataset), or None when it
    holds none out."""
    held = getattr(data, "holdout", None)
    return held if held is not None and len(held) else None


def held_out_batch(held, stage) -> tuple[Tensor, Tensor]:
    """As many examples of `held` (a TensorDataset; all of them when fewer) as the current
    step of `stage` has, drawn without replacement from the step's own generator, so a
    resumed epoch draws what the uninterrupted one would have. Under torchrun every process
    draws the same global batch and keeps its share (`stage.shard`). Policy trainers pair
    each batch of the training examples with these when the run holds examples out
    (`data.holdout`)."""
    x_all, y_all = held.tensors
    g = stage.generator("holdout", shared=True)
    idx = stage.shard(torch.randperm(len(y_all), generator=g, device=g.device)[:stage.step_rows].cpu())
    return x_all[idx].to(stage.device), y_all[idx].to(stage.device)


def every_control(graph, actions: Mapping[str, int | Tensor], n: int) -> dict[str, Tensor]:
    """int64 CPU [n] per control node of `graph`, from `actions` (a number or a tensor [n] per
    control node); control nodes not named (a path that does not reach them) take action 0."""
    out = {}
    for q in graph.control_nodes:
        a = actions.get(q.name, 0)
        out[q.name] = a if isinstance(a, Tensor) else torch.full((n,), int(a), dtype=torch.long)
    return out


class PathTable:
    """What every static path predicts for every example of a data set, and where a routing sends each example.

    `correct[p, i]` says whether path p answers example i right, `fraction[p]` is its cost as
    a fraction of the full graph's. `outcome(actions, examples)` gives the cost and the
    correctness of each row of a forced routing. An example's route depends only on its own
    forced actions, so each distinct combination of actions is priced once, with `route` on
    one row per combination, however many rows take it; a combination whose nodes are not a
    known path (`paths.static_paths` stops at MAX_PATHS) adds its path to the table: its
    actions, forced on every example, run exactly those nodes.

    The override point is `record(forced, nodes)`, called once per new path: a subclass that
    needs more per path than correctness (a loss, the control nodes' inputs) overrides it
    and appends its row to `correct` as well."""

    def __init__(self, executor: Executor, dataset, batch: int, device: torch.device,
                 paths: list[tuple[dict[str, int], tuple[str, ...], float]]):
        self.executor, self.graph = executor, executor.graph
        self.dataset, self.y = dataset, dataset.tensors[1]
        self.batch, self.device = batch, device
        self.controls = [q.name for q in self.graph.control_nodes]
        # Mixed-radix code of a combination of actions (one int64 per row), when it fits.
        widths = [len(q.actions) for q in self.graph.control_nodes]
        self._radix = (np.cumprod([1] + widths[:-1]).astype(np.int64)
                       if math.prod(widths) < 2**62 else None)
        self.units = [n.name for n in self.graph.nodes if n.kind not in ("input", "output")]
        self.actions: list[dict[str, int]] = []
        self.nodes: list[tuple[str, ...]] = []
        self.costs: list[float] = []
        self.fraction: list[float] = []
        self.correct = np.zeros((0, len(self.y)), dtype=bool)
        self._by_nodes: dict[frozenset[str], int] = {}
        self._by_combination: dict[tuple[int, ...], int] = {}
        for actions, nodes, cost in paths:
            self._add(actions, nodes, cost)

    def _add(self, actions: Mapping[str, int], nodes: tuple[str, ...], cost: float) -> int:
        key = frozenset(nodes)
        if key in self._by_nodes:
            return self._by_nodes[key]
        graph, executor = self.graph, self.executor
        self.record(every_control(graph, actions, 1), key)
        self.actions.append({q: int(a) for q, a in actions.items()})
        self.nodes.append(tuple(nodes))
        self.costs.append(float(cost))
        probe = route(executor, every_control(graph, actions, 1), 1)
        self.fraction.append(float(probe.cost_fraction[0]))
        self._by_nodes[key] = len(self.actions) - 1
        return self._by_nodes[key]

    def record(self, forced: Mapping[str, Tensor], nodes: frozenset[str]) -> None:
        """Record what a new path does on every example: `forced` holds its actions, one
        int64 tensor [1] per control node (expand it to a batch), `nodes` the nodes it runs.
        This one appends the path's correctness to `correct`."""
        right = []
        with evaluating(self.executor):
            for x, y in batches(self.dataset, self.batch):
                actions = {q: a.expand(len(y)) for q, a in forced.items()}
                result = self.executor(x.to(self.device), mode="force", actions=actions)
                right.append((result.output.argmax(1).cpu() == y).numpy())
        self.correct = np.vstack([self.correct, np.concatenate(right)[None]])

    def _paths_of(self, combinations: np.ndarray) -> np.ndarray:
        """The path index of each row of [C, controls] actions, routing the new ones in one call."""
        new = [c for c in map(tuple, combinations.tolist()) if c not in self._by_combination]
        if new:
            forced = {q: torch.tensor([c[j] for c in new], dtype=torch.long) for j, q in enumerate(self.controls)}
            routed = route(self.executor, forced, len(new))
            for r, c in enumerate(new):
                ran = tuple(name for name in self.units if _contains(routed.rows[name], r))
                taken = {q: a for q, a in zip(self.controls, c) if q in ran}
                self._by_combination[c] = self._add(taken, ran, float(routed.cost[r]))
        return np.array([self._by_combination[c] for c in map(tuple, combinations.tolist())], dtype=np.int64)

    def outcome(self, actions: Mapping[str, Tensor], examples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cost fraction (float64) and correctness (bool) of each row of a forced routing; row r
        is example `examples[r]` of the data set under `actions[q][r]`."""
        if not self.controls:
            return np.full(len(examples), self.fraction[0]), self.correct[0, examples]
        path = self.paths(np.stack([actions[q].numpy() for q in self.controls], axis=1))
        return np.asarray(self.fraction, dtype=np.float64)[path], self.correct[path, examples]

    def paths(self, matrix: np.ndarray) -> np.ndarray:
        """Path index [R] of each row of actions [R, controls]."""
        if self._radix is not None:  # sorting one int64 per row is much faster than rows
            _, first, inverse = np.unique(matrix @ self._radix, return_index=True, return_inverse=True)
            combinations = matrix[first]
        else:
            combinations, inverse = np.unique(matrix, axis=0, return_inverse=True)
        return self._paths_of(combinations)[inverse.ravel()]

    def mean_cost(self, actions: Mapping[str, Tensor]) -> float:
        """The mean cost fraction of a forced routing of every example of the data set."""
        return float(self.outcome(actions, np.arange(len(self.y)))[0].mean())


def _contains(rows, r: int) -> bool:
    return rows.index is None or bool(np.isin(r, rows.index))


def path_table(executor: Executor, dataset, stage) -> PathTable:
    """The `PathTable` of `dataset`, starting from the graph's static paths, batched and
    placed as the stage says (`stage.batch`, `stage.device`)."""
    return PathTable(executor, dataset, stage.batch, stage.device, path_costs(executor.graph))

"""Evaluation: run a compiled graph over a split and say what it did — how well, how cheaply, which way.

In:  an `Executor`, a `TensorDataset` of (x, y) (a split of `d2graph.data.Splits`), and a
     `Policy` that routes the examples (None: the control nodes' own argmax).
Out: `per_example(...)`, one row per example (numpy columns: prediction, label, cost,
     path, exit, which nodes ran, which actions were taken), and `evaluate(...)`, a
     `Report` built from those rows: accuracy (and F1 for a binary task), mean cost, how
     often each node ran and each action was taken, the histogram of paths, accuracy per
     exit, and the traffic on every edge (which `d2graph render --stats` draws).
Guarantees:
  - The executor runs in eval mode under `torch.inference_mode()`, in batches on its own
    device; its previous train/eval mode is restored afterwards, even on an error.
  - Costs are the executor's exact per-example costs (`Result.cost`), summed as integers
    (float64 when a node declares a fractional `cost=`): the mean cost is the exact mean.
  - The same executor, data, policy and generator state give the same report; a `Report`
    survives `to_json()` → `json.dumps` → `from_json()` unchanged.

Vocabulary:
  path   the actions taken by the control nodes that ran for an example, numbered from 1
         as in drawings and messages: "Q1=2 Q2=1"; "(no control)" when the graph has none.
  exit   the heads (`d2graph.paths.heads`) whose scores reached the output for an
         example: for a `merge=select` output the one head it took (the first present in
         its edge order), for other outputs every head that ran; joined with "+".

A graph with several outputs is scored on its first output (the first `output` in the file).

Example:
    >>> splits = d2graph.data.load("digits", seed=0)                          # doctest: +SKIP
    >>> report = evaluate(executor, splits.test, classes=splits.classes)      # doctest: +SKIP
    >>> print(report.table())                                                 # doctest: +SKIP
    test: 270 examples  accuracy 91.1%  mean cost 12.3K MACs (24.0% of the full 51.2K)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .executor import Executor, Result
from .ir import Graph, format_cost
from .paths import heads
from .policies import Policy, evaluating, run_policy

__all__ = ["NO_CONTROL", "NO_EXIT", "Report", "evaluate", "f1_score", "per_example", "summarise", "whole_percentages"]

NO_CONTROL = "(no control)"  # the path label of every example of a graph without control nodes
NO_EXIT = "(none)"  # the exit label of an example whose output took no head's scores
TOP_PATHS = 10  # paths shown by Report.table()


# --- one row per example ----------------------------------------------------------------------


def per_example(executor: Executor, dataset: Dataset, policy: Policy | None = None, *, batch: int = 256,
                generator: torch.Generator | None = None) -> dict[str, np.ndarray]:
    """Run `executor` over `dataset` and return one row per example, as numpy columns:

        prediction  int64   argmax of the (first) output's scores
        label       int64   the true class
        correct     bool    prediction == label
        cost        int64   the example's cost (float64 if a node declares a fractional cost)
        path        str     the actions taken, e.g. "Q1=2 Q2=1" (see the module docstring)
        exit        str     the head(s) whose scores the output took, e.g. "N4"
        ran.NAME    bool    for every node NAME of the graph: it ran for the example
        action.Q    int64   for every control node Q: its action (0-based), -1 where it did not run

    ('.' cannot occur in a .d2 name, so these keys never clash.) Rows follow the dataset's order.

    Example:
        >>> rows = per_example(executor, splits.val)                         # doctest: +SKIP
        >>> rows["cost"][rows["path"] == "Q1=1"].mean()                      # doctest: +SKIP
    """
    graph = executor.graph
    if batch < 1:
        raise ValueError(f"batch must be a positive number of examples, not {batch}")
    if len(dataset) == 0:
        raise ValueError("the data set is empty: there is nothing to evaluate")
    param = next(executor.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else None
    output = graph.outputs[0].name
    names = [n.name for n in graph.nodes]
    controls = [q.name for q in graph.control_nodes]

    cols: dict[str, list[np.ndarray]] = {"prediction": [], "label": [], "cost": []}
    ran: dict[str, list[np.ndarray]] = {name: [] for name in names}
    actions: dict[str, list[np.ndarray]] = {q: [] for q in controls}
    with evaluating(executor):
        for x, y in _batches(dataset, batch):
            x = x.to(device=device, dtype=dtype if x.is_floating_point() and dtype is not None else None)
            y = y.to(device)
            result: Result = run_policy(executor, policy, x, y, generator=generator)
            cols["prediction"].append(result.outputs[output].argmax(dim=1).cpu().numpy())
            cols["label"].append(y.cpu().numpy())
            cols["cost"].append(result.cost.cpu().numpy())
            b = x.shape[0]
            for name in names:
                ran[name].append(_mask(result.rows[name].index, b))
            for q, a in result.actions.items():
                actions[q].append(a.cpu().numpy())

    rows: dict[str, np.ndarray] = {key: np.concatenate(parts) for key, parts in cols.items()}
    rows["prediction"] = rows["prediction"].astype(np.int64)
    rows["label"] = rows["label"].astype(np.int64)
    rows["correct"] = rows["prediction"] == rows["label"]
    for name in names:
        rows[f"ran.{name}"] = np.concatenate(ran[name])
    for q in controls:
        rows[f"action.{q}"] = np.concatenate(actions[q]).astype(np.int64)
    rows["path"] = _path_labels(controls, rows)
    rows["exit"] = _exit_labels(graph, rows)
    return rows


def _batches(dataset: Dataset, batch: int):
    # A TensorDataset is sliced directly: a DataLoader would index it one example at a
    # time and stack the results again, which costs more than the evaluation of a small graph.
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) == 2:
        x_all, y_all = tensors
        for start in range(0, len(x_all), batch):
            yield x_all[start:start + batch], y_all[start:start + batch]
        return
    yield from DataLoader(dataset, batch_size=batch, shuffle=False)


def _mask(index: np.ndarray | None, b: int) -> np.ndarray:
    if index is None:
        return np.ones(b, dtype=bool)
    mask = np.zeros(b, dtype=bool)
    mask[index] = True
    return mask


def _path_labels(controls: list[str], rows: Mapping[str, np.ndarray]) -> np.ndarray:
    n = len(rows["label"])
    if not controls:
        return np.full(n, NO_CONTROL)
    # One label per distinct combination of actions, not per example: few combinations occur.
    table = np.stack([rows[f"action.{q}"] for q in controls], axis=1)
    combos, inverse = np.unique(table, axis=0, return_inverse=True)
    labels = [" ".join(f"{q}={a + 1}" for q, a in zip(controls, combo) if a >= 0) or NO_CONTROL
              for combo in combos.tolist()]
    return np.array(labels, dtype=str)[inverse.reshape(-1)]


def _exit_labels(graph: Graph, rows: Mapping[str, np.ndarray]) -> np.ndarray:
    n = len(rows["label"])
    head_names = heads(graph)
    took = {h: np.zeros(n, dtype=bool) for h in head_names}
    for out in graph.outputs:
        if out.merge == "select":
            # The output took, per example, its first present input: a source that ran, or
            # an edge with a default (present everywhere, carrying its default, not a head).
            undecided = np.ones(n, dtype=bool)
            for edge in out.inputs:
                source_ran = rows[f"ran.{edge.source}"]
                taken = undecided & (source_ran if edge.default is None else True)
                if edge.source in took:
                    took[edge.source] |= taken & source_ran
                undecided &= ~taken
        else:
            for edge in out.inputs:
                if edge.source in took:
                    took[edge.source] |= rows[f"ran.{edge.source}"]
    if not head_names:
        return np.full(n, NO_EXIT)
    table = np.stack([took[h] for h in head_names], axis=1)
    combos, inverse = np.unique(table, axis=0, return_inverse=True)
    labels = ["+".join(h for h, t in zip(head_names, combo) if t) or NO_EXIT for combo in combos.tolist()]
    return np.array(labels, dtype=str)[inverse.reshape(-1)]


# --- the report -------------------------------------------------------------------------------


@dataclass
class Report:
    """What a graph did on one split.

    split          the split's name ("test", "val", ...)
    n              examples evaluated
    classes        number of classes of the task
    accuracy       share of examples whose argmax of the (first) output is the label
    f1             binary tasks (classes == 2): F1 of class 1; None otherwise
    mean_cost      mean cost per example, in the graph's cost unit (multiply-accumulates
                   unless a node declares `cost=`; then `cost_unit` is "")
    cost_fraction  mean_cost / full_cost (0 when the graph costs nothing)
    full_cost      the cost of one example when every node runs
    node_rates     function or control node → share of examples it ran for
    action_rates   control node → [share taking action 1, action 2, ..., share it did not run]
    paths          [{path, count, fraction, accuracy, mean_cost}], most frequent first
    exits          exit label → {count, accuracy}, shallowest exit first (graph order)
    edge_traffic   "SRC->DST" (data edge) → share of examples whose value flowed on it: both
                   ends ran (and, into a `merge=select` node, no earlier input served them);
                   "Q=>TARGET" (control edge; TARGET "skip" for skip) → share taking it
    policy         how the examples were routed (`Policy.describe()`)
    cost_unit      "MACs", or "" when a node declares `cost=` (the user's own unit)
    graph          the graph's name
    """

    split: str
    n: int
    classes: int
    accuracy: float
    f1: float | None
    mean_cost: float
    cost_fraction: float
    full_cost: int | float
    node_rates: dict[str, float]
    action_rates: dict[str, list[float]]
    paths: list[dict[str, Any]]
    exits: dict[str, dict[str, Any]]
    edge_traffic: dict[str, float]
    policy: str = ""
    cost_unit: str = "MACs"
    graph: str = ""

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types (str, int, float, None, lists, dicts), for `json.dumps`."""
        return _plain(asdict(self))

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Report:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def table(self, *, routed_by: bool = True) -> str:
        """A text table for people: the headline, how often each node ran (and, for a control
        node, the share of the examples it ran for that took each action: they add up to
        100%), the paths, the exits (shallowest first). `routed_by=False` leaves out the line
        naming the policy (for a report that names it once above several tables)."""
        head = f"{self.split}: {self.n:,} examples  accuracy {self.accuracy:.1%}"
        if self.f1 is not None:
            head += f"  F1 {self.f1:.3f}"
        unit = f" {self.cost_unit}" if self.cost_unit else ""
        head += (f"  mean cost {format_cost(self.mean_cost)}{unit} "
                 f"({self.cost_fraction:.1%} of the full {format_cost(self.full_cost)})")
        lines = [head]
        if self.policy and routed_by:
            lines.append(f"routed by {self.policy}")

        if self.node_rates:
            width = max(len("node"), *(len(name) for name in self.node_rates))
            said = any(self.action_rates.get(name) for name in self.node_rates)
            lines += ["", f"{'node':<{width}}  {'ran':>6}" + ("  actions (of the examples it ran for)" if said else "")]
            for name, rate in self.node_rates.items():
                actions = self.action_rates.get(name)
                note = ""
                if actions and sum(actions[:-1]) > 0:
                    shares = whole_percentages([r / sum(actions[:-1]) for r in actions[:-1]])
                    note = "  " + " ".join(f"{i + 1}:{p}%" for i, p in enumerate(shares))
                lines.append(f"{name:<{width}}  {rate:>6.1%}{note}")

        shown = self.paths[:TOP_PATHS]
        if shown:
            width = max(len("path"), *(len(p["path"]) for p in shown))
            lines += ["", f"{'path':<{width}}  {'count':>7}  {'share':>6}  {'accuracy':>8}  {'mean cost':>9}"]
            for p in shown:
                lines.append(f"{p['path']:<{width}}  {p['count']:>7,}  {p['fraction']:>6.1%}  "
                             f"{p['accuracy']:>8.1%}  {format_cost(p['mean_cost']):>9}")
            if len(self.paths) > TOP_PATHS:
                rest = sum(p["count"] for p in self.paths[TOP_PATHS:])
                lines.append(f"... {len(self.paths) - TOP_PATHS} more paths, {rest:,} examples")

        if self.exits:
            width = max(len("exit"), *(len(e) for e in self.exits))
            lines += ["", f"{'exit':<{width}}  {'count':>7}  {'accuracy':>8}"]
            for label, e in self.exits.items():
                lines.append(f"{label:<{width}}  {e['count']:>7,}  {e['accuracy']:>8.1%}")
        return "\n".join(lines)


def f1_score(prediction, label) -> float:
    """F1 of class 1 from predicted and true labels (numpy arrays or tensors of one shape):
    2TP / (2TP + FP + FN), 0.0 when there is neither a positive nor an error (sklearn's
    zero_division=0).

    Example:
        >>> f1_score(np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1]))  # TP 2, FP 1
        0.8
    """
    pred, true = np.asarray(prediction) == 1, np.asarray(label) == 1
    tp = int(np.count_nonzero(pred & true))
    wrong = int(np.count_nonzero(pred != true))  # false positives + false negatives
    return 2 * tp / (2 * tp + wrong) if tp + wrong else 0.0


def whole_percentages(shares: list[float]) -> list[int]:
    """Shares that add up to 1 as whole percentages that add up to exactly 100 (largest
    remainder: the percentages rounded down, then one more to those rounded down the most).

    Example:
        >>> whole_percentages([1 / 3, 1 / 3, 1 / 3])
        [34, 33, 33]
    """
    exact = [100 * s for s in shares]
    whole = [math.floor(e + 1e-9) for e in exact]
    for i in sorted(range(len(exact)), key=lambda i: (whole[i] - exact[i], i))[:max(0, 100 - sum(whole))]:
        whole[i] += 1
    return whole


def _plain(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def evaluate(executor: Executor, dataset: Dataset, policy: Policy | None = None, *, classes: int,
             batch: int = 256, generator: torch.Generator | None = None, split: str = "test") -> Report:
    """Run `executor` over `dataset`, routed by `policy` (None: the control nodes' argmax),
    and summarise what it did in a `Report` (see the module docstring).

    Example:
        >>> report = evaluate(executor, splits.test, classes=splits.classes)   # doctest: +SKIP
        >>> report.accuracy, report.cost_fraction, report.paths[0]["path"]     # doctest: +SKIP
        (0.91, 0.24, 'Q1=2')
    """
    rows = per_example(executor, dataset, policy, batch=batch, generator=generator)
    return summarise(executor.graph, rows, classes=classes, split=split,
                     policy=policy.describe() if policy is not None else "the control nodes' own scores (argmax)")


def summarise(graph: Graph, rows: Mapping[str, np.ndarray], *, classes: int, split: str = "test",
              policy: str = "") -> Report:
    """The `Report` of the rows `per_example` returned (or a subset of them, e.g. one
    difficulty level: `{k: v[mask] for k, v in rows.items()}`)."""
    n = len(rows["label"])
    if n == 0:
        raise ValueError("no examples to summarise")
    correct = rows["correct"]
    cost = rows["cost"]
    full = graph.full_cost
    mean_cost = _mean(cost)

    f1 = f1_score(rows["prediction"], rows["label"]) if classes == 2 else None

    def rate(mask: np.ndarray) -> float:
        return int(np.count_nonzero(mask)) / n

    node_rates = {node.name: rate(rows[f"ran.{node.name}"])
                  for node in graph.nodes if node.kind in ("node", "control")}
    action_rates = {}
    for q in graph.control_nodes:
        a = rows[f"action.{q.name}"]
        counts = np.bincount(a + 1, minlength=len(q.actions) + 1)  # slot 0: did not run (-1)
        action_rates[q.name] = [int(c) / n for c in counts[1:]] + [int(counts[0]) / n]

    paths = []
    labels, inverse, counts = np.unique(rows["path"], return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    for i, label in enumerate(labels.tolist()):
        mask = inverse == i
        count = int(counts[i])
        paths.append({"path": label, "count": count, "fraction": count / n,
                      "accuracy": int(np.count_nonzero(correct & mask)) / count, "mean_cost": _mean(cost[mask])})
    paths.sort(key=lambda p: (-p["count"], p["path"]))

    exits = {}
    labels, inverse, counts = np.unique(rows["exit"], return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    # Shallowest exit first: in the graph's node order (an output's `select` edges usually
    # list the deepest first, which is not how people read a chain of exits).
    order = {node.name: i for i, node in enumerate(graph.nodes)}
    for i in sorted(range(len(labels)), key=lambda i: [order.get(h, -1) for h in str(labels[i]).split("+")]):
        mask = inverse == i
        exits[str(labels[i])] = {"count": int(counts[i]),
                                 "accuracy": int(np.count_nonzero(correct & mask)) / int(counts[i])}

    traffic: dict[str, float] = {}
    for node in graph.nodes:
        taken = np.zeros(n, dtype=bool)  # select: the examples an earlier input already served
        for edge in node.inputs:
            flows = rows[f"ran.{edge.source}"] & rows[f"ran.{node.name}"]
            if node.merge == "select":  # only the first present input's value flows on
                flows, taken = flows & ~taken, taken | flows
            traffic[f"{edge.source}->{node.name}"] = rate(flows)
    for c in graph.control_edges:
        key = f"{c.source}=>{c.target or 'skip'}"
        # Two actions of one control node into the same target (or two skips) share a key.
        traffic[key] = traffic.get(key, 0.0) + action_rates[c.source][c.action]

    return Report(
        split=split, n=n, classes=classes, accuracy=rate(correct), f1=f1, mean_cost=mean_cost,
        cost_fraction=mean_cost / full if full else 0.0, full_cost=full, node_rates=node_rates,
        action_rates=action_rates, paths=paths, exits=exits, edge_traffic=traffic, policy=policy,
        cost_unit="" if any(node.cost_declared for node in graph.nodes) else "MACs", graph=graph.name)


def _mean(cost: np.ndarray) -> float:
    # Integer costs are summed exactly as 64-bit integers (no rounding), then divided once.
    if len(cost) == 0:
        return math.nan
    total = int(cost.sum(dtype=np.int64)) if cost.dtype.kind in "iu" else float(cost.sum(dtype=np.float64))
    return total / len(cost)

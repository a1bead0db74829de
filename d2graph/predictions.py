"""Per-exit predictions of a multi-exit network: what policies learned on a frozen backbone read.

In:  a compiled multi-exit chain (`examples/early_exit.d2`, `eenet_resnet.d2`, `cascade.d2`:
     control nodes that each choose between `skip` — exit through the head they read — and
     going on) and its data, or a folder written by MSDNet's / EENet's public code.
Out: `Predictions`: every exit's softmax on every validation and test example, the labels,
     and the cumulative cost of exiting at each exit. `exits_of(graph)` names the exits,
     `from_executor` computes the predictions with one mode="all" pass per split,
     `save` / `load` write and read them as a folder, and `actions_for_exits` turns an
     exit per example back into the forced actions that make the executor take it.
Guarantees:
  - Exits are ordered shallow → deep; `costs[k]` is the cost of the static path that
    exits at exit k (`d2graph.paths.path_costs`), so it never decreases with k, and `full_cost`
    (the graph's, every node running) turns it into the fractions budgets are given in.
  - `from_executor` runs in eval mode under `torch.inference_mode()` and puts the
    executor's mode back; the softmax is taken in float64 and stored as float32, the same
    way policies compute it when they decide (`head_probs`), so a policy fitted on
    `Predictions` routes the executor exactly as it routed the predictions.
  - A graph that is not a multi-exit chain is refused with E921, naming what is missing;
    every mistake in a predictions folder (missing file, wrong shapes, a cost per exit
    that does not match the exits, values that are neither probabilities nor finite
    logits) is a D2GraphError with code E924 and a hint. Scores that do not sum to 1 are
    taken for logits and softmaxed; `Predictions.notes` says so.

The folder layout is that of the public MSDNet and EENet code (`dynamic_evaluate`), read
from their source since the paper does not give it:
    logits_single.pth  torch.save((val_pred, val_target, test_pred, test_target)), the
                       preds softmax [K, N, C] (float32), the targets [N] (theirs are float
                       tensors holding integers; we write int64 and read either). A dict with
                       keys val_probs, val_targets, test_probs, test_targets is read too.
    flops.pth          torch.save(list of K cumulative costs): the cost of exiting at each exit.
    seconds.csv        (read only) K lines, the cumulative latency of each exit (EENet's unit).
    costs.json         ours: {"costs", "full_cost", "exit_names"}; read first when present.
Everything is read with `torch.load(weights_only=True)`.

Example:
    >>> pred = from_executor(trained.executor, trained.data)                  # doctest: +SKIP
    >>> save(pred, "preds/early_exit"); load("preds/early_exit").fractions    # doctest: +SKIP
    array([0.107, 0.531, 1.   ])
"""

from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from .diagnostics import D2GraphError, Diagnostic
from .executor import Executor, Result
from .files import atomic_path, write_atomic
from .ir import Graph
from .paths import current_head, heads as heads_of, path_costs
from .policies import evaluating
from .schema import trainer_error

__all__ = ["Exit", "Predictions", "actions_for_exits", "exit_costs", "exits_of", "from_executor", "head_probs",
           "load", "save"]

LOGITS_FILE = "logits_single.pth"
FLOPS_FILE = "flops.pth"
SECONDS_FILE = "seconds.csv"
COSTS_FILE = "costs.json"

# Rows whose values sum to 1 within this are probabilities; otherwise the scores are logits.
_SUM_TOLERANCE = 1e-3


def _error(message: str, help: str) -> D2GraphError:
    return D2GraphError([Diagnostic("E924", message, None, "", help=help)])


_LAYOUT_HELP = (f"a predictions folder holds {LOGITS_FILE} = torch.save((val_probs [K, Nv, C], val_targets [Nv], "
                f"test_probs [K, Nt, C], test_targets [Nt])) and the cumulative cost of each exit in {COSTS_FILE}, "
                f"{FLOPS_FILE} (a list of K numbers) or {SECONDS_FILE} (K lines); d2graph.predictions.save writes one")


# --- the exits of a graph -------------------------------------------------------------------


class Exit(NamedTuple):
    """One exit of a multi-exit chain, shallow to deep.

    control  the control node that decides "exit here" (None for the last exit)
    head     the head whose class scores the example leaves with
    stop     the control node's `skip` action (0-based; -1 for the last exit)
    go       its action that continues (-1 for the last exit)"""

    control: str | None
    head: str
    stop: int = -1
    go: int = -1


def _output_classes(graph: Graph) -> int | None:
    outputs = graph.outputs
    return outputs[0].out_shape[0] if outputs and len(outputs[0].out_shape) == 1 else None


def _chain(graph: Graph, trainer: str | None) -> tuple[list[Exit], list[float]]:
    """The exits and the cost of exiting at each, or E921 saying why `graph` is no chain: in
    the name of `trainer`, or (None) of the per-exit predictions asked for."""

    def refuse(message: str, help: str) -> D2GraphError:
        if trainer is not None:
            return trainer_error(trainer, message, help=help)
        return D2GraphError([Diagnostic("E921", f"no per-exit predictions: {message}", None, "", help=help)])

    see = "see examples/early_exit.d2: `Q1 => skip | B2` exits through H1 or runs block 2"
    controls = graph.control_nodes
    if not controls:
        raise refuse(f"graph `{graph.name}` has no control node, so it has no exit to choose",
                     help="a multi-exit chain has a control node before each deeper stage; " + see)
    stop, go = {}, {}
    for q in controls:
        actions = " | ".join(a or "skip" for a in q.actions)
        if len(q.actions) != 2 or q.actions.count(None) != 1:
            what = (f"has {len(q.actions)} actions ({actions})" if len(q.actions) != 2 else
                    f"has no `skip` action ({actions})" if None not in q.actions else "has two `skip` actions")
            raise refuse(f"control node `{q.name}` {what}: it is not an exit decision",
                         help="each control node of a multi-exit chain chooses between `skip` (exit "
                              "here) and one node that continues; " + see)
        stop[q.name] = q.actions.index(None)
        go[q.name] = 1 - stop[q.name]
    classes = _output_classes(graph)
    reads = {q.name: current_head(graph, q.name, classes) for q in controls}
    paths = sorted(path_costs(graph), key=lambda p: p[2])
    for q, h in reads.items():
        if h is None:
            raise refuse(f"control node `{q}` reads no exit head: no classifier's scores are "
                         f"known when it decides to exit",
                         help=f"feed the head `{q}` would exit through into it (e.g. `H1 -> {q}`); " + see)
    m = len(controls)
    not_chain = refuse(
        f"graph `{graph.name}` is not a chain of exits: its {len(paths)} static paths are not 'exit at "
        f"the 1st, 2nd, … control node, or run to the end'",
        help="each control node must decide whether to exit or continue to the next one; " + see)
    if len(paths) != m + 1:
        raise not_chain
    order: list[str] = []
    for i, (actions, _, _) in enumerate(paths[:-1]):
        exiting = [q for q, a in actions.items() if a == stop[q]]
        if len(actions) != i + 1 or len(exiting) != 1 or set(actions) - set(exiting) != set(order):
            raise not_chain
        order.append(exiting[0])
    if set(paths[-1][0]) != set(order) or any(a != go[q] for q, a in paths[-1][0].items()):
        raise not_chain
    shallow = [reads[q] for q in order]
    final = [h for h in heads_of(graph) if h not in shallow]
    if len(set(shallow)) != m or len(final) != 1:
        raise refuse(f"the exits of `{graph.name}` are not one head each: the control nodes "
                     f"read {', '.join(shallow)} and the heads not read by any are "
                     f"{', '.join(final) or 'none'}",
                     help="each exit decision reads its own head, and one more head (the last exit) "
                          "answers for the examples that never exit; " + see)
    exits = [Exit(q, reads[q], stop[q], go[q]) for q in order] + [Exit(None, final[0])]
    out = graph.outputs[0]
    for exit, (_, nodes, _) in zip(exits, paths):
        present = [e.source for e in out.inputs if e.source in nodes or e.default is not None]
        if out.merge != "select" or not present or present[0] != exit.head:
            raise refuse(
                f"output `{out.name}` does not answer with `{exit.head}` on the path that exits there",
                help=f"give `{out.name}` [merge=select] and list its heads deepest first, e.g. "
                     f"`{', '.join(e.head for e in reversed(exits))} -> {out.name}`")
    return exits, [float(cost) for _, _, cost in paths]


def exits_of(graph: Graph, trainer: str = "eenet") -> list[Exit]:
    """The exits of a multi-exit chain, shallow → deep: `Exit(control, head, stop, go)`, the
    last one with control None. Raises `trainer_error(trainer, ...)` (E921) naming what is
    missing for a graph of another shape (no `skip` action, a control node with no head to
    read, paths that are not a chain, an output that does not select the exit's head).

    Example:
        >>> [(e.control, e.head) for e in exits_of(d2graph.load("examples/early_exit.d2"))]  # doctest: +SKIP
        [('Q1', 'H1'), ('Q2', 'H2'), (None, 'B3')]
    """
    return _chain(graph, trainer)[0]


def exit_costs(graph: Graph, trainer: str = "eenet") -> list[float]:
    """The cost (the graph's unit) of the static path that exits at each exit, shallow → deep."""
    return _chain(graph, trainer)[1]


def actions_for_exits(exits: Sequence[Exit], exit_index: Tensor | np.ndarray | Sequence[int]) -> dict[str, Tensor]:
    """The forced actions {control: int64 CPU [N]} that make example n leave through exit
    `exit_index[n]` (0-based, shallow → deep): continue before it, `skip` at it. Control
    nodes past the exit do not run; they get `skip` too (mode="force" needs every one).

    Example:
        >>> actions_for_exits(exits_of(graph), [0, 2, 1])                    # doctest: +SKIP
        {'Q1': tensor([0, 1, 1]), 'Q2': tensor([0, 1, 0])}
    """
    index = torch.as_tensor(np.asarray(exit_index), dtype=torch.long).reshape(-1).cpu()
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= len(exits)):
        raise ValueError(f"exit indices must lie in [0, {len(exits)}), not [{int(index.min())}, {int(index.max())}]")
    return {e.control: torch.where(index > k, e.go, e.stop).long()
            for k, e in enumerate(exits) if e.control is not None}


# --- predictions ----------------------------------------------------------------------------


@dataclass
class Predictions:
    """Every exit's softmax on the validation and test splits.

    val_probs     float32 [K, Nv, C]; row k is exit k's class probabilities (shallow → deep)
    test_probs    float32 [K, Nt, C] (Nt may be 0: no test split)
    val_targets   int64 [Nv]
    test_targets  int64 [Nt]
    costs         float64 [K], the cumulative cost of exiting at exit k (any unit; never decreasing)
    exit_names    the K exits' names (the heads, for a graph)
    full_cost     the cost that budgets are fractions of (default: costs[-1], the deepest exit)
    notes         what was done to the data on the way in (e.g. logits softmaxed)
    """

    val_probs: np.ndarray
    test_probs: np.ndarray
    val_targets: np.ndarray
    test_targets: np.ndarray
    costs: np.ndarray
    exit_names: list[str] = field(default_factory=list)
    full_cost: float | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.val_probs = _as_array(self.val_probs, np.float32)
        self.test_probs = _as_array(self.test_probs, np.float32)
        self.val_targets = _as_array(self.val_targets, np.int64)
        self.test_targets = _as_array(self.test_targets, np.int64)
        self.costs = _as_array(self.costs, np.float64)
        if not self.exit_names:
            self.exit_names = [f"exit{k + 1}" for k in range(len(self.costs))]
        self.exit_names = [str(n) for n in self.exit_names]
        if self.full_cost is None and len(self.costs):
            self.full_cost = float(self.costs[-1])
        _validate(self)

    @property
    def exits(self) -> int:
        return self.val_probs.shape[0]

    @property
    def classes(self) -> int:
        return self.val_probs.shape[2]

    @property
    def fractions(self) -> np.ndarray:
        """costs / full_cost: the cost of exiting at each exit as a fraction of the full cost."""
        return self.costs / self.full_cost if self.full_cost else np.zeros_like(self.costs)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(probs [K, N, C], targets [N]) of "val" or "test"."""
        if name not in ("val", "test"):
            raise KeyError(name)
        return getattr(self, f"{name}_probs"), getattr(self, f"{name}_targets")

    def outcome(self, name: str, exit_index: np.ndarray) -> tuple[float, float]:
        """(accuracy, mean cost fraction) of a split when example n leaves at `exit_index[n]`."""
        probs, targets = self.split(name)
        if len(targets) == 0:
            return math.nan, math.nan
        exit_index = np.asarray(exit_index, dtype=np.int64)
        predicted = probs[exit_index, np.arange(len(targets))].argmax(1)
        return float((predicted == targets).mean()), float(self.fractions[exit_index].mean())


def _as_array(value: Any, dtype) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise _error(f"predictions hold a value that is not numeric ({str(e)[:120]})", _LAYOUT_HELP) from None


def _validate(p: Predictions) -> None:
    for name in ("val", "test"):
        probs, targets = p.split(name)
        if probs.ndim != 3:
            raise _error(f"{name} probabilities have shape {list(probs.shape)}, not [exits, examples, classes]",
                         _LAYOUT_HELP)
        if targets.ndim != 1 or len(targets) != probs.shape[1]:
            raise _error(f"{name} targets have shape {list(targets.shape)} for {probs.shape[1]} examples",
                         "give one integer label per example of the split: [N]")
        if not np.isfinite(probs).all():
            raise _error(f"{name} probabilities hold NaN or infinite values",
                         "recompute the predictions; a diverged backbone gives NaN scores")
        if len(targets) and (targets.min() < 0 or targets.max() >= probs.shape[2]):
            raise _error(f"{name} targets lie in [{targets.min()}, {targets.max()}], outside [0, {probs.shape[2]})",
                         "targets are class indices, one per example, below the number of classes")
    k, c = p.val_probs.shape[0], p.val_probs.shape[2]
    if p.test_probs.shape[0] != k or (p.test_probs.shape[2] != c and p.test_probs.shape[1]):
        raise _error(f"validation has {k} exits × {c} classes but test has {p.test_probs.shape[0]} × "
                     f"{p.test_probs.shape[2]}", "both splits come from the same network: same exits, same classes")
    if p.val_probs.shape[1] == 0:
        raise _error("the validation split is empty", "policies are fitted on validation: it needs examples")
    if c < 2:
        raise _error(f"the predictions have {c} class", "a classifier needs at least two classes")
    if p.costs.ndim != 1 or len(p.costs) != k:
        raise _error(f"{len(p.costs.reshape(-1))} exit costs for {k} exits",
                     "give the cumulative cost of exiting at each exit, one number per exit, shallow first")
    if not np.isfinite(p.costs).all() or (p.costs < 0).any() or (np.diff(p.costs) < 0).any():
        raise _error(f"exit costs {p.costs.tolist()} are not non-negative and non-decreasing",
                     "costs are cumulative: the cost of exiting at exit k includes every earlier stage")
    if not (p.full_cost and math.isfinite(p.full_cost) and p.full_cost > 0):
        raise _error(f"the full cost {p.full_cost} is not a positive number",
                     "budgets are fractions of the full cost; give positive costs")
    if len(p.exit_names) != k:
        raise _error(f"{len(p.exit_names)} exit names for {k} exits", "give one name per exit, or none")


def _to_probabilities(scores: np.ndarray, what: str, notes: list[str]) -> np.ndarray:
    """Probabilities as they are; anything else is taken for logits and softmaxed (noted)."""
    if scores.size == 0:
        return scores
    if (scores >= 0).all() and (scores <= 1 + _SUM_TOLERANCE).all() and \
            np.abs(scores.sum(-1, dtype=np.float64) - 1).max() <= _SUM_TOLERANCE:
        return scores
    notes.append(f"{what}: the scores do not sum to 1 over the classes, so they were taken for logits and "
                 f"softmaxed")
    return torch.from_numpy(scores).double().softmax(-1).float().numpy()


# --- from a compiled graph ------------------------------------------------------------------


def head_probs(result: Result, heads: Sequence[str]) -> Tensor:
    """The heads' softmax from a mode="all" result that kept them: float32 CPU [K, B, C].
    float64 softmax, stored as float32: the same numbers for fitting and for deciding."""
    parts = []
    for h in heads:
        index, scores = result.values[h]
        probs = torch.zeros((result.batch_size, scores.shape[1]), dtype=torch.float32)
        probs[index.cpu()] = scores.detach().double().softmax(1).float().cpu()
        parts.append(probs)
    return torch.stack(parts)


def from_executor(executor: Executor, splits, batch: int = 256,
                  which: Iterable[str] = ("val", "test"), trainer: str | None = None) -> Predictions:
    """The predictions of every exit of `executor`'s multi-exit chain on `splits` (a
    `d2graph.data.Splits`, or anything with `.val` / `.test` TensorDatasets): one mode="all"
    pass per batch, keeping only the heads; costs from the static paths. A split left out
    of `which` is empty (N = 0). E921 when the graph is not a multi-exit chain (in the name
    of `trainer` when one asks for the predictions).

    Example:
        >>> pred = from_executor(trained.executor, trained.data)              # doctest: +SKIP
        >>> pred.val_probs.shape, pred.fractions                              # doctest: +SKIP
    """
    graph = executor.graph
    exits, costs = _chain(graph, trainer)
    heads = [e.head for e in exits]
    param = next(executor.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else None
    which = set(which)
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with evaluating(executor):
        for name in ("val", "test"):
            if name not in which:
                classes = _output_classes(graph) or 2
                arrays[name] = (np.zeros((len(heads), 0, classes), np.float32), np.zeros(0, np.int64))
                continue
            x_all, y_all = getattr(splits, name).tensors[:2]
            probs, targets = [], []
            for start in range(0, len(y_all), batch):
                x = x_all[start:start + batch].to(device)
                if x.is_floating_point() and dtype is not None:
                    x = x.to(dtype)
                probs.append(head_probs(executor(x, mode="all", keep=heads), heads))
                targets.append(y_all[start:start + batch].cpu())
            arrays[name] = (torch.cat(probs, 1).numpy(), torch.cat(targets).numpy())
    return Predictions(arrays["val"][0], arrays["test"][0], arrays["val"][1], arrays["test"][1],
                       np.array(costs), heads, float(graph.full_cost))


# --- files ----------------------------------------------------------------------------------


def save(pred: Predictions, folder: str | Path) -> Path:
    """Write `pred` to `folder` (created if needed) in the MSDNet / EENet layout: the
    probabilities and targets in logits_single.pth, the cumulative exit costs in flops.pth,
    and costs.json (costs, full cost, exit names). Each file is written atomically.

    Example:
        >>> save(pred, "preds/early_exit")                                    # doctest: +SKIP
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = (torch.from_numpy(pred.val_probs), torch.from_numpy(pred.val_targets),
            torch.from_numpy(pred.test_probs), torch.from_numpy(pred.test_targets))
    with atomic_path(folder / LOGITS_FILE) as tmp:
        torch.save(data, tmp)
    with atomic_path(folder / FLOPS_FILE) as tmp:
        torch.save([float(c) for c in pred.costs], tmp)
    write_atomic(folder / COSTS_FILE, json.dumps({"costs": [float(c) for c in pred.costs],
                                                  "full_cost": float(pred.full_cost),
                                                  "exit_names": list(pred.exit_names)}, indent=2) + "\n")
    return folder


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _error(f"{path} is damaged or holds more than tensors and numbers ({first[:160]})",
                     "it is read with torch.load(weights_only=True): save plain tensors, lists and dicts; "
                     + _LAYOUT_HELP) from None


def _read_costs(folder: Path, k: int) -> tuple[list[float], float | None, list[str]]:
    """(costs, full cost or None, exit names or []) from costs.json, flops.pth or seconds.csv."""
    if (folder / COSTS_FILE).is_file():
        path = folder / COSTS_FILE
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
            costs = spec["costs"] if isinstance(spec, dict) else spec
            full = spec.get("full_cost") if isinstance(spec, dict) else None
            names = spec.get("exit_names", []) if isinstance(spec, dict) else []
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise _error(f"{path} is not JSON with a \"costs\" list ({str(e)[:120]})",
                         '{"costs": [c1, ..., cK]} with the cumulative cost of each exit') from None
    elif (folder / FLOPS_FILE).is_file():
        path = folder / FLOPS_FILE
        costs, full, names = _torch_load(path), None, []
    elif (folder / SECONDS_FILE).is_file():
        path = folder / SECONDS_FILE
        try:
            lines = [line.split(",")[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
            costs, full, names = [float(v) for v in lines if v], None, []
        except (ValueError, UnicodeDecodeError) as e:
            raise _error(f"{path} is not one number per line ({str(e)[:120]})",
                         "seconds.csv holds the cumulative latency of each exit, one per line") from None
    else:
        raise _error(f"{folder} has no exit costs ({COSTS_FILE}, {FLOPS_FILE} or {SECONDS_FILE})", _LAYOUT_HELP)
    if isinstance(costs, Tensor):
        costs = costs.reshape(-1).tolist()
    if not isinstance(costs, (list, tuple)) or not all(
            isinstance(c, (int, float)) and not isinstance(c, bool) for c in costs):
        raise _error(f"{path} does not hold a list of numbers", "give the cumulative cost of each exit, shallow first")
    if len(costs) != k:
        raise _error(f"{path} gives {len(costs)} exit costs but the predictions have {k} exits",
                     "one cumulative cost per exit, in the order of the exits (shallow first)")
    if full is not None and not isinstance(full, (int, float)):
        raise _error(f"{path}: full_cost is not a number", "give the cost of the whole network, or leave it out")
    return [float(c) for c in costs], full, list(names)


def load(folder: str | Path) -> Predictions:
    """Read a predictions folder (see the module docstring for the layout) with
    `weights_only=True`. Every mistake is a D2GraphError E924 with a hint; scores that are
    not probabilities are softmaxed, with a line in `notes`.

    Example:
        >>> pred = load("outputs/resnet56_3_None_cifar10")                    # doctest: +SKIP
        >>> pred.exits, pred.classes, pred.costs                              # doctest: +SKIP
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise _error(f"no predictions folder {folder}", _LAYOUT_HELP)
    path = folder / LOGITS_FILE
    if not path.is_file():
        raise _error(f"{folder} has no {LOGITS_FILE}", _LAYOUT_HELP)
    data = _torch_load(path)
    keys = ("val_probs", "val_targets", "test_probs", "test_targets")
    if isinstance(data, Mapping) and all(key in data for key in keys):
        data = tuple(data[key] for key in keys)
    if not isinstance(data, (tuple, list)) or len(data) != 4 or not all(isinstance(t, Tensor) for t in data):
        raise _error(f"{path} does not hold four tensors (val_probs, val_targets, test_probs, test_targets)",
                     _LAYOUT_HELP)
    val_probs, val_targets, test_probs, test_targets = (t.detach().cpu() for t in data)
    for name, t in (("val_targets", val_targets), ("test_targets", test_targets)):
        if t.is_floating_point() and not bool(torch.all(t == t.round())):
            raise _error(f"{path}: {name} are not whole numbers", "targets are class indices, one per example")
    if val_probs.ndim != 3 or test_probs.ndim != 3:
        raise _error(f"{path}: the probabilities have shapes {list(val_probs.shape)} and {list(test_probs.shape)}, "
                     f"not [exits, examples, classes]", _LAYOUT_HELP)
    if not (torch.isfinite(val_probs).all() and torch.isfinite(test_probs).all()):
        raise _error(f"{path}: the probabilities hold NaN or infinite values",
                     "recompute the predictions; a diverged backbone gives NaN scores")
    notes: list[str] = []
    val = _to_probabilities(val_probs.float().numpy(), "validation", notes)
    test = _to_probabilities(test_probs.float().numpy(), "test", notes)
    costs, full, names = _read_costs(folder, val.shape[0])
    return Predictions(val, test, val_targets.long().numpy(), test_targets.long().numpy(), np.array(costs),
                       names, full, notes)

"""The IR: a checked dynamic network as immutable data — names, kinds, edges, shapes, costs.

In:  built only by `d2graph.check` from an AST that passed every rule.
Out: read by the executor, the renderer, trainers and `d2graph check --ir`.
Guarantees: frozen; holds no torch modules (layers are names + bound arguments, built
by `d2graph.layers`); `nodes` is in a topological order of data and control edges;
costs are per example in the graph's cost unit (multiply-accumulates unless a node
declares `cost=`); `str(graph)` prints one line per node and is stable (golden tests);
`lint()` re-checks the invariants and raises `ValueError` listing any that fail.

Example:
    >>> g = d2graph.load("examples/high_low.d2")     # doctest: +SKIP
    >>> g["Q1"].actions
    ('N2', 'N3')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import networkx as nx

from .diagnostics import Diagnostic, Span, span_field
from .schema import format_value

Shape = tuple[int, ...]

# The most parameters (elements) a graph may have for d2graph to build it: the checker
# warns above it (W604) and `compile` refuses (E926). 2^31 parameters are 8 GiB of
# float32 weights, and training keeps about three times that (gradients, Adam's moments).
MAX_PARAMS = 1 << 31

KINDS = ("input", "output", "node", "control", "dummy")
MERGES = ("sum", "concat", "select")


@dataclass(frozen=True)
class Layer:
    """One layer of a node's pipeline: its name, bound arguments (defaults filled, in
    schema order), input and output shape per example, its cost per example and its
    number of parameters (elements)."""

    name: str
    args: tuple[tuple[str, Any], ...]
    in_shape: Shape
    out_shape: Shape
    cost: int = 0
    params: int = 0
    written: str = field(default="", compare=False)  # canonical call, constants filled in: fc(10)
    span: Span = span_field()

    @property
    def kwargs(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.args}

    def summary(self) -> str:
        return self.written or self.name


@dataclass(frozen=True)
class DataEdge:
    source: str
    target: str
    default: float | None = None  # the fill value when the source does not run
    span: Span = span_field()


@dataclass(frozen=True)
class ControlEdge:
    source: str
    action: int  # 0-based; messages and drawings number actions from 1
    target: str | None  # None for `skip`
    span: Span = span_field()


@dataclass(frozen=True)
class Node:
    name: str
    kind: str  # one of KINDS
    layers: tuple[Layer, ...] = ()
    merge: str = "sum"
    in_shape: Shape | None = None  # after merging the data inputs; None for input/dummy
    out_shape: Shape = ()
    cost: int | float = 0
    cost_declared: bool = False
    inputs: tuple[DataEdge, ...] = ()  # incoming data edges, in declaration order
    controllers: tuple[ControlEdge, ...] = ()  # incoming control edges
    actions: tuple[str | None, ...] = ()  # a control node's targets, one per action
    span: Span = span_field()
    tokens: bool = False  # an input of integer token ids (`input x tokens [T]`), 0 = padding

    @property
    def is_control(self) -> bool:
        return self.kind == "control"

    def summary(self) -> str:
        return ", ".join(layer.summary() for layer in self.layers)

    @property
    def params(self) -> int:
        """Parameters of the node's layers (elements; 4 bytes each in float32)."""
        return sum(layer.params for layer in self.layers)


@dataclass(frozen=True)
class TrainStage:
    name: str
    trainer: str
    args: tuple[tuple[str, Any], ...]
    span: Span = span_field()


@dataclass(frozen=True)
class TrainConfig:
    """The resolved `train { }` block: the data set call, other settings, the stages."""

    data: tuple[str, tuple[tuple[str, Any], ...]] | None
    settings: tuple[tuple[str, Any], ...]
    stages: tuple[TrainStage, ...]
    span: Span = span_field()


@dataclass(frozen=True)
class Graph:
    name: str
    nodes: tuple[Node, ...]
    data_edges: tuple[DataEdge, ...]
    control_edges: tuple[ControlEdge, ...]
    train: TrainConfig | None = None
    warnings: tuple[Diagnostic, ...] = field(default=(), compare=False, repr=False)
    span: Span = span_field()

    # --- lookup -----------------------------------------------------------------------

    def __getitem__(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def __contains__(self, name: str) -> bool:
        return any(n.name == name for n in self.nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def of_kind(self, kind: str) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.kind == kind)

    @property
    def inputs(self) -> tuple[Node, ...]:
        return self.of_kind("input")

    def vocab(self, name: str) -> int:
        """The number of token ids token input `name` may hold: the smallest `vocab` of the
        embeddings that read it (the checker makes every reader start with one, E833).

        Example:
            >>> d2graph.load("examples/bert_early_exit.d2").vocab("ids")   # doctest: +SKIP
            64
        """
        return min(dict(n.layers[0].args)["vocab"] for n in self.nodes
                   if n.layers and any(e.source == name for e in n.inputs))

    @property
    def outputs(self) -> tuple[Node, ...]:
        return self.of_kind("output")

    @property
    def control_nodes(self) -> tuple[Node, ...]:
        return self.of_kind("control")

    @property
    def params(self) -> int:
        """Parameters of every node together (elements; 4 bytes each in float32)."""
        return sum(n.params for n in self.nodes)

    @property
    def full_cost(self) -> int | float:
        """The cost of one example when every node runs."""
        return sum(n.cost for n in self.nodes)

    def to_networkx(self) -> nx.DiGraph:
        """Data and control edges as one DiGraph (edge attribute `kind`)."""
        g = nx.DiGraph()
        for n in self.nodes:
            g.add_node(n.name, kind=n.kind)
        for e in self.data_edges:
            g.add_edge(e.source, e.target, kind="data", default=e.default)
        for c in self.control_edges:
            if c.target is not None:
                g.add_edge(c.source, c.target, kind="control", action=c.action)
        return g

    # --- printing -----------------------------------------------------------------------

    def __str__(self) -> str:
        lines = [f"graph {self.name}  # cost per example; full cost {exact_cost(self.full_cost)}"]
        width = max((len(n.name) for n in self.nodes), default=1)
        for n in self.nodes:
            parts = [f"{n.kind:<7} {n.name:<{width}}"]
            if n.inputs:
                ins = ", ".join(e.source + ("" if e.default is None else f" [default={format_value(e.default)}]")
                                for e in n.inputs)
                parts.append(f"in: {ins}")
                if len(n.inputs) > 1 or n.merge != "sum":
                    parts.append(f"merge: {n.merge}")
            if n.controllers:
                parts.append("when: " + " or ".join(f"{c.source}={c.action + 1}" for c in n.controllers))
            if n.actions:
                parts.append("actions: " + " | ".join(a or "skip" for a in n.actions))
            parts.append(f"shape: {list(n.out_shape)}" + (" tokens" if n.tokens else ""))
            if n.kind not in ("input", "output"):
                parts.append(f"cost: {exact_cost(n.cost)}" + (" (declared)" if n.cost_declared else ""))
            if n.layers:
                parts.append(f"layers: {n.summary()}")
            lines.append("  " + "  ".join(parts))
        if self.train is not None:
            t = self.train
            if t.data:
                lines.append(f"  train data: {_call_text(*t.data)}")
            for k, v in t.settings:
                lines.append(f"  train {k}: {format_value(v)}")
            for s in t.stages:
                lines.append(f"  stage {s.name}: {_call_text(s.trainer, s.args)}")
        return "\n".join(lines)

    # --- invariants ---------------------------------------------------------------------

    def lint(self) -> None:
        """Re-check the invariants the checker guarantees; raise ValueError if any fail."""
        problems: list[str] = []
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            problems.append("node names are not unique")
        known = set(names)
        kind = {n.name: n.kind for n in self.nodes}
        position = {name: i for i, name in enumerate(names)}
        for e in self.data_edges:
            if e.source not in known or e.target not in known:
                problems.append(f"data edge {e.source} -> {e.target} names an unknown node")
                continue
            if position[e.source] >= position[e.target]:
                problems.append(f"nodes are not in topological order at {e.source} -> {e.target}")
            if kind[e.source] in ("control", "output"):
                problems.append(f"{kind[e.source]} node {e.source} has an outgoing data edge")
            if kind[e.target] in ("input", "dummy"):
                problems.append(f"{kind[e.target]} node {e.target} has a data input")
        for c in self.control_edges:
            if c.source not in known or (c.target is not None and c.target not in known):
                problems.append(f"control edge {c.source} => {c.target} names an unknown node")
                continue
            if kind[c.source] != "control":
                problems.append(f"{c.source} emits control but is a {kind[c.source]} node")
            if c.target is not None and position[c.source] >= position[c.target]:
                problems.append(f"nodes are not in topological order at {c.source} => {c.target}")
        inputs, controllers, actions = edges_by_node(self.data_edges, self.control_edges)
        for n in self.nodes:
            if n.kind not in KINDS:
                problems.append(f"{n.name} has an unknown kind {n.kind!r}")
            if n.merge not in MERGES:
                problems.append(f"{n.name} has an unknown merge {n.merge!r}")
            if n.inputs != tuple(inputs.get(n.name, ())):
                problems.append(f"{n.name}.inputs disagrees with the data edges")
            if n.controllers != tuple(controllers.get(n.name, ())):
                problems.append(f"{n.name}.controllers disagrees with the control edges")
            if n.kind in ("node", "control", "output") and not n.inputs:
                problems.append(f"{n.name} has no data input")
            if n.kind == "control":
                if n.controllers:
                    problems.append(f"control node {n.name} is itself controlled (R3)")
                own = tuple(actions.get(n.name, ()))
                if own != n.actions or not n.actions:
                    problems.append(f"{n.name}.actions disagrees with its control edges")
                if n.out_shape != (len(n.actions),):
                    problems.append(f"{n.name} emits {list(n.out_shape)} scores for {len(n.actions)} actions")
            if n.cost < 0:
                problems.append(f"{n.name} has a negative cost")
            if any(d <= 0 for d in n.out_shape) or not n.out_shape:
                problems.append(f"{n.name} has an invalid shape {list(n.out_shape)}")
            if n.layers and n.layers[-1].out_shape != n.out_shape:
                problems.append(f"{n.name}'s last layer shape disagrees with the node's shape")
        if problems:
            raise ValueError("IR invariants violated:\n- " + "\n- ".join(problems))


def edges_by_node(data_edges, control_edges) -> tuple[dict[str, list[DataEdge]], dict[str, list[ControlEdge]],
                                                     dict[str, list[str | None]]]:
    """The edges grouped once (a per-node scan would be quadratic): each node's incoming data
    edges, each node's incoming control edges, and each control node's action targets in order."""
    inputs: dict[str, list[DataEdge]] = {}
    controllers: dict[str, list[ControlEdge]] = {}
    actions: dict[str, list[str | None]] = {}
    for e in data_edges:
        inputs.setdefault(e.target, []).append(e)
    for c in control_edges:
        controllers.setdefault(c.target, []).append(c)
        actions.setdefault(c.source, []).append(c.target)
    return inputs, controllers, actions


def _call_text(name: str, args: tuple[tuple[str, Any], ...]) -> str:
    inner = ", ".join(f"{k}={format_value(v)}" for k, v in args)
    return f"{name}({inner})"


def exact_cost(cost: int | float) -> str:
    return f"{cost:,}" if isinstance(cost, int) else f"{cost:g}"


def describe_params(params: int) -> str:
    """2147483648 → '2,147,483,648 parameters (8 GiB in float32)'."""
    size = params * 4.0
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            break
        size /= 1024
    return f"{params:,} parameters ({size:.3g} {unit} in float32)"


def format_cost(cost: int | float) -> str:
    """12345678 → '12.3M'; costs read at a glance in labels and tables."""
    cost = float(cost)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(cost) >= scale:
            return f"{cost / scale:.3g}{unit}"
    return f"{cost:.4g}"

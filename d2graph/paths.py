"""Facts about a graph's paths, read from the IR: heads, static paths and their costs, action orders.

In:  a checked `Graph` (the IR). Nothing here builds an executor or draws a random number.
Out: the analyses that trainers, evaluation, predictions and benchmarks share:
       heads(graph)              the function nodes that feed an output directly
       nodes_run(graph, actions) the nodes one example runs under constant actions
       static_paths(graph)       every distinct static path (constant actions), dearest first
       answering_head(graph, n)  the head whose scores are the output when the nodes n run
       path_costs(graph)         the static paths with their cost per example
       action_order(graph)       each control node's actions, cheapest first
       current_head(graph, q)    the classifier a control node can read when it decides
       route_dependent(graph)    the nodes whose value depends on the route an example takes
       parameter_count(graph, n) how many weights node n's layers have (built on the meta device)
Guarantees:
  - `nodes_run` applies the executor's routing rule (LANGUAGE.md §3.1: a node runs where it
    is activated by a chosen action and its inputs without a default are present; a
    `select` merge needs one input present) to one example whose control nodes take
    constant actions. tests/test_layers.py checks it, and the costs below, against
    `executor.route` on every example graph.
  - A path's cost is the sum of the IR costs of its nodes, which is what the executor
    charges an example that takes it (`Result.cost`).
  - No function here consumes torch's random streams, so calling one never changes what a
    seeded run does next.

Vocabulary (docs/trainers.md):
  head          a function node whose output feeds an output node directly: an exit or a
                branch classifier (`heads(graph)`).
  current head  of a control node: the classifier whose scores it can see when it decides
                (`current_head(graph, q)`), which threshold rules read.
  route-dependent  a node whose value on an example is not the one a pass of every node
                (mode="all") gives it: it runs on some route without one of its inputs.
  action order  of a control node: its actions from cheapest to dearest, priced by the
                cheapest path that takes each (`action_order(graph)`); the first is "stop".

Example:
    >>> g = d2graph.load("examples/high_low.d2")                     # doctest: +SKIP
    >>> [(actions, cost) for actions, _, cost in path_costs(g)]      # doctest: +SKIP
    [({'Q1': 1}, 41472), ({'Q1': 0}, 6272)]
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Mapping

import networkx as nx
import torch

from .ir import Graph, Node
from .layers import build_layer

__all__ = ["MAX_COMBINATIONS", "MAX_PATHS", "action_order", "current_head", "heads", "nodes_run",
           "parameter_count", "path_costs", "route_dependent", "static_paths"]

MAX_PATHS = 32  # distinct static paths `static_paths` keeps by default
MAX_COMBINATIONS = 4096  # action combinations tried to find them


def heads(graph: Graph) -> list[str]:
    """The function nodes that feed an output node directly, in the order of the output's
    edges (an output with `merge=select` lists the deepest exit first in our examples)."""
    found: list[str] = []
    for out in graph.outputs:
        for edge in out.inputs:
            if graph[edge.source].kind == "node" and edge.source not in found:
                found.append(edge.source)
    return found


def answering_head(graph: Graph, nodes) -> str | None:
    """The head whose scores are the graph's (first) output when exactly `nodes` run: with
    `merge=select`, the first of the output's inputs that runs; with another merge, the one
    input that runs; None when the output reads several (or no) heads on that path.

    Example:
        >>> g = d2graph.load("examples/early_exit.d2")                         # doctest: +SKIP
        >>> answering_head(g, nodes_run(g, {"Q1": 1, "Q2": 0}))                 # doctest: +SKIP
        'H2'
    """
    out, ran = graph.outputs[0], set(nodes)
    present = [e.source for e in out.inputs if graph[e.source].kind == "node" and e.source in ran]
    if out.merge == "select":
        return present[0] if present else None
    return present[0] if len(present) == 1 else None


def nodes_run(graph: Graph, actions: Mapping[str, int]) -> tuple[str, ...]:
    """The nodes (inputs and outputs left out), in graph order, that run for an example
    whose control nodes take `actions` (a control node not named takes action 0).

    Example:
        >>> nodes_run(d2graph.load("examples/high_low.d2"), {"Q1": 0})  # doctest: +SKIP
        ('N1', 'Q1', 'L1')
    """
    ran: set[str] = set()
    for node in graph.nodes:
        if _runs(node, ran, actions):
            ran.add(node.name)
    return tuple(n.name for n in graph.nodes if n.name in ran and n.kind not in ("input", "output"))


def _runs(node: Node, ran: set[str], actions: Mapping[str, int]) -> bool:
    # The executor's `_rows_for` on one example: activated ∩ inputs present.
    if node.controllers and not any(c.source in ran and actions.get(c.source, 0) == c.action
                                    for c in node.controllers):
        return False
    if node.merge == "select":
        return any(e.default is not None or e.source in ran for e in node.inputs)
    return all(e.source in ran for e in node.inputs if e.default is None)


def static_paths(graph: Graph, max_paths: int = MAX_PATHS) -> list[tuple[dict[str, int], tuple[str, ...]]]:
    """The distinct static paths of a graph, dearest first: (constant actions, the nodes that
    run). Each combination of actions (up to MAX_COMBINATIONS of them) is routed once;
    combinations that run the same nodes are one path, described by the actions of the
    control nodes that ran. Beyond `max_paths` paths, the cheapest, the dearest and paths
    evenly spread in cost between them are kept."""
    controls = graph.control_nodes
    seen: dict[frozenset[str], tuple[dict[str, int], tuple[str, ...]]] = {}
    combinations = itertools.product(*(range(len(q.actions)) for q in controls))
    for combination in itertools.islice(combinations, MAX_COMBINATIONS):
        actions = dict(zip((q.name for q in controls), combination))
        ran = nodes_run(graph, actions)
        key = frozenset(ran)
        if key not in seen:
            seen[key] = ({q: a for q, a in actions.items() if q in key}, ran)
    cost = {n.name: n.cost for n in graph.nodes}
    paths = sorted(seen.values(), key=lambda path: -sum(cost[name] for name in path[1]))
    if len(paths) > max_paths:
        keep = sorted({round(i * (len(paths) - 1) / (max_paths - 1)) for i in range(max_paths)})
        paths = [paths[i] for i in keep]
    return paths


def path_costs(graph: Graph) -> list[tuple[dict[str, int], tuple[str, ...], float]]:
    """The static paths of the graph (`static_paths`, dearest first) with their cost per
    example: (the actions of the control nodes that run, the nodes that run, cost)."""
    return [(dict(actions), nodes, cost) for actions, nodes, cost in _path_costs(graph)]


@functools.lru_cache(maxsize=16)
def _path_costs(graph: Graph) -> tuple:
    cost = {n.name: n.cost for n in graph.nodes}
    return tuple((actions, nodes, sum(cost[n] for n in nodes)) for actions, nodes in static_paths(graph))


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


def current_head(graph: Graph, control: str, classes: int | None = None) -> str | None:
    """The classifier a control node can read when it decides, or None.

    1. Among the control node's own data inputs, the last one that is (or is computed
       from) class scores: a head, or a function node with `classes` outputs, not an input
       that happens to be as wide (`early_exit.d2`'s Q2 reads H1 and H2: H2 is current).
    2. Otherwise the head that runs on exactly the examples the control node runs on and
       does not depend on its decision, latest in the graph's order (`cascade.d2`: Q1
       reads features of N1; N2, the stage's classifier, is current).
    Route-dependent nodes (`route_dependent`) are never current heads."""
    q = graph[control]
    # A head whose value depends on the route (it reads a merge of branches) is not one a rule
    # can read: its confidence in a pass of every node is not the one the example meets.
    dependent = route_dependent(graph)
    head_names = [h for h in heads(graph) if h not in dependent]
    for edge in reversed(q.inputs):
        src = graph[edge.source]
        if edge.source in dependent:
            continue
        if edge.source in head_names or (classes is not None and src.kind == "node" and src.out_shape == (classes,)):
            return edge.source
    after_q = nx.descendants(graph.to_networkx(), control)
    paths = path_costs(graph)
    with_q = [set(nodes) for _, nodes, _ in paths if control in nodes]
    without_q = [set(nodes) for _, nodes, _ in paths if control not in nodes]
    order = [n.name for n in graph.nodes]
    candidates = [h for h in head_names if h not in after_q
                  and all(h in p for p in with_q) and not any(h in p for p in without_q)]
    return max(candidates, key=order.index) if candidates else None


def route_dependent(graph: Graph) -> frozenset[str]:
    """The nodes whose value on an example can differ from the one a pass of every node
    (executor mode="all") computes: a node that runs on some route without one of its inputs
    (an input with a default, or one input of a `select` merge), and every node computed
    from one. Elsewhere a node's inputs, hence its value, are the same on every route it runs
    on, so a pass of every node reads it right for every example.

    Example:
        >>> sorted(route_dependent(d2graph.load("examples/chain.d2")))   # doctest: +SKIP
        ['N10', 'N4', 'N5', 'N6', 'N7', 'N8', 'N9', 'Q2', 'Q3', 'y']
    """
    return _route_dependent(graph)


@functools.lru_cache(maxsize=16)
def _route_dependent(graph: Graph) -> frozenset[str]:
    inputs = {n.name for n in graph.nodes if n.kind == "input"}
    # Every distinct route within MAX_COMBINATIONS, not only the MAX_PATHS kept for pricing.
    routes = [set(ran) | inputs for _, ran in static_paths(graph, max_paths=MAX_COMBINATIONS)]
    dependent: set[str] = set()
    for node in graph.nodes:  # graph order is topological: a node's inputs come first
        if any(e.source in dependent for e in node.inputs) or any(
                node.name in ran and any(e.source not in ran for e in node.inputs) for ran in routes):
            dependent.add(node.name)
    return frozenset(dependent)


def parameter_count(graph: Graph, name: str) -> int:
    """The number of weights (parameters) of node `name`'s layers, as compiled.

    The layers are built on the meta device: no memory, no initialisation, no random
    number drawn. A `module(...)` layer is the user's class, built as the checker built it.

    Example:
        >>> parameter_count(d2graph.load("examples/high_low.d2"), "Q1")   # doctest: +SKIP
        66
    """
    with torch.device("meta"):
        return sum(w.numel() for layer in graph[name].layers
                   for w in build_layer(layer.name, layer.kwargs, layer.in_shape).parameters())

"""The executor: a checked graph compiled into an `nn.Module` that routes each example.

In:  a `Graph` from `d2graph.load` / `d2graph.check` (frozen IR, nodes in topological order).
Out: `compile(graph)` → `Executor`, an `nn.Module` holding one `Pipeline` (an `nn.Sequential`) per node that
     has layers, keyed by the node's name (`executor.nodes["N1"]`, state_dict keys
     `nodes.N1.0.weight`). It is built on the CPU in float32; `.to(device / dtype)`,
     `.train()` / `.eval()` and `state_dict()` work as for any module.
     Calling it, `executor(x, mode=..., ...)`, runs one batch and returns a `Result`:
     the outputs for the whole batch, the per-example cost, which nodes ran for which
     examples, every control node's scores and chosen actions, the log-probabilities of
     sampled actions, and (on request, `keep=`) intermediate node outputs.

Modes (how control nodes choose; LANGUAGE.md §3.4 leaves that to the caller):
    argmax   inference: the action with the highest score.
    force    the actions given in `actions={control: int | LongTensor[B]}` (0-based);
             control nodes missing from the dict take the argmax.
    explore  ε-greedy: a uniformly random action with probability `epsilon`, else argmax.
    sample   an action drawn from softmax(scores); `Result.log_probs` keeps its
             log-probability (differentiable, for REINFORCE).
    all      every node runs on every example (supervised training of every head, or
             what each action would cost); control nodes still compute their scores and
             report their argmax, but routing ignores them.
`explore` and `sample` draw from `generator` when one is given (on its own device).

Guarantees:
  - Semantics of LANGUAGE.md §3, per example: a node runs iff (it has no incoming control
    edge or one of them is activated) and every data input is present (the source ran,
    or the edge has a default, which then stands in as a tensor of the source's shape);
    `merge=select` runs when any input is present and takes the first present one in
    declaration order, for each example separately. Null propagates. Outputs have a value
    for every example (the checker's totality rule R7; checked again here, for free).
  - Routing works on compact row subsets: each node runs on the examples that reach it
    only, gathered with `index_select` and merged with `index_copy_` into fresh tensors;
    no boolean-mask indexing and no full-batch `torch.where` on data. A node that no
    example reaches is not called at all; a node that every example reaches runs on the
    full-batch tensors without a copy.
  - The sets of examples are kept on the host (CPU index tensors), so their sizes, unions
    and intersections never wait for the device: at most one host synchronisation per
    control node (reading its actions back), none in `all` mode or for actions forced as
    ints or CPU tensors. Index tensors travel to the GPU through pinned memory,
    asynchronously.
  - `Result.cost` is the exact sum of the costs of the nodes that ran for each example,
    accumulated with integers (float64 if a node declares a fractional `cost=`). When no
    node declares `cost=`, its sum over the batch equals FlopCounterMode's FLOPs / 2 for
    the same forward pass.
  - Token inputs (`input x tokens [T]`): a node downstream of the token input whose layers
    ignore padding (`attention`, `transformer`, `pool_tokens(mean)`) gets the padding mask
    (ids == 0) of exactly the examples it runs on, gathered like its data; so an example's
    result does not depend on the other examples of its batch.
  - Gradients flow through every node that ran, and through `scores` and `log_probs`.
    Works in train and eval mode, under `torch.inference_mode()`, in float32 and bfloat16.

The forward pass is an interpreter in the style of torch.fx's `Interpreter`: one method
per node kind (`run_input`, `run_node`, `run_control`, `run_dummy`, `run_output`), called
for each node of `graph.nodes` in order.

Example:
    >>> import torch, d2graph
    >>> from d2graph.executor import compile
    >>> executor = compile(d2graph.load("examples/high_low.d2")).eval()   # doctest: +SKIP
    >>> result = executor(torch.randn(8, 1, 32, 32))                      # doctest: +SKIP
    >>> result.output.shape, result.actions["Q1"], result.cost_fraction   # doctest: +SKIP
    >>> executor(x, mode="force", actions={"Q1": 1}).cost                 # doctest: +SKIP
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, reduce
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .diagnostics import D2GraphError, Diagnostic
from .ir import MAX_PARAMS, DataEdge, Graph, Node, describe_params
from .layers import PAD_ID, Pipeline, build_layer

MODES = ("argmax", "force", "explore", "sample", "all")

__all__ = ["MODES", "Executor", "Interpreter", "Result", "Rows", "compile", "require_buildable", "route"]


# --- sets of examples ---------------------------------------------------------------------


class Rows:
    """A sorted set of example indices of one batch, held on the host.

    `index` is a sorted int64 numpy array, or None for every example of the batch. Sets
    live on the host so that their sizes (which decide whether a node is called, and on
    how many rows) are known without waiting for the device; numpy because these arrays
    are small and its calls cost a microsecond where torch's cost several. The device
    copy is made once, on first use.

    A set made by splitting another by a control node's actions remembers that set
    (`_parent`), its positions in it (`_in_parent`) and its sibling parts (`_parts`,
    pairwise disjoint): unions, intersections and gathers across the branches of one
    decision — the usual merge after a branch — then need no set arithmetic at all."""

    __slots__ = ("batch", "index", "n", "_mask", "_device_index", "_parent", "_in_parent", "_parts")

    def __init__(self, batch: int, index: np.ndarray | None, parent: Rows | None = None,
                 in_parent: np.ndarray | None = None, parts: list[Rows] | None = None):
        self.batch = batch
        self.index = index
        self.n = batch if index is None else len(index)
        self._mask: np.ndarray | None = None
        self._device_index: Tensor | None = None
        self._parent = parent
        self._in_parent = in_parent
        self._parts = parts

    @property
    def full(self) -> bool:
        return self.index is None

    def __repr__(self) -> str:
        return "Rows(all)" if self.index is None else f"Rows({self.index.tolist()})"


class _Router:
    """Set algebra on `Rows` for one forward pass, and their copies on the device.

    Sets are canonical where it is cheap: a result equal to one of the operands is that
    very object, a result covering the batch is `self.all`, an empty one `self.none`. The
    fast paths of the interpreter compare sets by identity, so "every example chose the
    same branch" keeps the full-batch tensors flowing without a single copy, and the two
    branches of a decision merge back into the very set the decision ran on. The masks
    below are host-side bookkeeping on index sets, never used to index data."""

    def __init__(self, batch: int, device: torch.device, cpu: bool | None = None):
        self.batch = batch
        self.device = device
        self.cpu = device.type == "cpu" if cpu is None else cpu
        self.all = Rows(batch, None)
        self.none = Rows(batch, _NO_INDEX)
        self._positions: dict[tuple[Rows, Rows], Tensor] = {}

    def rows(self, index: np.ndarray) -> Rows:
        n = len(index)
        return self.all if n == self.batch else self.none if n == 0 else Rows(self.batch, index)

    def mask(self, rows: Rows) -> np.ndarray:
        if rows._mask is None:
            if rows.index is None:
                rows._mask = np.ones(self.batch, dtype=bool)
            else:
                rows._mask = np.zeros(self.batch, dtype=bool)
                rows._mask[rows.index] = True
        return rows._mask

    def _from_mask(self, mask: np.ndarray, same_as: Rows) -> Rows:
        n = int(np.count_nonzero(mask))
        return same_as if n == same_as.n else self.rows(np.flatnonzero(mask))

    def intersect2(self, a: Rows, b: Rows) -> Rows:
        """a ∩ b; one of the operands itself whenever it is the answer."""
        if a is b or b is self.all:
            return a
        if a is self.all:
            return b
        if a.n == 0 or b.n == 0:
            return self.none
        if a._parent is b:
            return a
        if b._parent is a:
            return b
        if a._parts is not None and a._parts is b._parts:  # two branches of one decision
            return self.none
        small, big = (a, b) if a.n <= b.n else (b, a)
        hit = self.mask(big)[small.index]  # the small set's members that are in the big one
        n = int(np.count_nonzero(hit))
        return small if n == small.n else self.rows(small.index[hit])

    def union(self, sets: Iterable[Rows]) -> Rows:
        sets = [s for s in sets if s.n]
        if not sets:
            return self.none
        first = sets[0]
        if len(sets) == 1:
            return first
        if any(s is self.all for s in sets):
            return self.all
        parts = first._parts
        if parts is not None and all(s._parts is parts for s in sets):
            # branches of one decision are disjoint: all of them together are the set it split
            distinct = {id(s): s for s in sets}
            if sum(s.n for s in distinct.values()) == first._parent.n:
                return first._parent
            if len(distinct) == 1:
                return first
        biggest = max(sets, key=lambda s: s.n)
        mask = self.mask(biggest).copy()
        for s in sets:
            if s is not biggest:
                mask[s.index] = True
        return self._from_mask(mask, biggest)

    def split(self, rows: Rows, actions: np.ndarray, k: int, counts: Sequence[int] | None = None) -> list[Rows]:
        """The examples of `rows` per action, given each one's action (host, aligned with rows)
        and, when already known, how many took each action."""
        if counts is None:
            if k == 2:  # one count answers "did everybody take the same branch?"
                second = int(np.count_nonzero(actions))
                if second == 0:
                    return [rows, self.none]
                if second == rows.n:
                    return [self.none, rows]
                counts = (rows.n - second, second)
            else:
                counts = np.bincount(actions, minlength=k).tolist()  # Python ints compare faster
        for top in range(k):
            if counts[top] == rows.n:  # one branch for everybody: keep the very same set (no copies downstream)
                return [rows if j == top else self.none for j in range(k)]
        parts: list[Rows] = []
        for j in range(k):
            if not counts[j]:
                parts.append(self.none)
                continue
            # ascending, like the set it came from (`nonzero` is numpy's cheapest way there)
            local = (actions if k == 2 and j == 1 else actions == j).nonzero()[0]
            parts.append(Rows(self.batch, local if rows.index is None else rows.index[local], rows, local, parts))
        return parts

    # --- on the device ---

    def upload(self, a: np.ndarray) -> Tensor:
        t = torch.from_numpy(a)
        if self.cpu:
            return t
        if self.device.type == "cuda":  # pinned memory: the copy does not block the host
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def on_device(self, rows: Rows) -> Tensor:
        if rows._device_index is None:
            if rows.index is None:
                rows._device_index = torch.arange(self.batch, device=self.device)
            elif rows.n == 0:
                rows._device_index = torch.empty(0, dtype=torch.long, device=self.device)
            else:
                rows._device_index = self.upload(rows.index)
        return rows._device_index

    def scatter(self, rows: Rows, t: Tensor | None, fill: float, shape: tuple, dtype: torch.dtype) -> Tensor:
        """A node's [n, *shape] rows → [B, *shape], `fill` where it did not run."""
        if rows is self.all and t is not None:
            return t
        if t is not None:
            dtype = t.dtype
        out = torch.full((self.batch, *shape), fill, dtype=dtype, device=self.device)
        return out.index_copy_(0, self.on_device(rows), t) if t is not None else out

    def positions(self, sub: Rows, sup: Rows) -> Tensor:
        """Where each example of `sub` sits among those of `sup` (sub ⊆ sup), on the device."""
        if sup is self.all:
            return self.on_device(sub)
        key = (sub, sup)
        found = self._positions.get(key)
        if found is None:
            assert sub.index is not None and sup.index is not None
            local = sub._in_parent if sub._parent is sup else np.searchsorted(sup.index, sub.index)
            found = self._positions[key] = self.upload(local)
        return found


# The index of the empty set, shared by every pass (read-only: nothing writes to an index).
_NO_INDEX = np.empty(0, dtype=np.int64)
_NO_INDEX.flags.writeable = False


# --- the result ---------------------------------------------------------------------------


@dataclass(eq=False)  # tensors do not compare to one bool
class Result:
    """What one forward pass produced, for a batch of B examples.

    outputs        output name → tensor [B, ...] (`output` when the graph has one output)
    cost           [B] the cost of each example: the sum of the costs of the nodes that ran
                   (int64, or float64 when a node declares a fractional `cost=`)
    cost_fraction  [B] float64, cost / graph.full_cost (0 where the graph costs nothing)
    actions        control name → int64 [B], the chosen action (0-based), -1 where the
                   control node did not run
    scores         control name → [B, k] scores, zero rows where it did not run (see `ran`)
    log_probs      control name → float32 [B] log-probability of the sampled action, 0 where
                   it did not run; only in `sample` mode (empty otherwise)
    values         node name → (example indices [n], output [n, ...]) for the nodes named
                   in `keep=`; the rows are those of the examples it ran for
    ran            node name → sorted int64 example indices it ran for (on the device);
                   `ran_mask(name)` gives the same as a bool [B]
    rows           node name → the same sets on the host (`Rows`: a numpy index or all)

    `cost`, `cost_fraction`, `actions`, `scores`, `log_probs` and `ran` are made into
    full-batch tensors when first read (inference rarely reads them, and on a CPU every
    extra operation in the forward pass runs with caches the layers have just evicted).
    Read them before `backward()` when a loss depends on them, as with any tensor.
    """

    outputs: dict[str, Tensor]
    values: dict[str, tuple[Tensor, Tensor]]
    mode: str
    rows: dict[str, Rows] = field(repr=False)
    # What the interpreter recorded, turned into full-batch tensors only when read: the
    # control nodes as (name, k), and per control node that ran its scores [n, k], its
    # actions [n] (a device tensor, a host array, or one int for all) and, in `sample`
    # mode, its log-probabilities [n], all on the rows it ran for.
    _controls: tuple[tuple[str, int], ...] = field(repr=False, compare=False)
    _scores: dict[str, Tensor] = field(repr=False, compare=False)
    _actions: dict[str, Tensor | np.ndarray | int] = field(repr=False, compare=False)
    _log_probs: dict[str, Tensor] = field(repr=False, compare=False)
    _router: _Router = field(repr=False, compare=False)
    _dtype: torch.dtype = field(repr=False, compare=False)
    _costs: tuple[tuple[str, int | float], ...] = field(repr=False, compare=False)  # (node, cost) where cost ≠ 0
    _integer_costs: bool = field(repr=False, compare=False)
    _full_cost: int | float = field(repr=False, compare=False)
    _grad: bool = field(default=True, repr=False, compare=False)  # torch's modes during the forward
    _inference: bool = field(default=False, repr=False, compare=False)

    @cached_property
    def cost(self) -> Tensor:
        return self._router.upload(self._per_example_cost())

    @cached_property
    def cost_fraction(self) -> Tensor:
        cost = self._per_example_cost()
        full = self._full_cost
        return self._router.upload(cost / full if full else np.zeros(self._router.batch))

    @property
    def batch_size(self) -> int:
        return self._router.batch

    @property
    def output(self) -> Tensor:
        if len(self.outputs) != 1:
            raise AttributeError(f"the graph has {len(self.outputs)} outputs ({', '.join(self.outputs)}): "
                                 "use result.outputs[name]")
        return next(iter(self.outputs.values()))

    def _per_example_cost(self) -> np.ndarray:
        return _per_example_cost(self._router.batch, self.rows, self._costs, self._integer_costs)

    def _scatter(self, recorded: dict, fill: float, dtype: torch.dtype | None, per_action: bool) -> dict[str, Tensor]:
        # Under the grad / inference mode of the forward pass, not the caller's: reading
        # `scores` first inside `no_grad()` must not cache scores cut off from the graph.
        r = self._router
        with torch.inference_mode(self._inference), torch.set_grad_enabled(self._grad):
            out = {}
            for name, k in self._controls:
                rows, t = self.rows[name], recorded.get(name)
                if isinstance(t, np.ndarray):
                    t = r.upload(t)
                elif isinstance(t, int):
                    t = torch.full((rows.n,), t, dtype=torch.long, device=r.device)
                out[name] = r.scatter(rows, t, fill, (k,) if per_action else (), dtype or self._dtype)
            return out

    @cached_property
    def actions(self) -> dict[str, Tensor]:
        return self._scatter(self._actions, -1, torch.long, False)

    @cached_property
    def scores(self) -> dict[str, Tensor]:
        return self._scatter(self._scores, 0.0, None, True)

    @cached_property
    def log_probs(self) -> dict[str, Tensor]:
        return self._scatter(self._log_probs, 0.0, torch.float32, False) if self.mode == "sample" else {}

    @cached_property
    def ran(self) -> dict[str, Tensor]:
        return {name: self._router.on_device(rows) for name, rows in self.rows.items()}

    def ran_mask(self, name: str) -> Tensor:
        """bool [B]: True for the examples node `name` ran for."""
        return self._router.upload(self._router.mask(self.rows[name]).copy())


# --- the module ---------------------------------------------------------------------------


class Executor(nn.Module):
    """A compiled graph: one `Pipeline` (an `nn.Sequential`) per node with layers, in `self.nodes`.

    Call it as `executor(x, mode="argmax", actions=None, epsilon=0.0, keep=(), generator=None)`;
    see the module docstring for the modes and `Result` for what comes back."""

    def __init__(self, graph: Graph):
        super().__init__()
        self.graph = graph
        self.nodes = nn.ModuleDict()
        for node in graph.nodes:
            if node.layers:
                # Written into `_modules` directly: ModuleDict refuses keys that are also
                # attribute names of nn.Module (a node the user called `eval`, `to` or
                # `forward`), and the names are the user's to choose.
                self.nodes._modules[node.name] = Pipeline(
                    *(build_layer(layer.name, layer.kwargs, layer.in_shape) for layer in node.layers))
        self.to(device="cpu", dtype=torch.float32)  # whatever the user's default device / dtype
        # After the last node that reads a value, the interpreter drops it (less peak
        # memory at inference; autograd keeps what it needs anyway).
        last_use: dict[str, int] = {}
        for i, node in enumerate(graph.nodes):
            for edge in node.inputs:
                last_use[edge.source] = i
        self._dead_after: list[list[str]] = [[] for _ in graph.nodes]
        for name, i in last_use.items():
            self._dead_after[i].append(name)
        self._integer_costs = all(isinstance(n.cost, int) and not isinstance(n.cost, bool) for n in graph.nodes)
        # What every forward pass would otherwise re-derive from the IR (its lookups scan
        # the node tuple): the per-node plan the interpreter walks, and the graph's facts.
        self._plan = tuple(_Step(node, tuple(self._dead_after[i])) for i, node in enumerate(graph.nodes))
        self._shapes = {node.name: node.out_shape for node in graph.nodes}
        self._input_names = tuple(node.name for node in graph.inputs)
        self._output_names = tuple(node.name for node in graph.outputs)
        self._control_nodes = graph.control_nodes
        self._controls = tuple((node.name, len(node.actions)) for node in graph.control_nodes)
        self._actions_of = dict(self._controls)  # control node → its number of actions
        self._costs = tuple((node.name, node.cost) for node in graph.nodes if node.cost)
        self._full_cost = graph.full_cost
        # node → the token input whose padding its layers must ignore: the one among its
        # data ancestors (the checker allows one token input per graph, E832), for the
        # nodes with a layer that reads a padding mask.
        tokens_above: dict[str, set[str]] = {}
        for node in graph.nodes:
            above = {node.name} if node.kind == "input" and node.tokens else set()
            for edge in node.inputs:
                above |= tokens_above[edge.source]
            tokens_above[node.name] = above
        pipelines = self.nodes._modules
        self._padding_of = {name: min(above) for name, above in tokens_above.items()
                            if above and name in pipelines and pipelines[name].uses_padding}

    def padding_source(self, node: str) -> str | None:
        """The token input whose padding mask node `node`'s layers take (as a second argument,
        on the node's rows), or None where its layers read no mask. `d2graph export` records
        it, so that the runtime hands each program the mask the executor would.

        Example:
            >>> compile(d2graph.load("examples/bert_early_exit.d2")).padding_source("L2")  # doctest: +SKIP
            'ids'
        """
        return self._padding_of.get(node)

    def extra_repr(self) -> str:
        return f"graph={self.graph.name!r}"

    def compile_nodes(self) -> Executor:
        """Compile each node's layer pipeline with `torch.compile` (in place; the weights and
        their names are unchanged). Batch sizes are dynamic, since routing hands each node a
        different number of rows per batch; the routing itself stays Python. Compiling takes
        seconds per node on first use, and on a CPU it made these small networks no faster
        (docs/performance.md#compiled-nodes)."""
        for module in self.nodes.values():
            module.compile(dynamic=True)
        return self

    def forward(self, x: Tensor | Mapping[str, Tensor], mode: str = "argmax",
                actions: Mapping[str, int | Tensor] | None = None, epsilon: float = 0.0,
                keep: Iterable[str] = (), generator: torch.Generator | None = None) -> Result:
        """Run a batch: `x` is a tensor [B, *shape] for a graph with one input, else a dict
        input name → tensor. Returns a `Result`.

        Example:
            >>> executor(x).output                                            # doctest: +SKIP
            >>> executor(x, mode="force", actions={"Q1": torch.tensor([0, 1, 1])})  # doctest: +SKIP
            >>> executor(x, mode="sample", generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
        """
        return Interpreter(self, x, mode, actions, epsilon, keep, generator).run()

    # typing: nn.Module.__call__ returns Any
    def __call__(self, *args: Any, **kwargs: Any) -> Result:
        return super().__call__(*args, **kwargs)


def compile(graph: Graph) -> Executor:  # noqa: A001 - the stage's verb (DESIGN.md)
    """Compile a checked graph into an `Executor` (an nn.Module, on the CPU, float32).

    Example:
        >>> executor = compile(d2graph.load("examples/cascade.d2"))       # doctest: +SKIP
        >>> sorted(executor.state_dict())[:2]                             # doctest: +SKIP
        ['nodes.N1.0.bias', 'nodes.N1.0.weight']
    """
    require_buildable(graph)
    return Executor(graph)


def require_buildable(graph: Graph) -> None:
    """Raise `D2GraphError` (E926) when `graph` has more parameters than d2graph builds
    (`ir.MAX_PARAMS`), before any memory is allocated for them: the run commands call it
    first, so that they refuse with the figure instead of dying in the allocator.

    Example:
        >>> require_buildable(d2graph.load("examples/cascade.d2"))        # doctest: +SKIP
    """
    if graph.params <= MAX_PARAMS:
        return
    largest = max(graph.nodes, key=lambda n: n.params)
    raise D2GraphError([Diagnostic(
        "E926", f"graph `{graph.name}` has {describe_params(graph.params)}: more than d2graph builds "
                f"({describe_params(MAX_PARAMS)})", largest.span, f"`{largest.name}` alone has {largest.params:,}",
        help="nothing was built or written; make the largest layers smaller (an `fc` holds its input width × "
             "its output width)",
    )])


# --- the interpreter ----------------------------------------------------------------------


class _Step:
    """One node as the walk needs it, derived once at compile time: its control edges as
    (control node, action) pairs, the sources it cannot do without (edges without a
    default), for a `select` merge its sources and whether one of them has a default (then
    some input is present everywhere), the values no later node reads, and the number of
    actions of a control node."""

    __slots__ = ("node", "name", "kind", "controllers", "needs", "select", "sources", "anywhere", "k", "dead")

    def __init__(self, node: Node, dead: tuple[str, ...]):
        self.node, self.name, self.kind = node, node.name, node.kind
        self.controllers = tuple((c.source, c.action) for c in node.controllers)
        self.needs = tuple(e.source for e in node.inputs if e.default is None)
        self.select = node.merge == "select"
        self.sources = tuple(e.source for e in node.inputs)
        self.anywhere = any(e.default is not None for e in node.inputs)
        self.k = len(node.actions) if node.is_control else 0
        self.dead = dead


_NUMPY_FLOATS = (torch.float32, torch.float64)


class Interpreter:
    """One forward pass of an `Executor`: walks `graph.nodes` in order, calling the method
    for each node's kind on the examples that reach it. Subclass and override a `run_*`
    method to trace or alter one kind of node (as with torch.fx's Interpreter).

    The walk costs a few microseconds of Python per node: what can be derived from the IR
    alone is in the executor's per-node plan (`_Step`), and the common cases — every
    example on the same path, the branches of one decision merging back — are answered
    by identity checks on `Rows` before any set arithmetic."""

    def __init__(self, executor: Executor, x: Tensor | Mapping[str, Tensor], mode: str,
                 actions: Mapping[str, int | Tensor] | None, epsilon: float, keep: Iterable[str],
                 generator: torch.Generator | None):
        self.executor = executor
        self.graph = graph = executor.graph
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; the modes are {', '.join(MODES)}")
        if mode == "force":
            if actions is None:
                raise ValueError("mode='force' needs actions={control node: action}")
            unknown = [name for name in actions if name not in executor._actions_of]
            if unknown:
                controls = list(executor._actions_of)
                raise ValueError(f"actions name {', '.join(map(repr, unknown))}, which "
                                 f"{'is' if len(unknown) == 1 else 'are'} not a control node of "
                                 f"{graph.name!r}; its control nodes are {', '.join(controls) or 'none'}")
        elif actions is not None:
            raise ValueError(f"actions are only used in mode='force', not {mode!r}")
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon is a probability, between 0 and 1, not {epsilon}")
        self.keep = tuple(keep)
        missing = [name for name in self.keep if name not in executor._shapes]
        if missing:
            raise ValueError(f"keep names {', '.join(map(repr, missing))}, not a node of {graph.name!r}")
        self.mode, self.forced, self.epsilon, self.generator = mode, dict(actions or {}), epsilon, generator
        # Whether control nodes take the argmax of their scores (decided once, not per node).
        self._greedy = mode in ("argmax", "all", "force") or (mode == "explore" and epsilon == 0.0)

        self.inputs = self._check_inputs(x)
        first = next(iter(self.inputs.values()))
        self.batch = first.shape[0]
        self.device = first.device
        # The dtype of the data; dummies, defaults and empty merges are made in it.
        self.dtype = first.dtype if first.is_floating_point() else torch.get_default_dtype()
        self.router = _Router(self.batch, self.device, first.is_cpu)
        # Node modules by name, read once per pass (ModuleDict's item lookup is not free).
        self.modules: dict[str, nn.Module] = executor._modules["nodes"]._modules

        # node → its output, whose rows are the examples in `self.rows[node]`, in order; None
        # where it ran for no example, and once no later node reads it
        self.env: dict[str, Tensor | None] = {}
        self.rows: dict[str, Rows] = {}  # node → the examples it ran for (`none` if it did not run)
        self.chosen: dict[str, list[Rows]] = {}  # control node → the examples per action
        self.scores: dict[str, Tensor] = {}
        self.actions: dict[str, Tensor] = {}
        self.log_probs: dict[str, Tensor] = {}
        self._counts: list[int] | None = None  # actions per branch, when forced_actions counted them
        self._padding: dict[str, Tensor] = {}  # token input → its padding mask [B, T], made on first use

    def _check_inputs(self, x: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
        names = self.executor._input_names
        if isinstance(x, Tensor) and len(names) == 1:
            given = {names[0]: x}
        elif isinstance(x, Mapping):
            given = dict(x)
            if set(given) != set(names):
                raise ValueError(f"{self.graph.name!r} has inputs {', '.join(names)}; got {', '.join(given) or 'none'}")
        elif len(names) == 1:
            given = {names[0]: x}
        else:
            raise TypeError(f"{self.graph.name!r} has {len(names)} inputs ({', '.join(names)}): "
                            "pass a dict name → tensor")
        batch = None
        shapes = self.executor._shapes
        for name in names:
            t, shape = given[name], shapes[name]
            if not isinstance(t, Tensor) or t.shape[1:] != shape:
                got = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"input {name!r} takes a batch of shape [B, {', '.join(map(str, shape))}], got {got}")
            if batch is not None and t.shape[0] != batch:
                raise ValueError(f"inputs have different batch sizes ({batch} and {t.shape[0]} for {name!r})")
            batch = t.shape[0]
        if batch == 0:
            raise ValueError("the batch is empty")
        return given

    # --- the walk ---

    def run(self) -> Result:
        handlers = {"input": self.run_input, "node": self.run_node, "control": self.run_control,
                    "dummy": self.run_dummy, "output": self.run_output}
        keep = self.keep
        env, rows_of, chosen = self.env, self.rows, self.chosen
        r = self.router
        every, none, rows_for = self.mode == "all", r.none, self._rows_for
        # Costs are not added up here: `Result` sums them from `rows` when `cost` is read.
        for step in self.executor._plan:
            name = step.name
            rows = r.all if every else rows_for(step)
            rows_of[name] = rows
            if rows.n:
                env[name] = handlers[step.kind](step.node, rows)
            else:
                env[name] = None  # null for every example: not called at all
                if step.k:
                    chosen[name] = [none] * step.k
            for dead in step.dead:
                if dead not in keep:
                    env[dead] = None
        return self.result()

    def _rows_for(self, step: _Step) -> Rows:
        # A source is present on the rows it ran for (`none` if it ran for nobody); the
        # values dropped after their last reader are never asked for again.
        r, rows_of = self.router, self.rows
        rows = r.all
        controllers = step.controllers
        if controllers:
            if len(controllers) == 1:
                source, action = controllers[0]
                rows = self.chosen[source][action]
            else:
                rows = r.union(self.chosen[source][action] for source, action in controllers)
            if rows.n == 0:
                return r.none
        if step.select:
            return rows if step.anywhere else r.intersect2(rows, r.union(rows_of[s] for s in step.sources))
        for source in step.needs:  # an edge with a default is present everywhere
            have = rows_of[source]
            if have is not rows:
                rows = r.intersect2(rows, have)
                if rows.n == 0:
                    return r.none
        return rows

    def present(self, edge: DataEdge) -> Rows:
        return self.router.all if edge.default is not None else self.rows[edge.source]

    # --- one method per node kind ---

    def run_input(self, node: Node, rows: Rows) -> Tensor:
        return self.inputs[node.name]

    def run_node(self, node: Node, rows: Rows) -> Tensor:
        return self.call(node, self.merge(node, rows), rows)

    def run_dummy(self, node: Node, rows: Rows) -> Tensor:
        # `const` reads only the batch size, dtype and device of what it is given
        like = torch.empty((rows.n, 0), dtype=self.dtype, device=self.device)
        return self.call(node, like)

    def run_output(self, node: Node, rows: Rows) -> Tensor:
        if rows is not self.router.all:
            raise AssertionError(f"output {node.name!r} has no value for some examples; the checker's "
                                 "totality rule (R7) should have made that impossible")
        return self.merge(node, rows)

    def run_control(self, node: Node, rows: Rows) -> Tensor:
        name = node.name
        scores = self.call(node, self.merge(node, rows), rows)
        device_actions, host_actions = self.decide(node, rows, scores)
        if host_actions is not None:  # None in `all` mode: routing ignores the choice
            k = len(node.actions)
            if isinstance(host_actions, int):
                self.chosen[name] = [rows if i == host_actions else self.router.none for i in range(k)]
            else:
                self.chosen[name] = self.router.split(rows, host_actions, k, self._counts)
                self._counts = None
        self.scores[name] = scores
        self.actions[name] = device_actions
        return scores

    # --- helpers ---

    def call(self, node: Node, x: Tensor, rows: Rows | None = None) -> Tensor:
        """The node's layers on `x`, its input on `rows`; layers that ignore padded tokens
        get the padding mask of those rows."""
        source = self.executor._padding_of.get(node.name)
        if source is None or rows is None:
            return self.modules[node.name](x)
        return self.modules[node.name](x, self.padding(source, rows))

    def padding(self, source: str, rows: Rows) -> Tensor:
        """Where token input `source` holds padding (id 0) on `rows`: bool [rows.n, T]."""
        mask = self._padding.get(source)
        if mask is None:
            mask = self._padding[source] = self.inputs[source] == PAD_ID
        return mask if rows.full else mask.index_select(0, self.router.on_device(rows))

    def merge(self, node: Node, rows: Rows) -> Tensor:
        """The node's input on `rows`, its data inputs merged (LANGUAGE.md §3.3)."""
        inputs = node.inputs
        if len(inputs) == 1:
            return self.gather(inputs[0], rows)
        if node.merge == "select":
            return self.select(node, rows)
        if node.merge == "concat":
            # dim 1: the first per-example dimension
            return torch.cat([self.gather(edge, rows) for edge in inputs], dim=1)
        # A sum term that is its default 0 for every example adds nothing: leave it out
        # (the usual `A, B -> y [default=0]` after a branch then costs no fill and no add).
        env = self.env
        parts = [self.gather(edge, rows) for edge in inputs
                 if not (edge.default == 0 and env[edge.source] is None)]
        if not parts:
            return self.fill(inputs[0], rows.n, None)
        return parts[0] if len(parts) == 1 else reduce(operator.add, parts)

    def gather(self, edge: DataEdge, rows: Rows) -> Tensor:
        """The edge's tensor on `rows`: its source's output where the source ran, the edge's
        default elsewhere (the node runs only where every input without default is present)."""
        value = self.env[edge.source]
        if value is None:
            return self.fill(edge, rows.n, None)
        have = self.rows[edge.source]
        if have is rows:
            return value  # the same examples: no copy
        r = self.router
        if edge.default is None:
            return value.index_select(0, r.positions(rows, have))
        hit = r.intersect2(rows, have)
        if hit is rows:
            return value.index_select(0, r.positions(rows, have))
        out = self.fill(edge, rows.n, value)
        if hit.n:
            part = value if hit is have else value.index_select(0, r.positions(hit, have))
            out.index_copy_(0, r.positions(hit, rows), part)
        return out

    def fill(self, edge: DataEdge, n: int, like: Tensor | None) -> Tensor:
        shape = self.executor._shapes[edge.source]
        dtype = like.dtype if like is not None else self.dtype
        return torch.full((n, *shape), float(edge.default), dtype=dtype, device=self.device)

    def select(self, node: Node, rows: Rows) -> Tensor:
        """Per example, the first present input in declaration order. An input that covers
        every row alone is passed through without a copy. Otherwise the inputs are written
        last one first, each over its own rows, so that earlier inputs overwrite later
        ones: with nested sets (the exits of a cascade) no input needs gathering and no set
        differences are computed. The node runs only where some input is present, so the
        inputs written cover `rows` and the output needs no initial fill."""
        r = self.router
        takes: list[tuple[DataEdge, Rows]] = []
        for edge in node.inputs:
            take = r.intersect2(rows, self.present(edge))
            if take.n == 0:
                continue
            if take is rows:
                if not takes:
                    return self.gather(edge, rows)
                takes.append((edge, take))
                break  # inputs after one present everywhere are never taken
            takes.append((edge, take))
        assert takes, "a select node runs only where an input is present"
        out = None
        for edge, take in reversed(takes):
            part = self.gather(edge, take)
            if out is None:
                if take is rows:
                    out = part.clone()  # written over next: never the source's own tensor
                    continue
                out = part.new_empty((rows.n, *part.shape[1:]))
            out.index_copy_(0, r.positions(take, rows), part)
        return out

    def decide(self, node: Node, rows: Rows,
               scores: Tensor) -> tuple[Tensor | np.ndarray | int, np.ndarray | int | None]:
        """The actions of a control node on its rows: (for `Result.actions`, on the host). The
        host copy is the one synchronisation a control node may cost; `None` in `all` mode, an
        int when one action is forced for everybody. The first is a device tensor, or, where
        the host already has it (CPU, forced ints), the host value itself: `Result` turns it
        into a tensor only when `actions` is read."""
        mode = self.mode
        if self.forced and node.name in self.forced:  # only `force` mode has forced actions
            return self.forced_actions(node, rows, self.forced[node.name])
        if self._greedy:
            if self.router.cpu and scores.dtype in _NUMPY_FLOATS:
                # On the host numpy's argmax is several times cheaper than torch's, and
                # picks the same action (the first of equal maxima; NaN counts as the max).
                host = (scores.detach() if scores.requires_grad else scores).numpy().argmax(axis=1)
                return host, (None if mode == "all" else host)  # `Result` makes a tensor if asked
            chosen = scores.detach().argmax(dim=1)
        else:
            k, n = len(node.actions), rows.n
            if mode == "explore":
                greedy = scores.detach().argmax(dim=1)
                explore = self.random(lambda g, d: torch.rand(n, generator=g, device=d)) < self.epsilon
                anything = self.random(lambda g, d: torch.randint(k, (n,), generator=g, device=d))
                chosen = torch.where(explore, anything, greedy)  # n actions, not data rows
            else:  # sample: inverse CDF, so that any generator (on any device) can drive it
                log_p = torch.log_softmax(scores.float(), dim=1)
                cdf = log_p.detach().exp().cumsum(dim=1)
                u = self.random(lambda g, d: torch.rand(n, 1, generator=g, device=d))
                chosen = torch.searchsorted(cdf, u, right=True).view(-1).clamp_(max=k - 1)
                self.log_probs[node.name] = log_p.gather(1, chosen.view(-1, 1)).view(-1)
        return chosen, (None if mode == "all" else chosen.cpu().numpy())

    def forced_actions(self, node: Node, rows: Rows, spec: int | Tensor) -> tuple[Tensor | np.ndarray | int,
                                                                                 np.ndarray | int]:
        k = len(node.actions)
        if isinstance(spec, Tensor) and spec.dim() == 0 and not spec.is_floating_point():
            spec = int(spec)
        if not isinstance(spec, (Tensor, bool)) and hasattr(spec, "__index__"):  # int, numpy int
            spec = operator.index(spec)
            if not 0 <= spec < k:
                raise ValueError(f"{node.name!r} has {k} actions (0..{k - 1}); cannot force action {spec}")
            return spec, spec
        if not isinstance(spec, Tensor) or spec.shape != (self.batch,) or spec.is_floating_point():
            raise ValueError(f"the action forced on {node.name!r} must be an int or an integer tensor "
                             f"of shape [{self.batch}] (one per example)")
        if spec.is_cpu and spec.dtype == torch.long:
            host = spec.numpy()
        else:
            host = spec.cpu().long().numpy()  # the one synchronisation, if the tensor is on the device
        if rows.index is not None:
            host = host[rows.index]
        try:  # one pass: bincount refuses negative actions and grows past k for too large ones
            counts = np.bincount(host, minlength=k)
        except ValueError:
            counts = None
        if counts is None or len(counts) != k:
            low, high = int(host.min()), int(host.max())
            raise ValueError(f"{node.name!r} has {k} actions (0..{k - 1}); the forced actions include "
                             f"{low if low < 0 else high}")
        self._counts = counts.tolist()  # `split` needs them too
        if self.router.cpu:
            on_device = host
        elif spec.device == self.device:
            on_device = spec.long() if rows.full else spec.long().index_select(0, self.router.on_device(rows))
        else:
            on_device = self.router.upload(host)
        return on_device, host

    def random(self, draw) -> Tensor:
        """Random numbers from the user's generator, on its device, brought to ours."""
        g = self.generator
        return draw(g, g.device if g is not None else self.device).to(self.device)

    # --- the result ---

    def result(self) -> Result:
        r, env, ex = self.router, self.env, self.executor
        outputs = {name: env[name] for name in ex._output_names}
        values = {}
        for name in self.keep:
            value = env[name]
            if value is None:
                empty = torch.empty((0, *ex._shapes[name]), dtype=self.dtype, device=self.device)
                values[name] = (r.on_device(r.none), empty)
            else:
                values[name] = (r.on_device(self.rows[name]), value)
        return Result(outputs, values, self.mode, self.rows, ex._controls, self.scores, self.actions, self.log_probs,
                      r, self.dtype, ex._costs, ex._integer_costs, ex._full_cost, torch.is_grad_enabled(),
                      torch.is_inference_mode_enabled())


def _per_example_cost(batch: int, rows_of: Mapping[str, Rows], costs: Iterable[tuple[str, int | float]],
                      integer: bool) -> np.ndarray:
    """[B] the cost of each example, summed on the host with plain integers (float64 when a
    node declares a fractional cost): the costs of the nodes run on each set of examples
    are added up first, then each set's total onto its examples."""
    cost_by_rows: dict[Rows, int | float] = {}
    for name, c in costs:
        rows = rows_of[name]
        if rows.n:
            cost_by_rows[rows] = cost_by_rows.get(rows, 0) + c
    base = sum(c for rows, c in cost_by_rows.items() if rows.full)
    cost = np.full(batch, base, dtype=np.int64 if integer else np.float64)
    for rows, c in cost_by_rows.items():
        if not rows.full:
            cost[rows.index] += c  # the indices of a set are distinct
    return cost


class _Routing(Interpreter):
    """A forward pass that routes without computing: each node yields zeros of its shape, as
    one zero expanded to the rows (no memory per row: pricing a large batch stays cheap; the
    merges write only into tensors they make themselves)."""

    def call(self, node: Node, x: Tensor, rows: Rows | None = None) -> Tensor:
        return _zeros(x.shape[0], node.out_shape, self.dtype, self.device)


def _zeros(n: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> Tensor:
    return torch.zeros((), dtype=dtype, device=device).expand(n, *shape)


def route(executor: Executor, actions: Mapping[str, int | Tensor], x: Tensor | Mapping[str, Tensor] | int) -> Result:
    """Where forced `actions` send each example, and what it costs, without calling a layer.

    `x` is a batch (only its size, device and dtype are used) or a batch size. Every
    control node must be forced (there are no scores to take an argmax of). The Result's
    `cost`, `rows` and `actions` are those `executor(x, mode="force", actions=actions)`
    would give; its outputs are zeros. Policies use it to price routings in microseconds.

    Example:
        >>> route(executor, {"Q1": torch.tensor([0, 1])}, 2).cost_fraction   # doctest: +SKIP
    """
    missing = [q.name for q in executor._control_nodes if q.name not in actions]
    if missing:
        raise ValueError(f"route() needs an action for every control node; missing {', '.join(missing)}")
    if isinstance(x, int):
        x = {n.name: _zeros(x, n.out_shape, torch.float32, "cpu") for n in executor.graph.inputs}
    with torch.inference_mode():
        return _Routing(executor, x, "force", actions, 0.0, (), None).run()


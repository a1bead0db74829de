"""The deployment runtime: run an exported dynamic network without d2graph's front end.

In:  a folder written by `d2graph export` (d2graph/export.py): `manifest.json` (plain JSON:
     the nodes in evaluation order, their edges, defaults, merges, actions and costs, the
     input shapes (token inputs with their vocabulary), the token input whose padding mask
     each node's program takes, the policy's decision rule per control node, the graph's
     source text and the format version) and one exported program per node with layers,
     `nodes/<name>.pt2` (torch.export) or `nodes/<name>.onnx`, plus one per policy scorer,
     `policy/<name>.*`.
Out: `load(folder)` → `Runtime`; `runtime(x)` runs one batch and returns a `Prediction`
     (the outputs, each control node's chosen action, the per-example cost, the exit each
     example answered through); `predict(runtime, x, batch=256)` runs a whole array in
     batches; `write_predictions(path, arrays)` saves them atomically as `.npz`;
     `summary(arrays, runtime)` is the one line `d2graph predict` prints.
Guarantees:
  - The executor's semantics (LANGUAGE.md §3; d2graph/executor.py), per example: a node runs
    iff one of its control edges is activated (or it has none) and every data input without
    a default is present; `merge=select` takes the first present input in declaration
    order; `sum` adds, `concat` joins on the first per-example dimension; a default stands
    in for a missing source. Control nodes decide with the run's policy, exported as plain
    numbers and, where it needs computation (confidence features, EENet's scorers), as
    programs of their own. For the same weights and policy, the outputs equal those of
    `run_policy(executor, policy, x)` within float tolerance, and the actions and
    per-example costs are identical (tests/test_runtime.py, every shipped example).
  - Token inputs stay int64 (the embedding indexes with them). Each token input's padding
    mask (ids == 0, bool [B, T]) is made once per batch, and a program whose layers ignore
    padding gets, as its second argument, the mask's rows of exactly the examples it runs
    on, as the executor hands them: an example's result does not depend on its batch.
  - Compact-row routing: each node runs only on the examples that reach it, gathered with
    `index_select` (numpy: `take`) and merged with `index_copy_` (numpy: assignment at
    indices); a node no example reaches is not called; a node every example reaches runs on
    the whole batch without a copy. The sets of examples are numpy index arrays on the host.
    A batch of one example walks the nodes without any set (each node runs or it does not):
    the latency a single request sees.
  - Programs are called as their bare graphs with the weights bound and detached, so no
    autograd graph is recorded and no guard runs per call; the runtime checks the input's
    shape once per batch instead.
  - `cost` is the executor's accounting: the sum of the IR costs of the nodes the routing
    runs for each example (integers; float64 when a node declares a fractional `cost=`).
    A policy that decides from a scorer does not run the control node's own layers, but
    they are charged, as the executor charges them.
  - Imports: numpy and this package's `diagnostics` and `files` (no lark, no networkx, no
    checker, no trainers); torch only for the `pt2` format, onnxruntime only for `onnx`.
  - Mistakes are `D2GraphError`s: E942 (not an export folder, or one of another format
    version), E943 (a file missing, damaged or altered since the export), E944 (an input
    of the wrong shape, token ids that are not integers in [0, vocab), or an input file
    without the array), E945 (the ONNX format without onnxruntime installed). Nothing is
    half-written: `write_predictions` replaces its file in one rename.

Example:
    >>> from d2graph import runtime                                         # doctest: +SKIP
    >>> net = runtime.load("deploy/early_exit")                             # doctest: +SKIP
    >>> p = net(x)                     # x: [B, 1, 32, 32], a torch tensor or numpy array
    >>> p.output.argmax(1), p.exit, p.cost                                 # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from functools import cached_property, reduce
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .diagnostics import D2GraphError, Diagnostic
from .files import atomic_path

__all__ = ["FORMATS", "MANIFEST", "MANIFEST_VERSION", "Prediction", "Runtime", "bind_program", "load", "load_program", "number",
           "predict", "read_manifest", "runtime_error", "summary", "write_predictions"]

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1  # raised whenever a reader of the old layout would misread the new one
FORMATS = {"pt2": ".pt2", "onnx": ".onnx"}


def runtime_error(code: str, message: str, help: str = "") -> D2GraphError:
    """A problem with an export folder, an input or an output (E940–E949)."""
    return D2GraphError([Diagnostic(code, message, None, "", help=help)])


def number(value: float | str) -> float:
    """A float from the manifest, where infinities are written as the strings "inf" / "-inf"
    (strict JSON has no such numbers)."""
    return float(value)


# --- sets of examples -----------------------------------------------------------------------
#
# A set of examples of one batch is None (every example) or a sorted int64 numpy array.
# Sets are kept canonical where it is cheap (a result equal to an operand is that operand),
# so that "the same examples" is usually an identity check, and a value is passed on
# without a copy.

_EMPTY = np.empty(0, dtype=np.int64)
_EMPTY.flags.writeable = False


def _size(rows: np.ndarray | None, batch: int) -> int:
    return batch if rows is None else len(rows)


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is b:
        return True
    return a is not None and b is not None and len(a) == len(b) and bool(np.array_equal(a, b))


def _intersect(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    if a is b or b is None:
        return a
    if a is None:
        return b
    if not len(a) or not len(b):
        return _EMPTY
    both = np.intersect1d(a, b, assume_unique=True)
    return a if len(both) == len(a) else b if len(both) == len(b) else both


def _union(sets: Sequence[np.ndarray | None], batch: int) -> np.ndarray | None:
    sets = [s for s in sets if s is None or len(s)]
    if not sets:
        return _EMPTY
    if any(s is None for s in sets):
        return None
    if len(sets) == 1:
        return sets[0]
    every = reduce(np.union1d, sets)
    if len(every) == batch:
        return None
    return next((s for s in sets if len(s) == len(every)), every)


def _split(rows: np.ndarray | None, actions: np.ndarray, k: int, batch: int) -> list[np.ndarray | None]:
    """The examples of `rows` per action (`actions` is aligned with rows)."""
    counts = np.bincount(actions, minlength=k)
    n = _size(rows, batch)
    for top in range(k):
        if counts[top] == n:  # one branch for everybody: that very set, no copies downstream
            return [rows if j == top else _EMPTY for j in range(k)]
    where = np.arange(batch, dtype=np.int64) if rows is None else rows
    return [where[actions == j] if counts[j] else _EMPTY for j in range(k)]


def _positions(sub: np.ndarray | None, sup: np.ndarray | None, batch: int) -> np.ndarray:
    """Where each example of `sub` sits among those of `sup` (sub ⊆ sup)."""
    if sup is None:
        return np.arange(batch, dtype=np.int64) if sub is None else sub
    return np.searchsorted(sup, np.arange(batch, dtype=np.int64) if sub is None else sub)


# --- array operations, for torch tensors or numpy arrays ------------------------------------


def _not_ids(name: str, dtype: str) -> D2GraphError:
    return runtime_error("E944", f"input `{name}` takes token ids (integers), got {dtype} values",
                         "give the token ids as an integer array (int64), 0 where a sequence is padded")


def _check_ids(name: str, low: int, high: int, vocab: int) -> None:
    if low < 0 or high >= vocab:
        raise runtime_error("E944", f"input `{name}` takes token ids in [0, {vocab}), got ids from {low} to {high}",
                            "encode the tokens with the vocabulary the graph was trained with")


class _TorchOps:
    """Tensors for the `pt2` format, on one device."""

    def __init__(self, torch, device):
        self.torch, self.device = torch, torch.device(device)
        self.cpu = self.device.type == "cpu"

    def array(self, x, name: str, vocab: int | None = None):
        if vocab is not None:  # token ids stay integers: the embedding indexes with them
            t = self.torch.as_tensor(x)
            if t.is_floating_point() or t.is_complex() or t.dtype == self.torch.bool:
                raise _not_ids(name, str(t.dtype).replace("torch.", ""))
            t = t.to(self.device, self.torch.int64)
            if t.numel():
                _check_ids(name, int(t.min()), int(t.max()), vocab)
            return t
        if isinstance(x, self.torch.Tensor) and x.dtype == self.torch.float32 and x.device == self.device:
            # The weights are bound detached: with the input detached too, no autograd graph is
            # ever recorded, and no inference-mode context is needed around each batch.
            return x.detach() if x.requires_grad else x
        t = self.torch.as_tensor(x)
        if not t.is_floating_point():
            t = t.float()
        return t.to(self.device, self.torch.float32)

    def index(self, idx: np.ndarray):
        t = self.torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
        return t if self.cpu else t.to(self.device)

    def take(self, x, idx: np.ndarray):
        return x.index_select(0, self.index(idx))

    def put(self, out, idx: np.ndarray, part):
        return out.index_copy_(0, self.index(idx), part)

    def full(self, n: int, shape: Sequence[int], value: float, like=None):
        dtype = like.dtype if like is not None else self.torch.float32
        return self.torch.full((n, *shape), float(value), dtype=dtype, device=self.device)

    def empty(self, n: int, like):
        return like.new_empty((n, *like.shape[1:]))

    def copy(self, x):
        return x.clone()

    def cat(self, parts):
        return self.torch.cat(parts, dim=1)

    def host(self, x) -> np.ndarray:
        return x.numpy() if self.cpu else x.cpu().numpy()

    def constant(self, row: list, n: int):
        t = self.torch.tensor(row, dtype=self.torch.float32, device=self.device)
        return t.expand(n, *t.shape[1:])


class _NumpyOps:
    """numpy arrays for the `onnx` format."""

    def array(self, x, name: str, vocab: int | None = None):
        if vocab is not None:  # token ids stay integers: the embedding indexes with them
            a = np.asarray(x)
            if not np.issubdtype(a.dtype, np.integer):
                raise _not_ids(name, str(a.dtype))
            a = np.ascontiguousarray(a, dtype=np.int64)
            if a.size:
                _check_ids(name, int(a.min()), int(a.max()), vocab)
            return a
        return np.ascontiguousarray(np.asarray(x, dtype=np.float32))

    def take(self, x, idx: np.ndarray):
        return np.take(x, idx, axis=0)

    def put(self, out, idx: np.ndarray, part):
        out[idx] = part
        return out

    def full(self, n: int, shape: Sequence[int], value: float, like=None):
        return np.full((n, *shape), float(value), dtype=like.dtype if like is not None else np.float32)

    def empty(self, n: int, like):
        return np.empty((n, *like.shape[1:]), dtype=like.dtype)

    def copy(self, x):
        return x.copy()

    def cat(self, parts):
        return np.concatenate(parts, axis=1)

    def host(self, x) -> np.ndarray:
        return x

    def constant(self, row: list, n: int):
        a = np.asarray(row, dtype=np.float32)
        return np.broadcast_to(a, (n, *a.shape[1:]))


# --- loading the programs -------------------------------------------------------------------


def _load_pt2(path: Path, device) -> Callable:
    import torch  # the pt2 format's one dependency; imported here so that onnx needs no torch

    return bind_program(torch.export.load(str(path)), device)


def bind_program(program, device="cpu") -> Callable:
    """An `ExportedProgram` as a plain call x → y, its weights on `device` (x, padding → y
    for a node whose layers ignore padding: the mask is its second argument). The program's
    own module (`.module()`) checks its guards and flattens its arguments on every call,
    which at batch 1 costs more than a small node computes; the runtime checks the shapes
    once per batch, so it calls the graph directly with the weights bound.

    Example:
        >>> f = bind_program(torch.export.export(module, (x,)))               # doctest: +SKIP
    """
    from torch.export.graph_signature import InputKind, OutputKind  # pt2 only (see _load_pt2)

    signature = program.graph_signature
    args: list = []
    user = []
    for spec in signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            user.append(len(args))
            args.append(None)
        elif spec.target in program.state_dict:
            args.append(program.state_dict[spec.target].detach().to(device))
        else:  # constants and non-persistent buffers
            args.append(program.constants[spec.target].to(device))
    outputs = [i for i, spec in enumerate(signature.output_specs) if spec.kind == OutputKind.USER_OUTPUT]
    if len(user) not in (1, 2) or len(outputs) != 1:
        raise ValueError(f"{len(user)} inputs and {len(outputs)} outputs, where a node has one input (two with "
                         "a padding mask) and one output")
    # `forward` itself: nn.Module's __call__ adds hook handling that a bare graph never uses
    forward, out = program.graph_module.forward, outputs[0]
    if len(user) == 2:
        slot, mask_slot = user

        def call_masked(x, padding):
            args[slot], args[mask_slot] = x, padding
            try:
                return forward(*args)[out]
            finally:
                args[slot] = args[mask_slot] = None  # do not keep the batch alive between calls

        return call_masked
    slot = user[0]

    def call(x):
        args[slot] = x
        try:
            return forward(*args)[out]
        finally:
            args[slot] = None  # do not keep the batch alive between calls

    return call


def _load_onnx(path: Path, threads: int | None) -> Callable:
    import onnxruntime  # the onnx format's one dependency (the `d2graph[onnx]` extra)

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if len(names) == 2:  # a node whose layers ignore padding: (x, padding mask)
        x_name, mask_name = names

        def call_masked(x, padding):
            return session.run(None, {x_name: np.ascontiguousarray(x), mask_name: np.ascontiguousarray(padding)})[0]

        return call_masked
    name = names[0]

    def call(x):
        return session.run(None, {name: np.ascontiguousarray(x)})[0]

    return call


def load_program(path: str | Path, format: str = "pt2", *, device: str = "cpu",
                 threads: int | None = None) -> Callable:
    """One exported program (a node's layer pipeline, or a policy's scorer) as a call
    x [n, ...] → y [n, ...] (x, padding mask → y for a node whose layers ignore padding):
    torch tensors for pt2, numpy arrays for onnx. `export` uses it
    to check what it wrote.

    Example:
        >>> f = load_program("deploy/early_exit/nodes/H1.pt2")                # doctest: +SKIP
        >>> f(torch.randn(3, 8, 16, 16)).shape                                  # doctest: +SKIP
        torch.Size([3, 10])
    """
    if format == "pt2":
        import torch  # see _load_pt2

        return _load_pt2(Path(path), torch.device(device))
    return _load_onnx(Path(path), threads)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of an export folder, checked for its format and version (E942).

    Example:
        >>> read_manifest("deploy/early_exit")["graph"]                       # doctest: +SKIP
        'early_exit'
    """
    folder = Path(folder)
    path = folder / MANIFEST
    export_help = "write one with `d2graph export RUN --out DIR` (RUN: a finished `d2graph train` run folder)"
    if not folder.is_dir():
        raise runtime_error("E942", f"no export folder {folder}", export_help)
    if not path.is_file():
        raise runtime_error("E942", f"{folder} is not an export folder (it has no {MANIFEST})", export_help)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise runtime_error("E943", f"{path} is unreadable or damaged ({e})",
                            "export the run again: `d2graph export RUN --out DIR`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "d2graph-export":
        raise runtime_error("E942", f"{path} is not a d2graph export manifest", export_help)
    version = manifest.get("version")
    if version != MANIFEST_VERSION:
        raise runtime_error("E942", f"{path} is an export of manifest version {version!r}; this d2graph reads "
                                    f"version {MANIFEST_VERSION}",
                            "export the run again with this d2graph (`d2graph export RUN --out DIR`), or run it "
                            "with the d2graph that exported it")
    return manifest


# --- the result -----------------------------------------------------------------------------


class Prediction:
    """What one batch of B examples produced.

    outputs        output name → [B, ...] (torch tensors for pt2, numpy arrays for onnx)
    actions        control node → int64 [B], the chosen action (0-based), -1 where it did not run
    cost           [B] the cost of each example (int64, float64 for fractional costs)
    cost_fraction  [B] float64, cost / the graph's full cost
    exit           int64 [B], for each example the first of the first output's inputs
                   (`exit_names`) that ran for it: with `merge=select` the exit it answered
                   through
    ran            node → the examples it ran for (None: all of them; else a sorted index array)

    As the executor's `Result`, `actions`, `cost`, `cost_fraction` and `exit` are made from
    the sets of examples when first read: serving at batch 1 often reads the output only.
    """

    def __init__(self, outputs: dict[str, Any], ran: dict[str, np.ndarray | None],
                 decided: dict[str, tuple[np.ndarray | None, np.ndarray | int]], runtime: Runtime, batch: int):
        self.outputs = outputs
        self.ran = ran
        self.exit_names = runtime.exit_names
        self._decided, self._runtime, self.batch_size = decided, runtime, batch

    def __repr__(self) -> str:
        return f"Prediction({self._runtime.graph!r}, batch_size={self.batch_size})"

    @property
    def output(self):
        if len(self.outputs) != 1:
            raise AttributeError(f"the graph has {len(self.outputs)} outputs ({', '.join(self.outputs)}): "
                                 "use prediction.outputs[name]")
        return next(iter(self.outputs.values()))

    @cached_property
    def actions(self) -> dict[str, np.ndarray]:
        out = {}
        for name in self._runtime.controls:
            a = np.full(self.batch_size, -1, dtype=np.int64)
            if name in self._decided:
                rows, chosen = self._decided[name]
                if rows is None:
                    a[:] = chosen
                else:
                    a[rows] = chosen
            out[name] = a
        return out

    @cached_property
    def cost(self) -> np.ndarray:
        rt = self._runtime
        # The costs of the nodes run on each set of examples are added up first, then each
        # set's total onto its examples (the executor's order: integers, so any order is exact).
        by_rows: dict[int, tuple[np.ndarray | None, int | float]] = {}
        for name, c in rt._costs:
            rows = self.ran[name]
            if rows is None or len(rows):
                key = id(rows)
                by_rows[key] = (rows, by_rows[key][1] + c if key in by_rows else c)
        cost = np.zeros(self.batch_size, dtype=np.int64 if rt.integer_costs else np.float64)
        for rows, c in by_rows.values():
            if rows is None:
                cost += c
            else:
                cost[rows] += c
        return cost

    @cached_property
    def cost_fraction(self) -> np.ndarray:
        full = self._runtime.full_cost
        return self.cost / full if full else np.zeros(self.batch_size)

    @cached_property
    def exit(self) -> np.ndarray:
        exit_index = np.full(self.batch_size, -1, dtype=np.int64)
        for i in reversed(range(len(self.exit_names))):
            rows = self.ran[self.exit_names[i]]
            if rows is None:
                exit_index[:] = i
            elif len(rows):
                exit_index[rows] = i
        return exit_index


# --- the runtime ----------------------------------------------------------------------------


class _Step:
    """One node of the manifest as the walk needs it."""

    __slots__ = ("name", "kind", "shape", "inputs", "merge", "controllers", "needs", "select", "sources", "anywhere",
                 "k", "program", "rule", "scorer", "const", "dead", "single", "rule_kind", "tau", "stop", "go",
                 "padding")

    def __init__(self, node: Mapping[str, Any]):
        self.name, self.kind, self.shape = node["name"], node["kind"], tuple(node["shape"])
        self.inputs = tuple((e["source"], None if e["default"] is None else float(e["default"]))
                            for e in node["inputs"])
        self.merge = node.get("merge", "sum")
        self.controllers = tuple((c[0], int(c[1])) for c in node["controllers"])
        self.needs = tuple(s for s, d in self.inputs if d is None)
        self.select = self.merge == "select"
        self.sources = tuple(s for s, _ in self.inputs)
        self.anywhere = any(d is not None for _, d in self.inputs)
        self.k = len(node.get("actions") or ())
        self.program: Callable | None = None
        self.rule: dict[str, Any] | None = node.get("rule")
        self.scorer: Callable | None = None
        self.const = node.get("const")
        # the token input whose padding mask the program takes as its second argument, if any
        self.padding: str | None = node.get("padding")
        self.dead: tuple[str, ...] = ()
        # the source of the one data input, where there is one (the common node)
        self.single = self.inputs[0][0] if len(self.inputs) == 1 else None
        self.rule_kind = self.rule["kind"] if self.rule else None
        cutoff = self.rule_kind == "cutoff"
        self.tau = number(self.rule["tau"]) if cutoff else None
        self.stop, self.go = (int(self.rule["stop"]), int(self.rule["go"])) if cutoff else (None, None)


class Runtime:
    """An exported network, loaded: call it on a batch (`runtime(x)` → `Prediction`).

    `x` is an array [B, *shape] (torch tensor or numpy) for a graph with one input, else a
    dict input name → array (token ids as integers). Attributes: `graph` (its name), `inputs`
    (name → per-example shape), `tokens` (token input → its vocabulary), `outputs`,
    `controls`, `full_cost`, `exit_names`, `policy` (the policy in words), `format`,
    `manifest`."""

    def __init__(self, folder: str | Path, *, device: str = "cpu", threads: int | None = None):
        self.folder = Path(folder)
        manifest = self.manifest = read_manifest(self.folder)
        fmt = manifest.get("program_format")
        if fmt not in FORMATS:
            raise runtime_error("E942", f"{self.folder / MANIFEST} names an unknown program format {fmt!r}",
                                "export the run again: `d2graph export RUN --out DIR`")
        self.format = fmt
        self.graph = manifest["graph"]
        self.inputs = {i["name"]: tuple(i["shape"]) for i in manifest["inputs"]}
        # token input → its vocabulary: kept int64, checked to lie in [0, vocab)
        self.tokens = {i["name"]: int(i["vocab"]) for i in manifest["inputs"] if i.get("tokens")}
        self.outputs = tuple(manifest["outputs"])
        self.full_cost = manifest["full_cost"]
        self.integer_costs = bool(manifest["integer_costs"])
        self.exit_names = tuple(manifest.get("exits") or ())
        self.policy = manifest["policy"]["describe"]
        self.controls = tuple(n["name"] for n in manifest["nodes"] if n["kind"] == "control")
        self._costs = tuple((n["name"], n["cost"]) for n in manifest["nodes"] if n["cost"])
        self._check_files()
        if fmt == "pt2":
            try:
                import torch  # only the pt2 format computes with torch
            except ImportError:  # pragma: no cover - torch is a dependency of d2graph itself
                raise runtime_error("E945", "the pt2 format needs torch", "pip install torch") from None
            self._ops = _TorchOps(torch, device)
            self._torch = torch
            load_program = lambda path: _load_pt2(path, self._ops.device)  # noqa: E731
        else:
            try:
                import onnxruntime  # noqa: F401 - only to say what is missing before anything else
            except ImportError:
                raise runtime_error("E945", f"{self.folder} holds ONNX programs, and onnxruntime is not installed",
                                    "install the extra: `pip install 'd2graph[onnx]'` (onnx and onnxruntime)") \
                    from None
            if device != "cpu":
                raise ValueError("the onnx format runs on the CPU (device='cpu')")
            self._ops = _NumpyOps()
            self._torch = None
            load_program = lambda path: _load_onnx(path, threads)  # noqa: E731
        self._plan = [_Step(n) for n in manifest["nodes"]]
        self._shapes = {step.name: step.shape for step in self._plan}
        self._one_input = None
        if len(self.inputs) == 1:
            name, shape = next(iter(self.inputs.items()))
            self._one_input = (name, shape, len(shape) + 1, self.tokens.get(name))
        for node, step in zip(manifest["nodes"], self._plan):
            try:
                if node.get("file"):
                    step.program = load_program(self.folder / node["file"])
                if step.rule is not None and step.rule.get("file"):
                    step.scorer = load_program(self.folder / step.rule["file"])
            except D2GraphError:
                raise
            except Exception as e:  # torch / onnxruntime raise many kinds for a file they cannot read
                which = node.get("file") if step.program is None else step.rule["file"]
                raise runtime_error("E943", f"{self.folder / which} cannot be loaded ({type(e).__name__}: "
                                            f"{str(e)[:200]})",
                                    "export the run again: `d2graph export RUN --out DIR`") from None
        last_use: dict[str, int] = {}
        for i, step in enumerate(self._plan):
            for source in step.sources:
                last_use[source] = i
            if step.rule:
                for source in step.rule.get("reads", ()):
                    last_use[source] = i
        dead: list[list[str]] = [[] for _ in self._plan]
        for name, i in last_use.items():
            dead[i].append(name)
        for step, names in zip(self._plan, dead):
            step.dead = tuple(n for n in names if n not in self.outputs)
        # the token inputs whose padding masks some program takes (each made once per batch)
        self._masked = tuple(sorted({step.padding for step in self._plan if step.padding}))

    def _check_files(self) -> None:
        again = "export the run again: `d2graph export RUN --out DIR`"
        for name, digest in self.manifest["files"].items():
            path = self.folder / name
            if not path.is_file():
                raise runtime_error("E943", f"{path} is missing from the export folder", again)
            if _sha256(path) != digest:
                raise runtime_error("E943", f"{path} is damaged or was changed after the export (its checksum "
                                            "differs from the manifest's)", again)

    def __repr__(self) -> str:
        return f"Runtime({self.graph!r}, format={self.format!r}, policy={self.policy!r})"

    # --- one batch ---

    def check_inputs(self, x) -> dict[str, Any]:
        """The batch as {input name: array}, each of shape [B, *shape] (E944 otherwise)."""
        names = list(self.inputs)
        if isinstance(x, Mapping):
            given = dict(x)
            if set(given) != set(names):
                raise runtime_error("E944", f"`{self.graph}` takes the inputs {', '.join(names)}; got "
                                            f"{', '.join(map(str, given)) or 'none'}",
                                    "give one array per input, named as in the graph")
        elif len(names) == 1:
            given = {names[0]: x}
        else:
            raise runtime_error("E944", f"`{self.graph}` has {len(names)} inputs ({', '.join(names)})",
                                "give a dict input name → array")
        batch = None
        out = {}
        for name in names:
            shape = self.inputs[name]
            got = tuple(getattr(given[name], "shape", ()))
            if len(got) != len(shape) + 1 or got[1:] != shape:
                raise runtime_error("E944", f"input `{name}` takes a batch of shape [B, {', '.join(map(str, shape))}], "
                                            f"got {list(got)}",
                                    "one row per example, each of the shape the graph declares")
            if batch is not None and got[0] != batch:
                raise runtime_error("E944", f"the inputs have different numbers of examples ({batch} and {got[0]} "
                                            f"for `{name}`)", "give every input the same examples")
            batch = got[0]
            out[name] = self._ops.array(given[name], name, self.tokens.get(name))
        if not batch:
            raise runtime_error("E944", "the batch is empty", "give at least one example")
        return out

    def __call__(self, x) -> Prediction:
        one = self._one_input
        shape = getattr(x, "shape", None)
        if one is not None and shape is not None and len(shape) == one[2] and shape[1:] == one[1] and shape[0]:
            inputs = {one[0]: self._ops.array(x, one[0], one[3])}  # the common case, checked in a few comparisons
        else:
            inputs = self.check_inputs(x)
        return self._run(inputs)

    def _run_one(self, inputs: dict[str, Any]) -> Prediction:
        """One example: every set is all or nothing, so the walk needs no set at all — a node
        runs or it does not (the latency a single request sees; the same rules as `_run`)."""
        ops = self._ops
        masks = self._masks(inputs)
        env: dict[str, Any] = {}
        rows_of: dict[str, np.ndarray | None] = {}
        chosen: dict[str, int] = {}
        actions: dict[str, tuple[None, int]] = {}
        for step in self._plan:
            name, kind = step.name, step.kind
            # plain loops, not any()/all() over generators: this walk is the latency of one request
            runs = True
            if kind != "input":
                if step.controllers:
                    runs = False
                    for source, action in step.controllers:
                        if chosen.get(source) == action:
                            runs = True
                            break
                if runs:
                    if step.select:
                        if not step.anywhere:
                            runs = False
                            for source in step.sources:
                                if rows_of[source] is None:
                                    runs = True
                                    break
                    else:
                        for source in step.needs:
                            if rows_of[source] is not None:
                                runs = False
                                break
            if not runs:
                rows_of[name] = _EMPTY
                env[name] = None
                continue
            rows_of[name] = None
            single = step.single
            try:
                if kind == "node":
                    # the usual node: one data input, whose source ran
                    x = env[single] if single is not None and rows_of[single] is None else \
                        self._merge_one(step, env, rows_of)
                    env[name] = step.program(x) if step.padding is None else step.program(x, masks[step.padding])
                elif kind == "control":
                    if step.rule_kind == "argmax":
                        x = env[single] if single is not None and rows_of[single] is None else \
                            self._merge_one(step, env, rows_of)
                        scores = step.program(x) if step.padding is None else step.program(x, masks[step.padding])
                        acts = int(ops.host(scores).argmax())  # [1, k]: the flat index is the action
                    elif step.rule_kind == "cutoff" and len(step.rule["reads"]) == 1 \
                            and rows_of[step.rule["reads"][0]] is None:
                        value = float(ops.host(step.scorer(env[step.rule["reads"][0]]))[0])  # float64, exactly
                        acts = step.stop if value >= step.tau else step.go
                    else:
                        acts = self._decide(step, None, 1, env, rows_of, 1, masks)
                        acts = acts if isinstance(acts, int) else int(acts[0])
                    chosen[name] = acts
                    actions[name] = (None, acts)
                elif kind == "input":
                    env[name] = inputs[name]
                elif kind == "dummy":
                    env[name] = ops.constant(step.const, 1)
                else:  # output
                    env[name] = self._merge_one(step, env, rows_of)
            except D2GraphError:
                raise
            except Exception as e:
                raise RuntimeError(f"while running node `{name}` of `{self.graph}`: {e}") from e
            for gone in step.dead:
                env[gone] = None
        return Prediction({name: env[name] for name in self.outputs}, rows_of, actions, self, 1)

    def _merge_one(self, step: _Step, env, rows_of):
        """`_merge` for one example: each input is its source's value if it ran, else its default."""
        inputs = step.inputs
        if len(inputs) == 1:
            source, default = inputs[0]
            if rows_of[source] is None:
                return env[source]
            return self._ops.full(1, self._shapes[source], default)
        if step.select:
            for source, default in inputs:
                if rows_of[source] is None:
                    return env[source]
                if default is not None:
                    return self._ops.full(1, self._shapes[source], default)
            raise RuntimeError("a select node runs only where an input is present")
        values = [env[s] if rows_of[s] is None else self._ops.full(1, self._shapes[s], d) for s, d in inputs
                  if step.merge == "concat" or not (d == 0 and rows_of[s] is not None)]
        if step.merge == "concat":
            return self._ops.cat(values)
        if not values:
            source, default = inputs[0]
            return self._ops.full(1, self._shapes[source], default)
        return reduce(lambda a, b: a + b, values)

    def _run(self, inputs: dict[str, Any]) -> Prediction:
        ops = self._ops
        batch = next(iter(inputs.values())).shape[0]
        if batch == 1:
            return self._run_one(inputs)
        masks = self._masks(inputs)
        env: dict[str, Any] = {}
        rows_of: dict[str, np.ndarray | None] = {}
        chosen: dict[str, list[np.ndarray | None]] = {}
        actions: dict[str, tuple[np.ndarray | None, np.ndarray | int]] = {}
        rows_for = self._rows_for
        for step in self._plan:
            name, kind = step.name, step.kind
            rows = None if kind == "input" else rows_for(step, rows_of, chosen, batch)
            rows_of[name] = rows
            n = batch if rows is None else len(rows)
            if n == 0:  # no example reaches it: not called at all
                env[name] = None
                if step.k:
                    chosen[name] = [_EMPTY] * step.k
            else:
                try:
                    if kind == "node":
                        env[name] = self._call(step, self._merge(step, rows, env, rows_of, batch), rows, masks)
                    elif kind == "control":
                        acts = self._decide(step, rows, n, env, rows_of, batch, masks)
                        actions[name] = (rows, acts)
                        if n == 1 and not isinstance(acts, int):
                            acts = int(acts[0])  # one example: one branch, no set to split
                        if isinstance(acts, int):
                            chosen[name] = [rows if j == acts else _EMPTY for j in range(step.k)]
                        else:
                            chosen[name] = _split(rows, acts, step.k, batch)
                    elif kind == "input":
                        env[name] = inputs[name]
                    elif kind == "dummy":
                        env[name] = ops.constant(step.const, n)
                    else:  # output
                        if rows is not None:
                            raise RuntimeError(f"output `{name}` has no value for some examples")
                        env[name] = self._merge(step, rows, env, rows_of, batch)
                except D2GraphError:
                    raise
                except Exception as e:
                    raise RuntimeError(f"while running node `{name}` of `{self.graph}`: {e}") from e
            for gone in step.dead:
                env[gone] = None
        return Prediction({name: env[name] for name in self.outputs}, rows_of, actions, self, batch)

    def _rows_for(self, step: _Step, rows_of, chosen, batch: int) -> np.ndarray | None:
        rows = None
        if step.controllers:
            rows = _union([chosen[source][action] for source, action in step.controllers], batch)
            if _size(rows, batch) == 0:
                return _EMPTY
        if step.select:
            return rows if step.anywhere else _intersect(rows, _union([rows_of[s] for s in step.sources], batch))
        for source in step.needs:
            rows = _intersect(rows, rows_of[source])
            if _size(rows, batch) == 0:
                return _EMPTY
        return rows

    def _gather(self, source: str, default: float | None, rows, env, rows_of, batch: int):
        """The edge's values on `rows`: the source's output where it ran, the default elsewhere."""
        ops = self._ops
        value, have = env[source], rows_of[source]
        n = _size(rows, batch)
        shape = self._shape(source)
        if value is None:
            return ops.full(n, shape, default)
        if _same(have, rows):
            return value
        if default is None:  # the node runs only where the source is present: rows ⊆ have
            return ops.take(value, _positions(rows, have, batch))
        hit = _intersect(rows, have)
        if _same(hit, rows):
            return ops.take(value, _positions(rows, have, batch))
        out = ops.full(n, shape, default, like=value)
        if _size(hit, batch):
            part = value if _same(hit, have) else ops.take(value, _positions(hit, have, batch))
            ops.put(out, _positions(hit, rows, batch), part)
        return out

    def _shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def _merge(self, step: _Step, rows, env, rows_of, batch: int):
        """The node's input on `rows`, its data inputs merged (LANGUAGE.md §3.3)."""
        if len(step.inputs) == 1:
            source, default = step.inputs[0]
            return self._gather(source, default, rows, env, rows_of, batch)
        if step.select:
            return self._select(step, rows, env, rows_of, batch)
        if step.merge == "concat":
            return self._ops.cat([self._gather(s, d, rows, env, rows_of, batch) for s, d in step.inputs])
        # As the executor: a term that is its default 0 for every example is left out.
        parts = [self._gather(s, d, rows, env, rows_of, batch) for s, d in step.inputs
                 if not (d == 0 and env[s] is None)]
        if not parts:
            source, default = step.inputs[0]
            return self._ops.full(_size(rows, batch), self._shape(source), default)
        return reduce(lambda a, b: a + b, parts)

    def _select(self, step: _Step, rows, env, rows_of, batch: int):
        """Per example, the first present input in declaration order: the inputs are written
        last one first, each over its own rows, so that earlier ones overwrite later ones."""
        takes = []
        for source, default in step.inputs:
            take = rows if default is not None else _intersect(rows, rows_of[source])
            if _size(take, batch) == 0:
                continue
            if _same(take, rows):
                if not takes:
                    return self._gather(source, default, rows, env, rows_of, batch)
                takes.append((source, default, take))
                break  # inputs after one present everywhere are never taken
            takes.append((source, default, take))
        out = None
        for source, default, take in reversed(takes):
            part = self._gather(source, default, take, env, rows_of, batch)
            if out is None:
                if _same(take, rows):
                    out = self._ops.copy(part)
                    continue
                out = self._ops.empty(_size(rows, batch), part)
            self._ops.put(out, _positions(take, rows, batch), part)
        return out

    def _masks(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Each token input's padding mask on the whole batch (bool [B, T], True where the id
        is 0, the executor's rule), for the token inputs some program takes a mask of."""
        return {source: inputs[source] == 0 for source in self._masked}

    def _call(self, step: _Step, x, rows, masks: dict[str, Any]):
        """The node's program on `x`, its input on `rows`; a program whose layers ignore
        padding also gets its token input's padding mask on those rows (the executor's
        `Interpreter.call`)."""
        if step.padding is None:
            return step.program(x)
        mask = masks[step.padding]
        return step.program(x, mask if rows is None else self._ops.take(mask, rows))

    def _decide(self, step: _Step, rows, n: int, env, rows_of, batch: int, masks: dict[str, Any]) -> np.ndarray | int:
        """The actions of a control node on its rows (host int64 [n], or one int for all)."""
        rule = step.rule
        kind = rule["kind"]
        if kind == "constant":
            return int(rule["action"])
        value = None
        if step.scorer is not None:
            reads = rule["reads"]
            for head in reads:
                if _size(_intersect(rows, rows_of[head]), batch) != n:
                    raise RuntimeError(f"the policy reads `{head}`, which did not run for every example that "
                                       f"reached `{step.name}`")
            parts = [self._gather(h, None, rows, env, rows_of, batch) for h in reads]
            value = self._ops.host(step.scorer(parts[0] if len(parts) == 1 else self._ops.cat(parts)))
        if kind == "cutoff":  # stop where the scorer's value reaches the threshold
            return np.where(value.astype(np.float64) >= number(rule["tau"]), int(rule["stop"]), int(rule["go"]))
        scores = self._ops.host(self._call(step, self._merge(step, rows, env, rows_of, batch), rows, masks))
        if kind == "argmax":
            return scores.argmax(axis=1)
        # The executor's policies add in float64, in this order (the same rounding).
        total = scores.astype(np.float64)
        if kind == "offset":
            total = total + np.asarray(rule["bonus"], dtype=np.float64)
        elif kind == "plus":
            total = (total + value) + np.asarray(rule["bias"], dtype=np.float64)
        else:
            raise RuntimeError(f"unknown decision rule {kind!r}")
        return total.argmax(axis=1)


def load(folder: str | Path, *, device: str = "cpu", threads: int | None = None) -> Runtime:
    """Load an export folder (`d2graph export RUN --out DIR`) as a `Runtime`.

    `device` places a pt2 export (e.g. "cuda"); `threads` sets onnxruntime's intra-op
    threads (torch's are the caller's: `torch.set_num_threads`).

    Example:
        >>> net = load("deploy/early_exit")                                   # doctest: +SKIP
        >>> net(torch.randn(4, 1, 32, 32)).exit                              # doctest: +SKIP
        array([2, 0, 0, 1])
    """
    return Runtime(folder, device=device, threads=threads)


# --- many batches ---------------------------------------------------------------------------


def predict(runtime: Runtime, x, *, batch: int = 256, progress: bool = False) -> dict[str, np.ndarray]:
    """Run `x` (an array [N, *shape], or a dict input name → array) in batches of `batch`
    and return numpy arrays: `output_<name>` per output, `prediction` (the argmax of the
    class scores, for one output of one dimension), `action_<control>` per control node,
    `cost`, `cost_fraction`, `exit` and `exit_names`, and `seconds` (the wall time).

    Example:
        >>> arrays = predict(load("deploy/early_exit"), np.load("digits.npz")["x"])   # doctest: +SKIP
        >>> summary(arrays, runtime)                                                   # doctest: +SKIP
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, not {batch}")
    names = list(runtime.inputs)
    given = dict(x) if isinstance(x, Mapping) else {names[0]: x}
    if set(given) != set(names):
        runtime.check_inputs(given)  # raises E944 naming what is missing
    total = len(next(iter(given.values())))
    bar = None
    if progress:
        try:
            from tqdm import tqdm  # the progress bar is optional: a deployment may not have tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            bar = tqdm(total=total, unit="ex", desc=f"predict {runtime.graph}", leave=False)
    parts: list[Prediction] = []
    start = time.perf_counter()
    try:
        for begin in range(0, total, batch):
            chunk = {name: a[begin:begin + batch] for name, a in given.items()}
            parts.append(runtime(chunk if len(names) > 1 else chunk[names[0]]))
            if bar is not None:
                bar.update(len(parts[-1].cost))
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    if not parts:
        raise runtime_error("E944", "the input holds no example", "give at least one example")
    ops = runtime._ops
    out: dict[str, np.ndarray] = {}
    for name in runtime.outputs:
        out[f"output_{name}"] = np.concatenate([np.asarray(ops.host(p.outputs[name])) for p in parts])
    if len(runtime.outputs) == 1 and out[f"output_{runtime.outputs[0]}"].ndim == 2:
        out["prediction"] = out[f"output_{runtime.outputs[0]}"].argmax(axis=1)
    for name in runtime.controls:
        out[f"action_{name}"] = np.concatenate([p.actions[name] for p in parts])
    out["cost"] = np.concatenate([p.cost for p in parts])
    out["cost_fraction"] = np.concatenate([p.cost_fraction for p in parts])
    out["exit"] = np.concatenate([p.exit for p in parts])
    out["exit_names"] = np.asarray(runtime.exit_names, dtype=str)
    out["seconds"] = np.asarray(seconds)
    return out


def write_predictions(path: str | Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """Save `predict`'s arrays as an `.npz`, atomically (the old file stays whole until the
    new one is complete)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise runtime_error("E944", f"predictions are written as .npz, not `{path.name}`",
                            "give --out a name ending in .npz")
    if not path.parent.is_dir():
        raise runtime_error("E944", f"no folder {path.parent} to write {path.name} in", "create it first")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append `.npz` to a name
            np.savez(f, **arrays)
    return path


def summary(arrays: Mapping[str, np.ndarray], runtime: Runtime) -> str:
    """One line: examples, time, mean cost (and its share of the full graph), exit shares."""
    cost = arrays["cost"]
    n = len(cost)
    mean = float(cost.mean())
    share = f" ({float(arrays['cost_fraction'].mean()):.1%} of the full graph)" if runtime.full_cost else ""
    exits = ""
    if runtime.exit_names:
        counts = np.bincount(arrays["exit"][arrays["exit"] >= 0], minlength=len(runtime.exit_names))
        exits = "; exits " + ", ".join(f"{name} {c / n:.1%}" for name, c in zip(runtime.exit_names, counts))
    seconds = float(arrays.get("seconds", float("nan")))
    speed = f" in {seconds:.2f} s" if math.isfinite(seconds) else ""
    return f"{runtime.graph}: {n:,} examples{speed}, mean cost {_cost(mean)} per example{share}{exits}"


def _cost(cost: float) -> str:
    # ir.format_cost's rule, written again: d2graph.ir needs networkx, which a deployment lacks
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(cost) >= scale:
            return f"{cost / scale:.3g}{unit}"
    return f"{cost:.4g}"

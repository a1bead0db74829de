"""Export a trained network for deployment: one program per node, and a plain-JSON manifest.

In:  a finished run folder (`export_run(RUN, OUT)`, what `d2graph export` calls), or a
     compiled `Executor` with its `Policy` (`export(executor, policy, OUT)`).
Out: the folder OUT that `d2graph.runtime` loads:
       manifest.json      plain JSON: the graph's name, its inputs (shapes; a token input
                          `"tokens": true` with its `"vocab"`) and outputs, the nodes in
                          evaluation order (kind, data inputs with their defaults, merge,
                          control edges, actions, shape, cost, program file, and `"padding"`:
                          the token input whose padding mask the program takes), the
                          edges, each control node's decision rule with its numbers
                          (thresholds, biases, bonuses), the policy (kind, words, state), the
                          exits, the full cost, the graph's source text, the manifest version
                          and each file's SHA-256
       nodes/<N>.pt2      each node's (and control node's) layer pipeline, torch.export'ed
                          with a batch dimension that varies (or .onnx, `format="onnx"`):
                          x → y, int64 ids for a node that reads a token input; (x, padding)
                          → y for one whose layers ignore padding (`Executor.padding_source`),
                          the mask bool [B, T], True where the id is 0
       policy/<Q>.pt2     for policies that compute (threshold's and costsensitive's
                          confidences, EENet's scorers): the computation of control node Q's
                          decision, exported the same way
Guarantees:
  - Per-batch predicates (`torch.cond`, ONNX `If`) cannot route each example of a batch,
    so nothing here exports the routing: each node is exported on its own and the runtime
    routes between them with the executor's rules.
  - Every program is checked after writing: bound as the runtime binds it and run on a
    batch of 3 (the trace used 2) — token ids in [0, vocab), and for a program that takes a
    padding mask, rows of no, half and all padding — its output must match the module's
    (E941 otherwise).
  - The policy is exported as the executor applies it (`policies.run_policy`): the same
    float64 additions in the same order, the same confidence functions (traced from the
    trainers' own code), so actions and costs are identical. Policies that are not a rule
    of the inputs — `uniform` (random) and `oracle` (reads the labels) — are refused (E941).
  - Atomic: the folder is built under a temporary name next to OUT and renamed into place;
    a failure leaves no OUT and an existing export untouched. An existing OUT that is not
    an export folder is never replaced (E946).
  - E940: the run is not finished (no last.pt, or one saved before the end of the last
    stage: an interrupted run). E945: `format="onnx"` without the `d2graph[onnx]` extra installed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

import networkx as nx
import torch
from torch import Tensor, nn

from .check import load
from .executor import Executor, compile
from .ir import Graph
from .paths import action_order
from .policies import LearnedPolicy, Policy, StaticPolicy, load_policy, save_policy
from .runs import Run, check_fingerprint, load_checkpoint
from .runtime import FORMATS, MANIFEST, MANIFEST_VERSION, bind_program, load_program, runtime_error
from .trainers.baselines import MEASURES, HeadTermPolicy, PatiencePolicy, ThresholdPolicy, agreeing_streaks, confidence
from .trainers.eenet import EENetPolicy, scorer_inputs
from .trainers.reinforce import OffsetPolicy

__all__ = ["export", "export_run"]

# The batch of the example input each program is traced with; the batch dimension is
# exported as varying (1 and up), so any batch runs.
_TRACE_BATCH = 2


# --- the policy's computations, as modules to export ----------------------------------------


class Confidence(nn.Module):
    """A head's confidence by one measure (threshold's rule), float64 [n]."""

    def __init__(self, measure: str):
        super().__init__()
        self.measure = measure

    def forward(self, scores: Tensor) -> Tensor:
        return confidence(scores, self.measure)


class ConfidenceTerm(nn.Module):
    """costsensitive's term without its bias: the head's confidence by every measure times
    the learned weights, float64 [n, k] (the runtime adds the bias after, in the order the
    policy does, so that the rounding is the same)."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.register_buffer("weight", weight.to(torch.float64))

    def forward(self, scores: Tensor) -> Tensor:
        found = torch.stack([confidence(scores, m) for m in MEASURES], dim=1)
        return found @ self.weight.T


class Streak(nn.Module):
    """PABEE's agreeing streak, float64 [n], from the class scores of a chain's heads
    concatenated [n, k·C] (its current head last): how many consecutive heads, ending with
    the last, predict the class the last one predicts (`baselines.agreeing_streaks`)."""

    def __init__(self, heads: int, classes: int):
        super().__init__()
        self.heads, self.classes = heads, classes

    def forward(self, scores: Tensor) -> Tensor:
        votes = scores.reshape(scores.shape[0], self.heads, self.classes).argmax(2)
        chain = [str(j) for j in range(self.heads)]
        streak = agreeing_streaks({h: votes[:, j] for j, h in enumerate(chain)}, {"q": chain})["q"]
        return streak.to(torch.float64)


class ExitScore(nn.Module):
    """EENet's utility score at exit k, float32 [n], from the class scores of exits 1..k
    concatenated [n, k·C]: each exit's softmax (float64, stored as float32, as the policy's
    `head_probs`), the scorers' inputs (`eenet.scorer_inputs`, with the rule's `sorted_probs`),
    and the scorers g_1..g_k in turn, each fed the earlier ones' sigmoids
    (`eenet._Scorers.forward`, stopped at exit k)."""

    def __init__(self, scorers: nn.ModuleList, k: int, classes: int, sorted_probs: bool):
        super().__init__()
        self.g = nn.ModuleList(scorers[:k + 1])
        self.k, self.classes, self.sorted_probs = k, classes, sorted_probs

    def forward(self, scores: Tensor) -> Tensor:
        c = self.classes
        probs = torch.stack([scores[:, j * c:(j + 1) * c].double().softmax(1).float() for j in range(self.k + 1)])
        inputs = scorer_inputs(probs, self.sorted_probs)
        past: list[Tensor] = []
        s = scores
        for j in range(self.k + 1):
            x = torch.cat([inputs[j], *past], 1) if past else inputs[j]
            s = self.g[j](x)[:, 0]
            past.append(torch.sigmoid(s)[:, None])
        return s


def _finite(value: float) -> float | str:
    # strict JSON has no infinities (an EENet exit that takes nobody has threshold +inf)
    value = float(value)
    return value if math.isfinite(value) else str(value)


def decision_rules(graph: Graph, policy: Policy) -> tuple[dict[str, dict], dict[str, nn.Module]]:
    """Each control node's decision rule (plain data) and, for rules that compute, the module
    to export for it, keyed by control node. Raises E941 for a policy that cannot be deployed.

    Rules: `argmax` (the node's own scores), `constant` (one action), `offset` (argmax of the
    scores + a bonus per action), `plus` (argmax of the scores + a scorer's term + a bias),
    `cutoff` (the `stop` action where a scorer's value reaches `tau`, else `go`).

    Example:
        >>> decision_rules(graph, LearnedPolicy())[0]                          # doctest: +SKIP
        {'Q1': {'kind': 'argmax'}}
    """
    controls = [q.name for q in graph.control_nodes]
    rules: dict[str, dict] = {q: {"kind": "argmax"} for q in controls}  # force mode's default
    modules: dict[str, nn.Module] = {}
    if isinstance(policy, LearnedPolicy) or policy is None:
        pass
    elif isinstance(policy, StaticPolicy):
        rules = {q: {"kind": "constant", "action": int(policy.actions.get(q, 0))} for q in controls}
    elif isinstance(policy, OffsetPolicy):
        for q in controls:
            order = policy.orders[q]
            k = len(order)
            bonus = torch.empty(k, dtype=torch.float64)
            bonus[torch.tensor(order)] = torch.arange(k - 1, -1, -1, dtype=torch.float64)
            o = policy.offsets[q] if policy.offsets else policy.offset
            rules[q] = {"kind": "offset", "bonus": (o * bonus).tolist()}
    elif isinstance(policy, ThresholdPolicy):
        for q, head in policy.heads.items():
            rules[q] = {"kind": "cutoff", "reads": [head], "tau": _finite(policy.tau), "stop": policy.stop[q],
                        "go": policy.go[q]}
            modules[q] = Confidence(policy.measure)
    elif isinstance(policy, HeadTermPolicy):
        for q, head in policy.heads.items():
            rules[q] = {"kind": "plus", "reads": [head], "bias": policy.bias[q].tolist()}
            modules[q] = ConfidenceTerm(policy.weight[q])
    elif isinstance(policy, PatiencePolicy):
        for q, chain in policy.chains.items():
            classes = graph[chain[-1]].out_shape[0]
            rules[q] = {"kind": "cutoff", "reads": list(chain), "tau": float(policy.patience),
                        "stop": policy.stop[q], "go": policy.go[q]}
            modules[q] = Streak(len(chain), classes)
    elif isinstance(policy, EENetPolicy):
        scorers = policy.rule.scorers()
        heads = [e.head for e in policy.exits]
        for k, e in enumerate(policy.exits):
            if e.control is None:
                continue
            rules[e.control] = {"kind": "cutoff", "reads": heads[:k + 1],
                                "tau": _finite(policy.rule.thresholds[k]), "stop": e.stop, "go": e.go}
            modules[e.control] = ExitScore(scorers.g, k, policy.rule.classes, policy.rule.sorted_probs)
    else:
        why = {"uniform": "it routes at random", "oracle": "it reads the labels, which a deployment does not have"}
        raise runtime_error("E941", f"the run's policy `{policy.kind}` cannot be deployed: "
                                    f"{why.get(policy.kind, 'd2graph does not know how to export it')}",
                            "train the graph with a policy stage that decides from the inputs (threshold, eenet, "
                            "costsensitive, patience, reinforce, qlearning, static)")
    return rules, modules


def evaluation_order(graph: Graph, rules: Mapping[str, dict]) -> list[str]:
    """The graph's nodes in an order where every node comes after its inputs and its
    controllers (the graph's order) and every control node after the heads its rule reads
    (a threshold reads a head the graph may list after the control node); ties keep the
    graph's order."""
    dag = graph.to_networkx()
    for q, rule in rules.items():
        for head in rule.get("reads", ()):
            dag.add_edge(head, q)
    index = {n.name: i for i, n in enumerate(graph.nodes)}
    try:
        return list(nx.lexicographical_topological_sort(dag, key=index.__getitem__))
    except nx.NetworkXUnfeasible:
        raise runtime_error("E941", "the policy reads a head that depends on the decision it informs",
                            "a control node can only read heads computed before it decides") from None


# --- writing programs -----------------------------------------------------------------------


def _example_padding(batch: int, tokens: int) -> Tensor:
    """A realistic padding mask bool [batch, tokens]: each row padded at its end, as token
    data is, the rows' real lengths taken in turn from all, half, none and all but one."""
    cycle = (tokens, tokens // 2, 0, tokens - 1)
    lengths = torch.tensor([cycle[i % len(cycle)] for i in range(batch)])
    return torch.arange(tokens)[None, :] >= lengths[:, None]


def _example(batch: int, in_shape: tuple[int, ...], vocab: int | None, padding: Tensor | None) -> Tensor:
    """An input batch for tracing and checking: token ids in [1, vocab), 0 where `padding`
    says so (a node that reads the token input directly), or floats."""
    if vocab is None:
        return torch.randn(batch, *in_shape)
    ids = torch.randint(1, max(vocab, 2), (batch, *in_shape), dtype=torch.int64)
    if padding is not None and padding.shape == ids.shape:
        ids = ids.masked_fill(padding, 0)
    return ids


def _write_program(module: nn.Module, in_shape: tuple[int, ...], path: Path, fmt: str, what: str, *,
                   vocab: int | None = None, padding: int | None = None) -> None:
    """Export `module` (input [B, *in_shape]) to `path` and check it. `vocab`: the input is
    token ids in [0, vocab) (int64), not floats. `padding`: the module takes a second
    argument, the padding mask bool [B, padding] of the token input."""
    module = module.eval()
    mask = _example_padding(_TRACE_BATCH, padding) if padding is not None else None
    example = (_example(_TRACE_BATCH, in_shape, vocab, mask),) + ((mask,) if mask is not None else ())
    batch = torch.export.Dim("batch", min=1)
    dynamic = tuple({0: batch} for _ in example)  # every argument varies in its batch only
    names = ["x", "padding"][:len(example)]
    try:
        if fmt == "pt2":
            program = torch.export.export(module, example, dynamic_shapes=dynamic)
            torch.export.save(program, str(path))
            run = bind_program(program)  # as the runtime binds it (loading it back would cost 0.4 s a node)
        else:
            # One self-contained file per program (the weights inside, where the manifest's
            # checksum covers them); the exporter's progress lines and its notes about
            # torchvision's operators are not the user's business.
            with _quiet_onnx():
                torch.onnx.export(module, example, str(path), input_names=names, output_names=["y"],
                                  dynamic_shapes=dynamic, dynamo=True, external_data=False, verbose=False)
            onnx_call = load_program(path, "onnx")
            run = lambda *xs: torch.from_numpy(onnx_call(*(x.numpy() for x in xs)))  # noqa: E731
    except Exception as e:  # torch raises many kinds for a layer it cannot trace
        raise runtime_error("E941", f"{what} cannot be exported as {fmt} ({type(e).__name__}: {str(e)[:300]})",
                            "a `module(...)` layer must be traceable by torch.export (no data-dependent Python "
                            "control flow)") from None
    # Checked on another batch size than the traced one; where the module reads a mask, with
    # rows of no padding, half padding and all padding (align_padding's special case).
    mask = _example_padding(3, padding) if padding is not None else None
    x = (_example(3, in_shape, vocab, mask),) + ((mask,) if mask is not None else ())
    with torch.inference_mode():
        expected, got = module(*x), run(*x)
    if got.shape != expected.shape or not torch.allclose(got.to(expected.dtype), expected, rtol=1e-4, atol=1e-5):
        raise runtime_error("E941", f"{what}: the exported program computes something else than the module",
                            "report this with the .d2 file: d2graph should not export it")


@contextlib.contextmanager
def _quiet_onnx():
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401  the `d2graph[onnx]` extra: optional, checked only when asked for
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise runtime_error("E945", f"the onnx format needs the `d2graph[onnx]` extra ({e.name} is not installed)",
                            "pip install 'd2graph[onnx]', or export with --format pt2") from None


def _plain(value: Any) -> Any:
    """`value` with tuples as lists and infinities as strings: strict JSON."""
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export(executor: Executor, policy: Policy | None, out: str | Path, *, source: str = "", format: str = "pt2",
           run: Mapping[str, Any] | None = None) -> Path:
    """Write `executor` (its weights) and `policy` (None: the control nodes' argmax) as an
    export folder at `out`, for `d2graph.runtime.load`. `source` is the graph's .d2 text,
    kept in the manifest; `run` notes where it came from. Returns the folder.

    Example:
        >>> trained = d2graph.train(graph, [...])                              # doctest: +SKIP
        >>> export(trained.executor, trained.policy, "deploy/early_exit")     # doctest: +SKIP
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; the formats are {', '.join(FORMATS)}")
    if format == "onnx":
        _require_onnx()
    graph = executor.graph
    device = next(executor.parameters(), torch.empty(0)).device
    if device.type != "cpu":  # the programs are traced on CPU tensors; the runtime places them
        raise ValueError(f"export traces a CPU executor; this one is on {device}: pass executor.cpu()")
    out = Path(out)
    if out.exists() and not (out / MANIFEST).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise runtime_error("E946", f"{out} exists and is not an export folder", "choose another --out (an export "
                                                                                "folder is replaced whole)")
    # token input → its vocabulary: the runtime keeps these int64 and makes their padding masks
    tokens = {n.name: graph.vocab(n.name) for n in graph.inputs if n.tokens}
    rules, modules = decision_rules(graph, policy or LearnedPolicy())
    order = evaluation_order(graph, rules)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".export"))
    was_training = executor.training
    executor.eval()
    try:
        (work / "nodes").mkdir()
        suffix = FORMATS[format]
        files: dict[str, str] = {}
        nodes = []
        for name in order:
            node = graph[name]
            entry: dict[str, Any] = {
                "name": name, "kind": node.kind, "shape": list(node.out_shape), "cost": node.cost,
                "merge": node.merge, "inputs": [{"source": e.source, "default": e.default} for e in node.inputs],
                "controllers": [[c.source, c.action] for c in node.controllers],
                "actions": list(node.actions), "file": None,
            }
            module = executor.nodes[name] if name in executor.nodes else None
            if node.kind == "dummy" and module is not None:
                # A constant: the same row for every example, written out as numbers.
                with torch.inference_mode():
                    entry["const"] = module(torch.empty(1, 0)).tolist()
            elif module is not None:
                file = f"nodes/{name}{suffix}"
                # A node reads a token input directly or not at all (the checker's E833).
                reads = [e.source for e in node.inputs if e.source in tokens]
                masked = executor.padding_source(name)
                _write_program(module, node.in_shape, work / file, format, f"node `{name}`",
                               vocab=tokens[reads[0]] if reads else None,
                               padding=graph[masked].out_shape[0] if masked is not None else None)
                entry["file"] = file
                if masked is not None:  # the program's second argument: this input's padding mask
                    entry["padding"] = masked
                files[file] = _sha256(work / file)
            if node.is_control:
                rule = dict(rules[name])
                if name in modules:
                    (work / "policy").mkdir(exist_ok=True)
                    file = f"policy/{name}{suffix}"
                    width = sum(graph[h].out_shape[0] for h in rule["reads"])
                    _write_program(modules[name], (width,), work / file, format, f"the policy at `{name}`")
                    rule["file"] = file
                    files[file] = _sha256(work / file)
                entry["rule"] = rule
            nodes.append(entry)
        first = graph.outputs[0] if graph.outputs else None
        manifest = {
            "format": "d2graph-export", "version": MANIFEST_VERSION, "d2graph": _version(),
            "program_format": format, "torch": torch.__version__, "graph": graph.name,
            "inputs": [{"name": n.name, "shape": list(n.out_shape)}
                       | ({"tokens": True, "vocab": tokens[n.name]} if n.name in tokens else {})
                       for n in graph.inputs],
            "outputs": [n.name for n in graph.outputs],
            "exits": [e.source for e in first.inputs] if first is not None else [],
            "full_cost": graph.full_cost,
            "integer_costs": all(isinstance(n.cost, int) and not isinstance(n.cost, bool) for n in graph.nodes),
            "edges": {"data": [{"source": e.source, "target": e.target, "default": e.default}
                               for e in graph.data_edges],
                      "control": [{"source": c.source, "action": c.action, "target": c.target}
                                  for c in graph.control_edges]},
            "nodes": nodes,
            "policy": {"kind": (policy or LearnedPolicy()).kind, "describe": (policy or LearnedPolicy()).describe(),
                       "state": save_policy(policy or LearnedPolicy())},
            "action_order": action_order(graph),
            "run": dict(run or {}),
            "source": source,
            "files": files,
        }
        (work / MANIFEST).write_text(json.dumps(_plain(manifest), indent=1, allow_nan=False) + "\n", encoding="utf-8")
        _replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        executor.train(was_training)
    return out


def _replace(work: Path, out: Path) -> None:
    """Move the finished folder `work` to `out` in renames: a reader sees the old export or
    the new one, never a mixture (an existing `out` is moved aside first, then removed)."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
        os.rmdir(old)
        os.replace(out, old)
    try:
        os.replace(work, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _version() -> str:
    try:
        from importlib.metadata import version  # only to stamp the manifest

        return version("d2graph")
    except Exception:
        return "dev"


def export_run(folder: str | Path, out: str | Path, *, format: str = "pt2") -> Path:
    """Export a finished run folder (`d2graph train`'s) with its final weights and policy.

    Example:
        >>> export_run("runs/early_exit/20261201-020000", "deploy/early_exit")  # doctest: +SKIP
    """
    run = Run.open(folder)
    finish = f"finish it first: `d2graph train --resume {folder}`"
    last = run.folder / "last.pt"
    if not last.is_file():
        raise runtime_error("E940", f"the run {folder} is not finished: it has no last.pt yet", finish)
    state = load_checkpoint(last)
    if not state.get("complete"):
        raise runtime_error("E940", f"the run {folder} is not finished: its last.pt is not the end of its last stage",
                            finish)
    graph = load(run.source)
    check_fingerprint(state, graph, run.folder / "last.pt",
                      help="the run folder's copy of the source was changed after training; export an untouched run")
    with torch.random.fork_rng(devices=[]):  # building the modules must not move the caller's random stream
        executor = compile(graph)
    try:
        executor.load_state_dict(state["weights"])
        policy = load_policy(graph, state["policy"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise runtime_error("E943", f"{run.folder / 'last.pt'} does not fit graph `{graph.name}` ({str(e)[:200]})",
                            "export an untouched run folder") from None
    return export(executor, policy, out, source=run.source.read_text(encoding="utf-8"), format=format,
                  run={"folder": str(run.folder), "fingerprint": state.get("fingerprint")})

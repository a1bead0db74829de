"""AST → IR: the rules of the language (R1–R8), shape inference and costs.

In:  a parsed `ast.File`.
Out: `(graph, diagnostics)`: a frozen `ir.Graph` when there is no error (warnings may
     remain), else `None` and every independent error found in one pass.
Guarantees: each diagnostic has a stable code, a span with a caret-ready position and a
help sentence. Errors that follow from an earlier one are not reported twice (a node
whose input shape is unknown is not shape-checked; totality is only checked on a graph
whose structure is sound). A returned graph passes `graph.lint()`.

Codes: E0xx syntax and files · E1xx R1 cycles · E2xx R2 edge kinds · E3xx R3 nested
control · E4xx R4 actions · E5xx R5 reachability and node kinds · E6xx R6 shapes ·
E7xx R7 totality · E8xx R8 names, layers, arguments, train block. docs/language.md
lists them all.

Example:
    >>> graph, diags = check(parse(open("examples/high_low.d2").read()))   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx

from . import ast
from .cost import measure
from .diagnostics import D2GraphError, Diagnostic, Note, Span, did_you_mean
from .ir import (MAX_PARAMS, ControlEdge, DataEdge, Graph, Layer, Node, TrainConfig, TrainStage, describe_params,
                 edges_by_node)
from .layers import LAYERS, LayerError
from .schema import DATASETS, TRAINERS, TRAIN_SETTINGS, Param, Schema, Symbol, format_value
from .syntax import parse, read_source

# Totality (R7) walks the action combinations; it stops after this many steps (a node
# evaluated on one combination) and says that its answer is partial (W701). Bounded by
# work, not by combinations: one combination of a graph of a thousand nodes costs a
# thousand steps. About a second of checking.
TOTALITY_STEPS = 1_000_000

# A graph expands into at most this many layers (blocks expanded, a `resnet_stage` counted
# by its size, four per basic block) and declares at most this many edges: the checker
# builds and measures every layer (a few milliseconds each, unless the same layer was
# measured before), so without a bound nested blocks would make its work exponential (E815).
MAX_LAYERS = 2_000
MAX_EDGES = 100_000

# The attributes each kind of statement accepts (`[merge=concat]`); the language server
# completes and describes them from here too.
ATTRIBUTES = {
    "node": Schema("node", (Param("cost", "number", None, doc="declared cost per example"),
                            Param("merge", "choice", "sum", choices=("sum", "concat", "select")))),
    "control": Schema("control", (Param("cost", "number", None),
                                  Param("merge", "choice", "sum", choices=("sum", "concat", "select")))),
    "dummy": Schema("dummy", (Param("cost", "number", None),)),
    "output": Schema("output", (Param("merge", "choice", "sum", choices=("sum", "concat", "select")),)),
    "edge": Schema("edge", (Param("default", "number", None, doc="value sent when the source is skipped"),)),
    "control edge": Schema("control edge", ()),
}


@dataclass
class _Decl:
    name: str
    kind: str
    span: Span
    name_span: Span
    decl: Any  # the AST statement
    attrs: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)  # [(name, args, span, written)]
    broken: bool = False  # some layer of the pipeline was reported as unresolvable


def load(path: str | Path, *, allow_imports: bool = False) -> Graph:
    """Read, parse and check a .d2 file; raise `D2GraphError` with every error.

    >>> g = load("examples/high_low.d2")   # doctest: +SKIP
    """
    text = read_source(path)
    return check_text(text, str(path), allow_imports=allow_imports)


def check_text(text: str, filename: str = "<input>", *, allow_imports: bool = False) -> Graph:
    graph, diags = check(parse(text, filename), allow_imports=allow_imports)
    if graph is None:
        raise D2GraphError(diags)
    return graph


def check(file: ast.File, *, allow_imports: bool = False) -> tuple[Graph | None, list[Diagnostic]]:
    """Check a parsed file; see the module docstring."""
    return _Checker(file, allow_imports).run()


class _Checker:
    def __init__(self, file: ast.File, allow_imports: bool):
        self.file = file
        self.allow_imports = allow_imports
        self.diags: list[Diagnostic] = []
        self.lets: dict[str, Any] = {}
        self.blocks: dict[str, ast.BlockDef] = {}
        self.decls: dict[str, _Decl] = {}
        self.names: dict[str, Span] = {}  # every constant, block and node name: one namespace
        self.data_edges: list[DataEdge] = []
        self.control_lists: dict[str, list[ast.ControlEdges]] = {}
        self.control_edges: list[ControlEdge] = []
        self.shapes: dict[str, tuple | None] = {}
        self.costs: dict[str, int | float] = {}
        self.layers: dict[str, tuple[Layer, ...]] = {}
        self.in_shapes: dict[str, tuple | None] = {}
        self.token_inputs: list[str] = []  # inputs of token ids (`input x tokens [T]`), in file order
        # Nodes named in an edge statement that had an error: their missing edges are
        # a consequence, not a second mistake, so E504 and W501 stay quiet about them.
        self.tainted: set[str] = set()
        self.layer_budget = MAX_LAYERS  # layers (and block uses) left to expand; E815 at 0
        self.edge_budget = MAX_EDGES

    def error(self, code, message, span, label="", help="", notes=()):
        self.diags.append(Diagnostic(code, message, span, label, help, tuple(notes)))

    def warn(self, code, message, span, label="", help=""):
        self.diags.append(Diagnostic(code, message, span, label, help, severity="warning"))

    @property
    def has_errors(self) -> bool:
        return any(d.is_error for d in self.diags)

    # --- driver ------------------------------------------------------------------------

    def run(self) -> tuple[Graph | None, list[Diagnostic]]:
        graphs = self.file.graphs
        if not graphs:
            self.error("E006", "this file has no `graph`", self.file.span and _start(self.file.span),
                       "expected `graph NAME { ... }`",
                       help="a .d2 file describes one network: `graph NAME { input x [1, 8, 8] ... }`")
            return None, self.diags
        for extra in graphs[1:]:
            self.error("E006", "a file describes one graph, but this is a second one", extra.name.span,
                       "second graph", help="move it to a file of its own",
                       notes=[Note(graphs[0].name.span, "the first graph")])
        g = graphs[0]
        file_level = [i for i in self.file.items if not isinstance(i, ast.GraphDecl)]
        self.collect_scope(file_level + list(g.body))
        self.collect_decls(g.body)
        self.resolve_pipelines()
        self.collect_edges(g.body)
        structure_ok = not self.has_errors
        self.check_structure()
        structure_ok = structure_ok and not self.has_errors
        acyclic = self.check_cycles()
        if acyclic:
            self.check_reachability()
            self.infer_shapes()
            self.check_size()
            if structure_ok and not self.has_errors:
                self.check_totality()
        train = self.check_train([s for s in g.body if isinstance(s, ast.TrainBlock)])
        if self.has_errors:
            return None, self._sorted()
        graph = self.build(g, train)
        graph.lint()
        return graph, self._sorted()

    def _sorted(self) -> list[Diagnostic]:
        # Stable order of appearance in the file, errors and warnings interleaved. A block
        # used many times reports a mistake in its body once, not once per use.
        unique = list({(d.code, d.message, d.span, d.span and d.span.source.name): d for d in self.diags}.values())
        return sorted(unique, key=lambda d: (d.span.start if d.span else -1))

    # --- names: lets, blocks, nodes -------------------------------------------------------

    def collect_scope(self, items) -> None:
        for item in items:
            if isinstance(item, ast.Let):
                name = item.name.text
                if self._duplicate(name, item.name.span):
                    continue
                self.lets[name] = self.value(item.value, self.lets)
            elif isinstance(item, ast.BlockDef):
                name = item.name.text
                if self._duplicate(name, item.name.span):
                    continue
                if name in LAYERS:
                    self.error("E801", f"block `{name}` has the name of a built-in layer", item.name.span,
                               "would hide the layer", help=f"rename the block, e.g. `my_{name}`")
                    continue
                params = [p.text for p in item.params]
                for p in item.params:
                    if params.count(p.text) > 1:
                        self.error("E801", f"block `{name}` has two parameters named `{p.text}`", p.span,
                                   "repeated", help="give each parameter its own name")
                        break
                self.blocks[name] = item

    def _duplicate(self, name: str, span: Span) -> bool:
        """E801 if the name of a constant, block or node is taken; else claim it."""
        seen = self.names
        if name in seen:
            self.error("E801", f"`{name}` is defined twice", span, f"second definition of `{name}`",
                       help="rename one of them; names of nodes, constants and blocks are unique",
                       notes=[Note(seen[name], "first defined here")])
            return True
        seen[name] = span
        return False

    def collect_decls(self, body) -> None:
        for stmt in body:
            if isinstance(stmt, ast.InputDecl):
                kind = "input"
            elif isinstance(stmt, ast.OutputDecl):
                kind = "output"
            elif isinstance(stmt, ast.NodeDecl):
                kind = stmt.kind
            else:
                continue
            name = stmt.name.text
            if self._duplicate(name, stmt.name.span):
                continue
            decl = _Decl(name, kind, stmt.span, stmt.name.span, stmt)
            schema = ATTRIBUTES.get(kind)
            if schema is not None:
                decl.attrs = self.attributes(schema, getattr(stmt, "attrs", ()), f"{kind} `{name}`")
            self.decls[name] = decl

    def attributes(self, schema: Schema, attrs, owner: str) -> dict:
        keywords = []
        for a in attrs:
            key = a.key.text
            if key not in {p.name for p in schema.params}:
                allowed = ", ".join(f"`{p.name}`" for p in schema.params) or "none"
                self.error("E808", f"{owner} has no attribute `{key}`{did_you_mean(key, [p.name for p in schema.params])}",
                           a.key.span, "unknown attribute", help=f"attributes allowed here: {allowed}")
                continue
            keywords.append((key, self.value(a.value, self.lets), a.key.span, a.value.span))
        bound, diags = schema.bind([], keywords, None, what="attribute of")
        for d in diags:  # re-word "attribute of `node` ..." into the owner's words
            self.diags.append(Diagnostic(d.code, d.message.replace(f"attribute of `{schema.name}`", owner),
                                         d.span, d.label, d.help))
        return bound

    # --- values ------------------------------------------------------------------------

    def value(self, v, env: dict) -> Any:
        """An AST value → a Python value; bare names are looked up, else become symbols."""
        if isinstance(v, (ast.Number, ast.String, ast.Bool)):
            return v.value
        if isinstance(v, ast.List):
            return [self.value(i, env) for i in v.items]
        if isinstance(v, ast.Ref):
            name = v.name.text
            return env[name] if name in env else Symbol(name)
        if isinstance(v, ast.Call):
            return _CallValue(v.name.text, v)
        raise TypeError(v)

    def check_symbols(self, value, span, param: Param | None, env: dict) -> bool:
        """A bare name that is no constant/parameter is fine only where a symbol is expected."""
        if isinstance(value, _CallValue):
            self.error("E805", f"`{value.name}(...)` is a call; a value is expected here", span,
                       "not a value", help="layers go in the pipeline; arguments are numbers, strings, lists or names")
            return False
        if isinstance(value, Symbol):
            if param is not None and (param.kind == "choice" or value in param.also or param.kind == "any"):
                return True
            self.error("E802", f"undefined name `{value}`{did_you_mean(value, env)}", span,
                       "not a constant or block parameter",
                       help="define it with `let NAME = value`, or write a number, string or list")
            return False
        if isinstance(value, list):
            return all(self.check_symbols(v, span, None, env) for v in value)
        return True

    # --- pipelines ---------------------------------------------------------------------

    def resolve_pipelines(self) -> None:
        for decl in self.decls.values():
            if decl.kind in ("input", "output"):
                continue
            errors_before = len(self.diags)
            budget_before = self.layer_budget
            decl.layers = self.expand(decl.decl.pipeline, self.lets, [], decl)
            decl.broken = len(self.diags) > errors_before or self.layer_budget <= 0
            if self.layer_budget <= 0 and budget_before > 0:
                self.error("E815", f"the graph expands into more than {MAX_LAYERS:,} layers", decl.name_span,
                           f"`{decl.name}` passes the limit",
                           help="blocks are expanded into their layers for every use, and a `resnet_stage` "
                                "counts four layers per basic block: use fewer or smaller blocks")
            consts = [i for i, layer in enumerate(decl.layers) if layer[0] == "const"]
            if decl.kind == "dummy" and (not decl.layers or consts[:1] != [0]) and decl.decl.pipeline:
                first = decl.decl.pipeline[0]
                self.error("E814", f"dummy node `{decl.name}` must start with `const(value, shape=[...])`",
                           first.span, "a dummy node has no input to transform",
                           help="write e.g. `dummy D = const(0, shape=[10])`")
            for i in consts:
                if decl.kind != "dummy" or i != 0:
                    self.error("E814", "`const` can only start a dummy node", decl.layers[i][2],
                               "not allowed here", help="declare a `dummy` node for a constant and connect it with an edge")

    def expand(self, calls, env: dict, stack: list[str], decl: _Decl) -> list:
        out = []
        for call in calls:
            # Every call costs one unit, a block use too: nested blocks expand
            # exponentially, and the budget stops them long before that bites.
            self.layer_budget -= 1
            if self.layer_budget <= 0:
                return out
            name = call.name.text
            if name in self.blocks:
                out += self.expand_block(call, env, stack, decl)
                continue
            spec = LAYERS.get(name)
            if spec is None:
                hint = did_you_mean(name, LAYERS.names() + list(self.blocks))
                self.error("E803", f"unknown layer `{name}`{hint}", call.name.span, "no such layer or block",
                           help="see the layer table in docs/language.md, or define `block "
                           f"{name}(...) = ...`")
                continue
            if spec.imports and not self.allow_imports:
                self.error("E809", "`module(...)` imports and runs code named by this file", call.span,
                           "needs permission",
                           help="if you trust this file, run with --allow-imports (`d2graph.load(..., allow_imports=True)`)")
                continue
            args = self.bind_call(spec.schema, call, env, "layer")
            if args is not None:
                if spec.size is not None:  # `resnet_stage(c, blocks)` builds `blocks` blocks
                    self.layer_budget -= max(0, spec.size(args) - 1)
                    if self.layer_budget <= 0:
                        return out
                out.append((name, args, call.span, _summary(spec.schema, args)))
        return out

    def bind_call(self, schema: Schema, call: ast.Call, env: dict, what: str):
        positional, keywords, ok, bad = [], [], True, []
        names = [p.name for p in schema.params]
        for i, arg in enumerate(call.args):
            v = self.value(arg.value, env)
            if arg.key is None:
                param = schema.params[i] if i < len(schema.params) else None
                positional.append((v, arg.value.span))
            else:
                param = schema.params[names.index(arg.key.text)] if arg.key.text in names else None
                keywords.append((arg.key.text, v, arg.key.span, arg.value.span))
            if (param is not None or schema.open) and not self.check_symbols(
                    v, arg.value.span, param or Param("x", "any"), env):
                ok, bad = False, bad + [arg.value.span]
        bound, diags = schema.bind(positional, keywords, call.span, what=what)
        # An argument already reported as an undefined name is not also the wrong type.
        diags = [d for d in diags if d.span not in bad]
        self.diags += diags
        return bound if ok and not diags else None

    def expand_block(self, call: ast.Call, env: dict, stack: list[str], decl: _Decl) -> list:
        block = self.blocks[call.name.text]
        name = block.name.text
        if name in stack:
            cycle = " -> ".join(stack[stack.index(name):] + [name])
            self.error("E812", f"block `{name}` uses itself ({cycle})", call.name.span, "recursive use",
                       help="a block expands into layers once; remove the recursion")
            return []
        schema = Schema(name, tuple(Param(p.text, "any") for p in block.params))
        bound = self.bind_call(schema, call, env, "block")
        if bound is None:
            return []
        inner_env = {**self.lets, **bound}
        return self.expand(block.pipeline, inner_env, stack + [name], decl)

    # --- edges -------------------------------------------------------------------------

    def node_ref(self, name: ast.Name) -> bool:
        if name.text in self.decls:
            return True
        if name.text in self.lets or name.text in self.blocks:
            self.error("E802", f"`{name.text}` is not a node", name.span, "a constant or block, not a node",
                       help="edges connect inputs, outputs and nodes")
        else:
            self.tainted.add("*")  # a misspelt name may be the missing edge of any node
            self.error("E802", f"undefined node `{name.text}`{did_you_mean(name.text, self.decls)}", name.span,
                       "not declared", help=f"declare it, e.g. `node {name.text} = ...`, or fix the name")
        return False

    def collect_edges(self, body) -> None:
        seen: dict[tuple[str, str], Span] = {}
        for stmt in body:
            if isinstance(stmt, ast.EdgeChain):
                attrs = self.attributes(ATTRIBUTES["edge"], stmt.attrs, "an edge")
                ok = [all([self.node_ref(n) for n in hop]) for hop in stmt.hops]
                if not all(ok):
                    self.tainted |= {n.text for hop in stmt.hops for n in hop}
                pairs = sum(len(a) * len(b) for a, b in zip(stmt.hops, stmt.hops[1:]))
                self.edge_budget -= pairs
                if self.edge_budget < 0:  # `a, b, ... -> c, d, ...` is every pair: quadratic in its length
                    self.tainted |= {n.text for hop in stmt.hops for n in hop}
                    if self.edge_budget + pairs >= 0:
                        self.error("E815", f"the graph declares more than {MAX_EDGES:,} data edges", stmt.span,
                                   f"this statement declares {pairs:,}",
                                   help="`A, B -> C, D` declares an edge for every pair of a left and a right "
                                        "name: split the statement, or merge nodes first")
                    continue
                for (left, lok), (right, rok) in zip(zip(stmt.hops, ok), zip(stmt.hops[1:], ok[1:])):
                    if not (lok and rok):
                        continue
                    for a in left:
                        for b in right:
                            span = a.span.to(b.span) if a.span.line == b.span.line else b.span
                            if (a.text, b.text) in seen:
                                self.error("E204", f"the edge `{a.text} -> {b.text}` is declared twice", span,
                                           "again here", help="remove one of them",
                                           notes=[Note(seen[a.text, b.text], "first declared here")])
                                continue
                            seen[a.text, b.text] = span
                            self.data_edges.append(DataEdge(a.text, b.text, attrs.get("default"), span))
            elif isinstance(stmt, ast.ControlEdges):
                self.attributes(ATTRIBUTES["control edge"], stmt.attrs, "a control edge")
                src = stmt.source
                names = [src.text] + [t.text for t in stmt.actions if t is not None]
                if not self.node_ref(src):
                    self.tainted |= set(names)
                    continue
                targets_ok = all([self.node_ref(t) for t in stmt.actions if t is not None])
                kind = self.decls[src.text].kind
                if kind != "control":
                    self.tainted |= set(names)
                    self.error("E202", f"`{src.text}` emits control edges but is {_a(kind)}", src.span,
                               "only control nodes choose actions",
                               help=f"declare it as `control {src.text} = ...` ending in one score per action, "
                               "or use `->` for data")
                    continue
                lists = self.control_lists.setdefault(src.text, [])
                lists.append(stmt)
                if len(lists) > 1:
                    self.error("E403", f"control node `{src.text}` has more than one action list", stmt.span,
                               "second action list",
                               help=f"put all actions in one list: `{src.text} => A | B | ...`",
                               notes=[Note(lists[0].span, "first action list")])
                    continue
                seen_targets: dict[str, Span] = {}
                for i, (t, tspan) in enumerate(zip(stmt.actions, stmt.action_spans)):
                    if t is not None and t.text in seen_targets:
                        self.error("E404", f"`{t.text}` appears twice in the actions of `{src.text}`", tspan,
                                   "repeated target", help="each action activates a different node (or `skip`)",
                                   notes=[Note(seen_targets[t.text], "first here")])
                        targets_ok = False
                    elif t is not None:
                        seen_targets[t.text] = tspan
                if targets_ok:
                    for i, (t, tspan) in enumerate(zip(stmt.actions, stmt.action_spans)):
                        self.control_edges.append(ControlEdge(src.text, i, None if t is None else t.text, tspan))

    # --- structure: R2, R3, R4 (lists), R5 (kinds) ----------------------------------------------

    def check_structure(self) -> None:
        controlled: dict[str, list[ControlEdge]] = {}
        for c in self.control_edges:
            if c.target is None:
                continue
            controlled.setdefault(c.target, []).append(c)
            tkind = self.decls[c.target].kind
            if tkind in ("input", "output"):
                self.error("E505", f"{tkind} `{c.target}` cannot be controlled", c.span,
                           f"{tkind}s always exist",
                           help="control the nodes that feed it instead")
        for e in self.data_edges:
            skind, tkind = self.decls[e.source].kind, self.decls[e.target].kind
            if skind == "control":
                self.error("E203", f"control node `{e.source}` has an outgoing data edge to `{e.target}`", e.span,
                           "control nodes only emit control edges (rule R2)",
                           help=f"use `{e.source} => ...` to choose what runs; feed `{e.target}` from a function node")
            if skind == "output":
                self.error("E503", f"output `{e.source}` has an outgoing edge", e.span, "outputs end the graph",
                           help=f"feed `{e.target}` from the node that feeds `{e.source}`")
            if tkind in ("input", "dummy"):
                self.error("E502", f"{tkind} `{e.target}` cannot have a data input", e.span,
                           f"{tkind}s take no input",
                           help="declare it as a `node` if it should compute from its input")
        # Edges already reported as impossible would only add echoes (cycles, shapes) later.
        invalid = {"control", "output"}
        for e in self.data_edges:
            if self.decls[e.source].kind in invalid or self.decls[e.target].kind in ("input", "dummy"):
                self.tainted |= {e.source, e.target}
        self.data_edges = [e for e in self.data_edges if self.decls[e.source].kind not in invalid
                           and self.decls[e.target].kind not in ("input", "dummy")]
        self.control_edges = [c for c in self.control_edges
                              if c.target is None or self.decls[c.target].kind not in ("input", "output")]
        has_input = {e.target for e in self.data_edges}
        for d in self.decls.values():
            if d.kind in ("node", "control", "output") and d.name not in has_input and not {d.name, "*"} & self.tainted:
                self.error("E504", f"{_kind_word(d.kind)} `{d.name}` has no data input", d.name_span,
                           "nothing flows into it", help=f"connect it, e.g. `x -> {d.name}`")
            if d.kind == "control":
                if d.name not in self.control_lists:
                    self.error("E402", f"control node `{d.name}` has no action list", d.name_span,
                               "chooses nothing",
                               help=f"add `{d.name} => A | B` (one target per score, `skip` for none)")
                if d.name in controlled and d.name in self.control_lists:
                    by = controlled[d.name][0]
                    lst = self.control_lists[d.name][0]
                    self.error("E301", f"control node `{d.name}` is itself controlled by `{by.source}`",
                               lst.source.span,
                               "a node with an incoming control edge cannot emit control edges (rule R3)",
                               help=f"feed {d.name} from a data node that {by.source} controls instead; "
                               f"{d.name} is skipped when its input is null",
                               notes=[Note(by.span, f"controlled by `{by.source}` here")])

    def nx_graph(self) -> nx.DiGraph:
        g = nx.DiGraph()
        g.add_nodes_from(self.decls)
        for e in self.data_edges:
            g.add_edge(e.source, e.target, span=e.span)
        for c in self.control_edges:
            if c.target is not None:
                g.add_edge(c.source, c.target, span=c.span)
        return g

    def check_cycles(self) -> bool:
        # The edges are final from here on: build the graph views every later step reads.
        self.dag = g = self.nx_graph()
        self.inputs_of: dict[str, list[DataEdge]] = {}
        for e in self.data_edges:
            self.inputs_of.setdefault(e.target, []).append(e)
        self.cyclic: set[str] = set()
        for comp in nx.strongly_connected_components(g):
            if len(comp) == 1 and not g.has_edge(*(list(comp) * 2)):
                continue
            self.cyclic |= comp
            cycle = nx.find_cycle(g.subgraph(comp))
            names = [u for u, _ in cycle] + [cycle[0][0]]
            closing = g.edges[cycle[-1][0], cycle[-1][1]]["span"]
            self.error("E101", "the graph has a cycle: " + " -> ".join(names), closing,
                       "this edge closes the cycle",
                       help="a dynamic network is acyclic (rule R1): remove or redirect one of these edges")
        return not self.cyclic

    def check_reachability(self) -> None:
        g = self.dag
        inputs = [d.name for d in self.decls.values() if d.kind == "input"]
        reached = set(inputs)
        for i in inputs:
            reached |= nx.descendants(g, i)
        outputs = [d.name for d in self.decls.values() if d.kind == "output"]
        feeds_output = set(outputs)
        for o in outputs:
            feeds_output |= nx.ancestors(g, o)
        if not inputs:
            self.error("E501", "the graph has no input", self.file.graphs[0].name.span, "no `input` declared",
                       help="declare the shape of one example, e.g. `input x [1, 8, 8]`")
        if not outputs:
            self.error("E501", "the graph has no output", self.file.graphs[0].name.span, "no `output` declared",
                       help="declare one, e.g. `output y`, and connect a node to it")
        has_input = {e.target for e in self.data_edges}
        for d in self.decls.values():
            if inputs and d.kind in ("node", "control", "output") and d.name not in reached and d.name in has_input:
                self.error("E501", f"`{d.name}` is not reachable from any input", d.name_span,
                           "it only sees constants" if d.name in has_input else "nothing reaches it",
                           help="connect it to a path that starts at an input")
            # Unused-node warnings wait for a file without errors: until then they are noise.
            if outputs and d.kind != "output" and d.name not in feeds_output and not self.has_errors:
                self.warn("W501", f"`{d.name}` reaches no output", d.name_span, "its result is never used",
                          help="connect it to an output, or remove it")

    # --- shapes and costs: R6, R4 (widths) -----------------------------------------------------

    def infer_shapes(self) -> None:
        for name in nx.topological_sort(self.dag):
            d = self.decls[name]
            if d.kind == "input":
                shape = self.value(d.decl.shape, self.lets)
                tokens = self.input_kind(d, shape)
                if not Param("shape", "shape").accepts(shape):
                    self.error("E605", f"input `{name}` needs a shape of positive integers", d.decl.shape.span,
                               f"this is {format_value(shape)}",
                               help="give the shape of ONE example, e.g. `[1, 8, 8]` (channels, height, width)")
                    self.shapes[name] = None
                else:
                    self.shapes[name] = tuple(shape)
                    if tokens is False:
                        self.shapes[name] = None  # a wrong kind or rank: its readers' shapes would be guesses
                self.costs[name] = 0
                continue
            if d.kind == "dummy":
                if d.layers and d.layers[0][0] == "const":
                    self.run_pipeline(d, None)
                else:  # already reported (E814); a shape here would only echo it
                    self.shapes[name] = None
                continue
            edges = self.inputs_of.get(name, [])
            in_shapes = [self.shapes.get(e.source) for e in edges]
            if not edges or any(s is None for s in in_shapes):
                self.shapes[name] = None
                continue
            if not self.check_token_readers(d, edges):
                self.shapes[name] = None
                continue
            merged = self.merge(d, edges, in_shapes)
            self.in_shapes[name] = merged
            if merged is None:
                self.shapes[name] = None
                continue
            if d.kind == "output":
                self.shapes[name] = merged
                self.costs[name] = 0
                continue
            self.run_pipeline(d, merged)
            if d.kind == "control" and self.shapes.get(name) is not None and name in self.control_lists:
                n_actions = len(self.control_lists[name][0].actions)
                if self.shapes[name] != (n_actions,):
                    last = d.layers[-1][2] if d.layers else d.name_span
                    self.error("E401", f"control node `{name}` emits {_shape_words(self.shapes[name])} "
                               f"for {n_actions} actions", last,
                               f"the last layer gives {list(self.shapes[name])}",
                               help=f"end `{name}` with a layer giving one score per action, e.g. `fc({n_actions})`",
                               notes=[Note(self.control_lists[name][0].span, f"{n_actions} actions here")])

    def input_kind(self, d: _Decl, shape) -> bool | None:
        """None for an input of real values; True for a valid token input; False (after
        an error) for an unknown kind (E830) or a token input whose shape is not [T] (E831)."""
        kind = d.decl.kind
        if kind is None:
            return None
        if kind.text != "tokens":
            self.error("E830", f"unknown input kind `{kind.text}`{did_you_mean(kind.text, ['tokens'])}", kind.span,
                       "not an input kind", help="write `input x tokens [16]` for token ids, or leave the word "
                                                 "out for real values: `input x [1, 32, 32]`")
            return False
        if isinstance(shape, list) and len(shape) != 1:
            self.error("E831", f"token input `{d.name}` needs one dimension, the number of tokens", d.decl.shape.span,
                       f"this is {format_value(shape)}", help="write `input x tokens [T]`, T tokens per example")
            return False
        if self.token_inputs:
            first = self.token_inputs[0]
            self.error("E832", f"a graph has at most one token input; `{first}` is one already", d.name_span,
                       "second token input", help="the padding mask that attention reads comes from one token input: "
                                                  "concatenate the sequences into one input",
                       notes=[Note(self.decls[first].name_span, "the first token input")])
            return False
        self.token_inputs.append(d.name)
        return True

    def check_token_readers(self, d: _Decl, edges: list[DataEdge]) -> bool:
        """E833 unless token ids go into `embedding` and only there: a node fed by a token
        input has that one input and starts with `embedding`; `embedding` reads nothing else."""
        reads = [e for e in edges if e.source in self.token_inputs]
        first = d.layers[0] if d.layers else None
        starts = first is not None and LAYERS.get(first[0]) is not None and LAYERS.get(first[0]).reads_tokens
        later = [layer for layer in d.layers[1:] if LAYERS.get(layer[0]) is not None and LAYERS.get(layer[0]).reads_tokens]
        if reads and (not starts or len(edges) > 1):
            what = "an output" if d.kind == "output" else f"`{d.name}`"
            self.error("E833", f"token ids from `{reads[0].source}` go into {what}, which does not start with `embedding`"
                       if not starts else f"`{d.name}` merges token ids from `{reads[0].source}` with other inputs",
                       reads[0].span, "token ids here",
                       help="token ids are integers, not features: feed the token input alone into a node that "
                            "starts with `embedding(vocab, dim)`")
            return False
        if starts and not reads:
            self.error("E833", f"`{first[0]}` reads token ids, but `{d.name}` is fed by `{edges[0].source}`, "
                       "which is not a token input", first[2], "needs token ids",
                       help="declare the input as `input x tokens [T]`, or use `fc`/`patches` on real values")
            return False
        if later:
            self.error("E833", f"`{later[0][0]}` reads token ids, so it must be the first layer of `{d.name}`",
                       later[0][2], "not the first layer", help="start a node fed by the token input with it")
            return False
        return True

    def merge(self, d: _Decl, edges: list[DataEdge], shapes: list[tuple]) -> tuple | None:
        if len(edges) == 1:
            return shapes[0]
        how = d.attrs.get("merge", "sum")
        if how in ("sum", "select"):
            first = shapes[0]
            for e, s in zip(edges[1:], shapes[1:]):
                if s != first:
                    what = "summed" if how == "sum" else "selected between"
                    self.error("E601", f"inputs of `{d.name}` are {what} but their shapes differ: "
                               f"`{edges[0].source}` gives {list(first)}, `{e.source}` gives {list(s)}", e.span,
                               f"shape {list(s)}",
                               help="make the shapes agree" + (", or use `merge=concat` on "
                                                               f"`{d.name}`" if how == "sum" else ""),
                               notes=[Note(edges[0].span, f"shape {list(first)}")])
                    return None
            return first
        # concat along the first per-example dimension (channels or features)
        first = shapes[0]
        for e, s in zip(edges[1:], shapes[1:]):
            if len(s) != len(first) or s[1:] != first[1:]:
                self.error("E602", f"inputs of `{d.name}` are concatenated along their first dimension, "
                           f"but `{edges[0].source}` gives {list(first)} and `{e.source}` gives {list(s)}", e.span,
                           f"shape {list(s)}", help="all dimensions but the first must agree",
                           notes=[Note(edges[0].span, f"shape {list(first)}")])
                return None
        return (sum(s[0] for s in shapes),) + tuple(first[1:])

    def run_pipeline(self, d: _Decl, shape: tuple | None) -> None:
        layers, cost = [], 0
        if d.broken:  # a layer could not be resolved: its shapes would be guesses
            self.shapes[d.name] = None
            return
        for lname, args, span, written in d.layers:
            shape_in = () if lname == "const" else shape
            try:
                out, macs, params = measure(lname, args, shape_in if shape_in is not None else ())
            except LayerError as e:
                self.error("E604", str(e), span, f"input here is {list(shape_in or ())}",
                           help=_layer_help(lname, shape_in or ()))
                self.shapes[d.name] = None
                return
            layers.append(Layer(lname, tuple((k, _freeze(v)) for k, v in args.items()), tuple(shape_in or ()),
                                out, macs, params, written, span))
            cost += macs
            shape = out
        self.layers[d.name] = tuple(layers)
        self.shapes[d.name] = shape
        declared = d.attrs.get("cost")
        if declared is not None and declared < 0:
            self.error("E805", f"the cost of `{d.name}` cannot be negative", d.name_span, f"cost={declared}",
                       help="costs are per example, in one unit for the whole graph")
        self.costs[d.name] = declared if declared is not None else cost

    def check_size(self) -> None:
        """W604 when the graph has more parameters than the run commands will build."""
        params = {name: sum(layer.params for layer in layers) for name, layers in self.layers.items()}
        total = sum(params.values())
        if total <= MAX_PARAMS:
            return
        largest = max(params, key=params.__getitem__)
        self.warn("W604", f"the graph has {describe_params(total)}: more than d2graph builds "
                          f"({describe_params(MAX_PARAMS)})", self.decls[largest].name_span,
                  f"`{largest}` alone has {params[largest]:,} parameters",
                  help="train, bench, sweep and eval will refuse it (E926); make the largest layers "
                       "smaller (an `fc` after a large feature map holds its input width × its output width)")

    # --- totality: R7 ------------------------------------------------------------------

    def check_totality(self) -> None:
        order = list(nx.topological_sort(self.dag))
        inputs_of = self.inputs_of
        controllers: dict[str, list[ControlEdge]] = {}
        for c in self.control_edges:
            if c.target is not None:
                controllers.setdefault(c.target, []).append(c)
        actions = {name: lst[0].actions for name, lst in self.control_lists.items()}
        outputs = [n for n in order if self.decls[n].kind == "output"]
        found: dict[str, list] = {}
        steps = 0  # node evaluations so far, plus the bookkeeping of each finished combination
        combinations = 0
        ever_ran: set[str] = set()
        # For each `select` merge: the inputs it took on some combination, and for each input,
        # the earlier inputs present on every combination it is present on (None: never present),
        # as bit masks (bit i: input i), so that a merge of many inputs costs one pass.
        selects = [n for n in order if self.decls[n].attrs.get("merge") == "select" and len(inputs_of.get(n, [])) > 1]
        taken: dict[str, set[int]] = {n: set() for n in selects}
        shadowed: dict[str, list[int | None]] = {n: [None] * len(inputs_of[n]) for n in selects}

        def runs(name: str, present: dict, chosen: dict) -> bool:
            if name in controllers and not any(chosen.get(c.source) == c.action for c in controllers[name]):
                return False
            edges = inputs_of.get(name, [])
            ok = [present[e.source] or e.default is not None for e in edges]
            if self.decls[name].kind in ("input", "dummy"):
                return True
            if self.decls[name].attrs.get("merge") == "select":
                return any(ok)
            return bool(ok) and all(ok)

        # Depth first over the actions of the control nodes that run, in topological order,
        # with a stack of its own (a chain of many control nodes must not exhaust Python's).
        stack: list[tuple[int, dict, dict, list]] = [(0, {}, {}, [])]
        while stack and steps < TOTALITY_STEPS and len(found) < len(outputs):
            i, present, chosen, trail = stack.pop()
            branched = False
            while i < len(order):
                name = order[i]
                present[name] = runs(name, present, chosen)
                steps += 1 + len(inputs_of.get(name, ()))
                if present[name] and name in actions:
                    # pushed last action first, so that action 1 is tried first
                    for a in reversed(range(len(actions[name]))):
                        stack.append((i + 1, dict(present), {**chosen, name: a}, trail + [(name, a)]))
                    steps += len(present) * len(actions[name])
                    branched = True
                    break
                i += 1
            if branched:
                continue
            combinations += 1
            steps += len(present)
            ever_ran.update(n for n, ran in present.items() if ran)
            for n in selects:
                if not present[n]:
                    continue
                mask = 0  # the inputs present before input j
                for j, e in enumerate(inputs_of[n]):
                    if not (present[e.source] or e.default is not None):
                        continue
                    if not mask:
                        taken[n].add(j)
                    if j:
                        seen = shadowed[n][j]
                        shadowed[n][j] = mask if seen is None else seen & mask
                    mask |= 1 << j
                steps += len(inputs_of[n])
            for o in outputs:
                if not present[o] and o not in found:
                    found[o] = (trail, dict(present))
        partial = bool(stack) and len(found) < len(outputs)
        if not partial and not found:
            for name in order:
                if name not in ever_ran:
                    self.warn("W702", f"`{name}` never runs, whatever the control nodes choose",
                              self.decls[name].name_span, "dead on every path",
                              help="an input of it is null whenever it is activated: add a `default` to that "
                              "edge, or `merge=select`")
            for n in selects:
                self.warn_unselectable(n, taken[n], [None if m is None else {i for i in range(m.bit_length()) if m >> i & 1}
                                                     for m in shadowed[n]])
        for o in outputs:
            if o not in found:
                continue
            trail, present = found[o]
            d = self.decls[o]
            when = " and ".join(
                f"{q} takes action {a + 1} ({actions[q][a].text if actions[q][a] else 'skip'})" for q, a in trail)
            missing = [e for e in inputs_of.get(o, []) if not present[e.source] and e.default is None]
            notes = [Note(e.span, f"`{e.source}` did not run, and this edge has no default") for e in missing[:2]]
            self.error("E701", f"output `{o}` is null when {when}" if trail else f"output `{o}` never gets a value",
                       d.name_span, "gets no value on that path (rule R7)",
                       help=f"give the edges into `{o}` a default (`{missing[0].source if missing else 'N'} -> {o} "
                       "[default=0]`), " + ("" if d.attrs.get("merge") == "select" else
                                            f"declare `output {o} [merge=select]`, ")
                       + f"or route every action to a node that feeds `{o}`",
                       notes=notes)
        if partial:
            self.warn("W701", f"totality was checked on the first {combinations:,} action combinations only",
                      self.file.graphs[0].name.span,
                      f"too many combinations to check them all in {TOTALITY_STEPS:,} steps",
                      help="every output gets a value on each combination tried; the others were not "
                           "tried (nodes that never run and unused `select` inputs are not reported either)")

    def warn_unselectable(self, name: str, taken: set[int], shadowed: list[set[int] | None]) -> None:
        """W703: an input of a `select` merge that is never the first present one, on any
        combination of actions, because an input listed before it is present whenever it is
        (its node runs, if nothing else reads it, for nothing)."""
        edges = self.inputs_of[name]
        for j, earlier in enumerate(shadowed):
            if j in taken or earlier is None:  # taken, or never present (W702's business)
                continue
            e = edges[j]
            if earlier:
                lowest = min(earlier)  # once: inside the comprehension it made a wide merge cubic
                first = edges[lowest]
                why = (f"`{first.source}`, listed before it, has a default and so is always present"
                       if first.default is not None else f"`{first.source}`, listed before it, is present "
                                                         f"whenever `{e.source}` is")
                order = [x.source for x in edges[:lowest]] + [e.source] + \
                        [x.source for k, x in enumerate(edges) if k >= lowest and k != j]
                fix = f"list `{e.source}` before `{first.source}` (`{', '.join(order)} -> {name}`)"
                if first.default is not None:
                    fix = f"drop the default of `{first.source} -> {name}` or " + fix
            else:  # several earlier inputs between them cover it
                why = f"on every combination of actions, an input listed before it is present whenever `{e.source}` is"
                fix = f"list `{e.source}` earlier"
            self.warn("W703", f"input `{e.source}` of `{name}` [merge=select] is never selected: {why}", e.span,
                      "never the first present input",
                      help=f"`select` takes the first present input in the order the edges are listed: {fix} "
                           "to prefer it when it is present, or remove this edge")

    # --- train block: R8 for data sets and trainers ---------------------------------------------

    def check_train(self, blocks: list[ast.TrainBlock]) -> TrainConfig | None:
        if not blocks:
            return None
        for extra in blocks[1:]:
            self.error("E811", "a graph has one `train` block", extra.span, "second train block",
                       help="merge the two blocks", notes=[Note(blocks[0].span, "first train block")])
        block = blocks[0]
        data, settings, stages = None, [], []
        seen: dict[str, Span] = {}
        setting_names = [p.name for p in TRAIN_SETTINGS.params]
        for item in block.items:
            key = item.name.text if isinstance(item, ast.Stage) else item.key.text
            key_span = item.name.span if isinstance(item, ast.Stage) else item.key.span
            if key in seen:
                self.error("E801", f"`{key}` is set twice in the train block", key_span, "again here",
                           help="keep one of them", notes=[Note(seen[key], "first here")])
                continue
            seen[key] = key_span
            if isinstance(item, ast.Stage):
                args = self.registered_call(TRAINERS, item.trainer, "trainer")
                if args is not None:
                    stages.append(TrainStage(key, item.trainer.name.text, _freeze_items(args), item.span))
                continue
            if key == "data":
                if not isinstance(item.value, (ast.Call, ast.Ref)):
                    self.error("E805", "`data` names a data set", item.value.span, "not a data set",
                               help="e.g. `data = digits` or `data = cluttered_digits(size=32)`")
                    continue
                call = item.value if isinstance(item.value, ast.Call) else ast.Call(item.value.name, (), False, item.value.span)
                args = self.registered_call(DATASETS, call, "data set")
                if args is not None:
                    data = (call.name.text, _freeze_items(args))
                continue
            if key not in setting_names:
                self.error("E811", f"unknown train setting `{key}`{did_you_mean(key, setting_names + ['data', 'stage'])}",
                           key_span, "not a setting",
                           help="settings: `data`, " + ", ".join(f"`{n}`" for n in setting_names)
                           + ", and `stage NAME = trainer(...)`")
                continue
            v = self.value(item.value, self.lets)
            param = TRAIN_SETTINGS.params[setting_names.index(key)]
            if isinstance(v, _CallValue) and param.kind != "any":
                self.error("E805", f"`{key}` takes {param.describe()}, not a call", item.value.span, "a call")
                continue
            if isinstance(v, _CallValue):
                v = (v.name, _freeze_items(self.call_args(v.call)))
            elif not self.check_symbols(v, item.value.span, param, self.lets):
                continue
            elif not param.accepts(v):
                self.error("E805", f"train setting `{key}` must be {param.describe()}", item.value.span,
                           f"this is {format_value(v)}", help=param.doc)
                continue
            settings.append((key, _freeze(v)))
        if not stages and not self.has_errors:
            self.error("E811", "the train block has no `stage`", block.span, "nothing to train",
                       help="add e.g. `stage backbone = supervised(epochs=10)`")
        return TrainConfig(data, tuple(settings), tuple(stages), block.span)

    def call_args(self, call: ast.Call) -> dict:
        return {(a.key.text if a.key else str(i)): self.value(a.value, self.lets) for i, a in enumerate(call.args)}

    def registered_call(self, registry, call: ast.Call, what: str):
        entry = registry.get(call.name.text)
        if entry is None:
            known = registry.names()
            hint = did_you_mean(call.name.text, known)
            self.error("E811", f"unknown {what} `{call.name.text}`{hint}", call.name.span, f"no such {what}",
                       help=(f"{what}s: " + ", ".join(f"`{k}`" for k in known)) if known
                       else f"this installation of d2graph has no {what}s registered")
            return None
        return self.bind_call(entry.schema if hasattr(entry, "schema") else entry, call, self.lets, what)

    # --- IR ----------------------------------------------------------------------------

    def build(self, g: ast.GraphDecl, train: TrainConfig | None) -> Graph:
        position = {name: i for i, name in enumerate(self.decls)}  # ties keep the file's order
        order = list(nx.lexicographical_topological_sort(self.dag, key=position.__getitem__))
        inputs, controllers, actions = edges_by_node(self.data_edges, self.control_edges)
        nodes = []
        for name in order:
            d = self.decls[name]
            nodes.append(Node(
                name=name,
                kind=d.kind,
                layers=self.layers.get(name, ()),
                merge=d.attrs.get("merge", "sum"),
                in_shape=self.in_shapes.get(name),
                out_shape=self.shapes[name],
                cost=self.costs.get(name, 0),
                cost_declared=d.attrs.get("cost") is not None,
                inputs=tuple(inputs.get(name, ())),
                controllers=tuple(controllers.get(name, ())),
                actions=tuple(actions.get(name, ())),
                span=d.span,
                tokens=name in self.token_inputs,
            ))
        warnings = tuple(d for d in self.diags if not d.is_error)
        return Graph(g.name.text, tuple(nodes), tuple(self.data_edges), tuple(self.control_edges), train,
                     warnings, g.span)


@dataclass(frozen=True)
class _CallValue:
    name: str
    call: ast.Call


def _summary(schema: Schema, args: dict) -> str:
    """`conv(8, 3, stride=2)`: required arguments by position, others only when not default."""
    parts = []
    for p in schema.params:
        v = args.get(p.name)
        if p.required:
            parts.append(format_value(v))
        elif v != p.default:
            parts.append(f"{p.name}={format_value(v)}")
    parts += [format_value(v) for v in args.get("args", [])]
    parts += [f"{k}={format_value(v)}" for k, v in args.get("kwargs", {}).items()]
    return f"{schema.name}({', '.join(parts)})" if parts else schema.name


def _freeze(v):
    return tuple(_freeze(x) for x in v) if isinstance(v, list) else v


def _freeze_items(args: dict) -> tuple:
    return tuple((k, _freeze(v)) for k, v in args.items())


def _start(span: Span) -> Span:
    return Span(span.source, 0, min(1, len(span.source.text)))


def _a(kind: str) -> str:
    word = _kind_word(kind)
    return ("an " if word[0] in "aeiou" else "a ") + word


def _kind_word(kind: str) -> str:
    return {"node": "function node", "control": "control node", "dummy": "dummy node"}.get(kind, kind)


def _shape_words(shape: tuple) -> str:
    if len(shape) == 1:
        return f"{shape[0]} score" + ("s" if shape[0] != 1 else "")
    return f"a {list(shape)} tensor"


def _layer_help(name: str, shape: tuple) -> str:
    if name in ("conv", "maxpool", "avgpool", "global_avgpool", "residual", "resnet_stage") and len(shape) != 3:
        return "image layers need [channels, height, width]; put them before `flatten`/`fc`"
    if name in ("conv", "maxpool", "avgpool", "residual", "resnet_stage"):
        return "use a smaller kernel or stride, add padding, or downsample less before this layer"
    if name in ("attention", "transformer", "class_token", "positions", "pool_tokens") and len(shape) != 2:
        return "token layers need [tokens, width]: start with `patches(size, dim)` on an image or " \
               "`embedding(vocab, dim)` on a token input, and pool with `pool_tokens` before `fc`"
    return "see the layer table in docs/language.md for what each layer takes"

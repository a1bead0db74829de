"""The language server behind `d2graph lsp`: the checker and the formatter in an editor.

In:  Language Server Protocol messages over stdio (JSON-RPC, through pygls), from any
     editor: documents opened and edited, and requests about positions in them.
Out: diagnostics (on open at once, on change after a short pause), quick fixes for the
     checker's did-you-mean hints, hovers (a node's kind, layers, shapes and cost; a
     layer's, data set's or trainer's signature and parameters), go to definition and find
     references (nodes, `let` constants, blocks, block parameters), completion (layers,
     blocks, data sets, trainers, their parameters, settings, attributes, node names),
     whole-document formatting, the outline (document symbols) and semantic tokens.
Guarantees:
  - One parser and one checker: every answer comes from `syntax.parse`, `check.check` and
    `fmt.format_source` on the document's current text. Completion, which must work on a
    half-typed line that does not parse, reads only the brackets and the last few words
    before the cursor, and takes names from the last version of the file that parsed.
  - Opening a file runs none of its code: `module(...)` layers are reported (E809) exactly
    as `d2graph check` without `--allow-imports` reports them.
  - No document stops the server: a feature that fails answers "nothing" and logs the
    error (window/logMessage, type Error); the tests fuzz edits and watch that log.
  - Positions are the protocol's: 0-based lines, columns in the client's negotiated unit
    (UTF-16 code units unless it asked for another), line breaks LF, CRLF or a lone CR —
    the same line breaks the language reads, so a span's line is the editor's line (a form
    feed or U+2028 breaks no line; for that, the editor sends whole documents).
  - Formatting is `d2graph fmt`'s result, as one edit of the whole document, or no edit
    and a message when the file does not parse (fmt refuses such files too).

Example (what an editor runs; docs/editors.md shows the requests and the answers):
    $ d2graph lsp            # speaks LSP on stdin/stdout until the editor says `exit`
"""

from __future__ import annotations

import asyncio
import re
import traceback
from dataclasses import dataclass, field
from functools import wraps
from typing import Any, Callable

from lsprotocol import types
from pygls.lsp.server import LanguageServer
from pygls.uris import to_fs_path

from . import ast
from .check import ATTRIBUTES
from .check import check as check_file
from .diagnostics import D2GraphError, Diagnostic, Source, Span, suggestion
from .fmt import format_source
from .ir import Graph, Node, exact_cost
from .layers import LAYERS
from .runs import stage_problems
from .schema import DATASETS, TRAIN_SETTINGS, TRAINERS, Param, Schema, Symbol, format_value
from .syntax import normalise_newlines, parse, tokens

# How long the server waits after the last keystroke before checking again: long enough
# that typing a word checks once, not once per letter (a check measures every layer anew
# when a shape changes), short enough to feel live.
DEBOUNCE_SECONDS = 0.25

# A graph with a train block, checked once at start-up so that its imports are done early.
WARM_UP = ("graph warm { input x [4]  output y  node a = fc(2)  x -> a -> y"
           "  train { data = digits  stage s = supervised } }")

# Words that start a statement inside a graph, and how each kind of node is called in words.
STATEMENT_KEYWORDS = ("node", "control", "dummy", "input", "output", "let", "block", "train")
KIND_WORDS = {"node": "function node", "control": "control node", "dummy": "dummy node",
              "input": "input", "output": "output"}

# --- positions: the protocol's lines and columns ↔ offsets into the checked text ----------------


def utf16_units(text: str) -> int:
    """The length of `text` in UTF-16 code units, the protocol's default column unit."""
    return len(text.encode("utf-16-le")) // 2


class Lines:
    """Offsets into a document's text (line breaks normalised, as the parser sees it) and
    LSP positions, both ways. `units` counts a string in the client's position unit."""

    def __init__(self, text: str, units: Callable[[str], int] = utf16_units):
        self.source = Source("", normalise_newlines(text))
        self.units = units

    def position(self, offset: int) -> types.Position:
        line, column = self.source.position(offset)
        before = self.source.line_text(line)[: column - 1]
        return types.Position(line=line - 1, character=self.units(before))

    def range(self, span: Span | None) -> types.Range:
        if span is None:
            return types.Range(start=types.Position(line=0, character=0), end=types.Position(line=0, character=0))
        return types.Range(start=self.position(span.start), end=self.position(span.end))

    def offset(self, position: types.Position) -> int:
        starts = self.source.line_starts
        if position.line >= len(starts):
            return len(self.source.text)
        text = self.source.line_text(position.line + 1)
        count = 0
        for i, ch in enumerate(text):  # a column inside a surrogate pair lands on its character
            if count >= position.character:
                return starts[position.line] + i
            count += self.units(ch)
        return starts[position.line] + len(text)

    def whole(self) -> types.Range:
        return types.Range(start=types.Position(line=0, character=0), end=self.position(len(self.source.text)))


# --- what each name in a file is: the index behind hover, definition, references ---------------


@dataclass(frozen=True)
class Occurrence:
    """One name as written: `role` says what it names ("node", "let", "block", "param",
    "layer", "data set", "trainer", "setting", "stage", "argument", "graph"), `scope` the
    block a parameter belongs to or the callee an argument belongs to, and `statement` the
    declaration or statement it stands in."""

    span: Span
    name: str
    role: str
    definition: bool = False
    scope: str = ""
    statement: Any = field(default=None, compare=False)

    @property
    def key(self) -> tuple[str, str, str]:
        """Occurrences with equal keys name the same thing. Nodes, constants and blocks share
        one namespace (a name is one of them); a block parameter lives in its block."""
        if self.role in ("node", "let", "block"):
            return ("name", self.name, "")
        return (self.role, self.name, self.scope)


def occurrences(file: ast.File) -> list[Occurrence]:
    """Every name of a parsed file, in the order written, with what it names."""
    blocks = {i.name.text for i in _all_items(file) if isinstance(i, ast.BlockDef)}
    lets = {i.name.text for i in _all_items(file) if isinstance(i, ast.Let)}
    found: list[Occurrence] = []

    def value(v, params: frozenset, scope: str = "") -> None:
        if isinstance(v, ast.Ref):
            name = v.name.text
            if name in params:
                found.append(Occurrence(v.name.span, name, "param", scope=scope))
            elif name in lets:
                found.append(Occurrence(v.name.span, name, "let"))
        elif isinstance(v, ast.List):
            for item in v.items:
                value(item, params, scope)
        elif isinstance(v, ast.Call):  # a call written as a value: module arguments, `data = ...`
            call(v, "layer", params, scope)

    def call(c: ast.Call, role: str, params: frozenset = frozenset(), scope: str = "") -> None:
        name = c.name.text
        if role == "layer" and name in blocks:
            role = "block"
        found.append(Occurrence(c.name.span, name, role, statement=c))
        for a in c.args:
            if a.key is not None and role == "block":  # `head(n=2)` names the block's parameter `n`
                found.append(Occurrence(a.key.span, a.key.text, "param", scope=name, statement=c))
            elif a.key is not None:
                found.append(Occurrence(a.key.span, a.key.text, "argument", scope=f"{role}:{name}", statement=c))
            value(a.value, params, scope)

    def attrs(items, owner: str) -> None:
        for a in items:
            found.append(Occurrence(a.key.span, a.key.text, "argument", scope=f"attribute:{owner}"))
            value(a.value, frozenset())

    def statement(s) -> None:
        if isinstance(s, ast.Let):
            found.append(Occurrence(s.name.span, s.name.text, "let", True, statement=s))
            value(s.value, frozenset())
        elif isinstance(s, ast.BlockDef):
            found.append(Occurrence(s.name.span, s.name.text, "block", True, statement=s))
            params = frozenset(p.text for p in s.params)
            for p in s.params:
                found.append(Occurrence(p.span, p.text, "param", True, scope=s.name.text, statement=s))
            for c in s.pipeline:
                call(c, "layer", params, s.name.text)
        elif isinstance(s, ast.InputDecl):
            found.append(Occurrence(s.name.span, s.name.text, "node", True, statement=s))
            value(s.shape, frozenset())
        elif isinstance(s, ast.OutputDecl):
            found.append(Occurrence(s.name.span, s.name.text, "node", True, statement=s))
            attrs(s.attrs, "output")
        elif isinstance(s, ast.NodeDecl):
            found.append(Occurrence(s.name.span, s.name.text, "node", True, statement=s))
            attrs(s.attrs, s.kind)
            for c in s.pipeline:
                call(c, "layer")
        elif isinstance(s, ast.EdgeChain):
            for hop in s.hops:
                for n in hop:
                    found.append(Occurrence(n.span, n.text, "node", statement=s))
            attrs(s.attrs, "edge")
        elif isinstance(s, ast.ControlEdges):
            found.append(Occurrence(s.source.span, s.source.text, "node", statement=s))
            for target in s.actions:
                if target is not None:
                    found.append(Occurrence(target.span, target.text, "node", statement=s))
        elif isinstance(s, ast.TrainBlock):
            for item in s.items:
                if isinstance(item, ast.Stage):
                    found.append(Occurrence(item.name.span, item.name.text, "stage", True, statement=item))
                    call(item.trainer, "trainer")
                elif item.key.text == "data" and isinstance(item.value, (ast.Call, ast.Ref)):
                    found.append(Occurrence(item.key.span, "data", "setting", statement=item))
                    if isinstance(item.value, ast.Ref):
                        found.append(Occurrence(item.value.name.span, item.value.name.text, "data set"))
                    else:
                        call(item.value, "data set")
                else:
                    found.append(Occurrence(item.key.span, item.key.text, "setting", statement=item))
                    value(item.value, frozenset())
        elif isinstance(s, ast.GraphDecl):
            found.append(Occurrence(s.name.span, s.name.text, "graph", True, statement=s))
            for inner in s.body:
                statement(inner)

    for item in file.items:
        statement(item)
    return found


def _all_items(file: ast.File):
    for item in file.items:
        yield item
        if isinstance(item, ast.GraphDecl):
            yield from item.body


# --- one version of a document, analysed once ------------------------------------------------


@dataclass
class Analysis:
    """A document's text with its AST (None when it does not parse), its checked graph
    (None when it has errors), every diagnostic, and the index of its names."""

    text: str
    lines: Lines
    file: ast.File | None
    graph: Graph | None
    diagnostics: list[Diagnostic]
    names: list[Occurrence]

    def at(self, offset: int) -> Occurrence | None:
        """The name under the cursor (a cursor just after a name counts, as editors place it)."""
        for occ in self.names:
            if occ.span.start <= offset <= occ.span.end:
                return occ
        return None

    def same(self, occ: Occurrence) -> list[Occurrence]:
        return [o for o in self.names if o.key == occ.key]

    def definition(self, occ: Occurrence) -> Occurrence | None:
        return next((o for o in self.same(occ) if o.definition), None)


def analyse(text: str, filename: str, units: Callable[[str], int] = utf16_units) -> Analysis:
    """Parse and check `text` as `d2graph check` would (imports never allowed).

    >>> a = analyse("graph g { input x [4]  output y  x -> y }", "g.d2")
    >>> a.graph["x"].out_shape, [o.role for o in a.names][:2]
    ((4,), ['graph', 'node'])
    """
    lines = Lines(text, units)
    try:
        file = parse(text, filename)
    except D2GraphError as e:
        return Analysis(text, lines, None, None, list(e.diagnostics), [])
    try:
        graph, diags = check_file(file)
        if graph is not None:
            diags = [*diags, *stage_problems(graph)]  # a trainer that cannot train the graph, as `check` says
    except D2GraphError as e:  # a limit found while checking: reported, like any mistake
        graph, diags = None, list(e.diagnostics)
    return Analysis(text, lines, file, graph, diags, occurrences(file))


# --- diagnostics and quick fixes ----------------------------------------------------------------


def lsp_diagnostic(d: Diagnostic, lines: Lines, uri: str) -> types.Diagnostic:
    """A checker diagnostic in the protocol's terms: the caret's range, the code, the
    message with the caret's label and the help sentence, and its notes as related places."""
    message = d.message + (f" — {d.label}" if d.label else "") + (f"\nhelp: {d.help}" if d.help else "")
    related = [types.DiagnosticRelatedInformation(location=types.Location(uri=uri, range=lines.range(n.span)),
                                                  message=n.label)
               for n in d.notes if n.span is not None and n.span.source.text == lines.source.text]
    return types.Diagnostic(
        range=lines.range(d.span),
        message=message,
        severity=types.DiagnosticSeverity.Error if d.is_error else types.DiagnosticSeverity.Warning,
        code=d.code,
        source="d2graph",
        related_information=related or None,
    )


# A fix replaces one word (a name, a keyword, a symbol) or one quoted string; a hint about a
# wider span (a whole statement) is left to the reader.
_REPLACEABLE = re.compile(r'[A-Za-z_][A-Za-z0-9_]*|"[^"\n]*"')


def quick_fixes(analysis: Analysis, uri: str, wanted: types.Range) -> list[types.CodeAction]:
    """One "replace with" action per diagnostic in `wanted` whose message has a did-you-mean."""
    actions = []
    for d in analysis.diagnostics:
        better = suggestion(d)
        if better is None or d.span is None or not _REPLACEABLE.fullmatch(d.span.text):
            continue
        where = analysis.lines.range(d.span)
        if _before(wanted.end, where.start) or _before(where.end, wanted.start):
            continue
        actions.append(types.CodeAction(
            title=f"Replace `{d.span.text}` with `{better}`",
            kind=types.CodeActionKind.QuickFix,
            diagnostics=[lsp_diagnostic(d, analysis.lines, uri)],
            is_preferred=True,
            edit=types.WorkspaceEdit(changes={uri: [types.TextEdit(range=where, new_text=better)]}),
        ))
    return actions


def _before(a: types.Position, b: types.Position) -> bool:
    return (a.line, a.character) < (b.line, b.character)


# --- hover ----------------------------------------------------------------------------------


def hover_text(analysis: Analysis, occ: Occurrence) -> str | None:
    """Markdown for the name under the cursor, or None when there is nothing to say."""
    if occ.role == "node":
        return _node_hover(analysis, occ.name)
    if occ.role in ("let", "block", "param"):
        d = analysis.definition(occ)
        if d is None:
            return None
        if occ.role == "param":
            return f"parameter `{occ.name}` of block `{occ.scope}`"
        what = "constant" if occ.role == "let" else "block"
        return f"{what} `{occ.name}`\n```d2\n{_excerpt(d.statement.span)}\n```"
    if occ.role in ("layer", "data set", "trainer"):
        return _callee_hover(occ.role, occ.name)
    if occ.role == "argument":
        param = _argument(occ)
        if param is None:
            return None
        return f"`{param.name}`: {param.describe()}" + (f" — {param.doc}" if param.doc else "") + _default(param)
    if occ.role == "setting":
        if occ.name == "data":
            return "`data`: the data set to train and evaluate on, e.g. `data = cluttered_digits(size=32)`"
        param = next((p for p in TRAIN_SETTINGS.params if p.name == occ.name), None)
        if param is None:
            return None
        return (f"train setting `{param.name}`: {param.describe()}" + (f" — {param.doc}" if param.doc else "")
                + _default(param))
    if occ.role == "graph" and analysis.graph is not None:
        g = analysis.graph
        return (f"graph `{g.name}`: {len(g.nodes)} nodes, {len(g.control_nodes)} control; "
                f"full cost {exact_cost(g.full_cost)}{_unit(g)} per example")
    return None


def _node_hover(analysis: Analysis, name: str) -> str | None:
    g = analysis.graph
    if g is not None and name in g:
        return node_summary(g, g[name])
    decl = next((o for o in analysis.names if o.role == "node" and o.definition and o.name == name), None)
    if decl is None:
        return None
    kind = decl.statement.kind if isinstance(decl.statement, ast.NodeDecl) else (
        "input" if isinstance(decl.statement, ast.InputDecl) else "output")
    errors = sum(d.is_error for d in analysis.diagnostics)
    return (f"**{kind}** `{name}` — {KIND_WORDS[kind]}\n```d2\n{_excerpt(decl.statement.span)}\n```\n"
            f"_shapes and costs show once the file checks ({errors} error{'s' if errors != 1 else ''} now)_")


def node_summary(graph: Graph, node: Node) -> str:
    """A checked node in Markdown: kind, inputs, when it runs, shapes, cost and its share
    of the full cost, and each layer with the shape it gives and what it costs."""
    unit = _unit(graph)
    lines = [f"**{node.kind}** `{node.name}` — {KIND_WORDS[node.kind]}"]
    if node.inputs:
        ins = ", ".join(e.source + ("" if e.default is None else f" [default={format_value(e.default)}]")
                        for e in node.inputs)
        merge = f" (merge: {node.merge})" if len(node.inputs) > 1 or node.merge != "sum" else ""
        lines.append(f"- in: {ins}{merge} → shape `{list(node.in_shape or ())}`")
    if node.controllers:
        lines.append("- runs when: " + " or ".join(f"{c.source} takes action {c.action + 1}" for c in node.controllers))
    if node.actions:
        lines.append("- actions: " + " | ".join(f"{i + 1}: {a or 'skip'}" for i, a in enumerate(node.actions)))
    lines.append(f"- out: shape `{list(node.out_shape)}`")
    if node.kind not in ("input", "output"):
        share = _share(node.cost, graph.full_cost)
        declared = " (declared)" if node.cost_declared else ""
        lines.append(f"- cost: {exact_cost(node.cost)}{unit} per example{declared}, {share} of the full cost "
                     f"({exact_cost(graph.full_cost)}{unit})")
    if node.layers:
        lines.append("")
        lines.append("| layer | out | cost |")
        lines.append("|---|---|---|")
        for layer in node.layers:
            lines.append(f"| `{layer.summary()}` | `{list(layer.out_shape)}` | {exact_cost(layer.cost)} |")
    return "\n".join(lines)


def _share(cost, full) -> str:
    if not full:
        return "0%"
    share = 100 * cost / full
    return "<0.1%" if 0 < share < 0.1 else f"{share:.1f}%"


def _unit(graph: Graph) -> str:
    # A graph with a declared cost is in the user's unit, which the checker cannot name.
    return "" if any(n.cost_declared for n in graph.nodes) else " MACs"


def _callee_hover(role: str, name: str) -> str | None:
    schema, doc = _schema(role, name)
    if schema is None:
        return None
    lines = [f"{role} `{schema.signature()}`"]
    if doc:
        lines.append("")
        lines.append(doc)
    if role == "layer":
        lines.append(f"\ntakes: {LAYERS.get(name).takes}")
    described = [p for p in schema.params if p.doc or role != "layer"]
    if described:
        lines.append("")
        lines += [f"- `{p.name}`: {p.describe()}" + (f" — {p.doc}" if p.doc else "") + _default(p) for p in described]
    return "\n".join(lines)


def _schema(role: str, name: str) -> tuple[Schema | None, str]:
    registry = {"layer": LAYERS, "data set": DATASETS, "trainer": TRAINERS}.get(role)
    entry = registry.get(name) if registry is not None else None
    if entry is None:
        return None, ""
    schema = entry.schema
    doc = schema.doc or ((getattr(entry, "__doc__", None) or "").strip().split("\n\n")[0].replace("\n", " ")
                         if role == "trainer" else "")
    return schema, doc


def _argument(occ: Occurrence) -> Param | None:
    kind, _, callee = occ.scope.partition(":")
    if kind == "attribute":
        params = _attribute_params(callee)
    else:
        schema, _ = _schema(kind, callee)
        params = schema.params if schema is not None else ()
    return next((p for p in params if p.name == occ.name), None)


def _default(p: Param) -> str:
    if p.required:
        return " (required)"
    if p.default is None:
        return ""
    default = p.default
    if isinstance(default, str) and (p.kind == "choice" or default in p.also):
        default = Symbol(default)  # a word of the language, written bare (`maxprob`, not "maxprob")
    return f" (default `{p.shown or format_value(default)}`)"


def _excerpt(span: Span, most: int = 8) -> str:
    lines = span.text.split("\n")
    return "\n".join(lines[:most] + (["…"] if len(lines) > most else []))


# --- completion ---------------------------------------------------------------------------------

_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"?|#[^\n]*|->|=>|[A-Za-z_][A-Za-z0-9_]*|\d[\w.]*|\S')


def completions(text_before: str, known: Analysis | None) -> list[types.CompletionItem]:
    """What may be typed at the end of `text_before` (the document up to the cursor).

    Reads only tokens: the innermost open bracket, the word before the cursor and the
    statement's first word, so it works on a line that does not parse yet. Names of nodes,
    constants and blocks come from `known`, the last version of the file that parsed.
    """
    tokens = [t for t in _TOKEN.findall(text_before) if not t.startswith("#") and not t.startswith('"')]
    if tokens and re.fullmatch(r"[A-Za-z_]\w*", tokens[-1]) and re.search(r"[A-Za-z0-9_]$", text_before):
        tokens = tokens[:-1]  # the word being typed: the editor filters the items by it
    stack: list[int] = []
    for i, t in enumerate(tokens):
        if t in "([{":
            stack.append(i)
        elif t in ")]}" and stack:
            stack.pop()
    last = tokens[-1] if tokens else ""
    names = _defined(known)
    if stack and tokens[stack[-1]] == "(":
        opened = stack[-1]
        callee = tokens[opened - 1] if opened > 0 else ""
        role = _role_of_call(tokens, opened)
        params = _params_of(role, callee, known)
        if last in ("(", ","):
            positional, given = _arguments_given(tokens[opened + 1:])
            return ([_param_item(p) for p in params[positional:] if p.name not in given]
                    + _value_items(names["let"]))
        if last == "=":
            param = next((p for p in params if p.name == tokens[-2]), None)
            return _choice_items(param) + _value_items(names["let"])
        return []
    if stack and tokens[stack[-1]] == "[":
        opened = stack[-1]
        if opened > 1 and tokens[opened - 2] == "input":
            return _value_items(names["let"])  # a shape: numbers and constants
        owner = _attribute_owner(tokens, opened)
        if last in ("[", ","):
            return [_param_item(p) for p in _attribute_params(owner)]
        if last == "=":
            param = next((p for p in _attribute_params(owner) if p.name == tokens[-2]), None)
            return _choice_items(param) + _value_items(names["let"])
        return []
    in_train = bool(stack) and stack[-1] > 0 and tokens[stack[-1] - 1] == "train"
    start = (stack[-1] + 1) if stack else 0
    head = _statement_head(tokens, start)
    if in_train:
        if last == "=" and len(tokens) >= 3 and tokens[-3] == "stage":
            return _registry_items(TRAINERS, "trainer")
        if last == "=" and tokens[-2] == "data":
            return _registry_items(DATASETS, "data set")
        if last == "=":
            param = next((p for p in TRAIN_SETTINGS.params if p.name == tokens[-2]), None)
            return _choice_items(param) + _value_items(names["let"])
        if last == "stage":
            return []  # a new stage's name is the user's
        return ([_item("data", types.CompletionItemKind.Property, "the data set"),
                 _item("stage", types.CompletionItemKind.Keyword, "stage NAME = trainer(...)")]
                + [_param_item(p, suffix=" = ") for p in TRAIN_SETTINGS.params])
    if head in ("node", "control", "dummy", "block") and last in ("=", ",") and _in_pipeline(tokens, start):
        layers = _registry_items(LAYERS, "layer")
        if head == "dummy" and last == "=":
            layers = [i for i in layers if i.label == "const"]  # a dummy starts with `const` (E814)
        return layers + [_item(b, types.CompletionItemKind.Function, "block") for b in names["block"]]
    if last in ("->", "=>", "|") or (last == "," and head == ""):
        items = [_item(n, types.CompletionItemKind.Variable, kind) for n, kind in names["node"]]
        if last in ("=>", "|"):
            items.append(_item("skip", types.CompletionItemKind.Keyword, "no target: the action runs nothing"))
        return items
    if last in ("=", ",", "(", "[", "input", "output", "node", "control", "dummy", "let", "block", "graph"):
        return []  # a value, or a name the user is choosing
    return ([_item(k, types.CompletionItemKind.Keyword, "statement") for k in STATEMENT_KEYWORDS]
            + [_item(n, types.CompletionItemKind.Variable, kind) for n, kind in names["node"]])


def _defined(known: Analysis | None) -> dict[str, list]:
    names: dict[str, list] = {"node": [], "let": [], "block": []}
    if known is None or known.file is None:
        return names
    for occ in known.names:
        if not occ.definition:
            continue
        if occ.role == "node":
            s = occ.statement
            kind = s.kind if isinstance(s, ast.NodeDecl) else ("input" if isinstance(s, ast.InputDecl) else "output")
            names["node"].append((occ.name, KIND_WORDS[kind]))
        elif occ.role in ("let", "block"):
            names[occ.role].append(occ.name)
    return names


def _arguments_given(tokens: list[str]) -> tuple[int, set[str]]:
    """How many complete positional arguments, and which keywords, a call's open argument
    list already has (`8, 3, stride=2,` → 2 and {"stride"})."""
    positional, given, depth, start = 0, set(), 0, 0
    for i, t in enumerate(tokens):
        if t in "([":
            depth += 1
        elif t in ")]":
            depth -= 1
        elif t == "," and depth == 0:
            arg = tokens[start:i]
            if len(arg) >= 2 and arg[1] == "=":
                given.add(arg[0])
            elif arg:
                positional += 1
            start = i + 1
    return positional, given


def _statement_head(tokens: list[str], start: int) -> str:
    """The keyword that opened the statement the cursor is in (since the innermost `{`),
    or "" when the latest words are an edge statement, which starts with a name."""
    for i in range(len(tokens) - 1, start - 1, -1):
        t = tokens[i]
        if t in STATEMENT_KEYWORDS or t == "stage":
            return t
        if t in ("->", "=>"):
            return ""
    return ""


def _in_pipeline(tokens: list[str], start: int) -> bool:
    """Whether the cursor follows a declaration's `=` with no edge arrow since."""
    for i in range(len(tokens) - 1, start - 1, -1):
        if tokens[i] in ("->", "=>"):
            return False
        if tokens[i] in ("node", "control", "dummy", "block"):
            return "=" in tokens[i:]
    return False


def _role_of_call(tokens: list[str], opened: int) -> str:
    """Whether the call opened at `opened` is a trainer (`stage s = NAME(`), a data set
    (`data = NAME(`) or a layer or block."""
    if opened >= 3 and tokens[opened - 2] == "=" and tokens[opened - 4:opened - 3] == ["stage"]:
        return "trainer"
    if opened >= 3 and tokens[opened - 2] == "=" and tokens[opened - 3] == "data":
        return "data set"
    return "layer"


def _params_of(role: str, callee: str, known: Analysis | None) -> tuple[Param, ...]:
    schema, _ = _schema(role, callee)
    if schema is not None:
        return schema.params
    if known is not None and known.file is not None:  # a block: its parameters are the user's names
        for item in _all_items(known.file):
            if isinstance(item, ast.BlockDef) and item.name.text == callee:
                return tuple(Param(p.text, "any") for p in item.params)
    return ()


def _attribute_params(owner: str) -> tuple[Param, ...]:
    schema = ATTRIBUTES.get(owner)
    return schema.params if schema is not None else ()


def _attribute_owner(tokens: list[str], opened: int) -> str:
    """`node N [` → "node", `output y [` → "output", otherwise an edge's attributes."""
    if opened >= 2 and tokens[opened - 2] in ("node", "control", "dummy", "output"):
        return tokens[opened - 2]
    return "edge"


def _item(label: str, kind: types.CompletionItemKind, detail: str, doc: str = "", insert: str | None = None):
    return types.CompletionItem(label=label, kind=kind, detail=detail, insert_text=insert,
                                documentation=types.MarkupContent(kind=types.MarkupKind.Markdown, value=doc)
                                if doc else None)


def _registry_items(registry, role: str) -> list[types.CompletionItem]:
    items = []
    for name in registry.names():
        schema, doc = _schema(role, name)
        items.append(_item(name, types.CompletionItemKind.Function, schema.signature(), doc))
    return items


def _param_item(p: Param, suffix: str = "=") -> types.CompletionItem:
    return _item(p.name, types.CompletionItemKind.Property, p.describe() + _default(p), p.doc,
                 insert=p.name + suffix)


def _choice_items(param: Param | None) -> list[types.CompletionItem]:
    if param is None:
        return []
    words = param.choices + param.also + (("true", "false") if param.kind == "bool" else ())
    return [_item(w, types.CompletionItemKind.EnumMember, f"{param.name}") for w in words]


def _value_items(lets: list[str]) -> list[types.CompletionItem]:
    return [_item(n, types.CompletionItemKind.Constant, "constant") for n in lets]


# --- document symbols (the outline) -------------------------------------------------------------

_SYMBOL_KINDS = {
    "input": types.SymbolKind.Variable, "output": types.SymbolKind.Variable, "node": types.SymbolKind.Function,
    "control": types.SymbolKind.Event, "dummy": types.SymbolKind.Constant,
}


def document_symbols(analysis: Analysis) -> list[types.DocumentSymbol]:
    """The graph with its nodes, control nodes, outputs, constants, blocks and train stages;
    a checked file adds each node's shape and cost as its detail."""
    if analysis.file is None:
        return []
    lines, g = analysis.lines, analysis.graph

    def symbol(name: ast.Name, whole: Span, kind, detail: str = "", children=None):
        return types.DocumentSymbol(name=name.text, kind=kind, range=lines.range(whole.to(name.span)),
                                    selection_range=lines.range(name.span), detail=detail or None,
                                    children=children)

    def of(s) -> types.DocumentSymbol | None:
        if isinstance(s, ast.Let):
            return symbol(s.name, s.span, types.SymbolKind.Constant, "let")
        if isinstance(s, ast.BlockDef):
            return symbol(s.name, s.span, types.SymbolKind.Method, f"block ({', '.join(p.text for p in s.params)})")
        if isinstance(s, (ast.InputDecl, ast.OutputDecl, ast.NodeDecl)):
            kind = s.kind if isinstance(s, ast.NodeDecl) else ("input" if isinstance(s, ast.InputDecl) else "output")
            detail = kind
            if g is not None and s.name.text in g:
                n = g[s.name.text]
                detail += f" {list(n.out_shape)}" + (f" · {exact_cost(n.cost)}{_unit(g)}" if n.cost else "")
            return symbol(s.name, s.span, _SYMBOL_KINDS[kind], detail)
        if isinstance(s, ast.TrainBlock):
            stages = [symbol(i.name, i.span, types.SymbolKind.Method, f"stage: {i.trainer.name.text}")
                      for i in s.items if isinstance(i, ast.Stage)]
            return types.DocumentSymbol(name="train", kind=types.SymbolKind.Module, range=lines.range(s.span),
                                        selection_range=lines.range(Span(s.span.source, s.span.start,
                                                                         s.span.start + len("train"))),
                                        children=stages)
        if isinstance(s, ast.GraphDecl):
            children = [c for c in (of(x) for x in s.body) if c is not None]
            detail = f"full cost {exact_cost(g.full_cost)}{_unit(g)}" if g is not None else "graph"
            return symbol(s.name, s.span, types.SymbolKind.Class, detail, children)
        return None

    return [c for c in (of(i) for i in analysis.file.items) if c is not None]


# --- semantic tokens (colours for editors without the TextMate grammar) ---------------------------

TOKEN_TYPES = ("keyword", "operator", "number", "string", "comment", "variable", "function", "parameter",
               "property", "namespace", "class", "enumMember")
TOKEN_MODIFIERS = ("declaration", "readonly", "defaultLibrary")

# What each kind of name is coloured as: (token type, modifiers).
_NAME_TOKENS = {
    "node": ("variable", ()), "let": ("variable", ("readonly",)), "block": ("function", ()),
    "layer": ("function", ("defaultLibrary",)), "data set": ("function", ("defaultLibrary",)),
    "trainer": ("function", ("defaultLibrary",)), "param": ("parameter", ()), "argument": ("property", ()),
    "setting": ("property", ()), "stage": ("namespace", ()), "graph": ("class", ()),
}
_OPERATORS = {"->", "=>", "|"}


def semantic_tokens(analysis: Analysis) -> list[int]:
    """The file's tokens in the protocol's encoding: five integers per token (line and start
    relative to the previous token, length, type and modifier bits; columns in client units).
    Keywords, numbers, strings, operators and comments come from the language's own lexer;
    a name is coloured by what it names (a bare word that names nothing is a symbol, an
    enum member: `concat`, `maxprob`). A file that does not parse has no tokens."""
    if analysis.file is None:
        return []
    named = {occ.span.start: occ for occ in analysis.names}
    found: list[tuple[int, int, str, tuple[str, ...]]] = []  # (start, end, type, modifiers)
    for t in tokens(analysis.text):
        if t.type == "NAME":
            occ = named.get(t.start_pos)
            kind, modifiers = _NAME_TOKENS[occ.role] if occ is not None else ("enumMember", ())
            if occ is not None and occ.definition:
                modifiers = modifiers + ("declaration",)
        elif t.type == "NUMBER":
            kind, modifiers = "number", ()
        elif t.type == "STRING":
            kind, modifiers = "string", ()
        elif t.value in _OPERATORS:
            kind, modifiers = "operator", ()
        elif t.value.isalpha():
            kind, modifiers = "keyword", ()
        else:
            continue  # punctuation is left to the editor
        found.append((t.start_pos, t.end_pos, kind, modifiers))
    found += [(c.span.start, c.span.end, "comment", ()) for c in analysis.file.comments]
    data, line, column = [], 0, 0
    for start, end, kind, modifiers in sorted(found):
        at, to = analysis.lines.position(start), analysis.lines.position(end)
        length = to.character - at.character if to.line == at.line else 0
        if length <= 0:
            continue  # a token never spans lines (strings and comments end at the line's end)
        data += [at.line - line, at.character - (column if at.line == line else 0), length,
                 TOKEN_TYPES.index(kind), sum(1 << TOKEN_MODIFIERS.index(m) for m in modifiers)]
        line, column = at.line, at.character
    return data


# --- the server -------------------------------------------------------------------------------


class D2GraphServer(LanguageServer):
    """pygls's server with each document's latest analysis and pending checks."""

    def __init__(self):
        # Full sync: the editor sends the whole text on each change. pygls applies incremental
        # changes by `str.splitlines`, which also breaks lines at a form feed or U+2028 — legal
        # in a .d2 file, but not line breaks to the protocol — and would edit the wrong line.
        # A .d2 file is a few kilobytes (at most 1 MiB).
        super().__init__("d2graph", "dev", text_document_sync_kind=types.TextDocumentSyncKind.Full)
        self.analyses: dict[str, Analysis] = {}  # uri → analysis of its latest text
        self.parsed: dict[str, Analysis] = {}  # uri → analysis of the latest text that parsed
        self.pending: dict[str, Any] = {}  # uri → the debounce timer of its next check

    def analysis(self, uri: str) -> Analysis:
        """The analysis of the document's current text, computed now if the text changed."""
        document = self.workspace.get_text_document(uri)
        text = document.source
        cached = self.analyses.get(uri)
        if cached is not None and cached.text == text:
            return cached
        name = to_fs_path(uri) or uri
        result = analyse(text, name, document.position_codec.client_num_units)
        self.analyses[uri] = result
        if result.file is not None:
            self.parsed[uri] = result
        return result

    def cancel_check(self, uri: str) -> None:
        """Drop the document's debounced check, if one is waiting."""
        timer = self.pending.pop(uri, None)
        if timer is not None:
            timer.cancel()

    def publish(self, uri: str) -> None:
        self.pending.pop(uri, None)
        if uri not in self.workspace.text_documents:
            return  # closed while the check waited
        document = self.workspace.get_text_document(uri)
        a = self.analysis(uri)
        self.text_document_publish_diagnostics(types.PublishDiagnosticsParams(
            uri=uri, version=document.version, diagnostics=[lsp_diagnostic(d, a.lines, uri) for d in a.diagnostics]))

    def log_failure(self, what: str) -> None:
        self.window_log_message(types.LogMessageParams(
            type=types.MessageType.Error, message=f"d2graph lsp: internal error in {what}:\n{traceback.format_exc()}"))


server = D2GraphServer()


def guarded(feature: Callable) -> Callable:
    """Answer nothing, and log the traceback, when a feature fails: one bad document or one
    bug must not take down the server the editor relies on for every other file."""

    @wraps(feature)
    def run(ls: D2GraphServer, params):
        try:
            return feature(ls, params)
        except Exception:
            ls.log_failure(feature.__name__)
            return None

    return run


@server.feature(types.INITIALIZED)
@guarded
def initialized(ls: D2GraphServer, params: types.InitializedParams):
    # The first check imports torch, the data sets and the trainers (seconds); do it now,
    # while the editor is still opening its first file, rather than on that file.
    def warm_up():
        try:
            analyse(WARM_UP, "warm-up.d2")
        except Exception:
            ls.log_failure("the warm-up check")

    asyncio.get_running_loop().call_soon(warm_up)


@server.feature(types.TEXT_DOCUMENT_DID_OPEN)
@guarded
def did_open(ls: D2GraphServer, params: types.DidOpenTextDocumentParams):
    ls.publish(params.text_document.uri)


@server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
@guarded
def did_change(ls: D2GraphServer, params: types.DidChangeTextDocumentParams):
    uri = params.text_document.uri
    ls.cancel_check(uri)

    def later():
        try:
            ls.publish(uri)
        except Exception:
            ls.log_failure("diagnostics")

    ls.pending[uri] = asyncio.get_running_loop().call_later(DEBOUNCE_SECONDS, later)


@server.feature(types.TEXT_DOCUMENT_DID_SAVE)
@guarded
def did_save(ls: D2GraphServer, params: types.DidSaveTextDocumentParams):
    ls.cancel_check(params.text_document.uri)
    ls.publish(params.text_document.uri)


@server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
@guarded
def did_close(ls: D2GraphServer, params: types.DidCloseTextDocumentParams):
    uri = params.text_document.uri
    ls.cancel_check(uri)
    ls.analyses.pop(uri, None)
    ls.parsed.pop(uri, None)
    ls.text_document_publish_diagnostics(types.PublishDiagnosticsParams(uri=uri, diagnostics=[]))


@server.feature(types.TEXT_DOCUMENT_HOVER)
@guarded
def hover(ls: D2GraphServer, params: types.HoverParams):
    a = ls.analysis(params.text_document.uri)
    occ = a.at(a.lines.offset(params.position))
    text = hover_text(a, occ) if occ is not None else None
    if text is None:
        return None
    return types.Hover(contents=types.MarkupContent(kind=types.MarkupKind.Markdown, value=text),
                       range=a.lines.range(occ.span))


@server.feature(types.TEXT_DOCUMENT_DEFINITION)
@guarded
def definition(ls: D2GraphServer, params: types.DefinitionParams):
    a = ls.analysis(params.text_document.uri)
    occ = a.at(a.lines.offset(params.position))
    d = a.definition(occ) if occ is not None else None
    if d is None:
        return None
    return types.Location(uri=params.text_document.uri, range=a.lines.range(d.span))


@server.feature(types.TEXT_DOCUMENT_REFERENCES)
@guarded
def references(ls: D2GraphServer, params: types.ReferenceParams):
    a = ls.analysis(params.text_document.uri)
    occ = a.at(a.lines.offset(params.position))
    if occ is None or occ.role not in ("node", "let", "block", "param"):
        return None
    return [types.Location(uri=params.text_document.uri, range=a.lines.range(o.span))
            for o in a.same(occ) if params.context.include_declaration or not o.definition]


@server.feature(types.TEXT_DOCUMENT_COMPLETION,
                types.CompletionOptions(trigger_characters=["(", ",", "=", "[", ">", "|", " "]))
@guarded
def completion(ls: D2GraphServer, params: types.CompletionParams):
    uri = params.text_document.uri
    a = ls.analysis(uri)
    before = a.lines.source.text[: a.lines.offset(params.position)]
    return types.CompletionList(is_incomplete=False, items=completions(before, ls.parsed.get(uri)))


@server.feature(types.TEXT_DOCUMENT_FORMATTING)
@guarded
def formatting(ls: D2GraphServer, params: types.DocumentFormattingParams):
    uri = params.text_document.uri
    document = ls.workspace.get_text_document(uri)
    text = document.source
    try:
        new = format_source(text, to_fs_path(uri) or uri)
    except D2GraphError as e:  # fmt formats only what parses; say why instead of guessing
        first = e.diagnostics[0]
        where = f" (line {first.span.line})" if first.span is not None else ""
        ls.window_show_message(types.ShowMessageParams(
            type=types.MessageType.Warning, message=f"d2graph: not formatted: {first.message}{where}"))
        return None
    if new == text:
        return []
    return [types.TextEdit(range=Lines(text, document.position_codec.client_num_units).whole(), new_text=new)]


@server.feature(types.TEXT_DOCUMENT_CODE_ACTION,
                types.CodeActionOptions(code_action_kinds=[types.CodeActionKind.QuickFix]))
@guarded
def code_action(ls: D2GraphServer, params: types.CodeActionParams):
    a = ls.analysis(params.text_document.uri)
    return quick_fixes(a, params.text_document.uri, params.range) or None


@server.feature(types.TEXT_DOCUMENT_DOCUMENT_SYMBOL)
@guarded
def symbols(ls: D2GraphServer, params: types.DocumentSymbolParams):
    return document_symbols(ls.analysis(params.text_document.uri))


@server.feature(types.TEXT_DOCUMENT_SEMANTIC_TOKENS_FULL,
                types.SemanticTokensLegend(token_types=list(TOKEN_TYPES), token_modifiers=list(TOKEN_MODIFIERS)))
@guarded
def colours(ls: D2GraphServer, params: types.SemanticTokensParams):
    return types.SemanticTokens(data=semantic_tokens(ls.analysis(params.text_document.uri)))


def serve(version: str = "") -> None:
    """Serve one editor over stdin/stdout until it sends `exit`; `version` is the one the
    server reports to the editor (the installed d2graph's)."""
    if version:  # the protocol copied the server's name and version when it was made
        server.version = version
        server.protocol.server_info.version = version
    server.start_io()

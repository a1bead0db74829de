"""`d2graph lsp` end to end: a real LSP client (pytest-lsp) starts `python -m d2graph lsp`
as a subprocess and talks to it over stdio, as an editor does.

- diagnostics: every shipped example opens clean; every annotated case of the error corpus
  gets its diagnostics at the checker's ranges, with code and help; columns are UTF-16
  units on a CRLF file; rapid edits are checked once they pause;
- quick fixes from the checker's did-you-mean hints, applied, make the file check;
- hover shows a node's shapes, cost and share of the full cost as the IR has them, a
  layer's signature, a trainer's parameters;
- definition and references of nodes, constants, blocks and block parameters;
- completion of layers, parameters, data sets, trainers, settings and node names;
- formatting equals `d2graph fmt` on every example and a messy file, and is refused with
  a message on a file that does not parse;
- document symbols follow the graph's declarations; semantic tokens colour each name by
  what it names;
- fuzzed edits and requests at random places keep the server alive, with nothing in its
  error log, and it still answers correctly afterwards.

One server serves the whole module (starting one imports torch: seconds on a busy machine);
each test opens its own documents. Skipped without the `lsp` extra (pygls) or pytest-lsp.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import sys

import pytest

pytest.importorskip("pygls", reason='the lsp extra is not installed: pip install "d2graph[lsp]"')
pytest_lsp = pytest.importorskip("pytest_lsp", reason="pytest-lsp is not installed (the test extra has it)")

from lsprotocol import types  # noqa: E402

import d2graph  # noqa: E402
from d2graph.fmt import format_source  # noqa: E402
from d2graph.ir import exact_cost  # noqa: E402
from d2graph.layers import LAYERS  # noqa: E402
from d2graph.lsp import DEBOUNCE_SECONDS  # noqa: E402
from d2graph.schema import TRAINERS  # noqa: E402

from .conftest import EXAMPLES, ROOT, TESTDATA  # noqa: E402

pytestmark = pytest.mark.asyncio(loop_scope="module")

# The worktree's d2graph, whatever is installed: the server runs from the repository root.
SERVER = pytest_lsp.ClientServerConfig(
    server_command=[sys.executable, "-m", "d2graph", "lsp"],
    server_env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
)

# The first check in the server imports torch, the data sets and the trainers.
FIRST_ANSWER_S = 120
ANSWER_S = 30


class CountingDiagnostics(dict):
    """The client's store of published diagnostics, counting the publications per document."""

    def __init__(self):
        super().__init__()
        self.published: dict[str, int] = {}

    def __setitem__(self, uri, diagnostics):
        self.published[uri] = self.published.get(uri, 0) + 1
        super().__setitem__(uri, diagnostics)


@pytest_lsp.fixture(scope="module", config=SERVER)
async def client(lsp_client: pytest_lsp.LanguageClient):
    lsp_client.diagnostics = CountingDiagnostics()
    lsp_client.initialized_with = await asyncio.wait_for(lsp_client.initialize_session(types.InitializeParams(
        capabilities=pytest_lsp.client_capabilities("visual-studio-code"), root_uri=ROOT.as_uri())), FIRST_ANSWER_S)
    yield
    await asyncio.wait_for(lsp_client.shutdown_session(), ANSWER_S)


def uri_of(name: str) -> str:
    return (ROOT / "tests" / "lsp-documents" / name).as_uri()  # never read: the text travels in didOpen


async def diagnostics_after(client, uri: str, send, timeout: float = FIRST_ANSWER_S) -> list[types.Diagnostic]:
    """Send a notification (`send()`) and wait for the diagnostics it brings."""
    client.diagnostics.pop(uri, None)
    send()

    async def published():
        while uri not in client.diagnostics:
            await asyncio.sleep(0.02)
        return list(client.diagnostics[uri])

    return await asyncio.wait_for(published(), timeout)


async def open_document(client, uri: str, text: str) -> list[types.Diagnostic]:
    return await diagnostics_after(client, uri, lambda: client.text_document_did_open(types.DidOpenTextDocumentParams(
        text_document=types.TextDocumentItem(uri=uri, language_id="d2graph", version=1, text=text))))


def close_document(client, uri: str) -> None:
    client.text_document_did_close(types.DidCloseTextDocumentParams(
        text_document=types.TextDocumentIdentifier(uri=uri)))


def change(client, uri: str, version: int, text: str) -> None:
    """The document is now `text` (the server syncs whole documents)."""
    client.text_document_did_change(types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
        content_changes=[types.TextDocumentContentChangeWholeDocument(text=text)]))


def position_of(text: str, needle: str, offset_in_needle: int = 0) -> types.Position:
    """The position of `needle` (the first occurrence outside comments) in an ASCII text."""
    for number, line in enumerate(text.split("\n")):
        code = line.split("#")[0]
        if needle in code:
            return types.Position(line=number, character=code.index(needle) + offset_in_needle)
    raise AssertionError(f"{needle!r} not in the text")


def apply_edits(text: str, edits: list[types.TextEdit]) -> str:
    """Apply LSP edits (ASCII text, LF): from the last to the first."""
    starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def offset(p):
        return starts[p.line] + p.character if p.line < len(starts) else len(text)

    for e in sorted(edits, key=lambda e: (e.range.start.line, e.range.start.character), reverse=True):
        text = text[:offset(e.range.start)] + e.new_text + text[offset(e.range.end):]
    return text


def errors_logged(client) -> list[str]:
    return [m.message for m in client.log_messages if m.type == types.MessageType.Error]


# --- diagnostics ---------------------------------------------------------------------------------


async def test_examples_open_clean(client):
    for path in EXAMPLES:
        text = path.read_text(encoding="utf-8")
        got = await open_document(client, path.as_uri(), text)
        _, expected = d2graph.check(text, str(path))
        assert [(d.code, d.range.start.line + 1) for d in got] == [(d.code, d.span.line) for d in expected], path.name
        assert not any(d.severity == types.DiagnosticSeverity.Error for d in got), path.name
        close_document(client, path.as_uri())


async def test_error_corpus_ranges_codes_and_help(client):
    """Every annotated error case: the checker's diagnostics, at the checker's ranges."""
    for path in sorted((TESTDATA / "errors").glob("*.d2")):
        text = path.read_text(encoding="utf-8")
        uri = uri_of(path.name)
        got = await open_document(client, uri, text)
        _, expected = d2graph.check(text, path.name)
        assert len(got) == len(expected), path.name
        for lsp, d in zip(got, expected):
            assert lsp.code == d.code and lsp.source == "d2graph", path.name
            if d.span is not None:
                end_line, end_column = d.span.source.position(d.span.end)
                assert (lsp.range.start.line, lsp.range.start.character) == (d.span.line - 1, d.span.column - 1)
                assert (lsp.range.end.line, lsp.range.end.character) == (end_line - 1, end_column - 1)
            assert lsp.message.startswith(d.message)
            assert (f"help: {d.help}" in lsp.message) if d.help else True
            expected_severity = types.DiagnosticSeverity.Error if d.is_error else types.DiagnosticSeverity.Warning
            assert lsp.severity == expected_severity
        close_document(client, uri)


async def test_an_unknown_parameter_is_underlined_with_its_hint(client):
    text = "graph g {\n  input x [1, 8, 8]\n  output y\n  node A = conv(4, 3, strides=2), fc(10)\n  x -> A -> y\n}\n"
    (d,) = await open_document(client, uri_of("strides.d2"), text)
    assert d.code == "E804" and "did you mean `stride`" in d.message and "help: its parameters are" in d.message
    start = position_of(text, "strides")
    assert d.range == types.Range(start=start, end=types.Position(line=start.line, character=start.character + 7))
    close_document(client, uri_of("strides.d2"))


async def test_a_trainer_that_cannot_train_the_graph_is_underlined_at_its_stage(client):
    # high_low's Q1 decides before any classifier runs: `threshold` has nothing to read (as `check` says).
    text = (ROOT / "examples" / "high_low.d2").read_text(encoding="utf-8").replace(
        "stage policy = qlearning(lambda=0.75)", "stage policy = threshold(budget=0.5)")
    (d,) = await open_document(client, uri_of("hl_threshold.d2"), text)
    assert d.code == "E921" and "`Q1` has no classifier to read" in d.message and "help: " in d.message
    assert d.range.start == position_of(text, "stage policy = threshold")
    close_document(client, uri_of("hl_threshold.d2"))


async def test_columns_are_utf16_units_and_crlf_lines_count_once(client):
    # The emoji is one character to Python and two UTF-16 units to the editor.
    text = ('graph g {\r\n  input x [4]\r\n  output y\r\n  node A = fc(4, bias="\U0001F600", strides=2)\r\n'
            '  x -> A -> y\r\n}\r\n')
    got = await open_document(client, uri_of("utf16.d2"), text)
    line = text.split("\r\n")[3]
    column = len(line[:line.index("strides")].encode("utf-16-le")) // 2
    e804 = next(d for d in got if d.code == "E804")
    assert (e804.range.start.line, e804.range.start.character) == (3, column)
    assert e804.range.end.character == column + len("strides")
    close_document(client, uri_of("utf16.d2"))


async def test_form_feeds_and_line_separators_are_not_line_breaks(client):
    # Python's str.splitlines breaks lines at both; the protocol and the language do not.
    text = "graph g {\x0c input x [4]  # a\u2028b\n  output y\n  node A = fc(4), rleu\n  x -> A -> y\n}\n"
    (d,) = await open_document(client, uri_of("formfeed.d2"), text)
    assert d.code == "E803" and d.range.start == types.Position(line=2, character=18)
    close_document(client, uri_of("formfeed.d2"))


async def test_edits_are_checked_when_typing_pauses(client):
    uri = uri_of("typing.d2")
    text = "graph g {\n  input x [4]\n  output y\n  node A = fc(4)\n  x -> A -> y\n}\n"
    assert await open_document(client, uri, text) == []

    def type_letters():
        # `fc` becomes `fcz`, `fczz`, ... one letter per change, as a user types.
        for i in range(1, 6):
            change(client, uri, 1 + i, text.replace("fc(4)", "fc" + "z" * i + "(4)"))

    before = client.diagnostics.published[uri]
    got = await diagnostics_after(client, uri, type_letters, ANSWER_S)
    assert [d.code for d in got] == ["E803"] and "`fczzzzz`" in got[0].message  # the last text
    await asyncio.sleep(3 * DEBOUNCE_SECONDS)
    assert client.diagnostics.published[uri] == before + 1  # checked once, not once per letter
    close_document(client, uri)


# --- quick fixes ---------------------------------------------------------------------------------


async def test_did_you_mean_is_a_quick_fix_that_makes_the_file_check(client):
    uri = uri_of("typos.d2")
    text = ("graph g {\n  input x [1, 8, 8]\n  output y [merge=selct]\n  node A = conv(4, 3, strides=2), rleu, fc(10)\n"
            "  x -> A -> y\n}\n")
    got = await open_document(client, uri, text)
    assert sorted(d.code for d in got) == ["E803", "E804", "E805"]
    actions = await asyncio.wait_for(client.text_document_code_action_async(types.CodeActionParams(
        text_document=types.TextDocumentIdentifier(uri=uri),
        range=types.Range(start=types.Position(line=0, character=0), end=types.Position(line=6, character=0)),
        context=types.CodeActionContext(diagnostics=got))), ANSWER_S)
    assert sorted(a.title for a in actions) == ["Replace `rleu` with `relu`", "Replace `selct` with `select`",
                                                "Replace `strides` with `stride`"]
    assert all(a.kind == types.CodeActionKind.QuickFix for a in actions)
    fixed = apply_edits(text, [e for a in actions for e in a.edit.changes[uri]])
    graph, diags = d2graph.check(fixed)
    assert graph is not None and not diags, fixed
    # Asking about one line offers that line's fixes only.
    only = await client.text_document_code_action_async(types.CodeActionParams(
        text_document=types.TextDocumentIdentifier(uri=uri),
        range=types.Range(start=position_of(text, "rleu"), end=position_of(text, "rleu")),
        context=types.CodeActionContext(diagnostics=[])))
    assert [a.title for a in only] == ["Replace `rleu` with `relu`"]
    close_document(client, uri)


# --- hover ---------------------------------------------------------------------------------------


async def hover(client, uri: str, position: types.Position) -> str | None:
    answer = await asyncio.wait_for(client.text_document_hover_async(types.HoverParams(
        text_document=types.TextDocumentIdentifier(uri=uri), position=position)), ANSWER_S)
    return None if answer is None else answer.contents.value


async def test_hover_on_a_node_shows_its_shapes_cost_and_share(client):
    path = ROOT / "examples" / "early_exit.d2"
    text = path.read_text(encoding="utf-8")
    await open_document(client, path.as_uri(), text)
    graph = d2graph.load(path)
    for name, where in (("B2", "node B2"), ("B2", "| B2"), ("Q2", "control Q2"), ("H1", "H1 -> Q1")):
        node = graph[name]
        shown = await hover(client, path.as_uri(), position_of(text, where, where.index(name)))
        assert f"`{name}`" in shown and f"out: shape `{list(node.out_shape)}`" in shown
        assert f"cost: {exact_cost(node.cost)} MACs per example" in shown
        share = 100 * node.cost / graph.full_cost
        share = "<0.1%" if 0 < share < 0.1 else f"{share:.1f}%"  # Q2's 6 MACs are not "0.0%"
        assert f"{share} of the full cost ({exact_cost(graph.full_cost)} MACs)" in shown
        assert f"→ shape `{list(node.in_shape)}`" in shown
        for layer in node.layers:
            assert f"| `{layer.summary()}` | `{list(layer.out_shape)}` | {exact_cost(layer.cost)} |" in shown
    assert "shape `[1, 32, 32]`" in await hover(client, path.as_uri(), position_of(text, "x -> B1"))
    # A comment is not a name.
    assert await hover(client, path.as_uri(), types.Position(line=0, character=3)) is None
    close_document(client, path.as_uri())


async def test_hover_on_a_layer_a_trainer_a_constant_and_a_broken_file(client):
    path = ROOT / "examples" / "early_exit.d2"
    text = path.read_text(encoding="utf-8")
    await open_document(client, path.as_uri(), text)
    conv = await hover(client, path.as_uri(), position_of(text, "node B1 = conv", 10))
    assert LAYERS.get("conv").schema.signature() in conv and LAYERS.get("conv").schema.doc in conv
    threshold = await hover(client, path.as_uri(), position_of(text, "threshold(", 2))
    assert TRAINERS.get("threshold").schema.signature() in threshold
    for p in TRAINERS.get("threshold").schema.params:
        assert f"- `{p.name}`: {p.describe()}" in threshold
    assert "let classes = 10" in await hover(client, path.as_uri(), position_of(text, "fc(classes)", 4))
    padding = LAYERS.get("conv").schema.params[3]
    assert await hover(client, path.as_uri(), position_of(text, "padding=1")) == \
        f"`padding`: {padding.describe()} — {padding.doc} (default `0`)"
    assert await hover(client, path.as_uri(), position_of(text, "[merge=select]", 1)) == \
        "`merge`: one of `sum`, `concat`, `select` (default `sum`)"
    assert "learning rate (default `0.001`)" in await hover(client, path.as_uri(), position_of(text, "lr = "))
    close_document(client, path.as_uri())
    # With an error elsewhere the node is still described, as written, and says why no shapes.
    uri = uri_of("broken-hover.d2")
    broken = "graph g {\n  input x [4]\n  output y\n  node A = fc(4), rleu\n  x -> A -> y\n}\n"
    await open_document(client, uri, broken)
    shown = await hover(client, uri, position_of(broken, "A -> y"))
    assert "node A = fc(4), rleu" in shown and "shapes and costs show once the file checks (1 error now)" in shown
    # Definitions and the outline need only a file that parses.
    assert (await definition(client, uri, position_of(broken, "A -> y"))).range.start == position_of(broken, "A =")
    (graph_symbol,) = await client.text_document_document_symbol_async(types.DocumentSymbolParams(
        text_document=types.TextDocumentIdentifier(uri=uri)))
    assert [(c.name, c.detail) for c in graph_symbol.children] == [("x", "input"), ("y", "output"), ("A", "node")]
    close_document(client, uri)


async def test_the_hovers_in_docs_editors_md_are_the_servers(client):
    """docs/editors.md shows two hovers on examples/early_exit.d2 as the editor renders them."""
    docs = (ROOT / "docs" / "editors.md").read_text(encoding="utf-8")
    path = ROOT / "examples" / "early_exit.d2"
    text = path.read_text(encoding="utf-8")
    await open_document(client, path.as_uri(), text)
    for marker, where, offset in (("hover:B2", "| B2", 2), ("hover:threshold", "threshold(", 0)):
        shown = re.search(rf"<!-- {marker} -->\n```markdown\n(.*?)\n```", docs, re.S)[1]
        assert shown == await hover(client, path.as_uri(), position_of(text, where, offset)), marker
    close_document(client, path.as_uri())


# --- definition and references -------------------------------------------------------------------


async def definition(client, uri, position):
    return await asyncio.wait_for(client.text_document_definition_async(types.DefinitionParams(
        text_document=types.TextDocumentIdentifier(uri=uri), position=position)), ANSWER_S)


async def references(client, uri, position, declaration=True):
    found = await asyncio.wait_for(client.text_document_references_async(types.ReferenceParams(
        text_document=types.TextDocumentIdentifier(uri=uri), position=position,
        context=types.ReferenceContext(include_declaration=declaration))), ANSWER_S)
    return sorted((r.range.start.line, r.range.start.character) for r in found)


def word_positions(text: str, word: str) -> list[tuple[int, int]]:
    """Where `word` is written as a whole word outside comments."""
    return [(n, m.start()) for n, line in enumerate(text.split("\n"))
            for m in re.finditer(rf"\b{word}\b", line.split("#")[0])]


async def test_definition_and_references_of_nodes_and_constants(client):
    path = ROOT / "examples" / "early_exit.d2"
    text = path.read_text(encoding="utf-8")
    uri = path.as_uri()
    await open_document(client, uri, text)
    target = await definition(client, uri, position_of(text, "| B2", 2))
    assert target.range.start == position_of(text, "node B2", 5)
    assert await references(client, uri, position_of(text, "| B2", 2)) == word_positions(text, "B2")
    declared = (position_of(text, "node B2", 5).line, 7)
    assert declared not in await references(client, uri, position_of(text, "| B2", 2), declaration=False)
    assert await references(client, uri, position_of(text, "fc(classes)", 4)) == word_positions(text, "classes")
    assert (await definition(client, uri, position_of(text, "fc(classes)", 4))).range.start == \
        position_of(text, "let classes", 4)
    close_document(client, uri)


async def test_definition_and_references_of_blocks_and_their_parameters(client):
    uri = uri_of("blocks.d2")
    text = ("block head(n) = fc(n), relu\n"
            "graph g {\n  let k = 4\n  input x [8]\n  output y\n"
            "  node A = head(k), head(n=2)\n  x -> A -> y\n}\n")
    assert await open_document(client, uri, text) == []
    assert (await definition(client, uri, position_of(text, "head(k)"))).range.start == position_of(text, "head")
    assert await references(client, uri, position_of(text, "head(k)")) == word_positions(text, "head")
    # `n` inside the block is its parameter, and so is `n=` in a call of the block.
    assert (await definition(client, uri, position_of(text, "fc(n)", 3))).range.start == position_of(text, "(n)", 1)
    assert (await definition(client, uri, position_of(text, "n=2"))).range.start == position_of(text, "(n)", 1)
    call = position_of(text, "n=2")
    assert await references(client, uri, position_of(text, "(n)", 1)) == [(0, 11), (0, 19), (call.line, call.character)]
    assert await hover(client, uri, call) == "parameter `n` of block `head`"
    close_document(client, uri)


# --- completion ----------------------------------------------------------------------------------


# What the document held before the user began the line being completed: it parses, so its
# names (the constant `k`, the nodes) are known to the server.
BEFORE = "graph g {\n  let k = 3\n  input x [1, 8, 8]\n  output y\n  node A = fc(4)\n  x -> A -> y\n}\n"


async def complete(client, uri: str, text: str, marker: str = "|") -> list[str]:
    """Open BEFORE, change it to `text` (the cursor at `marker`, which is removed) and list
    the completion labels there."""
    line = next(n for n, row in enumerate(text.split("\n")) if marker in row)
    position = types.Position(line=line, character=text.split("\n")[line].index(marker))
    await open_document(client, uri, BEFORE)
    change(client, uri, 2, text.replace(marker, "", 1))
    answer = await asyncio.wait_for(client.text_document_completion_async(types.CompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri), position=position)), ANSWER_S)
    close_document(client, uri)
    items = answer.items if isinstance(answer, types.CompletionList) else answer
    return [i.label for i in items]


async def test_completion_from_the_schemas(client):
    uri = uri_of("complete.d2")
    head = "graph g {\n  let k = 3\n  input x [1, 8, 8]\n  output y\n"
    layers = await complete(client, uri, head + "  node A = conv(4, 3), |\n}\n")
    assert set(LAYERS.names()) <= set(layers)
    params = await complete(client, uri, head + "  node A = conv(4, 3, stride=2, |\n}\n")
    assert params[:4] == ["padding", "groups", "dilation", "bias"] and "k" in params  # given ones left out
    assert await complete(client, uri, head + "  node A = conv(4, 3, padding=|\n}\n") == ["same", "k"]
    trainers = await complete(client, uri, head + "  train {\n    stage s = |\n  }\n}\n")
    assert trainers == TRAINERS.names()
    data = await complete(client, uri, head + "  train {\n    data = |\n  }\n}\n")
    assert {"digits", "cluttered_digits", "npz"} <= set(data)
    digits = await complete(client, uri, head + "  train {\n    data = cluttered_digits(|)\n  }\n}\n")
    assert "size" in digits and "clutter" in digits
    settings = await complete(client, uri, head + "  train {\n    |\n  }\n}\n")
    assert {"data", "stage", "seed", "lr", "optimizer"} <= set(settings)
    assert await complete(client, uri, head + "  train {\n    optimizer = |\n  }\n}\n") == ["adam", "adamw", "sgd", "k"]
    attrs = await complete(client, uri, head + "  node A [|] = fc(4)\n}\n")
    assert attrs == ["cost", "merge"]
    # Node names come from the last version that parsed; the half-typed edge does not parse.
    assert await complete(client, uri, BEFORE.replace("x -> A -> y", "x -> |")) == ["x", "y", "A"]
    assert await complete(client, uri, BEFORE.replace("x -> A -> y", "|")) == [
        "node", "control", "dummy", "input", "output", "let", "block", "train", "x", "y", "A"]


# --- formatting ----------------------------------------------------------------------------------


async def format_document(client, uri: str):
    return await asyncio.wait_for(client.text_document_formatting_async(types.DocumentFormattingParams(
        text_document=types.TextDocumentIdentifier(uri=uri),
        options=types.FormattingOptions(tab_size=2, insert_spaces=True))), ANSWER_S)


async def test_formatting_equals_d2graph_fmt(client):
    messy = ("graph g{input  x[1,8,8] output y\nnode A=conv(4,3,padding=1),relu(),   # [4,8,8]\n   maxpool(2)\n"
             "x->A->y[default=0,]}\n")
    documents = [(p.as_uri(), p.read_text(encoding="utf-8")) for p in EXAMPLES] + [(uri_of("messy.d2"), messy)]
    for uri, text in documents:
        await open_document(client, uri, text)
        edits = await format_document(client, uri)
        assert apply_edits(text, edits) == format_source(text), uri
        assert (not edits) == (format_source(text) == text), uri
        close_document(client, uri)
    assert any(text != format_source(text) for _, text in documents)  # something was reformatted


async def test_formatting_is_refused_when_the_file_does_not_parse(client):
    uri = uri_of("unparsable.d2")
    (syntax_error,) = await open_document(client, uri, "graph g {\n  node A = fc(4)\n  x -> -> y\n}\n")
    assert syntax_error.code == "E002" and syntax_error.range.start == types.Position(line=2, character=7)
    assert await client.text_document_document_symbol_async(types.DocumentSymbolParams(
        text_document=types.TextDocumentIdentifier(uri=uri))) == []
    before = len(client.messages)
    assert await format_document(client, uri) is None

    async def message():
        while len(client.messages) == before:
            await asyncio.sleep(0.02)
        return client.messages[-1]

    shown = await asyncio.wait_for(message(), ANSWER_S)
    assert shown.type == types.MessageType.Warning and "not formatted" in shown.message and "line 3" in shown.message
    close_document(client, uri)


# --- document symbols ----------------------------------------------------------------------------


async def test_document_symbols_outline_the_graph(client):
    path = ROOT / "examples" / "early_exit.d2"
    text = path.read_text(encoding="utf-8")
    await open_document(client, path.as_uri(), text)
    (graph_symbol,) = await asyncio.wait_for(client.text_document_document_symbol_async(types.DocumentSymbolParams(
        text_document=types.TextDocumentIdentifier(uri=path.as_uri()))), ANSWER_S)
    assert graph_symbol.name == "early_exit" and graph_symbol.kind == types.SymbolKind.Class
    declared = re.findall(r"^\s*(?:let|input|output|node|control|dummy)(?: \[[^\]]*\])? ?(\w+)", text, re.M)
    names = [c.name for c in graph_symbol.children]
    assert names == declared + ["train"]
    assert [c.name for c in next(c for c in graph_symbol.children if c.name == "train").children] == \
        ["backbone", "policy"]
    kinds = {c.name: c.kind for c in graph_symbol.children}
    assert kinds["Q1"] == types.SymbolKind.Event and kinds["B1"] == types.SymbolKind.Function
    assert next(c for c in graph_symbol.children if c.name == "Q2").detail.startswith("control [2]")
    close_document(client, path.as_uri())


# --- semantic tokens -----------------------------------------------------------------------------


async def test_semantic_tokens_colour_names_by_what_they_name(client):
    path = ROOT / "examples" / "early_exit.d2"
    text = path.read_text(encoding="utf-8")
    await open_document(client, path.as_uri(), text)
    legend = client.initialized_with.capabilities.semantic_tokens_provider.legend
    answer = await asyncio.wait_for(client.text_document_semantic_tokens_full_async(types.SemanticTokensParams(
        text_document=types.TextDocumentIdentifier(uri=path.as_uri()))), ANSWER_S)
    rows, line, column, colours = text.split("\n"), 0, 0, {}
    for i in range(0, len(answer.data), 5):
        dl, dc, length, kind, bits = answer.data[i:i + 5]
        line, column = line + dl, (column + dc if dl == 0 else dc)
        modifiers = {m for b, m in enumerate(legend.token_modifiers) if bits >> b & 1}
        colours[line, column] = (rows[line][column:column + length], legend.token_types[kind], modifiers)

    def colour(needle, offset=0):
        at = position_of(text, needle, offset)
        return colours[at.line, at.character]

    assert colour("node B2") == ("node", "keyword", set())
    assert colour("node B2", 5) == ("B2", "variable", {"declaration"})
    assert colour("| B2", 2) == ("B2", "variable", set())
    assert colour("conv(16") == ("conv", "function", {"defaultLibrary"})
    assert colour("fc(classes)", 3) == ("classes", "variable", {"readonly"})
    assert colour("padding=1") == ("padding", "property", set())
    assert colour("merge=select", 6) == ("select", "enumMember", set())
    assert colour("x -> B1", 2) == ("->", "operator", set())
    assert colour("=> skip", 3) == ("skip", "keyword", set())
    assert colour("lr = 0.003", 5) == ("0.003", "number", set())
    assert colours[0, 0] == (rows[0], "comment", set())
    comments = sum(1 for row in rows if row.lstrip().startswith("#") or "  #" in row)
    assert sum(1 for c in colours.values() if c[1] == "comment") == comments
    close_document(client, path.as_uri())


# --- robustness ----------------------------------------------------------------------------------

# What the fuzzer types: pieces of the language, brackets, line breaks of every kind,
# characters outside the Basic Multilingual Plane, control characters.
PIECES = ["node", "control", " -> ", " => ", "|", "(", ")", "[", "]", "{", "}", ",", "=", "\"", "#", "\n", "\r\n",
          "\r", "\x0c", "\u2028", "fc(4)", "conv(", "skip", "-1e9", "\U0001F600", "\u202e", "\x00", "\t", "merge=",
          "train {", "x"]


async def test_fuzzed_edits_keep_the_server_alive(client):
    path = ROOT / "examples" / "early_exit.d2"
    original = path.read_text(encoding="utf-8")
    uri = uri_of("fuzzed.d2")
    await open_document(client, uri, original)
    rng = random.Random(16)
    text = original
    for version in range(2, 62):
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        line = rng.randrange(len(lines))
        a, b = sorted(rng.randrange(len(lines[line]) + 1) for _ in range(2))
        if rng.random() < 0.5:
            b = a  # an insertion; else the span [a, b) of the line is replaced
        new = "".join(rng.choice(PIECES) for _ in range(rng.randrange(3)))
        text = _apply_line_edit(text, line, a, b, new)
        change(client, uri, version, text)
        where = types.Position(line=rng.randrange(len(lines) + 2), character=rng.randrange(80))
        ident = types.TextDocumentIdentifier(uri=uri)
        requests = [
            client.text_document_hover_async(types.HoverParams(text_document=ident, position=where)),
            client.text_document_completion_async(types.CompletionParams(text_document=ident, position=where)),
            client.text_document_definition_async(types.DefinitionParams(text_document=ident, position=where)),
            client.text_document_document_symbol_async(types.DocumentSymbolParams(text_document=ident)),
            client.text_document_semantic_tokens_full_async(types.SemanticTokensParams(text_document=ident)),
        ]
        if version % 5 == 0:
            requests.append(client.text_document_formatting_async(types.DocumentFormattingParams(
                text_document=ident, options=types.FormattingOptions(tab_size=2, insert_spaces=True))))
        answers = await asyncio.wait_for(asyncio.gather(*requests), ANSWER_S)
        if version % 5 == 0:  # the server holds the client's text: its formatting is fmt's of it
            try:
                expected = format_source(text)
            except d2graph.D2GraphError:
                assert answers[-1] is None
            else:
                assert (answers[-1][0].new_text if answers[-1] else text) == expected
    assert errors_logged(client) == []
    # Still serving, and still right: back to the original text, the hover shows B2's shape.
    got = await diagnostics_after(client, uri, lambda: change(client, uri, 100, original), ANSWER_S)
    assert got == []
    assert "out: shape `[16, 8, 8]`" in await hover(client, uri, position_of(original, "node B2", 5))
    assert errors_logged(client) == []
    close_document(client, uri)


def _apply_line_edit(text: str, line: int, a: int, b: int, new: str) -> str:
    """Replace columns [a, b) of `line`, counting lines as LSP does (LF, CRLF, CR)."""
    parts = re.split(r"(\r\n|\r|\n)", text)
    rows, breaks = parts[0::2], parts[1::2]
    rows[line] = rows[line][:a] + new + rows[line][b:]
    return "".join(r + (breaks[i] if i < len(breaks) else "") for i, r in enumerate(rows))

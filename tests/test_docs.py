"""The docs stay true: docs/language.md and docs/cli.md are checked against the code.

- the layer table between the layer-table markers is exactly `layer_table()`;
- every diagnostic code used in d2graph/*.py is documented in docs/language.md;
- every ```d2 block that contains a `graph` parses; one with inputs and outputs checks
  clean, unless a line containing `<!-- error -->` precedes it (then it must produce a
  diagnostic, so the marker cannot hide a block that has become valid);
- the IR shown between the ir markers is what `str(graph)` prints for the first example;
- the formatter's before/after example is what `fmt` does;
- every CLI command, option and exit code appears in docs/cli.md.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import d2graph
from d2graph import ast, cli
from d2graph.layers import layer_table
from d2graph.render import RenderError
from d2graph.schema import TRAIN_SETTINGS
from d2graph.syntax import _KEYWORDS, parse

ROOT = Path(__file__).resolve().parent.parent
LANGUAGE = ROOT / "docs" / "language.md"
CLI = ROOT / "docs" / "cli.md"
CODE = re.compile(r'"([EW]\d{3})"')
FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _blocks(text: str):
    """(language, body, the last non-blank line before the fence) for each fenced block."""
    out = []
    for m in FENCE.finditer(text):
        before = [ln for ln in text[: m.start()].splitlines() if ln.strip()]
        out.append((m.group(1), m.group(2), before[-1] if before else ""))
    return out


def _between(text: str, begin: str, end: str) -> str:
    assert text.count(begin) == 1 and text.count(end) == 1, f"expected one {begin} and one {end}"
    return text[text.index(begin) + len(begin) : text.index(end)]


def _fenced_after(text: str, marker: str) -> str:
    """The body of the first fenced block after a marker line."""
    assert text.count(marker) == 1, f"expected one {marker}"
    m = FENCE.search(text, text.index(marker))
    assert m is not None, f"no code block after {marker}"
    return m.group(2)


# --- the layer table -------------------------------------------------------------------------


def test_layer_table_is_generated():
    table = _between(_text(LANGUAGE), "<!-- layer-table:begin -->", "<!-- layer-table:end -->")
    assert table.strip("\n") == layer_table(), (
        'regenerate it: python -c "from d2graph.layers import layer_table; print(layer_table())"'
    )


# --- diagnostic codes ------------------------------------------------------------------------


def _codes_in_source() -> set[str]:
    codes = set()
    for path in (ROOT / "d2graph").glob("*.py"):
        codes |= set(CODE.findall(_text(path)))
    return codes


def test_source_uses_diagnostic_codes():
    # guards the regex: if it stopped matching, the next test would pass vacuously
    assert {"E001", "E101", "E701", "E801", "W501"} <= _codes_in_source()


@pytest.mark.parametrize("code", sorted(_codes_in_source()))
def test_diagnostic_code_is_documented(code):
    table_rows = [ln for ln in _text(LANGUAGE).splitlines() if ln.startswith(f"| {code} |")]
    assert table_rows, f"{code} is used in d2graph/ but has no row in the diagnostic table of docs/language.md"


# --- d2 examples -----------------------------------------------------------------------------


def _d2_graph_blocks():
    blocks = [(body, "<!-- error -->" in before) for lang, body, before in _blocks(_text(LANGUAGE))
              if lang == "d2" and re.search(r"\bgraph\b", body)]
    return blocks


D2_BLOCKS = _d2_graph_blocks()


def test_there_are_d2_examples():
    assert len(D2_BLOCKS) >= 5
    assert any(is_error for _, is_error in D2_BLOCKS)


def _first_line(body: str) -> str:
    return next((ln.strip() for ln in body.splitlines() if ln.strip().startswith("graph")), body[:30])


@pytest.mark.parametrize("body,is_error", D2_BLOCKS, ids=[_first_line(b) for b, _ in D2_BLOCKS])
def test_d2_example(body, is_error):
    file = parse(body, "docs/language.md")
    graphs = file.graphs
    assert graphs, "a block that mentions `graph` should declare one"
    statements = [s for g in graphs for s in g.body]
    has_io = any(isinstance(s, ast.InputDecl) for s in statements) and any(
        isinstance(s, ast.OutputDecl) for s in statements)
    if not has_io:
        return
    graph, diags = d2graph.check(body, "docs/language.md")
    rendered = "\n\n".join(d.render() for d in diags)
    if is_error:
        assert diags, "marked <!-- error --> but checks clean: drop the marker or the example"
    else:
        assert graph is not None and not diags, rendered


def test_ir_example_is_current():
    text = _text(LANGUAGE)
    shown = _fenced_after(_between(text, "<!-- ir:begin -->", "<!-- ir:end -->"), "```text")
    first_example = next(body for body, is_error in D2_BLOCKS if not is_error)
    graph, diags = d2graph.check(first_example, "tour.d2")
    assert graph is not None, diags
    assert shown.rstrip("\n") == str(graph)


def test_fmt_example_is_current():
    text = _text(LANGUAGE)
    before = _fenced_after(text, "<!-- fmt:before -->")
    after = _fenced_after(text, "<!-- fmt:after -->")
    assert d2graph.format(before) == after


# --- other lists the docs repeat ----------------------------------------------------------------


def test_keywords_are_listed():
    row = next(ln for ln in _text(LANGUAGE).splitlines() if ln.startswith("| keyword |"))
    assert set(re.search(r"`([^`]*)`", row).group(1).split()) == _KEYWORDS


def test_trainers_are_documented_with_their_signatures():
    from d2graph.schema import TRAINERS

    text = _text(LANGUAGE)
    for name in TRAINERS.names():
        assert f"| `{TRAINERS.get(name).schema.signature()}` |" in text, name
        assert f"`{name}`" in (ROOT / "docs" / "trainers.md").read_text(encoding="utf-8"), name


def test_train_settings_are_documented():
    text = _text(LANGUAGE)
    for p in TRAIN_SETTINGS.params:
        assert f"| `{p.name}` |" in text, p.name


# --- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(cli._COMMANDS))
def test_command_is_documented(command):
    assert f"## `d2graph {command}`" in _text(CLI)


def _options():
    parser = cli.build_parser()
    found = set()
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:
            found |= {o for o in action.option_strings if o.startswith("--")}
            choices = getattr(action, "choices", None)
            if isinstance(choices, dict):  # the subcommands
                stack += choices.values()
    return sorted(found)


@pytest.mark.parametrize("option", _options())
def test_option_is_documented(option):
    assert f"`{option}" in _text(CLI)


@pytest.mark.parametrize("code", [cli.EXIT_OK, cli.EXIT_FOUND, cli.EXIT_USAGE, RenderError.exit_code,
                                  cli.EXIT_INTERNAL, cli.EXIT_INTERRUPTED])
def test_exit_code_is_documented(code):
    assert re.search(rf"^\| {code} \|", _text(CLI), re.M)


def test_trainer_guide_example_runs(monkeypatch):
    """The "add your own trainer" example of docs/trainers.md trains and routes as written."""
    page = (ROOT / "docs" / "trainers.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    monkeypatch.chdir(ROOT)
    # The example registers its trainer; forget it afterwards, or later tests see a
    # registry with one trainer more than d2graph ships (the language server's completion).
    from d2graph.schema import TRAINERS
    TRAINERS.names()  # the built-in trainers registered first, so that the copy kept holds them
    monkeypatch.setattr(TRAINERS, "entries", dict(TRAINERS.entries))
    namespace: dict = {}
    exec(compile(block, "docs/trainers.md", "exec"), namespace)
    trained = namespace["trained"]
    assert trained.policy.kind == "static" and trained.reports["test"].accuracy > 0.5


def test_api_page_runs_as_written(monkeypatch):
    """Every ```python block of docs/api.md runs, in order, in one namespace."""
    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)

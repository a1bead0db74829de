"""The editor files under editors/: the TextMate grammar and the VS Code extension.

- Every regex of the grammar compiles (Python's `re` reads these simple patterns as
  Oniguruma does) and its layer list is the layer registry's.
- A small TextMate scanner (match and begin/end rules, captures, includes — what the
  grammar uses) tokenises every shipped example; the scopes must agree with d2graph's own
  lexer: keywords, node kinds, `->` and `=>`, numbers, strings, comments, attribute keys,
  keyword arguments and layer calls.
- The VS Code extension declares the language, uses the grammar (an identical copy, as an
  extension must ship its files) and starts `d2graph lsp`.
- Without pygls, `d2graph lsp` says what to install (here, where the server's own tests are
  skipped when pygls is missing).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import lark
import pytest

from d2graph import ast, parse
from d2graph.layers import LAYERS
from d2graph.syntax import grammar_text

from .conftest import EXAMPLES, ROOT

EDITORS = ROOT / "editors"
GRAMMAR = json.loads((EDITORS / "d2graph.tmLanguage.json").read_text(encoding="utf-8"))
KEYWORDS = {"graph", "let", "block", "input", "output", "node", "control", "dummy", "train", "stage", "skip"}


def _rules(patterns: list[dict]) -> list[dict]:
    """The rules a pattern list stands for, includes expanded (in order)."""
    out = []
    for p in patterns:
        if "include" in p:
            target = GRAMMAR if p["include"] == "$self" else GRAMMAR["repository"][p["include"][1:]]
            out += _rules(target["patterns"]) if "match" not in target and "begin" not in target else [target]
        else:
            out += _rules(p["patterns"]) if "match" not in p and "begin" not in p else [p]
    return out


def _regexes(node) -> list[str]:
    if isinstance(node, dict):
        found = [node[k] for k in ("match", "begin", "end") if k in node]
        return found + [r for v in node.values() for r in _regexes(v)]
    if isinstance(node, list):
        return [r for v in node for r in _regexes(v)]
    return []


def tokenise(text: str) -> list[str | None]:
    """The innermost scope name of every character of `text`, as a TextMate engine
    assigns it (None: no scope). At each position every rule of the current region (and the
    region's end) is searched; the leftmost match wins, ties go to the region's end, then to
    the earlier rule. Text no rule matches takes the region's name."""
    scopes: list[str | None] = []
    stack: list[dict] = []  # the open begin/end regions
    for line in text.split("\n"):
        line_scopes: list[str | None] = [None] * len(line)
        pos = 0
        for _ in range(10 * len(line) + 10):  # every step consumes text or opens/closes a region
            region = stack[-1] if stack else None
            candidates = []
            if region is not None:
                m = re.compile(region["end"]).search(line, pos)
                if m:
                    candidates.append((m.start(), -1, region, m))
            for order, rule in enumerate(_rules(region["patterns"] if region else GRAMMAR["patterns"])):
                m = re.compile(rule.get("match") or rule["begin"]).search(line, pos)
                if m:
                    candidates.append((m.start(), order, rule, m))
            start = min(candidates, key=lambda c: c[:2])[0] if candidates else len(line)
            for i in range(pos, start):
                line_scopes[i] = region.get("name") if region else None
            if not candidates:
                break
            _, order, rule, m = min(candidates, key=lambda c: c[:2])
            if order == -1:  # the region ends
                _paint(line_scopes, m, rule.get("name"), rule.get("endCaptures", {}))
                stack.pop()
            elif "match" in rule:
                _paint(line_scopes, m, rule.get("name") or (region or {}).get("name"), rule.get("captures", {}))
            else:
                _paint(line_scopes, m, rule.get("name"), rule.get("beginCaptures", {}))
                stack.append(rule)
            if m.end() == pos and "match" in rule:
                if pos == len(line):
                    break
                pos += 1  # an empty match consumed nothing: move on
            pos = max(pos, m.end())
        scopes += line_scopes + [None]  # the line break
    return scopes[:len(text)]


def _paint(scopes: list, m: re.Match, name: str | None, captures: dict) -> None:
    for i in range(m.start(), m.end()):
        scopes[i] = name
    for group, capture in captures.items():
        if m.group(int(group)) is not None:
            for i in range(m.start(int(group)), m.end(int(group))):
                scopes[i] = capture.get("name", name)


def test_every_regex_compiles():
    patterns = _regexes(GRAMMAR)
    assert len(patterns) > 20
    for p in patterns:
        re.compile(p)


def test_the_layer_list_is_the_registry():
    (layer_rule,) = [r for r in _rules(GRAMMAR["repository"]["call"]["patterns"]) if "match" in r]
    assert layer_rule["match"] == r"\b(" + "|".join(LAYERS.names()) + r")\b"
    assert r"\b(" + "|".join(LAYERS.names()) + r")\s*(\()" in [r.get("begin") for r in _rules([{"include": "#call"}])]


def _expected(token: lark.Token, following: str) -> str | None:
    """The scope the grammar must give a token of d2graph's own lexer (None: not checked)."""
    if token.type != "NAME" and token.value in KEYWORDS:
        return "keyword." if token.value not in ("input", "output", "node", "control", "dummy") else "storage.type."
    if token.value in ("true", "false") and token.type != "NAME":
        return "constant.language.boolean"
    if token.value == "->":
        return "keyword.operator.edge.data"
    if token.value == "=>":
        return "keyword.operator.edge.control"
    if token.type == "NUMBER":
        return "constant.numeric"
    if token.type == "STRING":
        return "string.quoted.double"
    if token.type == "NAME" and token.value in LAYERS and following.lstrip().startswith("("):
        return "support.function.layer"
    return None


def _attribute_keys(file: ast.File):
    for item in file.items:
        for stmt in (item.body if isinstance(item, ast.GraphDecl) else ()):
            for a in getattr(stmt, "attrs", ()):
                yield a.key


def _keyword_arguments(file: ast.File):
    for item in file.items:
        for stmt in (item.body if isinstance(item, ast.GraphDecl) else (item,)):
            for call in getattr(stmt, "pipeline", ()):
                yield from (a.key for a in call.args if a.key is not None)


@pytest.mark.parametrize("path", EXAMPLES + [ROOT / "tests" / "testdata" / "errors" / "R8_E809_module_needs_opt_in.d2"],
                         ids=lambda p: p.name)
def test_examples_are_tokenised_as_the_lexer_reads_them(path):
    text = path.read_text(encoding="utf-8")
    scopes = tokenise(text)
    lexer = lark.Lark(grammar_text(), parser=None, lexer="basic")
    checked = 0
    for token in lexer.lex(text):
        want = _expected(token, text[token.end_pos:])
        if want is None:
            continue
        got = {scopes[i] for i in range(token.start_pos, token.end_pos)}
        assert len(got) == 1 and (got.pop() or "").startswith(want), (token, [scopes[token.start_pos]], want)
        checked += 1
    file = parse(text, path.name)
    for comment in file.comments:
        assert {scopes[i] for i in range(comment.span.start, comment.span.end)} == {"comment.line.number-sign.d2graph"}
    for key in _attribute_keys(file):
        assert scopes[key.span.start] == "entity.other.attribute-name.d2graph", key
    for key in _keyword_arguments(file):
        assert scopes[key.span.start] == "variable.parameter.d2graph", key
    assert checked >= 10


def test_strings_comments_and_edges_on_one_line():
    text = 'node A [cost=2] = module("pkg:Cls # not a comment", k=1)  # a "comment"\nQ => A | skip'
    scopes = tokenise(text)
    at = {word: scopes[text.index(word)] for word in ("node", "A", "cost", "module", '"pkg', "not a", "k=", "1)",
                                                     '# a "', "=>", "|", "skip")}
    assert at == {"node": "storage.type.node-kind.d2graph", "A": "entity.name.function.node.d2graph",
                  "cost": "entity.other.attribute-name.d2graph", "module": "support.function.layer.d2graph",
                  '"pkg': "string.quoted.double.d2graph", "not a": "string.quoted.double.d2graph",
                  "k=": "variable.parameter.d2graph", "1)": "constant.numeric.d2graph",
                  '# a "': "comment.line.number-sign.d2graph", "=>": "keyword.operator.edge.control.d2graph",
                  "|": "keyword.operator.action.d2graph", "skip": "keyword.control.skip.d2graph"}


def test_the_vscode_extension_uses_the_grammar_and_starts_the_server():
    folder = EDITORS / "vscode"
    package = json.loads((folder / "package.json").read_text(encoding="utf-8"))
    (language,) = package["contributes"]["languages"]
    (grammar,) = package["contributes"]["grammars"]
    assert grammar["language"] == language["id"] == "d2graph" and ".d2" in language["extensions"]
    assert grammar["scopeName"] == GRAMMAR["scopeName"]
    # An extension ships only its own folder: the grammar is a copy, kept identical.
    assert (folder / grammar["path"]).read_bytes() == (EDITORS / "d2graph.tmLanguage.json").read_bytes()
    json.loads((folder / language["configuration"]).read_text(encoding="utf-8"))
    assert package["contributes"]["configuration"]["properties"]["d2graph.server.command"]["default"] == \
        ["d2graph", "lsp"]
    main = (folder / package["main"]).read_text(encoding="utf-8")
    assert "vscode-languageclient/node" in main
    assert 'getConfiguration("d2graph").get("server.command"' in main
    assert "vscode-languageclient" in package["dependencies"]


def test_without_pygls_the_command_says_what_to_install():
    # `None` in sys.modules makes `import pygls` fail as if it were not installed.
    code = "import sys; sys.modules['pygls'] = None; from d2graph.cli import main; sys.exit(main(['lsp']))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 3
    assert 'pip install "d2graph[lsp]"' in done.stderr and "Traceback" not in done.stderr

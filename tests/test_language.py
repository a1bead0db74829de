"""Parser, checker and IR on the shipped examples: golden IR text, invariants, shapes and
costs that agree with real torch modules, and robustness against arbitrary edits."""

import dataclasses
import random
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st
from lark import Lark
from torch.utils.flop_counter import FlopCounterMode

import d2graph
from d2graph import ast
from d2graph.diagnostics import D2GraphError, Span
from d2graph.layers import LAYERS, build_layer
from d2graph.syntax import grammar_text, parse

from .conftest import EXAMPLES, TESTDATA, golden

IDS = [p.stem for p in EXAMPLES]


def test_grammar_is_lalr_without_conflicts():
    # strict mode turns shift/reduce conflicts and terminal collisions into errors
    Lark(grammar_text(), parser="lalr", lexer="basic", strict=True)


def test_there_are_examples():
    assert len(EXAMPLES) >= 8


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_example_checks_clean_and_matches_golden_ir(path):
    graph = d2graph.load(path)
    assert graph.warnings == ()
    graph.lint()
    golden(TESTDATA / "ir" / f"{path.stem}.txt", str(graph) + "\n")


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_shapes_and_costs_agree_with_real_modules(path):
    """Build every node for real (CPU weights), run one example: the output shape is the
    inferred one and FlopCounterMode counts exactly 2 × the node's cost."""
    torch.manual_seed(0)
    graph = d2graph.load(path)
    for node in graph.nodes:
        if not node.layers:
            continue
        x = torch.randn(1, *node.layers[0].in_shape)
        with FlopCounterMode(display=False) as counter:
            for layer in node.layers:
                module = build_layer(layer.name, layer.kwargs, layer.in_shape).eval()
                x = module(x)
        assert tuple(x.shape[1:]) == node.out_shape, node.name
        if not node.cost_declared:
            assert counter.get_total_flops() == 2 * node.cost, node.name


def _walk(value):
    """Every AST node under a value (dataclasses, tuples)."""
    if isinstance(value, Span):
        return
    if dataclasses.is_dataclass(value):
        yield value
        for f in dataclasses.fields(value):
            yield from _walk(getattr(value, f.name))
    elif isinstance(value, tuple):
        for v in value:
            yield from _walk(v)


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_every_ast_node_has_a_span_over_its_text(path):
    text = path.read_text()
    tree = parse(text, path.name)
    for node in _walk(tree):
        assert isinstance(node.span, Span), type(node).__name__
        if isinstance(node, ast.Name):
            assert node.span.text == node.text
    comments = [c.text for c in tree.comments]
    assert comments == [m.group(0).rstrip() for m in re.finditer(r"#[^\n]*", text)]


def test_spans_do_not_take_part_in_equality():
    a = parse("graph g {\n input x [4]\n output y\n x -> y\n}\n")
    b = parse("graph g { input x [4] output y x -> y }")
    assert a == b


ERROR_TEXTS = [p.read_text() for p in sorted((TESTDATA / "errors").glob("*.d2"))]
LARK_WORDS = re.compile(r"__ANON|\bRBRACE\b|\bLBRACE\b|\bLSQB\b|\bRSQB\b|\bLPAR\b|\bRPAR\b|\$END|\bNAME\b|"
                        r"\bNUMBER\b|\bCOMMA\b|\bEQUAL\b|\bVBAR\b|_ARROW|Token\(")


@pytest.mark.parametrize("text", ERROR_TEXTS)
def test_messages_never_show_parser_internals(text):
    _, diags = d2graph.check(text)
    for d in diags:
        prose = re.sub(r"`[^`]*`", "", d.message + " " + d.label)  # code samples are ours
        assert not LARK_WORDS.search(prose), d.render()


def _mutations(text: str, rng: random.Random, n: int):
    tokens = re.findall(r"\s+|[A-Za-z_]\w*|-?\d+\.?\d*|\"[^\"\n]*\"|->|=>|#[^\n]*|.", text)
    pool = ["->", "=>", "|", ",", "=", "(", ")", "[", "]", "{", "}", "node", "control", "skip", "7", "x", '"', ":"]
    for _ in range(n):
        t = list(tokens)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(t))
            op = rng.random()
            if op < 0.4:
                del t[i]
            elif op < 0.7:
                t.insert(i, rng.choice(pool))
            else:
                j = rng.randrange(len(t))
                t[i], t[j] = t[j], t[i]
        yield "".join(t)


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_edited_examples_give_diagnostics_not_crashes(path):
    """Random token edits: the checker either accepts the file or explains why — any
    other exception is a bug."""
    rng = random.Random(path.stem)
    for text in _mutations(path.read_text(), rng, 25):
        graph, diags = d2graph.check(text, path.name)
        assert graph is not None or any(d.is_error for d in diags)
        for d in diags:
            assert d.code and d.message and (d.span is None or 0 <= d.span.start <= len(text))
            d.render()


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("graph{}[]()->=>|,#\"0123456789 xyQN\n")), max_size=80))
def test_arbitrary_text_never_crashes(text):
    graph, diags = d2graph.check(text)
    assert graph is not None or diags


def test_load_raises_one_error_type_with_every_diagnostic(tmp_path):
    f = tmp_path / "bad.d2"
    f.write_text((TESTDATA / "errors" / "many_independent_errors.d2").read_text())
    with pytest.raises(D2GraphError) as info:
        d2graph.load(f)
    assert len(info.value.errors) == 3
    assert str(f) in str(info.value)


def test_module_layer_runs_with_opt_in():
    text = 'graph g { input x [4] output y node A = module("torch.nn:Linear", 4, 6) x -> A -> y }'
    graph, diags = d2graph.check(text, allow_imports=True)
    assert diags == [] and graph["A"].out_shape == (6,) and graph["A"].cost == 24
    _, diags = d2graph.check(text.replace("torch.nn:Linear", "torch.nn:Nope"), allow_imports=True)
    assert [d.code for d in diags] == ["E604"] and "no attribute" in diags[0].message


def test_blocks_and_lets_expand():
    text = """
    let width = 6
    block head(c, hidden) = fc(hidden), relu, fc(c)
    graph g {
      input x [1, 4, 4]
      output y
      node A = conv(2, 3, padding=same), head(width, hidden=5)
      x -> A -> y
    }"""
    graph, diags = d2graph.check(text)
    assert diags == [], diags
    assert [layer.summary() for layer in graph["A"].layers] == [
        "conv(2, 3, padding=same)", "fc(5)", "relu", "fc(6)"]
    assert graph["A"].out_shape == (6,)


def test_every_layer_has_a_documented_schema():
    for name in LAYERS.names():
        spec = LAYERS.get(name)
        assert spec.schema.doc, name

"""Parser, checker and IR on the shipped examples: golden IR text, invariants, shapes and
costs that agree with real torch modules, and robustness against arbitrary edits."""

import dataclasses
import importlib
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
        first = node.layers[0]
        x = (torch.randint(1, dict(first.kwargs)["vocab"], (1, *first.in_shape)) if first.name == "embedding"
             else torch.randn(1, *first.in_shape))  # token ids for an embedding, else real values
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


# --- limits (issue 15): diagnostics, never an exception or unbounded work ---------------------


def _nested(depth: int, where: str) -> str:
    """A graph whose brackets nest `depth` deep (the graph's `{`, a call's `(`, then a list)
    in a `let` value or in a layer argument."""
    if where == "let":
        value = "[" * (depth - 1) + "1" + "]" * (depth - 1)
        return f"graph g {{\n  let deep = {value}\n  input x [4]\n  output y\n  x -> y\n}}\n"
    value = "[" * (depth - 2) + "1" + "]" * (depth - 2)
    return f"graph g {{\n  input x [4]\n  output y\n  node A = fc(4, bias={value})\n  x -> A -> y\n}}\n"


@pytest.mark.parametrize("where", ["let", "argument"])
def test_nesting_at_the_limit_passes_every_stage(where):
    from d2graph.syntax import MAX_NESTING

    text = _nested(MAX_NESTING, where)  # the deepest a file may nest
    graph, diags = d2graph.check(text)
    assert [d.code for d in diags] == ([] if where == "let" else ["E805"])  # a list is no `bias`
    "\n".join(d.render() for d in diags)
    formatted = d2graph.format(text)  # re-parses and compares the ASTs: recursion on both
    assert parse(formatted) == parse(text)
    if graph is not None:
        graph.lint()
        str(graph)


@pytest.mark.parametrize("where", ["let", "argument"])
@pytest.mark.parametrize("depth", [65, 500, 5000])
def test_nesting_too_deep_is_a_diagnostic_before_anything_recursive(where, depth):
    text = _nested(depth, where)
    graph, diags = d2graph.check(text)
    assert graph is None and [d.code for d in diags] == ["E007"]
    (d,) = diags
    assert d.span.line in (2, 4) and text[d.span.start] == "[" and "64" in d.message
    with pytest.raises(D2GraphError) as info:
        d2graph.format(text)
    assert info.value.diagnostics[0].code == "E007"


def test_brackets_in_strings_and_comments_do_not_count():
    deep = "[" * 200
    text = f'graph g {{  # {deep}\n  input x [4]\n  output y\n  node A = fc(4), module("{deep}")\n  x -> A -> y\n}}\n'
    assert [d.code for d in d2graph.check(text)[1]] == ["E809"]


def test_a_text_over_the_size_limit_is_a_diagnostic(tmp_path):
    from d2graph.syntax import MAX_SOURCE_CHARS

    text = "graph g { input x [4] output y x -> y }\n" + "#" * MAX_SOURCE_CHARS
    graph, diags = d2graph.check(text, "big.d2")
    assert graph is None and [d.code for d in diags] == ["E011"]
    assert diags[0].span is not None and f"{MAX_SOURCE_CHARS:,}" in diags[0].render()
    path = tmp_path / "big.d2"
    path.write_text(text)
    with pytest.raises(D2GraphError) as info:
        d2graph.load(path)
    assert [d.code for d in info.value.diagnostics] == ["E011"] and str(path) in info.value.diagnostics[0].message


def test_a_lone_carriage_return_is_a_line_break_through_the_api_and_files(tmp_path):
    # `# note\rnode A = ...`: a comment, then a declaration on the next line, both ways.
    text = "graph g {\r  input x [4]\r  output y # note\r  node A = fc(4)\r\n  x -> A -> y\r}\r"
    path = tmp_path / "cr.d2"
    path.write_bytes(text.encode())
    graph, diags = d2graph.check(text, "cr.d2")
    assert diags == [] and "A" in graph
    assert d2graph.load(path) == graph
    broken = text.replace("fc(4)", "fc(4, nope=1)")
    path.write_bytes(broken.encode())
    _, api = d2graph.check(broken, str(path))
    with pytest.raises(D2GraphError) as info:
        d2graph.load(path)
    assert [(d.code, d.span.line, d.span.column) for d in api] == \
        [(d.code, d.span.line, d.span.column) for d in info.value.diagnostics] == [("E804", 4, 18)]
    assert d2graph.format(text) == d2graph.format(text.replace("\r\n", "\n").replace("\r", "\n"))


def test_control_characters_in_a_source_line_are_escaped_in_the_excerpt():
    text = 'graph g {\n  input x [4]\n  output y\n  node A = module("\x1b[2J\x1b]0;owned\x07"), fc(4, nope=1)\n  x -> A -> y\n}\n'
    _, diags = d2graph.check(text)
    shown = "\n".join(d.render() for d in diags)
    assert not any(ch in shown for ch in "\x1b\x07\r"), repr(shown)
    assert "\\x1b[2J" in shown
    (e804,) = [d for d in diags if d.code == "E804"]
    lines = e804.render().splitlines()
    row = next(i for i, ln in enumerate(lines) if ln.startswith("4 |"))
    assert lines[row][lines[row + 1].index("^"):].startswith("nope")


def _independent_controls(n: int) -> str:
    """`n` control nodes, each switching one head of a `select` output that a first head
    always feeds: total, with 2^n combinations of actions."""
    lines = ["graph many {", "  input x [4]", "  output y [merge=select]", "  node A = fc(4)", "  x -> A"]
    for i in range(n):
        lines += [f"  control Q{i} = fc(2)", f"  x -> Q{i}", f"  Q{i} => N{i} | skip", f"  node N{i} = fc(4)",
                  f"  x -> N{i}"]
    lines += ["  " + ", ".join(["A"] + [f"N{i}" for i in range(n)]) + " -> y", "}"]
    return "\n".join(lines)


def test_totality_is_bounded_by_work_and_says_when_it_is_partial():
    import time

    text = _independent_controls(200)
    started = time.perf_counter()
    graph, diags = d2graph.check(text)
    elapsed = time.perf_counter() - started
    assert graph is not None and [d.code for d in diags] == ["W701"]
    assert "action combinations only" in diags[0].message
    assert elapsed < 20, f"checking took {elapsed:.1f} s"  # was ~40 s before the bound


def test_totality_search_does_not_recurse_per_control_node(monkeypatch):
    check_module = importlib.import_module("d2graph.check")
    monkeypatch.setattr(check_module, "TOTALITY_STEPS", 50_000)
    # 1,200 control nodes that all switch one head: a search 1,200 decisions deep, more
    # than Python's recursion limit (the layer limit leaves no room for a head each)
    lines = ["graph many {", "  input x [4]", "  output y [merge=select]", "  node A = fc(4)", "  node N = fc(4)",
             "  x -> A, N", "  A, N -> y"]
    for i in range(1200):
        lines += [f"  control Q{i} = fc(2)", f"  x -> Q{i}", f"  Q{i} => N | skip"]
    graph, diags = d2graph.check("\n".join(lines + ["}"]))
    assert graph is not None and [d.code for d in diags] == ["W701"]


@pytest.mark.parametrize("target, args", [
    ("os:system", '"touch {marker}"'),
    ("builtins:exec", '"open(\'{marker}\', \'w\').close()"'),
    ("subprocess:getoutput", '"touch {marker}"'),
    ("pathlib:Path.touch", '"{marker}"'),
    ("shutil:rmtree", '"{folder}"'),
    ("torch.nn:functional.relu", '1'),
    ("collections:OrderedDict", '1'),
])
def test_allow_imports_constructs_only_torch_module_classes(target, args, tmp_path):
    folder = tmp_path / "keep"
    folder.mkdir()
    marker = tmp_path / "called"
    call = f'module("{target}", {args.format(marker=marker, folder=folder)})'
    text = f"graph g {{ input x [4] output y node A = {call} x -> A -> y }}"
    graph, diags = d2graph.check(text, allow_imports=True)
    assert graph is None and [d.code for d in diags] == ["E604"]
    assert "not a torch module class" in diags[0].message
    assert not marker.exists() and folder.is_dir()  # nothing was called


def test_a_graph_too_large_to_build_checks_with_a_warning_and_is_refused_by_compile():
    from d2graph.executor import compile

    text = "graph g { input x [4] output y node A = fc(1000000000) x -> A -> y }"
    graph, diags = d2graph.check(text)
    assert [d.code for d in diags] == ["W604"] and "5,000,000,000 parameters" in diags[0].message
    assert graph.params == graph["A"].params == 5_000_000_000
    with pytest.raises(D2GraphError) as info:
        compile(graph)
    (d,) = info.value.diagnostics
    assert d.code == "E926" and "5,000,000,000 parameters (18.6 GiB in float32)" in d.message


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_parameter_counts_agree_with_real_modules(path):
    from d2graph.executor import compile

    graph = d2graph.load(path)
    executor = compile(graph)
    for node in graph.nodes:
        if node.layers:
            assert node.params == sum(p.numel() for p in executor.nodes[node.name].parameters()), node.name


def test_expansion_and_edges_are_bounded():
    import time

    started = time.perf_counter()
    blocks = "block b0(w) = nope(w)\n" + "".join(f"block b{i + 1}(w) = b{i}(w), b{i}(w), b{i}(w)\n" for i in range(20))
    graph, diags = d2graph.check(blocks + "graph g { input x [4] output y node A = b20(4) x -> A -> y }")
    assert graph is None and sorted({d.code for d in diags}) == ["E803", "E815"]
    assert sum(d.code == "E803" for d in diags) == 1  # a mistake in a block body, once
    names = ", ".join(["x"] * 400)
    graph, diags = d2graph.check(f"graph g {{ input x [4] output y node A = fc(4) {names} -> {names.replace('x', 'A')} A -> y }}")
    assert graph is None and "E815" in [d.code for d in diags]
    assert time.perf_counter() - started < 20


def test_a_wide_select_merge_checks_in_linear_time():
    # W703 for each of 1,199 shadowed inputs once computed min() per list element: cubic, ~25 s.
    import time

    n = 1200
    text = ("graph g {\n  input x [4]\n  output y [merge=select]\n"
            + "".join(f"  node N{i} = relu\n  x -> N{i} -> y\n" for i in range(n)) + "}\n")
    started = time.perf_counter()
    graph, diags = d2graph.check(text)
    assert graph is not None and [d.code for d in diags] == ["W703"] * (n - 1)
    assert time.perf_counter() - started < 12

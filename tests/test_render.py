"""The renderer: golden DOT files, the drawing conventions, and writing SVG / PNG files.

Golden cases: every examples/*.d2 that checks clean draws to
tests/testdata/render/examples/NAME.golden.dot, and every tests/testdata/render/NAME.d2 to
tests/testdata/render/NAME.golden.dot. After an intended change to the drawing, re-accept
them with `D2GRAPH_ACCEPT=1 pytest tests/test_render.py`, render one to PNG and look at it.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from d2graph import check
from d2graph.check import load
from d2graph.diagnostics import D2GraphError
from d2graph.render import WRAP, RenderError, render, to_dot

ROOT = Path(__file__).resolve().parent.parent
RENDER_DIR = ROOT / "tests" / "testdata" / "render"

EXAMPLES = sorted((ROOT / "examples").glob("*.d2"))
CASES = sorted(RENDER_DIR.glob("*.d2"))
HAVE_DOT = shutil.which("dot") is not None


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _golden(path: Path) -> Path:
    folder = RENDER_DIR / "examples" if path.parent == ROOT / "examples" else RENDER_DIR
    return folder / f"{path.stem}.golden.dot"


def _load_or_skip(path: Path):
    # Examples are written by others while this suite runs; one that does not check
    # (yet) is the checker's tests' business, not the renderer's.
    try:
        return load(path)
    except D2GraphError as e:
        pytest.skip(f"{_id(path)} does not check clean: {e.diagnostics[0].code}")


# --- a small reader for the DOT we write --------------------------------------------------------


_ID = r'"(?:[^"\\]|\\.)*"|[A-Za-z_][A-Za-z0-9_.]*|-?[0-9.]+'


def _value(text: str, i: int) -> tuple[str, int]:
    """One attribute value starting at text[i]: an ID, a "string" or an <HTML> label."""
    if text[i] == "<":
        depth, j = 0, i
        while True:
            depth += {"<": 1, ">": -1}.get(text[j], 0)
            j += 1
            if depth == 0:
                return text[i + 1 : j - 1], j
    m = re.compile(_ID).match(text, i)
    assert m, f"cannot read a value at {text[i:i + 30]!r}"
    return _unquote(m.group()), m.end()


def _unquote(s: str) -> str:
    return s[1:-1].replace('\\"', '"') if s.startswith('"') else s


def _attrs(text: str) -> dict[str, str]:
    out, i = {}, 0
    while i < len(text):
        if text[i] in " \t,":
            i += 1
            continue
        m = re.compile(r"[A-Za-z_]+=").match(text, i)
        assert m, f"cannot read an attribute at {text[i:i + 30]!r}"
        out[m.group()[:-1]], i = _value(text, m.end())
    return out


def parse_dot(text: str) -> tuple[dict[str, dict], list[tuple[str, str, dict]]]:
    """(nodes by name, edges as (tail, head, attrs)) of the DOT text `to_dot` writes; an edge
    with a label also gets "text", the label's words without its HTML."""
    nodes: dict[str, dict] = {}
    edges: list[tuple[str, str, dict]] = []
    stmt = re.compile(rf"\t({_ID})(?: -> ({_ID}))?(?: \[(.*)\])?$")
    for line in text.splitlines():
        m = stmt.match(line)
        if not m or m.group(1) in ("node", "edge", "graph"):
            continue
        attrs = _attrs(m.group(3) or "")
        tail, head = _unquote(m.group(1)), m.group(2) and _unquote(m.group(2))
        if head is None:
            nodes.setdefault(tail, {}).update(attrs)
        else:
            if "label" in attrs:  # the text, without the table that gives it a white ground
                attrs["text"] = re.sub(r"<[^>]*>", "", attrs["label"])
            edges.append((tail, head, attrs))
    return nodes, edges


# --- golden files -------------------------------------------------------------------------------


def test_there_are_cases():
    assert len(CASES) >= 3
    assert EXAMPLES, "no examples/*.d2 found"


@pytest.mark.parametrize("path", EXAMPLES + CASES, ids=_id)
def test_golden(path: Path):
    got = to_dot(_load_or_skip(path))
    golden = _golden(path)
    if os.environ.get("D2GRAPH_ACCEPT") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(got, encoding="utf-8")
        return
    assert golden.exists(), f"{_id(golden)} is missing; run with D2GRAPH_ACCEPT=1 to create it"
    assert got == golden.read_text(encoding="utf-8"), (
        f"{_id(path)} draws differently from {_id(golden)}; if intended, re-accept with "
        "D2GRAPH_ACCEPT=1 and review the diff"
    )


@pytest.mark.parametrize("path", EXAMPLES + CASES, ids=_id)
def test_deterministic_and_complete(path: Path):
    graph = _load_or_skip(path)
    text = to_dot(graph)
    assert to_dot(load(path)) == text
    nodes, edges = parse_dot(text)
    assert set(graph_node.name for graph_node in graph) <= set(nodes)
    data = [(e.source, e.target) for e in graph.data_edges]
    assert sorted((t, h) for t, h, a in edges if a.get("style") != "dashed") == sorted(data)
    control = [(c.source, c.target or f"{c.source}.skip") for c in graph.control_edges]
    assert sorted((t, h) for t, h, a in edges if a.get("style") == "dashed") == sorted(control)
    for name, attrs in nodes.items():
        # Every label must be well-formed HTML-like text, or dot rejects the whole file.
        ET.fromstring(f"<label>{attrs['label']}</label>")


# --- the drawing conventions --------------------------------------------------------------------


@pytest.fixture(scope="module")
def three():
    graph = load(RENDER_DIR / "three_controls.d2")
    return graph, *parse_dot(to_dot(graph))


@pytest.fixture(scope="module")
def dummy():
    graph = load(RENDER_DIR / "dummy_skip_select.d2")
    return graph, *parse_dot(to_dot(graph))


def test_node_shapes(three, dummy):
    for graph, nodes, _ in (three, dummy):
        for node in graph:
            attrs = nodes[node.name]
            expected = {"input": "circle", "output": "circle", "node": "box",
                        "control": "diamond", "dummy": "box"}[node.kind]
            assert attrs["shape"] == expected, node.name
            filled = "filled" in attrs.get("style", "")
            assert filled == (node.kind in ("output", "control", "dummy")), node.name
    _, nodes, _ = dummy
    assert "dashed" in nodes["D"]["style"]
    assert nodes["D"]["fillcolor"] != nodes["y"]["fillcolor"]


def test_control_edges_are_dashed_and_numbered_from_one(three):
    _, _, edges = three
    q1 = {h: a for t, h, a in edges if t == "Q1"}
    assert {h: a["text"] for h, a in q1.items()} == {"N2": "1", "N3": "2", "N4": "3"}
    assert all(a["style"] == "dashed" for a in q1.values())
    data = [a for t, h, a in edges if t == "N1"]
    assert data and all("dashed" not in a.get("style", "") for a in data)


def test_skip_is_one_mark_per_control_node(three, dummy):
    for graph, nodes, edges in (three, dummy):
        for q in graph.control_nodes:
            skips = [(h, a) for t, h, a in edges if t == q.name and h == f"{q.name}.skip"]
            assert len(skips) == q.actions.count(None)
            for h, a in skips:
                assert a["text"] == str(q.actions.index(None) + 1)
                assert a["style"] == "dashed"
                assert nodes[h]["label"] == "skip"


def test_defaults_have_a_circle_and_a_label(three):
    graph, _, edges = three
    by_pair = {(t, h): a for t, h, a in edges}
    for e in graph.data_edges:
        attrs = by_pair[(e.source, e.target)]
        if e.default is None:
            assert "arrowhead" not in attrs and "default" not in attrs.get("label", "")
        else:
            assert attrs["arrowhead"] in ("odot", "dotnormal")
    assert "default=0.5" in by_pair[("N6", "y")]["text"]
    assert "default=0" in by_pair[("N2", "N5")]["text"]


def test_ordered_merges_number_their_inputs(three, dummy):
    _, _, edges = dummy
    assert [a["text"] for t, h, a in edges if h == "y"] == ["1st", "2nd"]
    _, _, edges = three
    assert [a["text"].split()[0] for t, h, a in edges if h == "N5"] == ["1st", "2nd", "3rd"]
    # A sum does not care about order: no numbers on y's inputs there.
    assert all("1st" not in a.get("label", "") for t, h, a in edges if h == "y")


def test_labels_say_name_layers_cost_and_shape(three):
    graph, nodes, _ = three
    assert "<B>N3</B>" in nodes["N3"]["label"]
    assert "fc(64), relu, fc(16), relu" in nodes["N3"]["label"]
    assert "17.4K MACs" in nodes["N3"]["label"]
    assert "cost 4.1" in nodes["N4"]["label"] and "MACs" not in nodes["N4"]["label"]
    assert "[1, 8, 8]" in nodes["img"]["label"]
    assert "merge=concat" in nodes["N5"]["label"]


def test_long_summaries_wrap_at_layer_boundaries():
    graph = load(RENDER_DIR / "long_names.d2")
    nodes, _ = parse_dot(to_dot(graph))
    label = nodes["backbone_features"]["label"]
    lines = [re.sub(r"<[^>]*>", "", part) for part in label.split("<BR/>")]
    layer_lines = lines[1:-1]
    assert len(layer_lines) > 1
    assert ", ".join(s.rstrip(",") for s in layer_lines) == graph["backbone_features"].summary()
    assert all(len(s) <= WRAP + 1 for s in layer_lines)


def test_labels_are_escaped():
    graph = load(RENDER_DIR / "dummy_skip_select.d2")
    node = graph["A"]
    odd = dataclasses.replace(node.layers[0], written='fc(32, note="<a & b>")')
    graph = dataclasses.replace(
        graph, nodes=tuple(dataclasses.replace(n, layers=(odd,) + n.layers[1:]) if n is node else n
                           for n in graph.nodes))
    label = parse_dot(to_dot(graph))[0]["A"]["label"]
    text = "".join(ET.fromstring(f"<label>{label}</label>").itertext())
    assert 'note="<a & b>"' in text


def test_graph_has_a_title_and_reads_top_to_bottom(three):
    text = to_dot(three[0])
    assert "rankdir=TB" in text
    assert re.search(r"label=<<B>three_controls</B>", text)


# --- statistics ----------------------------------------------------------------------------------


def test_stats_widen_edges_and_label_nodes():
    graph = load(RENDER_DIR / "three_controls.d2")
    stats = {"img": 1.0, "N1": 1.0, "Q1": 1.0, "N2": 0.6, "N3": 0.3, "N4": 0.1, "N5": 1.0,
             "Q2": 1.0, "N6": 0.37, "y": 1.0}
    nodes, edges = parse_dot(to_dot(graph, stats))
    assert "ran 37%" in nodes["N6"]["label"]
    width = {(t, h): float(a["penwidth"]) for t, h, a in edges if "penwidth" in a}
    assert width[("img", "N1")] == 6.0
    assert width[("N1", "N2")] > width[("N1", "N3")] > width[("N1", "N4")] >= 0.5
    assert width[("Q1", "N2")] == width[("N1", "N2")]  # control edges carry traffic too
    assert all(0.5 <= w <= 6.0 for w in width.values())
    assert "penwidth" not in to_dot(graph)


def test_stats_ignore_unknown_names_and_clamp():
    graph = load(RENDER_DIR / "dummy_skip_select.d2")
    base = {"x": 1.0, "Q": 1.0, "A": 0.5}
    assert to_dot(graph, {**base, "nope": 0.3}) == to_dot(graph, base)
    assert to_dot(graph, {**base, "A": 7.0}) == to_dot(graph, {**base, "A": 1.0})
    assert to_dot(graph, {}) == to_dot(graph)


# --- files ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph():
    return load(RENDER_DIR / "three_controls.d2")


@pytest.mark.skipif(not HAVE_DOT, reason="the Graphviz `dot` program is not installed")
def test_render_svg(graph, tmp_path):
    out = render(graph, tmp_path / "g.svg")
    assert out == tmp_path / "g.svg"
    svg = out.read_text(encoding="utf-8")
    assert svg.lstrip().startswith(("<?xml", "<svg"))
    for node in graph:
        assert f">{node.name}<" in svg, node.name
    assert (tmp_path / "g.dot").read_text(encoding="utf-8") == to_dot(graph)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.dot", "g.svg"]  # no temp files left


@pytest.mark.skipif(not HAVE_DOT, reason="the Graphviz `dot` program is not installed")
def test_render_png(graph, tmp_path):
    out = render(graph, tmp_path / "sub" / "g.PNG")
    assert out.read_bytes().startswith(b"\x89PNG")


def test_render_dot_only(graph, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: pytest.fail("dot is not needed for .dot"))
    out = render(graph, tmp_path / "g.dot", stats={"N1": 1.0})
    assert out.read_text(encoding="utf-8") == to_dot(graph, {"N1": 1.0})
    assert [p.name for p in tmp_path.iterdir()] == ["g.dot"]


def test_missing_dot_raises_e030_after_writing_the_dot_file(graph, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RenderError) as info:
        render(graph, tmp_path / "g.svg")
    assert isinstance(info.value, D2GraphError)
    (diag,) = info.value.diagnostics
    assert diag.code == "E030"
    assert "apt-get install -y graphviz" in diag.help and "brew install graphviz" in diag.help
    assert str(tmp_path / "g.dot") in diag.help
    assert (tmp_path / "g.dot").read_text(encoding="utf-8") == to_dot(graph)
    assert not (tmp_path / "g.svg").exists()


def test_unsupported_extension_raises_e031(graph, tmp_path):
    with pytest.raises(D2GraphError) as info:
        render(graph, tmp_path / "g.pdf")
    assert not isinstance(info.value, RenderError)
    (diag,) = info.value.diagnostics
    assert diag.code == "E031"
    for ext in (".svg", ".png", ".dot"):
        assert ext in diag.help
    assert list(tmp_path.iterdir()) == []


def test_failing_dot_raises_e032_with_its_stderr(graph, tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "dot"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'Error: syntax error in line 1' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(shutil, "which", lambda name: str(fake))
    out = tmp_path / "out"
    with pytest.raises(D2GraphError) as info:
        render(graph, out / "g.svg")
    (diag,) = info.value.diagnostics
    assert diag.code == "E032"
    assert "syntax error in line 1" in diag.message
    assert sorted(p.name for p in out.iterdir()) == ["g.dot"]  # the temp output is gone


def test_render_error_codes_are_documented():
    # `d2graph.render` is the function once the package is imported; ask for the module.
    doc = importlib.import_module("d2graph.render").__doc__
    for code in ("E030", "E031", "E032"):
        assert code in doc


_SHAPE = ", ".join(["1"] * 6000)
_LONG = "N" * 20000


@pytest.mark.parametrize("text", [
    f"graph g {{ input x [{_SHAPE}] output y x -> y }}",
    f"graph {_LONG} {{ input x [4] output y node {_LONG} = fc(2) control Q{_LONG} = fc(2) "
    f"Q{_LONG} => {_LONG} | skip x -> Q{_LONG} x -> {_LONG} -> y [default=0] }}",
    "graph g { input x [4] output y node A = " + ", ".join(["relu"] * 1900) + " x -> A -> y }",
    f"graph g {{ input x [4] output y dummy D = const(0, shape=[{_SHAPE}]), fc(4) x -> y D -> y }}",
], ids=["6000-dim shape", "20000-char names", "1900 layers", "long layer"])
def test_graphs_that_check_also_draw(text, tmp_path):
    graph, diags = check(text)
    assert graph is not None, diags
    source = to_dot(graph)
    assert max(len(line) for line in source.splitlines()) < 4000  # Graphviz's limit is 16,384
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed")
    out = render(graph, tmp_path / "g.svg")
    ET.parse(out)

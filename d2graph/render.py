"""IR (+ optional run statistics) → DOT text → SVG / PNG, drawn as in the D²NN paper.

In:  a checked `ir.Graph`; optionally `stats`, the run statistics of an evaluation: a
     `d2graph.evaluate.Report`, its `to_json()` dict (what `d2graph evaluate` saves), or
     just a mapping from node name to the fraction of examples (in [0, 1]) it ran for.
Out: `to_dot(graph, stats)` returns DOT text; `render(graph, path, stats)` writes it
     to `PATH.dot` (or to `path` itself when it ends in `.dot`) and, for `.svg` / `.png`,
     runs Graphviz's `dot` on it.
Guarantees: the DOT text depends only on the graph and the stats — the same input gives
byte-identical text (nodes and edges in IR order, numbers formatted with fixed
precision), so it can be compared with golden files. A graph that checks also draws:
long names, shapes and layer lists are shortened with `…` (Graphviz refuses a string of
more than 16,384 characters), and a long node name gets a short DOT id of its own.
Every file is written atomically (a temporary file in the same folder, then
`os.replace`): a reader never sees half a drawing. The DOT file is written before `dot` runs, so a user without Graphviz still
gets something to render elsewhere.

Drawing conventions:
  input              circle, its shape below the name
  output             circle filled light grey
  function node      box: name, layers (wrapped at layer boundaries), cost
  control node       diamond; its control edges are dashed and labelled with the
                     action number, counted from 1; `skip` goes to a small "skip" mark
  dummy node         box filled grey with a dashed outline
  data edge          solid; a small open circle at the head when it has a default, which
                     is written next to it (`default=0`); edges into a `select` or
                     `concat` merge are numbered 1st, 2nd, ... in the order that counts
With a report as stats, the title gives the run's accuracy and mean cost, and boxes get a
taller margin (so that a busy edge's big arrowhead does not cover a name). Every drawing is
padded, so that an edge label at its border is not clipped.
With stats, each function and control node says how often it ran, an edge is as wide
as its traffic (from 0.5 at 0% to 6 at 100%) and each control edge says how often its
action was taken ("2 · 37%"). A report's `edge_traffic` gives exact traffic; from node
rates alone an edge's traffic is estimated (see `_width`) and control edges get no share.

Errors (all `D2GraphError`): E030 `RenderError`, the `dot` program is missing (the CLI
exits 3 on it); E031, an output extension other than .svg, .png, .dot; E032, `dot` failed.

Example:
    >>> g = d2graph.load("examples/high_low.d2")                   # doctest: +SKIP
    >>> render(g, "high_low.svg", stats={"N2": 0.3, "N3": 0.7})    # doctest: +SKIP
    PosixPath('high_low.svg')
"""

from __future__ import annotations

import html
import math
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Mapping

import graphviz

from .diagnostics import D2GraphError, Diagnostic
from .files import atomic_path, write_atomic
from .ir import DataEdge, Graph, Node, format_cost
from .schema import format_value

FORMATS = (".svg", ".png", ".dot")

# Run statistics: a d2graph.evaluate.Report, its to_json() dict, node name → rate, or
# None for none. `Any` because the renderer, an earlier stage, does not import Report.
Stats = Any

# Layer summaries wrap at layer boundaries near this width: wide boxes push the rest of
# the drawing apart, and one layer per line would make tall ones. A diamond is about
# twice as wide as its text, so control nodes wrap shorter.
WRAP = 40
WRAP_CONTROL = 26

# Shortened with `…` past these lengths: a label is read at a glance, and Graphviz refuses
# any string (an id, a label) longer than 16,384 characters.
NAME_CHARS = 60  # a node's or the graph's name in a label
ID_CHARS = 100  # a node name used as a DOT id as it is; a longer one is cut and numbered
LAYER_CHARS = 2 * WRAP  # one layer's summary (`module("…")`, `const(0, shape=[…])`)
LAYER_LINES = 12  # lines of layers in one box, then "… N more layers"
SHAPE_DIMS = 6  # a shape with more dimensions shows its first and last few and its rank

FONT = "Helvetica"
PEN_MIN, PEN_MAX = 0.5, 6.0
DOT_TIMEOUT_S = 120

# Light fills that survive printing in grey scale; shapes, not colours, carry the meaning.
OUTPUT_FILL = "#d9d9d9"
DUMMY_FILL = "#bdbdbd"
CONTROL_FILL = "#fff2cc"
CONTROL_INK = "#7f6000"  # control edges and their labels: tells them from data at a glance
NOTE_INK = "#555555"  # secondary text: costs, shapes, defaults


class RenderError(D2GraphError):
    """The Graphviz `dot` program is missing; the DOT file was written anyway.

    Carries one Diagnostic with code E030; `dot_path` is the file that was written.
    The CLI exits with `exit_code` (3: a tool is missing, not the user's file).
    """

    exit_code = 3

    def __init__(self, dot_path: Path):
        self.dot_path = Path(dot_path)
        super().__init__([
            Diagnostic(
                "E030",
                "cannot draw the graph: the Graphviz `dot` program was not found",
                help=(
                    "install Graphviz: `apt-get install -y graphviz` (Debian/Ubuntu) or "
                    f"`brew install graphviz`; the DOT file was written to {self.dot_path}"
                ),
            )
        ])


# --- DOT text -----------------------------------------------------------------------------


def to_dot(graph: Graph, stats: Stats = None) -> str:
    """The graph as DOT text, deterministic for golden tests.

    `stats` is a `Report`, its `to_json()` dict, or a mapping from node names to execution
    rates in [0, 1]; names not in the graph are ignored (a stats file from an older
    version of the graph still draws).

    >>> print(to_dot(d2graph.load("examples/high_low.d2")).splitlines()[0])   # doctest: +SKIP
    digraph high_low {
    """
    if hasattr(stats, "to_json"):  # a Report (not imported: evaluation is a later stage)
        stats = stats.to_json()
    rates, traffic, taken = _read_stats(graph, stats)
    ids = _ids(graph)
    dot = graphviz.Digraph(name=_short(graph.name, ID_CHARS))
    dot.attr(
        rankdir="TB",
        label=f"<{_title(graph, _headline(stats))}>",
        labelloc="t",
        fontname=FONT,
        fontsize="16",
        nodesep="0.35",
        ranksep="0.45",
        pad="0.3",  # room for edge labels that dot places at the very edge of the drawing
    )
    # With stats, busy edges end in big arrowheads: a taller margin keeps a box's name (its
    # top line) clear of the arrowhead that lands on the box's top edge.
    dot.attr("node", fontname=FONT, fontsize="12", margin="0.12,0.14" if rates or traffic else "0.12,0.06")
    dot.attr("edge", fontname=FONT, fontsize="10", arrowsize="0.7")

    for node in graph.nodes:
        dot.node(ids[node.name], label=f"<{_label(node, rates)}>", **_node_style(node))

    # Outputs share the bottom rank so that every answer of the network reads off one line.
    outputs = graph.outputs
    if len(outputs) > 1:
        with dot.subgraph() as bottom:
            bottom.attr(rank="sink")
            for node in outputs:
                bottom.node(ids[node.name])

    for node in graph.nodes:
        ordered = node.merge in ("select", "concat") and len(node.inputs) > 1
        for i, edge in enumerate(node.inputs):
            dot.edge(ids[edge.source], ids[edge.target],
                     **_data_edge_style(edge, i if ordered else None, rates, traffic))

    for node in graph.control_nodes:
        skip_id = f"{ids[node.name]}.skip"  # a '.' cannot occur in a .d2 name: no clash
        if None in node.actions:
            dot.node(skip_id, label="skip", shape="plaintext", fontsize="10",
                     fontcolor=CONTROL_INK, width="0", height="0", margin="0.02")
        for action, target in enumerate(node.actions):
            attrs = {
                "style": "dashed",
                "color": CONTROL_INK,
                "fontcolor": CONTROL_INK,
                "label": _on_paper(str(action + 1)),  # drawings number actions from 1, as messages do
            }
            share = taken.get(node.name, {}).get(action)
            if share is not None:
                # A report counts the actions themselves: exact traffic, skip included.
                attrs["label"] = _on_paper(f"{action + 1} · {share:.0%}")
                attrs.update(_pen(share))
                dot.edge(ids[node.name], ids[target] if target else skip_id,
                         **({"arrowhead": "empty"} if target is None else {}), **attrs)
            elif target is None:
                # Node rates cannot tell how often `skip` was chosen (the targets of the
                # other actions may also be switched on by other control nodes), so the
                # skip edge keeps the plain width rather than show a made-up traffic.
                dot.edge(ids[node.name], skip_id, arrowhead="empty", **attrs)
            else:
                dot.edge(ids[node.name], ids[target], **attrs, **_width(rates, node.name, target))

    return dot.source


def _ids(graph: Graph) -> dict[str, str]:
    """Node name → DOT id: the name itself, or, past ID_CHARS, its start and its position
    after a `.` (which no .d2 name contains, so no id can clash with another)."""
    return {n.name: n.name if len(n.name) <= ID_CHARS else f"{n.name[:ID_CHARS]}.{i}"
            for i, n in enumerate(graph.nodes)}


def _short(text: str, width: int) -> str:
    """`text`, or its first `width` - 1 characters and `…`."""
    return text if len(text) <= width else text[: width - 1] + "…"


def _shape_text(shape) -> str:
    """`[3, 32, 32]`; a shape of many dimensions as `[1, 2, 3, …, 9, 10] (6,000 dims)`."""
    if len(shape) <= SHAPE_DIMS:
        return format_value(list(shape))
    head, tail = ", ".join(map(str, shape[:3])), ", ".join(map(str, shape[-2:]))
    return f"[{head}, …, {tail}] ({len(shape):,} dims)"


def _read_stats(graph: Graph, stats: Stats) -> tuple[dict[str, float], dict[str, float],
                                                      dict[str, dict[int, float]]]:
    """(node → rate, "SRC->DST" → data edge traffic, control → {action: share}), each
    clamped to [0, 1] and limited to what is in the graph."""
    if stats is None:
        return {}, {}, {}
    if "node_rates" not in stats:  # node rates alone
        return _clamped(stats, (n.name for n in graph.nodes)), {}, {}
    rates = _clamped(stats.get("node_rates") or {}, (n.name for n in graph.nodes))
    # Exact traffic, also on the edges of inputs and outputs, which have no node rate.
    traffic = _clamped(stats.get("edge_traffic") or {}, (f"{e.source}->{e.target}" for e in graph.data_edges))
    taken: dict[str, dict[int, float]] = {}
    for q in graph.control_nodes:
        shares = (stats.get("action_rates") or {}).get(q.name)
        if shares is None or len(shares) < len(q.actions):  # from another version of the graph
            continue
        taken[q.name] = _clamped(dict(enumerate(shares[:len(q.actions)])), range(len(q.actions)))
    return rates, traffic, taken


def _clamped(values: Mapping, keys) -> dict:
    out = {}
    for key in keys:
        value = values.get(key)
        if value is None or not math.isfinite(float(value)):
            continue
        out[key] = min(1.0, max(0.0, float(value)))
    return out


def _headline(stats: Stats) -> dict[str, Any] | None:
    """A report's split, accuracy and mean cost (for the title); None for node rates alone."""
    if stats is None:
        return None
    if not all(isinstance(stats.get(k), (int, float)) for k in ("accuracy", "mean_cost", "cost_fraction")):
        return None
    return {k: stats.get(k) for k in ("split", "accuracy", "mean_cost", "cost_fraction")}


def _title(graph: Graph, headline: Mapping[str, Any] | None = None) -> str:
    cost = format_cost(graph.full_cost)
    # A declared cost is in the user's own unit, so a sum that includes one is unitless.
    declared = any(n.cost_declared for n in graph.nodes)
    unit = "" if declared else " MACs"
    title = (
        f"<B>{_esc(_short(graph.name, NAME_CHARS))}</B><BR/>"
        f'<FONT POINT-SIZE="11" COLOR="{NOTE_INK}">full cost {cost}{unit} per example</FONT>'
    )
    if headline is not None:  # what the run achieved, the first thing its drawing should say
        split = _esc(str(headline.get("split") or "test"))
        title += (f'<BR/><FONT POINT-SIZE="11">{split}: accuracy {headline["accuracy"]:.1%}, mean cost '
                  f'{format_cost(headline["mean_cost"])}{unit} ({headline["cost_fraction"]:.1%} of the full '
                  "graph)</FONT>")
    return title


def _node_style(node: Node) -> dict[str, str]:
    if node.kind == "output":
        return {"shape": "circle", "style": "filled", "fillcolor": OUTPUT_FILL, "margin": "0.02"}
    if node.kind == "control":
        # No `ordering` here: pinning action 1 left of action 2 fights the data edges
        # into the same targets and makes the dashed edges cross each other.
        return {"shape": "diamond", "style": "filled", "fillcolor": CONTROL_FILL, "margin": "0.02"}
    # A data source keeps its consumers left to right in declaration order, so that
    # siblings (N4, N5 under N2) read in the order of the file.
    if node.kind == "input":
        return {"shape": "circle", "margin": "0.02", "ordering": "out"}
    if node.kind == "dummy":
        return {"shape": "box", "style": "filled,dashed", "fillcolor": DUMMY_FILL, "ordering": "out"}
    return {"shape": "box", "style": "rounded", "ordering": "out"}


def _label(node: Node, rates: Mapping[str, float]) -> str:
    """An HTML-like label: the name in bold, then smaller lines of detail."""
    lines = [f"<B>{_esc(_short(node.name, NAME_CHARS))}</B>"]
    small: list[str] = []
    if node.kind in ("input", "output"):
        small.append(_esc(_shape_text(node.out_shape)) + (" tokens" if node.tokens else ""))
        if node.merge != "sum" and len(node.inputs) > 1:
            small.append(f"merge={node.merge}")
    else:
        small += [_esc(line) for line in _wrap(node)]
        if node.merge != "sum" and len(node.inputs) > 1:
            small.append(f"merge={node.merge}")
        small.append(_esc(_cost_text(node)))
    if node.name in rates:
        small.append(f"<B>ran {rates[node.name]:.0%}</B>")
    lines += [f'<FONT POINT-SIZE="10" COLOR="{NOTE_INK}">{s}</FONT>' for s in small]
    return "<BR/>".join(lines)


def _cost_text(node: Node) -> str:
    if node.cost_declared:
        return f"cost {format_cost(node.cost)}"
    return f"{format_cost(node.cost)} MACs"


def _wrap(node: Node) -> list[str]:
    """The layer summary, broken after a layer's comma once a line reaches WRAP chars."""
    width = WRAP_CONTROL if node.is_control else WRAP
    lines: list[str] = []
    current = ""
    for i, layer in enumerate(node.layers):
        part = _short(layer.summary(), LAYER_CHARS)
        if current and len(current) + 2 + len(part) > width:
            lines.append(current + ",")
            current = part
            if len(lines) == LAYER_LINES:
                rest = len(node.layers) - i
                return lines + [f"… {rest:,} more layer{'s' if rest != 1 else ''}"]
        else:
            current = f"{current}, {part}" if current else part
    if current:
        lines.append(current)
    return lines


def _on_paper(text: str) -> str:
    """An edge label on a white ground: dot often sets a label across its own edge (or a
    neighbour), and the ground keeps the text readable where it does."""
    return (f'<<table border="0" cellborder="0" cellspacing="0" cellpadding="1" bgcolor="white">'
            f"<tr><td>{_esc(text)}</td></tr></table>>")


def _data_edge_style(edge: DataEdge, order: int | None, rates: Mapping[str, float],
                     traffic: Mapping[str, float]) -> dict[str, str]:
    attrs: dict[str, str] = {}
    notes = []
    if order is not None:
        notes.append(_ordinal(order + 1))
    if edge.default is not None:
        # The paper marks an edge that may carry a default instead of its source's
        # output with a small circle where it enters its target.
        attrs["arrowhead"] = "odot"
        notes.append(f"default={format_value(edge.default)}")
    if notes:
        attrs["label"] = _on_paper(" ".join(notes))
        attrs["fontsize"] = "9"
        attrs["fontcolor"] = NOTE_INK
    exact = traffic.get(f"{edge.source}->{edge.target}")
    attrs.update(_width(rates, edge.source, edge.target) if exact is None else _pen(exact))
    return attrs


def _width(rates: Mapping[str, float], source: str, target: str) -> dict[str, str]:
    # Traffic = the share of examples on which both ends ran; without a joint count,
    # min(rate) is its upper bound, exact whenever one end only runs when the other does
    # (the usual case: a target runs only if its source ran or its controller chose it).
    if source not in rates or target not in rates:
        return {}
    return _pen(min(rates[source], rates[target]))


def _pen(traffic: float) -> dict[str, str]:
    """The pen of an edge that carries `traffic` (a share of the examples, in [0, 1])."""
    pen = PEN_MIN + (PEN_MAX - PEN_MIN) * traffic
    # dot grows arrowheads with the pen width; shrink them back so that a busy edge keeps
    # a readable head (an open circle for a default stays visibly open).
    arrow = min(0.7, 0.9 / math.sqrt(pen))
    return {"penwidth": f"{pen:.2f}", "arrowsize": f"{arrow:.2f}"}


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _esc(text: str) -> str:
    # HTML-like labels: escape &, <, > and quotes; plain DOT escaping is not enough there.
    return html.escape(text, quote=True)


# --- files ----------------------------------------------------------------------------------


def render(graph: Graph, out_path: str | os.PathLike, stats: Stats = None) -> Path:
    """Write the drawing of `graph` to `out_path` (.svg, .png or .dot) and return its path.

    The DOT text always goes to `out_path` with a `.dot` suffix first; `dot` then turns
    it into the requested format.

    >>> render(d2graph.load("examples/chain.d2"), "runs/chain.svg")   # doctest: +SKIP
    PosixPath('runs/chain.svg')
    """
    out = Path(out_path)
    fmt = out.suffix.lower()
    if fmt not in FORMATS:
        raise D2GraphError([
            Diagnostic(
                "E031",
                f"cannot draw to `{out}`: unsupported file type `{out.suffix or '(none)'}`",
                help="use one of " + ", ".join(FORMATS) + f", e.g. `{out.with_suffix('.svg')}`",
            )
        ])
    out.parent.mkdir(parents=True, exist_ok=True)
    dot_path = out if fmt == ".dot" else out.with_suffix(".dot")
    write_atomic(dot_path, to_dot(graph, stats))
    if fmt == ".dot":
        return out

    exe = shutil.which("dot")
    if exe is None:
        raise RenderError(dot_path)
    with atomic_path(out) as tmp:
        try:
            proc = subprocess.run(
                [exe, f"-T{fmt[1:]}", "-o", str(tmp), str(dot_path)],
                capture_output=True, text=True, timeout=DOT_TIMEOUT_S,
            )
            failure = None if proc.returncode == 0 else (
                f"exit status {proc.returncode}", proc.stderr.strip())
        except subprocess.TimeoutExpired:
            failure = (f"no answer after {DOT_TIMEOUT_S} s", "")
        if failure is not None:
            why, stderr = failure
            raise D2GraphError([
                Diagnostic(
                    "E032",
                    f"Graphviz `dot` could not draw `{out}` ({why})"
                    + (f":\n{stderr}" if stderr else ""),
                    help=f"the DOT file is at {dot_path}; try `dot -T{fmt[1:]} {dot_path}` "
                         "to see the problem, and report it if it persists",
                )
            ])
    return out

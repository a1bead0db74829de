"""`render --stats`: a Report's run statistics drawn on the graph.

The report is made by hand (so each number is known) and, once, by evaluating a graph.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.utils.data import TensorDataset

import d2graph
from d2graph.evaluate import Report, evaluate
from d2graph.executor import compile
from d2graph.render import render, to_dot
from tests.test_render import RENDER_DIR, ROOT, parse_dot


@pytest.fixture(scope="module")
def cascade():
    return d2graph.load(ROOT / "examples" / "cascade.d2")


def _report(graph, node_rates, action_rates, traffic) -> dict:
    return Report(split="test", n=100, classes=10, accuracy=0.5, f1=None, mean_cost=1.0, cost_fraction=0.1,
                  full_cost=graph.full_cost, node_rates=node_rates, action_rates=action_rates, paths=[],
                  exits={}, edge_traffic=traffic).to_json()


@pytest.fixture(scope="module")
def stats(cascade):
    # A cascade where 80% go on after stage 1, 37% after stage 2, 10% after stage 3.
    rates = {"N1": 1.0, "N2": 1.0, "Q1": 1.0, "N3": 0.8, "N4": 0.8, "Q2": 0.8,
             "N5": 0.37, "N6": 0.37, "Q3": 0.37, "N7": 0.1}
    actions = {"Q1": [0.8, 0.2, 0.0], "Q2": [0.37, 0.43, 0.2], "Q3": [0.1, 0.27, 0.63]}
    traffic = {f"{e.source}->{e.target}": min(rates.get(e.source, 1.0), rates.get(e.target, 1.0))
               for e in cascade.data_edges}
    traffic["x->N7"] = 0.1
    for c in cascade.control_edges:
        traffic[f"{c.source}=>{c.target or 'skip'}"] = actions[c.source][c.action]
    return _report(cascade, rates, actions, traffic)


def test_nodes_say_how_often_they_ran(cascade, stats):
    nodes, _ = parse_dot(to_dot(cascade, stats))
    assert "ran 37%" in nodes["N5"]["label"] and "ran 10%" in nodes["N7"]["label"]
    assert "ran 100%" in nodes["Q1"]["label"]
    assert "ran" not in nodes["x"]["label"] and "ran" not in nodes["y"]["label"]  # not in a report's node rates


def test_pen_width_grows_with_traffic(cascade, stats):
    _, edges = parse_dot(to_dot(cascade, stats))
    data = {(t, h): float(a["penwidth"]) for t, h, a in edges if a.get("style") != "dashed"}
    assert len(data) == len(cascade.data_edges)  # every data edge has a width
    assert data[("x", "N1")] == 6.0
    assert data[("x", "N1")] > data[("x", "N3")] > data[("x", "N5")] > data[("x", "N7")] > 0.5
    assert data[("x", "N7")] == pytest.approx(0.5 + 5.5 * 0.1, abs=0.005)  # from edge_traffic, exactly
    assert all(0.5 <= w <= 6.0 for w in data.values())


def test_control_edges_show_their_action_shares(cascade, stats):
    _, edges = parse_dot(to_dot(cascade, stats))
    control = {(t, h): a for t, h, a in edges if a.get("style") == "dashed"}
    assert control[("Q2", "N5")]["text"] == "1 · 37%"
    assert control[("Q2", "Q2.skip")]["text"] == "2 · 43%"  # skip is counted too
    assert float(control[("Q2", "Q2.skip")]["penwidth"]) > float(control[("Q2", "N5")]["penwidth"])
    assert control[("Q1", "Q1.skip")]["text"] == "2 · 20%"


def test_without_stats_the_drawing_is_unchanged(cascade, stats):
    plain = to_dot(cascade)
    assert to_dot(cascade, None) == plain
    assert "ran " not in plain and "penwidth" not in plain and "·" not in plain
    assert to_dot(cascade, Report.from_json(stats)) == to_dot(cascade, stats)  # a Report draws as its JSON


def test_stats_of_another_version_of_the_graph_still_draw(cascade, stats):
    old = dict(stats, node_rates={**stats["node_rates"], "gone": 0.5},
               edge_traffic={**stats["edge_traffic"], "gone->N1": 0.5},
               action_rates={**stats["action_rates"], "Q3": [1.0]})  # Q3 had fewer actions then
    nodes, edges = parse_dot(to_dot(cascade, old))
    assert "gone" not in nodes
    assert all(a["text"] in ("1", "2") for t, h, a in edges if t == "Q3")  # no made-up shares


def test_an_evaluation_report_draws(cascade, tmp_path):
    torch.manual_seed(0)
    executor = compile(cascade)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(40, 1, 32, 32, generator=g), torch.randint(0, 10, (40,), generator=g))
    report = evaluate(executor, data, classes=10)
    out = render(cascade, tmp_path / "cascade.dot", report)
    nodes, edges = parse_dot(out.read_text(encoding="utf-8"))
    for name, rate in report.node_rates.items():
        assert f"ran {rate:.0%}" in nodes[name]["label"]
    assert len(edges) == len(cascade.data_edges) + len(cascade.control_edges)
    if shutil.which("dot"):
        svg = render(cascade, tmp_path / "cascade.svg", report)
        assert "ran " in svg.read_text(encoding="utf-8")


def test_plain_node_rates_still_work():
    graph = d2graph.load(RENDER_DIR / "three_controls.d2")
    nodes, _ = parse_dot(to_dot(graph, {"N6": 0.37}))
    assert "ran 37%" in nodes["N6"]["label"]


def test_the_title_gives_the_runs_accuracy_and_mean_cost(cascade, stats):
    """A drawing with a run's statistics says first what the run achieved."""
    text = to_dot(cascade, stats)
    assert "test: accuracy 50.0%, mean cost 1 MACs (10.0% of the full graph)" in text
    assert "accuracy" not in to_dot(cascade, {"N1": 1.0})  # node rates alone: no run to sum up
    assert "accuracy" not in to_dot(cascade)


def test_busy_arrowheads_and_edge_labels_keep_clear(cascade, stats):
    """With stats, boxes get a taller margin, so the arrowhead of a 6-point edge landing on a
    box's top edge does not cover its name; every drawing is padded, so that a label dot puts
    at the drawing's edge is not clipped."""
    busy, plain = to_dot(cascade, stats), to_dot(cascade)
    assert "margin=\"0.12,0.14\"" in busy and "margin=\"0.12,0.06\"" in plain
    assert "pad=0.3" in busy and "pad=0.3" in plain
    # dot sets some labels across their own edge: each sits on a white ground, readable there
    _, edges = parse_dot(busy)
    labels = [a["label"] for _, _, a in edges if "label" in a]
    assert labels and all('bgcolor="white"' in label for label in labels)

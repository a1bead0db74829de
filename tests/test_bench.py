"""`d2graph.bench`: one row for the dynamic executor and one per distinct static path, with
the IR's costs. No timing assertions (the machine is shared): only that times are there."""

from __future__ import annotations

import math

import pytest

import d2graph
from d2graph.bench import bench, bench_table
from d2graph.paths import static_paths

from .conftest import ROOT


def path_cost(graph: d2graph.Graph, nodes) -> int:
    return sum(graph[name].cost for name in nodes)


def test_high_low_has_two_static_paths_and_the_dynamic_row():
    graph = d2graph.load(ROOT / "examples" / "high_low.d2")
    rows = bench(graph, batch=4, rounds=2)
    assert [r["name"] for r in rows] == ["dynamic (argmax)", "path Q1=N2", "path Q1=N3"]
    dynamic, high, low = rows
    # the IR's path costs (golden IR: N1 16,200; Q1 4,880; N2 135,296; N3 2,624)
    assert high["nodes"] == ("N1", "Q1", "N2") and high["cost"] == 16_200 + 4_880 + 135_296
    assert low["nodes"] == ("N1", "Q1", "N3") and low["cost"] == 16_200 + 4_880 + 2_624
    assert high["actions"] == {"Q1": 0} and low["actions"] == {"Q1": 1}
    for r in (high, low):
        assert r["cost"] == path_cost(graph, r["nodes"])
        assert r["cost_fraction"] == pytest.approx(r["cost"] / graph.full_cost)
    assert low["cost"] <= dynamic["cost"] <= high["cost"]  # a mean over the batch of the two
    for r in rows:
        assert r["batch"] == 4 and r["rounds"] == 2
        assert r["ms_per_batch"] > 0 and math.isclose(r["us_per_example"], r["ms_per_batch"] * 1e3 / 4)

    table = bench_table(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert "| path Q1=N3 | N1 Q1 N3 | 23.7K | 14.9% |" in table[-1]


def test_paths_are_deduplicated_by_the_nodes_that_ran():
    # cascade: once Q1 stops, Q2's and Q3's actions change nothing: 4 paths, not 2³ = 8
    graph = d2graph.load(ROOT / "examples" / "cascade.d2")
    paths = static_paths(graph)
    assert [actions for actions, _ in paths] == [
        {"Q1": 0, "Q2": 0, "Q3": 0}, {"Q1": 0, "Q2": 0, "Q3": 1}, {"Q1": 0, "Q2": 1}, {"Q1": 1}]
    assert len({nodes for _, nodes in paths}) == 4
    assert paths[0][1] == tuple(n.name for n in graph.nodes if n.kind not in ("input", "output"))
    assert path_cost(graph, paths[0][1]) == graph.full_cost


def test_many_paths_are_capped_and_keep_both_ends():
    graph = d2graph.load(ROOT / "examples" / "hierarchy.d2")
    every = static_paths(graph, max_paths=10_000)
    kept = static_paths(graph, max_paths=5)
    assert len(every) > 5 and len(kept) == 5
    costs = [path_cost(graph, nodes) for _, nodes in kept]
    assert costs == sorted(costs, reverse=True)
    assert costs[0] == path_cost(graph, every[0][1]) and costs[-1] == path_cost(graph, every[-1][1])


def test_bad_arguments():
    graph = d2graph.load(ROOT / "examples" / "high_low.d2")
    with pytest.raises(ValueError, match="at least 1"):
        bench(graph, batch=0)

"""evaluate(): every number of a Report checked against an independent forward pass.

The executor runs the whole data set in one batch, with the same actions, and the test
derives each number from that `Result` by hand; `evaluate` runs it in uneven batches.
Random weights and random tensors: the numbers mean nothing, only their agreement does.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import d2graph
from d2graph.evaluate import NO_CONTROL, Report, evaluate, per_example
from d2graph.executor import compile
from d2graph.paths import path_costs
from d2graph.policies import Policy, StaticPolicy

ROOT = Path(__file__).resolve().parent.parent
N, BATCH, CLASSES = 64, 24, 10  # 24 does not divide 64: the last batch is short


class TablePolicy(Policy):
    """Actions read from a table made in advance, batch after batch (the reference run
    forces the same table on the whole data set at once)."""

    kind = "test-table"

    def __init__(self, table: dict[str, torch.Tensor]):
        self.table, self.start = table, 0

    def decide(self, executor, x, y=None, generator=None):
        n = x.shape[0]
        out = {q: a[self.start:self.start + n] for q, a in self.table.items()}
        self.start += n
        return out


@functools.cache  # checking a graph costs more than evaluating it here
def _graph(name: str, text_change: tuple[str, str] | None = None):
    path = ROOT / "examples" / f"{name}.d2"
    if text_change is None:
        return d2graph.load(path)
    graph, diagnostics = d2graph.check(path.read_text(encoding="utf-8").replace(*text_change), path.name)
    assert graph is not None, diagnostics
    return graph


def _setup(name: str, seed: int = 0, text_change: tuple[str, str] | None = None):
    graph = _graph(name, text_change)
    torch.manual_seed(seed)
    executor = compile(graph).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 1, 32, 32, generator=g)
    classes = graph.outputs[0].out_shape[0]
    y = torch.randint(0, classes, (N,), generator=g)
    table = {q.name: torch.randint(0, len(q.actions), (N,), generator=g) for q in graph.control_nodes}
    return graph, executor, TensorDataset(x, y), table


def _path_label(graph, actions: dict[str, torch.Tensor], i: int) -> str:
    parts = [f"{q.name}={int(actions[q.name][i]) + 1}" for q in graph.control_nodes if actions[q.name][i] >= 0]
    return " ".join(parts) or NO_CONTROL


@pytest.mark.parametrize("name", ["cascade", "high_low"])
def test_report_matches_an_independent_run(name):
    graph, executor, data, table = _setup(name)
    report = evaluate(executor, data, TablePolicy(table), classes=CLASSES, batch=BATCH)
    x, y = data.tensors
    with torch.inference_mode():
        ref = executor(x, mode="force", actions=table)

    assert report.n == N and report.split == "test" and report.classes == CLASSES
    correct = ref.output.argmax(dim=1) == y
    assert report.accuracy == correct.sum().item() / N
    assert report.f1 is None  # 10 classes
    assert ref.cost.dtype == torch.int64
    assert report.mean_cost == int(ref.cost.sum()) / N  # exact: integers summed, one division
    assert report.full_cost == graph.full_cost
    assert report.cost_fraction == pytest.approx(float(ref.cost_fraction.mean()), rel=1e-12)

    for node in graph.nodes:
        if node.kind in ("node", "control"):
            assert report.node_rates[node.name] == ref.ran_mask(node.name).sum().item() / N, node.name
        else:
            assert node.name not in report.node_rates
    for q in graph.control_nodes:
        a = ref.actions[q.name]
        expected = [(a == k).sum().item() / N for k in range(len(q.actions))] + [(a == -1).sum().item() / N]
        assert report.action_rates[q.name] == expected
        assert sum(report.action_rates[q.name]) == pytest.approx(1.0)

    labels = [_path_label(graph, ref.actions, i) for i in range(N)]
    assert sum(p["count"] for p in report.paths) == N
    assert [p["count"] for p in report.paths] == sorted((p["count"] for p in report.paths), reverse=True)
    assert len(report.paths) > 1  # random actions: the test sees several paths
    for p in report.paths:
        mask = torch.tensor([label == p["path"] for label in labels])
        assert p["count"] == int(mask.sum())
        assert p["fraction"] == p["count"] / N
        assert p["accuracy"] == correct[mask].sum().item() / p["count"]
        assert p["mean_cost"] == int(ref.cost[mask].sum()) / p["count"]

    for node in graph.nodes:
        served = torch.zeros(N, dtype=torch.bool)  # into a select node: the first present input only
        for e in node.inputs:
            flows = ref.ran_mask(e.source) & ref.ran_mask(e.target)
            if node.merge == "select":
                flows, served = flows & ~served, served | flows
            assert report.edge_traffic[f"{e.source}->{e.target}"] == flows.sum().item() / N
    # in a select output, the traffic on its edges is the exits' shares
    if graph["y"].merge == "select":
        for head, exit_ in report.exits.items():
            assert report.edge_traffic[f"{head}->y"] == exit_["count"] / N
    for c in graph.control_edges:
        assert report.edge_traffic[f"{c.source}=>{c.target or 'skip'}"] == report.action_rates[c.source][c.action]
    assert sum(e["count"] for e in report.exits.values()) == N


def test_per_example_rows_line_up_with_the_data():
    graph, executor, data, table = _setup("cascade")
    rows = per_example(executor, data, TablePolicy(table), batch=BATCH)
    with torch.inference_mode():
        ref = executor(data.tensors[0], mode="force", actions=table)
    assert all(len(v) == N for v in rows.values())
    assert np.array_equal(rows["label"], data.tensors[1].numpy())
    assert np.array_equal(rows["prediction"], ref.output.argmax(dim=1).numpy())
    assert np.array_equal(rows["correct"], rows["prediction"] == rows["label"])
    assert np.array_equal(rows["cost"], ref.cost.numpy()) and rows["cost"].dtype == np.int64
    for q in graph.control_nodes:
        assert np.array_equal(rows[f"action.{q.name}"], ref.actions[q.name].numpy())
    for node in graph.nodes:
        assert np.array_equal(rows[f"ran.{node.name}"], ref.ran_mask(node.name).numpy())
    assert list(rows["path"]) == [_path_label(graph, ref.actions, i) for i in range(N)]


@pytest.mark.parametrize("name", ["cascade", "high_low"])
def test_no_policy_routes_by_the_control_nodes_argmax(name):
    graph, executor, data, _ = _setup(name, seed=3)
    report = evaluate(executor, data, None, classes=CLASSES, batch=N)
    with torch.inference_mode():
        ref = executor(data.tensors[0])
    assert report.accuracy == (ref.output.argmax(dim=1) == data.tensors[1]).sum().item() / N
    assert report.mean_cost == int(ref.cost.sum()) / N
    assert report.node_rates == {n.name: ref.ran_mask(n.name).sum().item() / N
                                 for n in graph.nodes if n.kind in ("node", "control")}


@pytest.mark.parametrize("name", ["cascade", "high_low"])
def test_a_static_policy_takes_exactly_its_path(name):
    graph, executor, data, _ = _setup(name)
    paths = path_costs(graph)
    assert len(paths) >= 2
    for actions, nodes, cost in paths:
        report = evaluate(executor, data, StaticPolicy(actions), classes=CLASSES, batch=BATCH)
        assert len(report.paths) == 1
        (path,) = report.paths
        assert path["path"] == " ".join(f"{q}={a + 1}" for q, a in actions.items())
        assert path["count"] == N and path["fraction"] == 1.0
        assert report.mean_cost == cost == path["mean_cost"]
        assert report.cost_fraction == cost / graph.full_cost
        assert {n for n, r in report.node_rates.items() if r == 1.0} == set(nodes)
        assert all(r == 0.0 for n, r in report.node_rates.items() if n not in nodes)


def test_exits_of_a_select_output_are_the_head_it_took():
    # cascade: y [merge=select] <- N7, N6, N4, N2 (deepest first); every stage's head
    # runs with its stage, so the exit is the deepest head that ran.
    graph, executor, data, table = _setup("cascade")
    report = evaluate(executor, data, TablePolicy(table), classes=CLASSES, batch=BATCH)
    with torch.inference_mode():
        ref = executor(data.tensors[0], mode="force", actions=table)
    correct = ref.output.argmax(dim=1) == data.tensors[1]
    taken = torch.zeros(N, dtype=torch.bool)
    for head in ("N7", "N6", "N4", "N2"):
        mask = ref.ran_mask(head) & ~taken
        taken |= mask
        if mask.any():
            count = int(mask.sum())
            assert report.exits[head] == {"count": count, "accuracy": correct[mask].sum().item() / count}
        else:
            assert head not in report.exits
    assert taken.all() and "+" not in "".join(report.exits)

    stop_after_2 = evaluate(executor, data, StaticPolicy({"Q1": 0, "Q2": 1}), classes=CLASSES)
    assert list(stop_after_2.exits) == ["N4"] and stop_after_2.exits["N4"]["count"] == N


def test_exits_of_a_summed_output_are_every_head_that_ran():
    # high_low: y <- N2, N3 [default=0], summed; exactly one branch runs.
    graph, executor, data, table = _setup("high_low")
    report = evaluate(executor, data, TablePolicy(table), classes=CLASSES, batch=BATCH)
    chose = table["Q1"]
    assert report.exits == {
        "N2": {"count": int((chose == 0).sum()), "accuracy": report.exits["N2"]["accuracy"]},
        "N3": {"count": int((chose == 1).sum()), "accuracy": report.exits["N3"]["accuracy"]},
    }


def test_f1_of_a_binary_task_matches_sklearn():
    f1_score = pytest.importorskip("sklearn.metrics").f1_score
    graph, executor, data, table = _setup("cascade", seed=1, text_change=("let classes = 10", "let classes = 2"))
    assert graph.outputs[0].out_shape == (2,)
    report = evaluate(executor, data, TablePolicy(table), classes=2, batch=BATCH)
    with torch.inference_mode():
        pred = executor(data.tensors[0], mode="force", actions=table).output.argmax(dim=1)
    assert 0 < int(pred.sum()) < N  # both classes predicted: F1 is not a degenerate 0 or 1
    assert report.f1 == pytest.approx(f1_score(data.tensors[1].numpy(), pred.numpy()), abs=1e-12)
    assert f"F1 {report.f1:.3f}" in report.table()


def test_a_graph_without_control_has_one_path():
    graph, _ = d2graph.check("graph tiny {\n  input x [1, 32, 32]\n  output y\n  node A = flatten, fc(10)\n"
                             "  x -> A -> y\n}\n")
    executor = compile(graph)
    data = _setup("high_low")[2]
    report = evaluate(executor, data, classes=CLASSES)
    assert [(p["path"], p["count"]) for p in report.paths] == [(NO_CONTROL, N)]
    assert report.exits == {"A": {"count": N, "accuracy": report.accuracy}}
    assert report.action_rates == {} and report.cost_fraction == 1.0


def test_json_round_trip_and_table():
    graph, executor, data, table = _setup("cascade")
    report = evaluate(executor, data, TablePolicy(table), classes=CLASSES, batch=BATCH, split="val")
    text = json.dumps(report.to_json())
    back = Report.from_json(json.loads(text))
    assert back == report
    assert json.dumps(back.to_json()) == text
    shown = report.table()
    assert shown.splitlines()[0].startswith(f"val: {N} examples  accuracy {report.accuracy:.1%}")
    assert "% of the full" in shown.splitlines()[0]
    assert report.paths[0]["path"] in shown and "N7" in shown


def test_modes_are_restored_and_data_is_not_changed():
    graph, executor, data, table = _setup("high_low")
    x = data.tensors[0].clone()
    executor.train()
    evaluate(executor, data, TablePolicy(table), classes=CLASSES, batch=BATCH)
    assert executor.training and all(m.training for m in executor.modules())
    executor.eval()
    evaluate(executor, data, None, classes=CLASSES)
    assert not executor.training
    assert torch.equal(data.tensors[0], x)
    assert not torch.is_inference_mode_enabled()


def test_an_empty_data_set_is_refused():
    graph, executor, data, _ = _setup("high_low")
    empty = TensorDataset(data.tensors[0][:0], data.tensors[1][:0])
    with pytest.raises(ValueError, match="empty"):
        evaluate(executor, empty, classes=CLASSES)

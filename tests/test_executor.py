"""The executor against plain torch: every example graph in `all` mode against a hand-written
full-batch module, and under forced routings against a per-example reference interpreter
(each example alone, batch of 1, presence decided by simple Python); gradients, skipped
calls, costs (by hand and by FlopCounterMode), one small graph per rule of LANGUAGE.md §3,
a property test over random graphs, the sampling modes, bfloat16 and inference mode."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from torch.utils.flop_counter import FlopCounterMode

import d2graph
from d2graph.executor import MODES, Executor, compile

from .conftest import EXAMPLES, TESTDATA

IDS = [p.stem for p in EXAMPLES]
B = 5  # examples per batch in the equivalence tests: small, the reference runs them one by one


# --- helpers ------------------------------------------------------------------------------


def load(name: str) -> d2graph.Graph:
    return d2graph.load(TESTDATA / "executor" / f"{name}.d2")


def build(graph: d2graph.Graph, seed: int = 0) -> Executor:
    """An executor in eval mode with seeded weights and non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    executor = compile(graph)
    for m in executor.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return executor.eval()


def batch(graph: d2graph.Graph, n: int = B, seed: int = 1, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random inputs; a token input gets ids in [1, vocab) followed by padding (id 0), each
    example a different length (the first example has none, the last only one real token)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for node in graph.inputs:
        if node.tokens:
            (tokens,) = node.out_shape
            ids = torch.randint(1, graph.vocab(node.name), (n, tokens), generator=g)
            lengths = torch.linspace(tokens, 1, n).round().long()
            out[node.name] = ids.masked_fill(torch.arange(tokens)[None, :] >= lengths[:, None], 0)
        else:
            out[node.name] = torch.randn(n, *node.out_shape, generator=g).to(dtype)
    return out


def call_node(executor: Executor, node, x: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """A node's own module on `x`; layers that read a padding mask get the one of the
    graph's token input `inputs` (the same examples as `x`), written here from the ids."""
    module = executor.nodes[node.name]
    tokens = [n.name for n in executor.graph.inputs if n.tokens]
    if tokens and module.uses_padding:
        return module(x, inputs[tokens[0]] == 0)
    return module(x)


def merge_plain(node, parts):
    if node.merge == "select":
        return parts[0]
    if node.merge == "concat":
        return torch.cat(parts, dim=1)
    return sum(parts[1:], parts[0])


def reference_all(executor: Executor, inputs: dict[str, torch.Tensor]):
    """Every node on the full batch, in order, with the executor's own submodules (same
    weights): what `all` mode must compute. Returns (outputs, control scores)."""
    graph, values = executor.graph, {}
    n = next(iter(inputs.values())).shape[0]
    dtype = next(iter(inputs.values())).dtype
    for node in graph.nodes:
        if node.kind == "input":
            values[node.name] = inputs[node.name]
        elif node.kind == "dummy":
            values[node.name] = executor.nodes[node.name](torch.empty(n, 0, dtype=dtype))
        else:
            x = merge_plain(node, [values[e.source] for e in node.inputs])
            values[node.name] = x if node.kind == "output" else call_node(executor, node, x, inputs)
    return ({o.name: values[o.name] for o in graph.outputs},
            {q.name: values[q.name] for q in graph.control_nodes})


def reference_example(executor: Executor, inputs: dict[str, torch.Tensor], b: int, forced: dict):
    """Example `b` alone (batch of 1), with LANGUAGE.md §3 written as plain Python.
    Returns {node: output [1, ...]} for the nodes that ran, {control: action}, cost."""
    graph = executor.graph
    values, chosen, cost = {}, {}, 0
    for node in graph.nodes:
        if node.kind == "input":
            values[node.name] = inputs[node.name][b:b + 1]
            continue
        if node.controllers and not any(chosen.get(c.source) == c.action for c in node.controllers):
            continue
        present = [e for e in node.inputs if e.source in values or e.default is not None]
        if node.merge == "select":
            if node.inputs and not present:
                continue
        elif len(present) < len(node.inputs):
            continue
        parts = [values[e.source] if e.source in values
                 else torch.full((1, *graph[e.source].out_shape), float(e.default)) for e in present]
        if node.kind == "dummy":
            out = executor.nodes[node.name](torch.empty(1, 0))
        else:
            x = merge_plain(node, parts)
            out = x if node.kind == "output" else call_node(executor, node, x,
                                                               {k: v[b:b + 1] for k, v in inputs.items()})
        values[node.name] = out
        cost += node.cost
        if node.is_control:
            spec = forced.get(node.name)
            chosen[node.name] = (int(out.argmax(1)) if spec is None
                                 else spec if isinstance(spec, int) else int(spec[b]))
    return values, chosen, cost


def random_actions(graph: d2graph.Graph, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {q.name: torch.randint(len(q.actions), (n,), generator=g) for q in graph.control_nodes}


def routings(graph: d2graph.Graph, n: int):
    """Constant routings (every control node takes action 1, or its last action) and
    random per-example ones."""
    yield {q.name: 0 for q in graph.control_nodes}
    yield {q.name: len(q.actions) - 1 for q in graph.control_nodes}
    yield random_actions(graph, n, seed=7)
    yield random_actions(graph, n, seed=8)


def assert_matches_reference(executor, inputs, forced, result=None, atol=1e-5):
    """The executor's outputs, ran sets, actions, scores and costs equal those of the
    per-example reference, example by example."""
    graph = executor.graph
    n = next(iter(inputs.values())).shape[0]
    result = result or executor(inputs, mode="force", actions=forced)
    for b in range(n):
        values, chosen, cost = reference_example(executor, inputs, b, forced)
        for node in graph.nodes:
            assert bool(result.ran_mask(node.name)[b]) == (node.name in values), (node.name, b)
        for out in graph.outputs:
            assert out.name in values, f"reference: {out.name} has no value (totality)"
            torch.testing.assert_close(result.outputs[out.name][b:b + 1], values[out.name], atol=atol, rtol=1e-4)
        for q in graph.control_nodes:
            assert int(result.actions[q.name][b]) == chosen.get(q.name, -1), (q.name, b)
            expected = values[q.name] if q.name in values else torch.zeros(1, len(q.actions))
            torch.testing.assert_close(result.scores[q.name][b:b + 1], expected, atol=atol, rtol=1e-4)
        assert int(result.cost[b]) == cost, b
    return result


# --- equivalence on the example graphs ------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_all_mode_equals_a_plain_full_batch_module(path):
    graph = d2graph.load(path)
    executor = build(graph)
    inputs = batch(graph)
    result = executor(inputs, mode="all")
    outputs, scores = reference_all(executor, inputs)
    for name, expected in outputs.items():
        torch.testing.assert_close(result.outputs[name], expected)
    for name, expected in scores.items():
        torch.testing.assert_close(result.scores[name], expected)
        assert torch.equal(result.actions[name], expected.argmax(1))
    assert torch.equal(result.cost, torch.full((B,), graph.full_cost))
    assert torch.equal(result.cost_fraction, torch.ones(B, dtype=torch.float64))
    for node in graph.nodes:
        assert torch.equal(result.ran[node.name], torch.arange(B))


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_forced_routings_equal_the_per_example_reference(path):
    graph = d2graph.load(path)
    executor = build(graph)
    inputs = batch(graph)
    with torch.no_grad():
        for forced in routings(graph, B):
            assert_matches_reference(executor, inputs, forced)
        # argmax mode: the reference takes the argmax itself
        assert_matches_reference(executor, inputs, {}, result=executor(inputs))


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_gradients_equal_the_per_example_reference(path):
    graph = d2graph.load(path)
    executor = build(graph)
    inputs = batch(graph)
    forced = random_actions(graph, B, seed=3)
    g = torch.Generator().manual_seed(5)
    weights = {o.name: torch.randn(B, *o.out_shape, generator=g) for o in graph.outputs}
    weights.update({q.name: torch.randn(B, len(q.actions), generator=g) for q in graph.control_nodes})
    params = [p for p in executor.parameters()]

    result = executor(inputs, mode="force", actions=forced)
    loss = sum((result.outputs[o.name] * weights[o.name]).sum() for o in graph.outputs)
    loss = loss + sum((result.scores[q.name] * weights[q.name]).sum() for q in graph.control_nodes)
    ours = torch.autograd.grad(loss, params, allow_unused=True)

    ref_loss = 0
    for b in range(B):
        values, _, _ = reference_example(executor, inputs, b, forced)
        for name, w in weights.items():
            if name in values:
                ref_loss = ref_loss + (values[name] * w[b:b + 1]).sum()
    theirs = torch.autograd.grad(ref_loss, params, allow_unused=True)
    assert any(t is not None for t in ours)
    for (name, p), a, b in zip(executor.named_parameters(), ours, theirs):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


# --- skipping ---------------------------------------------------------------------------


def count_calls(executor: Executor):
    """node → list of the batch sizes it was called with."""
    calls = {name: [] for name in executor.nodes}
    for name, module in executor.nodes.items():
        module.register_forward_pre_hook(lambda m, args, name=name: calls[name].append(args[0].shape[0]))
    return calls


def test_unreached_nodes_are_not_called_and_full_nodes_run_without_copies():
    graph = d2graph.load(TESTDATA.parent.parent / "examples" / "high_low.d2")
    executor = build(graph)
    x = batch(graph, 8)["x"]
    seen = {}
    executor.nodes["N1"].register_forward_pre_hook(lambda m, args: seen.update(n1_in=args[0]))
    executor.nodes["N1"].register_forward_hook(lambda m, args, out: seen.update(n1_out=out))
    executor.nodes["N2"].register_forward_pre_hook(lambda m, args: seen.update(n2_in=args[0]))
    calls = count_calls(executor)
    result = executor(x, mode="force", actions={"Q1": 0})
    assert calls == {"N1": [8], "Q1": [8], "N2": [8], "N3": []}
    assert seen["n1_in"] is x  # the very input tensor: no gather
    assert seen["n2_in"] is seen["n1_out"]  # every example chose N2: no copy either
    assert result.ran["N3"].numel() == 0 and torch.equal(result.ran["N2"], torch.arange(8))

    # per-example routing: each branch is called once, on its own examples only
    executor = build(graph)
    calls = count_calls(executor)
    actions = torch.tensor([0, 1, 1, 0, 1, 1, 1, 0])
    result = executor(x, mode="force", actions={"Q1": actions})
    assert calls == {"N1": [8], "Q1": [8], "N2": [3], "N3": [5]}
    assert torch.equal(result.ran["N2"], torch.tensor([0, 3, 7]))
    assert torch.equal(result.ran["N3"], torch.tensor([1, 2, 4, 5, 6]))


def test_a_cascade_that_stops_early_calls_nothing_behind_the_stop():
    graph = d2graph.load(TESTDATA.parent.parent / "examples" / "cascade.d2")
    executor = build(graph)
    calls = count_calls(executor)
    executor(batch(graph, 6)["x"], mode="force", actions={"Q1": 1})
    assert {name: len(c) for name, c in calls.items()} == {
        "N1": 1, "N2": 1, "Q1": 1, "N3": 0, "N4": 0, "Q2": 0, "N5": 0, "N6": 0, "Q3": 0, "N7": 0}
    calls = count_calls(executor)
    executor(batch(graph, 6)["x"], mode="force",
             actions={"Q1": torch.tensor([0, 0, 1, 0, 1, 1]), "Q2": 1})
    assert calls["N3"] == [3] and calls["Q2"] == [3] and calls["N5"] == [] and calls["N7"] == []


# --- cost ---------------------------------------------------------------------------------


def test_forced_routings_cost_exactly_the_nodes_that_ran():
    graph = d2graph.load(TESTDATA.parent.parent / "examples" / "high_low.d2")
    executor = build(graph)
    x = batch(graph, 4)["x"]
    # golden IR: N1 16,200; Q1 4,880; N2 135,296; N3 2,624
    result = executor(x, mode="force", actions={"Q1": torch.tensor([0, 1, 1, 0])})
    high, low = 16_200 + 4_880 + 135_296, 16_200 + 4_880 + 2_624
    assert result.cost.dtype == torch.long
    assert result.cost.tolist() == [high, low, low, high]
    expected = torch.tensor([high, low, low, high], dtype=torch.float64) / 159_000  # full cost
    torch.testing.assert_close(result.cost_fraction, expected)

    graph = d2graph.load(TESTDATA.parent.parent / "examples" / "cascade.d2")
    executor = build(graph)
    c = {n.name: n.cost for n in graph.nodes}
    stage1 = c["N1"] + c["N2"] + c["Q1"]
    stage2 = stage1 + c["N3"] + c["N4"] + c["Q2"]
    stage3 = stage2 + c["N5"] + c["N6"] + c["Q3"]
    actions = {"Q1": torch.tensor([1, 0, 0, 0]), "Q2": torch.tensor([0, 1, 0, 0]), "Q3": torch.tensor([0, 0, 1, 0])}
    result = executor(batch(graph, 4)["x"], mode="force", actions=actions)
    assert result.cost.tolist() == [stage1, stage2, stage3, stage3 + c["N7"]]


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_cost_equals_flop_counter_mode(path):
    graph = d2graph.load(path)
    executor = build(graph)
    inputs = batch(graph, 2)
    forced = random_actions(graph, 2, seed=11)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        result = executor(inputs, mode="force", actions=forced)
    assert 2 * int(result.cost.sum()) == counter.get_total_flops()
    for b in range(2):  # and example by example
        one = {name: t[b:b + 1] for name, t in inputs.items()}
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            executor(one, mode="force", actions={q: a[b:b + 1] for q, a in forced.items()})
        assert 2 * int(result.cost[b]) == counter.get_total_flops()


def test_declared_fractional_costs_are_summed_in_float64():
    graph, diagnostics = d2graph.check("""graph g {
      input x [2]
      output y
      control Q [cost=0.5] = fc(2)
      node A [cost=1.25] = fc(2)
      x -> Q, A
      Q => A | skip
      A -> y [default=0]
    }""")
    assert graph is not None, diagnostics
    result = build(graph)(torch.randn(3, 2), mode="force", actions={"Q": torch.tensor([0, 1, 0])})
    assert result.cost.dtype == torch.float64
    assert result.cost.tolist() == [1.75, 0.5, 1.75]
    assert result.cost_fraction.tolist() == [1.0, 0.5 / 1.75, 1.0]


# --- one small graph per rule of LANGUAGE.md §3 -----------------------------------------------


def test_defaults_stand_in_for_nodes_that_did_not_run():
    executor = build(load("defaults"))
    x = torch.tensor([[1.0, 0.0], [-3.0, 2.0]])  # Q's scores are x: actions 0, 1
    result = executor(x)
    assert result.actions["Q"].tolist() == [0, 1]
    assert result.outputs["y"].tolist() == [[0.0, -1.0], [5.0, 7.0]]  # A + (-1); 5 + relu(x)
    assert result.outputs["z"].tolist() == [[1.0, 0.0], [10.0, 10.0]]  # C on A, C on the default
    assert result.ran["A"].tolist() == [0] and result.ran["B"].tolist() == [1]
    assert result.ran["C"].tolist() == [0, 1]


def test_null_propagates_to_nodes_that_need_the_missing_input():
    executor = build(load("null"))
    calls = count_calls(executor)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    result = executor(x)
    assert result.ran["A"].tolist() == result.ran["B"].tolist() == result.ran["C"].tolist() == [0, 2]
    assert calls["B"] == [2] and calls["C"] == [2]
    assert result.outputs["y"][1].tolist() == [7.0, 7.0]
    torch.testing.assert_close(result.outputs["y"][[0, 2]], executor.nodes["C"](torch.relu(x[[0, 2]])))
    assert result.cost.tolist() == [4, 0, 4]  # only C costs: fc(2) on [2] is 4 multiply-accumulates
    assert_matches_reference(executor, {"x": x}, {})


def test_sum_concat_and_select_merges():
    executor = build(load("merges"))
    x = torch.tensor([[2.0, 1.0], [-1.0, 3.0]])  # Q's scores are x: A runs for example 0 only
    r = executor(x)
    assert r.ran["A"].tolist() == [0]
    assert r.outputs["s"].tolist() == [[4.0, 2.0], [-1.0, 3.0]]  # A + x; 0 + x
    assert r.outputs["c"].tolist() == [[2.0, 1.0, 2.0, 1.0], [0.0, 0.0, -1.0, 3.0]]
    assert r.outputs["t"].tolist() == [[2.0, 1.0], [4.0, 4.0]]  # A where present, else D
    assert r.outputs["u"].tolist() == [[4.0, 4.0], [4.0, 4.0]]  # D first: always D
    # all mode: select takes the first input, everybody runs
    r = executor(x, mode="all")
    assert r.outputs["t"].tolist() == [[2.0, 1.0], [-1.0, 3.0]]


def test_a_node_with_several_control_edges_runs_when_any_is_activated():
    executor = build(load("two_controls"))
    x = torch.arange(8.0).view(4, 2)
    q1, q2 = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    r = executor(x, mode="force", actions={"Q1": q1, "Q2": q2})
    assert r.ran["A"].tolist() == [0, 1, 3]  # Q1 = A, or Q2 = A
    assert r.outputs["y"].tolist() == [[0.0, 1.0], [2.0, 3.0], [0.0, 0.0], [6.0, 7.0]]
    r = executor(x, mode="force", actions={"Q1": 1, "Q2": 0})  # both skip
    assert r.ran["A"].numel() == 0 and not r.outputs["y"].any()


def test_dummies_yield_their_constant_and_a_controlled_dummy_only_where_activated():
    executor = build(load("dummies"))
    calls = count_calls(executor)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 1.0]])
    r = executor(x)
    assert r.ran["W"].tolist() == [0, 2] and calls["W"] == [2] and calls["Z"] == [3]
    assert r.outputs["y"].tolist() == [[2.0, 1.0], [3.0, 4.0], [6.0, 2.0]]  # x + 3 (- 2 where W ran)


def test_two_inputs_and_two_outputs():
    graph = load("two_inputs")
    executor = build(graph)
    inputs = batch(graph, 6)
    with torch.no_grad():
        for forced in routings(graph, 6):
            result = assert_matches_reference(executor, inputs, forced)
            assert set(result.outputs) == {"y", "z"}
    with pytest.raises(ValueError, match="has inputs a, b"):
        executor({"a": inputs["a"]})
    with pytest.raises(TypeError, match="pass a dict"):
        executor(inputs["a"])
    with pytest.raises(AttributeError, match="2 outputs"):
        executor(inputs).output


def test_node_names_that_are_module_attributes():
    executor = build(load("clashing_names"))
    assert "nodes.eval.0.weight" in executor.state_dict()
    x = torch.randn(2, 3)
    nodes = executor.nodes
    torch.testing.assert_close(executor(x).output, nodes["keys"](nodes["forward"](nodes["eval"](x))))


def test_state_dict_is_keyed_by_node_and_round_trips(tmp_path):
    graph = d2graph.load(TESTDATA.parent.parent / "examples" / "high_low.d2")
    executor = build(graph, seed=0)
    keys = list(executor.state_dict())
    assert keys[:2] == ["nodes.N1.0.weight", "nodes.N1.0.bias"]
    torch.save(executor.state_dict(), tmp_path / "w.pt")
    other = build(graph, seed=1)
    other.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    x = batch(graph, 3)["x"]
    assert torch.equal(other(x).output, executor(x).output)


def test_keep_returns_intermediate_values_on_their_rows():
    graph = d2graph.load(TESTDATA.parent.parent / "examples" / "cascade.d2")
    executor = build(graph)
    inputs = batch(graph, 6)
    forced = {"Q1": torch.tensor([0, 1, 0, 1, 1, 0]), "Q2": 0, "Q3": 1}
    r = executor(inputs, mode="force", actions=forced, keep=["N3", "N1", "N7"])
    rows, values = r.values["N3"]
    assert rows.tolist() == [0, 2, 5]
    for i, b in enumerate(rows.tolist()):
        expected, _, _ = reference_example(executor, inputs, b, forced)
        torch.testing.assert_close(values[i:i + 1], expected["N3"])
    assert r.values["N1"][0].tolist() == list(range(6))
    assert r.values["N7"][0].numel() == 0 and r.values["N7"][1].shape == (0, 10)


def test_a_forced_action_may_be_any_integer():
    graph = d2graph.load(TESTDATA.parent.parent / "examples" / "high_low.d2")
    executor = build(graph)
    x = batch(graph, 3)["x"]
    expected = executor(x, mode="force", actions={"Q1": 1})
    for spec in (np.int64(1), torch.tensor(1), torch.tensor([1, 1, 1], dtype=torch.int32)):
        r = executor(x, mode="force", actions={"Q1": spec})
        assert torch.equal(r.output, expected.output) and r.actions["Q1"].tolist() == [1, 1, 1]
    # control nodes left out of `actions` take the argmax
    assert torch.equal(executor(x, mode="force", actions={}).output, executor(x).output)


def test_bad_calls_get_a_sentence():
    graph = d2graph.load(TESTDATA.parent.parent / "examples" / "high_low.d2")
    executor = build(graph)
    x = batch(graph, 2)["x"]
    with pytest.raises(ValueError, match="unknown mode 'greedy'"):
        executor(x, mode="greedy")
    with pytest.raises(ValueError, match="only used in mode='force'"):
        executor(x, actions={"Q1": 0})
    with pytest.raises(ValueError, match="'Q9', which is not a control node"):
        executor(x, mode="force", actions={"Q9": 0})
    with pytest.raises(ValueError, match="cannot force action 2"):
        executor(x, mode="force", actions={"Q1": 2})
    with pytest.raises(ValueError, match="include 5"):
        executor(x, mode="force", actions={"Q1": torch.tensor([0, 5])})
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        executor(x, mode="force", actions={"Q1": torch.tensor([0, 1, 1])})
    with pytest.raises(ValueError, match=r"\[B, 1, 32, 32\], got \[2, 3, 32, 32\]"):
        executor(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="between 0 and 1"):
        executor(x, mode="explore", epsilon=1.5)
    with pytest.raises(ValueError, match="not a node"):
        executor(x, keep=["N9"])
    assert set(MODES) == {"argmax", "force", "explore", "sample", "all"}


# --- property test over random graphs ----------------------------------------------------------


@st.composite
def random_graphs(draw) -> str:
    """.d2 text of a small graph: fc nodes of width 4 with random inputs, merges and
    defaults, a few constants, one or two control nodes switching later nodes (or skip),
    and outputs that always have a value (a select ending in x, a sum over defaulted edges)."""
    n = draw(st.integers(2, 6))
    lines = ["graph random {", "input x [4]", "output y [merge=select]", "output z"]
    edges, sources = [], ["x"]
    for i in range(n):
        if i and draw(st.integers(0, 4)) == 0:  # now and then a constant
            lines.append(f"dummy N{i} = const({i / 2}, shape=[4])")
        else:
            merge = draw(st.sampled_from(["sum", "concat", "select"]))
            lines.append(f"node N{i} [merge={merge}] = fc(4), tanh")
            for source in draw(st.lists(st.sampled_from(sources), min_size=1, max_size=3, unique=True)):
                default = draw(st.sampled_from([None, None, 0, 1.5]))
                edges.append(f"{source} -> N{i}" + ("" if default is None else f" [default={default}]"))
        sources.append(f"N{i}")
    controlled = set()
    for j in range(draw(st.integers(1, 2))):
        source = draw(st.sampled_from(sources[:-1]))
        later = sources[sources.index(source) + 1:]
        targets = draw(st.lists(st.sampled_from(later), min_size=1, max_size=3, unique=True))
        actions = targets + ["skip"] * draw(st.integers(0 if len(targets) > 1 else 1, 1))
        actions = draw(st.permutations(actions))
        lines.append(f"control Q{j} = fc({len(actions)})")
        edges.append(f"{source} -> Q{j}")
        edges.append(f"Q{j} => " + " | ".join(actions))
        controlled.update(targets)
    picks = draw(st.lists(st.sampled_from(sources[1:]), min_size=1, max_size=3, unique=True))
    edges.append(", ".join(picks) + ", x -> y")
    picks = draw(st.lists(st.sampled_from(sources[1:]), min_size=1, max_size=3, unique=True))
    edges.append(", ".join(picks) + " -> z [default=0]")
    return "\n".join(lines + edges + ["}"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(text=random_graphs(), seed=st.integers(0, 2**16))
def test_random_graphs_route_like_the_per_example_reference(text, seed):
    graph, _ = d2graph.check(text)
    assume(graph is not None)
    executor = build(graph, seed)
    inputs = batch(graph, 6, seed)
    with torch.no_grad():
        assert_matches_reference(executor, inputs, random_actions(graph, 6, seed))
        assert_matches_reference(executor, inputs, {}, result=executor(inputs))
        outputs, _ = reference_all(executor, inputs)
        result = executor(inputs, mode="all")
        for name, expected in outputs.items():
            torch.testing.assert_close(result.outputs[name], expected)


# --- sampling and exploring --------------------------------------------------------------------


def test_sample_mode_keeps_differentiable_log_probs_of_the_sampled_actions():
    graph = d2graph.load(TESTDATA.parent.parent / "examples" / "cascade.d2")
    executor = build(graph)
    x = batch(graph, 16)["x"]
    r = executor(x, mode="sample", generator=torch.Generator().manual_seed(0))
    for q in graph.control_nodes:
        ran = r.ran_mask(q.name)
        expected = torch.log_softmax(r.scores[q.name], 1).gather(1, r.actions[q.name].clamp(min=0)[:, None])[:, 0]
        torch.testing.assert_close(r.log_probs[q.name], torch.where(ran, expected, torch.zeros(())))
        assert (r.actions[q.name][~ran] == -1).all() and (r.actions[q.name][ran] >= 0).all()
    assert not r.ran_mask("Q2").all()  # some examples stopped at stage 1: zeros there
    loss = sum(lp.sum() for lp in r.log_probs.values())
    loss.backward()
    assert executor.nodes["Q1"][0].weight.grad.abs().sum() > 0
    assert executor.nodes["N7"][0].weight.grad is None  # not on the log-probabilities' path
    # the routing followed the sampled actions
    assert_matches_reference(executor, {"x": x}, {q: a for q, a in r.actions.items()}, result=r)


def test_sample_mode_draws_from_the_softmax_of_the_scores():
    graph, _ = d2graph.check("graph g {\n input x [2]\n output y\n control Q = identity\n node A = identity\n"
                             " x -> Q, A\n Q => skip | A\n A -> y [default=0]\n}")
    executor = compile(graph)
    x = torch.tensor([[0.0, math.log(3.0)]]).repeat(4000, 1)  # p = (1/4, 3/4)
    r = executor(x, mode="sample", generator=torch.Generator().manual_seed(0))
    assert abs(r.actions["Q"].float().mean().item() - 0.75) < 0.03
    chose_a = r.actions["Q"] == 1
    torch.testing.assert_close(r.log_probs["Q"][chose_a], torch.full((int(chose_a.sum()),), math.log(0.75)))
    again = executor(x, mode="sample", generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.actions["Q"], r.actions["Q"])


def test_explore_with_epsilon_0_is_argmax_and_with_epsilon_1_uniform():
    graph = d2graph.load(TESTDATA.parent.parent / "examples" / "ann_network_selection.d2")
    executor = build(graph)
    x = batch(graph, 600)["x"]
    with torch.no_grad():
        greedy = executor(x)
        r = executor(x, mode="explore", epsilon=0.0, generator=torch.Generator().manual_seed(0))
        assert torch.equal(r.actions["Q1"], greedy.actions["Q1"])
        assert torch.equal(r.output, greedy.output)
        r = executor(x, mode="explore", epsilon=1.0, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(r.actions["Q1"], minlength=3).float() / 600
    assert (counts - 1 / 3).abs().max() < 0.06, counts
    assert_matches_reference(executor, {"x": x[:40]}, {"Q1": r.actions["Q1"][:40], "Q2": r.actions["Q2"][:40]},
                             result=executor(x[:40], mode="force", actions={"Q1": r.actions["Q1"][:40],
                                                                            "Q2": r.actions["Q2"][:40]}))


# --- dtypes, modes of torch ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["high_low", "eenet_resnet"])
def test_bfloat16(name):
    graph = d2graph.load(TESTDATA.parent.parent / "examples" / f"{name}.d2")
    executor = build(graph).to(torch.bfloat16)
    inputs = batch(graph, 4, dtype=torch.bfloat16)
    with torch.no_grad():
        for mode in ("argmax", "sample", "explore"):
            r = executor(inputs, mode=mode, epsilon=0.5)
            assert r.output.dtype == torch.bfloat16 and r.output.isfinite().all()
        r = executor(inputs, mode="all")
        outputs, _ = reference_all(executor, inputs)
        torch.testing.assert_close(r.output, outputs["y"])
        r = executor(inputs, mode="force", actions=random_actions(graph, 4, seed=2))
        assert r.output.dtype == torch.bfloat16


def test_inference_mode_gives_the_same_results():
    graph = d2graph.load(TESTDATA.parent.parent / "examples" / "hierarchy.d2")
    executor = build(graph)
    inputs = batch(graph, 6)
    forced = random_actions(graph, 6, seed=4)
    with torch.no_grad():
        expected = executor(inputs, mode="force", actions=forced)
    with torch.inference_mode():
        r = executor(inputs, mode="force", actions=forced, keep=["N2"])
        for mode in MODES[:1] + MODES[2:]:
            executor(inputs, mode=mode)
    assert torch.equal(r.output, expected.output) and torch.equal(r.cost, expected.cost)
    assert r.ran["N4"].tolist() == expected.ran["N4"].tolist()


def test_train_mode_all_and_gradients_through_the_nodes_that_ran():
    graph = d2graph.load(TESTDATA.parent.parent / "examples" / "guan_cascade.d2")  # batch norm
    executor = build(graph).train()
    reference = copy.deepcopy(executor)
    inputs = batch(graph, 4)
    r = executor(inputs, mode="all")
    outputs, _ = reference_all(reference, inputs)
    torch.testing.assert_close(r.output, outputs["y"])
    for a, b in zip(executor.buffers(), reference.buffers()):  # same batch statistics
        torch.testing.assert_close(a, b)

    graph = d2graph.load(TESTDATA.parent.parent / "examples" / "high_low.d2")
    executor = build(graph).train()
    r = executor(batch(graph, 4)["x"], mode="force", actions={"Q1": torch.tensor([1, 1, 1, 1])})
    r.output.sum().backward()
    assert executor.nodes["N3"][-1].weight.grad.abs().sum() > 0
    assert executor.nodes["N1"][0].weight.grad.abs().sum() > 0
    assert executor.nodes["N2"][-1].weight.grad is None  # did not run


def test_scores_read_first_under_no_grad_still_carry_gradients():
    # actions, scores and log_probs are scattered to the full batch when first read
    graph = d2graph.load(TESTDATA.parent.parent / "examples" / "cascade.d2")
    executor = build(graph)
    r = executor(batch(graph, 6)["x"], mode="sample", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        baseline = r.scores["Q2"].mean() + r.log_probs["Q2"].mean()
    assert r.scores["Q2"].requires_grad and r.log_probs["Q2"].requires_grad
    assert not baseline.requires_grad
    with torch.inference_mode():
        r = executor(batch(graph, 6)["x"], mode="force", actions={"Q1": torch.tensor([0, 1, 0, 1, 0, 1])})
    assert r.actions["Q1"].tolist() == [0, 1, 0, 1, 0, 1] and r.scores["Q2"][1].tolist() == [0.0, 0.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    graph = d2graph.load(TESTDATA.parent.parent / "examples" / "ann_network_selection.d2")
    executor = build(graph)
    inputs = batch(graph, 64)
    forced = random_actions(graph, 64, seed=1)
    cpu = executor(inputs, mode="force", actions=forced)
    gpu_executor = executor.to("cuda")
    gpu_inputs = {k: v.cuda() for k, v in inputs.items()}
    for actions in (forced, {k: v.cuda() for k, v in forced.items()}):
        gpu = gpu_executor(gpu_inputs, mode="force", actions=actions)
        torch.testing.assert_close(gpu.output.cpu(), cpu.output, atol=1e-4, rtol=1e-3)
        assert torch.equal(gpu.cost.cpu(), cpu.cost) and gpu.cost.device.type == "cuda"
        assert gpu.ran["C"].cpu().tolist() == cpu.ran["C"].tolist()
    for mode in ("argmax", "sample", "explore", "all"):
        r = gpu_executor(gpu_inputs, mode=mode, epsilon=0.3)
        assert r.output.device.type == "cuda"
    with torch.inference_mode():
        gpu_executor.to(torch.bfloat16)({k: v.bfloat16() for k, v in gpu_inputs.items()})


def test_compiled_nodes_compute_what_eager_ones_do_and_keep_their_weight_names():
    """`compile = true`: each node's pipeline under torch.compile with dynamic batch sizes —
    the same outputs and costs for batches the routing splits differently, the same state
    dict (a checkpoint loads either way)."""
    graph = d2graph.check("""graph tiny {
      input x [6]
      output y [merge=select]
      node a = fc(4), relu
      node b = fc(3)
      node c = fc(3)
      control q = fc(2)
      x -> a -> q
      q => b | c
      a -> b
      a -> c
      b, c -> y
    }""")[0]
    torch.manual_seed(0)
    eager = compile(graph).eval()
    compiled = compile(graph).eval()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_nodes()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    for n, seed in ((7, 0), (3, 1), (1, 2)):
        x = torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))
        actions = {"q": torch.arange(n) % 2}
        a, b = compiled(x, mode="force", actions=actions), eager(x, mode="force", actions=actions)
        torch.testing.assert_close(a.output, b.output)
        assert torch.equal(a.cost, b.cost)

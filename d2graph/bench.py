"""Cost and latency of a user's own graph: the dynamic executor and each static path.

In:  a checked `Graph` (or an `Executor` holding trained weights), a batch size.
Out: `bench(...)` → one row (a dict) for the dynamic executor (argmax routing on random
     inputs) and one per distinct static path (`d2graph.paths.static_paths`: every
     combination of constant actions of the control nodes, deduplicated by the set of
     nodes that run), each run with mode="force";
     `bench_table(rows)` → the rows as a Markdown table. `d2graph bench FILE` prints it.
Guarantees: a path's cost is the sum of the IR costs of its nodes (the executor's own
accounting, which the executor tests tie to FlopCounterMode); the dynamic row's cost is
the mean over the batch. Latencies are medians over rounds in which the variants run
interleaved (dynamic, path 1, path 2, …), in eval mode under `torch.inference_mode()`,
on random inputs (standard normal) — on random inputs argmax routing is not what a
trained network does, so read the dynamic row's cost as an example, not a promise.

Example:
    >>> rows = bench(d2graph.load("examples/high_low.d2"), batch=64)   # doctest: +SKIP
    >>> print(bench_table(rows))                                        # doctest: +SKIP
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any

import torch

from .executor import Executor, compile
from .ir import Graph, format_cost
from .paths import static_paths

__all__ = ["bench", "bench_table"]


def bench(graph: Graph | Executor, batch: int = 256, rounds: int = 20, *, seed: int = 0,
          threads: int | None = None) -> list[dict[str, Any]]:
    """Cost and latency of the dynamic executor and of each static path of `graph`.

    `graph` is a checked Graph (weights initialised with `seed`) or an Executor (its own
    weights, device and dtype). `threads` sets torch's CPU threads for the run (restored
    afterwards). Each row: name, mode, actions ({control: 0-based action}, empty for the
    dynamic row), nodes (the nodes that ran, inputs and outputs left out; for the dynamic
    row those that ran for some example), cost (per example; the mean for the dynamic row), cost_fraction (of the
    graph's full cost), ms_per_batch and us_per_example (medians), batch, rounds.

    Example:
        >>> rows = bench(d2graph.load("examples/cascade.d2"), batch=32, rounds=5)   # doctest: +SKIP
        >>> [(r["name"], r["cost"]) for r in rows][:2]                              # doctest: +SKIP
    """
    if batch < 1 or rounds < 1:
        raise ValueError(f"batch and rounds must be at least 1, not {batch} and {rounds}")
    if isinstance(graph, Executor):
        executor, graph = graph, graph.graph
    else:
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
            torch.manual_seed(seed)
            executor = compile(graph)
    was_training = executor.training
    executor.eval()
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _bench(graph, executor, batch, rounds, seed)
    finally:
        torch.set_num_threads(old_threads)
        executor.train(was_training)


def _bench(graph: Graph, executor: Executor, batch: int, rounds: int, seed: int) -> list[dict[str, Any]]:
    full = graph.full_cost
    generator = torch.Generator().manual_seed(seed)
    # Real inputs are standard normal; token inputs random ids in [1, vocab), no padding.
    x = {n.name: (torch.randint(1, graph.vocab(n.name), (batch, *n.out_shape), generator=generator).to(_device(executor))
                  if n.tokens else
                  torch.randn((batch, *n.out_shape), generator=generator).to(_device(executor), _dtype(executor)))
         for n in graph.inputs}
    controls = {q.name: q for q in graph.control_nodes}
    rows: list[dict[str, Any]] = []
    runs = []
    with torch.inference_mode():
        r = executor(x)
        cost = r.cost.double().mean().item()
        rows.append(dict(name="dynamic (argmax)", mode="argmax", actions={},
                         nodes=tuple(n.name for n in graph.nodes
                                     if r.rows[n.name].n and n.kind not in ("input", "output")), cost=cost))
        runs.append(lambda: executor(x))
        for actions, nodes in static_paths(graph):
            r = executor(x, mode="force", actions=actions)
            cost = r.cost[0].item()
            label = ", ".join(f"{q}={controls[q].actions[a] or 'skip'}" for q, a in actions.items())
            rows.append(dict(name=f"path {label}" if label else "path (no control node)", mode="force",
                             actions=actions, nodes=nodes, cost=cost))
            runs.append(lambda actions=actions: executor(x, mode="force", actions=actions))
        times = _interleaved(runs, rounds, _device(executor))
    for row, t in zip(rows, times):
        median = statistics.median(t)
        row.update(cost_fraction=row["cost"] / full if full else 0.0, ms_per_batch=median * 1e3,
                   us_per_example=median * 1e6 / batch, batch=batch, rounds=rounds)
    return rows


def _interleaved(runs: list, rounds: int, device: torch.device) -> list[list[float]]:
    """Seconds per call of each run, one sample per round, the runs interleaved (order
    reversed every other round), after one warm-up call each; garbage collection off."""
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    clock = time.perf_counter
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(rounds):
            order = range(len(runs)) if i % 2 == 0 else range(len(runs) - 1, -1, -1)
            for j in order:
                sync()
                t0 = clock()
                runs[j]()
                sync()
                times[j].append(clock() - t0)
    finally:
        if enabled:
            gc.enable()
    return times


def bench_table(rows: list[dict[str, Any]]) -> str:
    """The rows of `bench` as a Markdown table (one line per row)."""
    if not rows:
        return ""
    batch, rounds = rows[0]["batch"], rows[0]["rounds"]
    lines = [f"| path (batch {batch}, median of {rounds} rounds) | nodes run | cost / example | of full "
             "| ms / batch | µs / example |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {' '.join(r['nodes'])} | {format_cost(r['cost'])} | {r['cost_fraction']:.1%} "
                     f"| {r['ms_per_batch']:.3f} | {r['us_per_example']:.2f} |")
    return "\n".join(lines)


def _device(executor: Executor) -> torch.device:
    return next((p.device for p in executor.parameters()), torch.device("cpu"))


def _dtype(executor: Executor) -> torch.dtype:
    return next((p.dtype for p in executor.parameters() if p.is_floating_point()), torch.float32)

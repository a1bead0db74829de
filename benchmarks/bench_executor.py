"""Executor benchmarks: the executor against hand-written static torch modules.

    python benchmarks/bench_executor.py            # the full run (about 8 minutes)
    python benchmarks/bench_executor.py --quick    # fewer batches and rounds (a smoke test)
    python benchmarks/bench_executor.py --write    # also write the tables into docs/performance.md

Every comparison runs in ONE process, on the SAME weights and inputs, with
`torch.set_num_threads(1)`, in eval mode under `torch.inference_mode()`. Outputs are
checked equal (allclose) before anything is timed. Each round runs every variant once,
interleaved (A, B, A, B, …, the order reversed every other round so that neither always
runs first); a table reports the MEDIAN over rounds of the per-round ratio, next to the
median absolute times for context. Ratios of neighbouring runs cancel most of the drift of
a shared, noisy machine; absolute times do not, and are only there to size things. The C
allocator is set to reuse freed blocks (see `settle_allocator`), so that no variant pays
for fresh pages on every pass.

  T1  all examples active: the executor (argmax routing where every example takes the same
      branch, and `all` mode) against a static module running the same nodes.
  T3  a 3-stage cascade (benchmarks/cascade3.d2, stage costs 1 : 4 : 16) where 70 % / 15 % /
      15 % of the examples stop after stage 1 / 2 / 3 (mode="force", actions fixed in
      advance): achieved speed-up over the full static network ÷ the FLOP-ideal speed-up
      (full cost / mean executed cost, from the executor's own cost accounting).
      A hand-routed module (the same index operations, indices computed in advance)
      separates what smaller sub-batches cost the layers from what the executor adds.
      For context only (the target stays the FLOP-ideal one), a time-ideal speed-up: the
      stages' measured full-batch times, each weighted by the share of examples reaching it.
  T3v T3's measure on a transformer: examples/vit_early_exit.d2 (four blocks, an exit after
      each) with 50 % / 20 % / 15 % / 15 % of the examples leaving at exit 1 / 2 / 3 / 4
      (random examples, actions forced): achieved speed-up over the full static network
      against the FLOP-ideal and the time-ideal speed-ups (`--only vit`).
  T4  the same scenario against compute-every-stage-and-mask (`torch.where` per example).
  T5  fixed cost per control node on tiny nodes (fc(8), a chain of K control nodes), when
      nobody changes branch and when every control node splits the batch.
  Mem peak memory of one forward pass, executor against static module, all examples active.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import d2graph  # noqa: E402
from d2graph.executor import Executor, compile  # noqa: E402

DOC = ROOT / "docs" / "performance.md"
DEVICE = torch.device("cpu")  # `--device cuda` runs T3 on a GPU (benchmarks/gpu_check.sh)
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


# --- measuring ----------------------------------------------------------------------------


def measure(variants: dict[str, Callable[[], object]], seconds: float, min_rounds: int, max_rounds: int,
            inner: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each variant, one sample per round, variants interleaved.

    The number of rounds fits `seconds` (between min_rounds and max_rounds), judged from a
    timed warm-up round. Garbage collection is off while timing (as in `timeit`)."""
    names = list(variants)
    for _ in range(2):  # warm-up: allocator, oneDNN primitive caches
        for name in names:
            variants[name]()
    start = time.perf_counter()
    for name in names:
        for _ in range(inner):
            variants[name]()
    per_round = time.perf_counter() - start
    rounds = max(min_rounds, min(max_rounds, int(seconds / max(per_round, 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in names}
    clock = time.perf_counter
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                f = variants[name]
                sync()
                t0 = clock()
                for _ in range(inner):
                    f()
                sync()  # a GPU's work is asynchronous: time it to its end
                times[name].append((clock() - t0) / inner)
    finally:
        gc.enable()
    return times


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def median_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def quartiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def ratios(times: dict[str, list[float]], a: str, b: str) -> list[float]:
    return [x / y for x, y in zip(times[a], times[b])]


def med_ms(times: dict[str, list[float]], name: str) -> float:
    return statistics.median(times[name]) * 1e3


def check_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
        raise AssertionError(f"{what}: outputs differ (max |diff| {(a - b).abs().max().item():.3g}); "
                             "nothing was timed")


def build(graph: d2graph.Graph, seed: int = 0) -> Executor:
    torch.manual_seed(seed)
    return compile(graph).eval()


def mark(ok: bool) -> str:
    return "**yes**" if ok else "**no**"


# --- T1: all examples active ----------------------------------------------------------------


class HighLowPath(nn.Module):
    """high_low's path N1 → Q1 → N2 by hand: what argmax routing runs when every example
    picks N2 (the scores of Q1 are computed, as they must be to decide)."""

    def __init__(self, nodes: nn.ModuleDict):
        super().__init__()
        self.n1, self.q1, self.n2 = nodes["N1"], nodes["Q1"], nodes["N2"]

    def forward(self, x):
        h = self.n1(x)
        self.q1(h)
        return self.n2(h)


class HighLowAll(nn.Module):
    """Every node of high_low on every example: what `all` mode runs."""

    def __init__(self, nodes: nn.ModuleDict):
        super().__init__()
        self.n1, self.q1, self.n2, self.n3 = nodes["N1"], nodes["Q1"], nodes["N2"], nodes["N3"]

    def forward(self, x):
        h = self.n1(x)
        self.q1(h)
        return self.n2(h) + self.n3(h)


def t1(quick: bool) -> tuple[str, list[dict]]:
    graphs = [("high_low", ROOT / "examples" / "high_low.d2"), ("high_low_wide", ROOT / "benchmarks" / "high_low_wide.d2")]
    batches = (32, 256) if quick else (32, 256, 1024)
    rows = []
    for label, path in graphs:
        graph = d2graph.load(path)
        executor = build(graph)
        with torch.no_grad():  # Q1 prefers N2 whatever the input: every example takes one path
            executor.nodes["Q1"][-1].bias.copy_(torch.tensor([1e4, -1e4]))
        path_module, all_module = HighLowPath(executor.nodes), HighLowAll(executor.nodes)
        for batch in batches:
            x = torch.randn(batch, *graph["x"].out_shape, generator=torch.Generator().manual_seed(batch))
            with torch.inference_mode():
                r = executor(x)
                assert r.rows["N2"].full and r.rows["N3"].n == 0, "argmax did not route everybody to N2"
                check_close(r.output, path_module(x), f"T1 {label} argmax")
                check_close(executor(x, mode="all").output, all_module(x), f"T1 {label} all")
                times = measure({"executor argmax": lambda: executor(x), "static path": lambda: path_module(x),
                                 "executor all": lambda: executor(x, mode="all"), "static all": lambda: all_module(x)},
                                seconds=3 if quick else (20 if batch < 256 else 45), min_rounds=10, max_rounds=400)
            for mode, a, b in (("argmax (one path)", "executor argmax", "static path"),
                               ("all", "executor all", "static all")):
                rs = ratios(times, a, b)
                over = statistics.median(rs) - 1
                lo, hi = quartiles(rs)
                target = 0.05 if batch < 256 else 0.02
                diff = statistics.median(x - y for x, y in zip(times[a], times[b])) * 1e6
                rows.append(dict(graph=label, batch=batch, mode=mode, static_ms=med_ms(times, b),
                                 executor_ms=med_ms(times, a), overhead=over, q1=lo - 1, q3=hi - 1, diff_us=diff,
                                 rounds=len(rs), target=target, met=over <= target))
    lines = ["| graph | batch | mode | static ms | executor ms | overhead (median of ratios − 1) | IQR of ratios − 1 "
             "| median difference µs | rounds | target | met |",
             "|---|---:|---|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['graph']} | {r['batch']} | {r['mode']} | {r['static_ms']:.3f} | {r['executor_ms']:.3f} "
                     f"| {r['overhead']:+.1%} | {r['q1']:+.1%} … {r['q3']:+.1%} | {r['diff_us']:+.0f} | {r['rounds']} "
                     f"| ≤ {r['target']:.0%} | {mark(r['met'])} |")
    return "\n".join(lines), rows


# --- T3 and T4: the cascade -----------------------------------------------------------------


class CascadeFull(nn.Module):
    """Every node of cascade3 on every example; the answer is the last stage's."""

    def __init__(self, nodes: nn.ModuleDict):
        super().__init__()
        self.s1, self.q1, self.s2, self.q2, self.s3 = (nodes[n] for n in ("S1", "Q1", "S2", "Q2", "S3"))

    def forward(self, x):
        self.q1(self.s1(x))
        self.q2(self.s2(x))
        return self.s3(x)


class CascadeMasked(CascadeFull):
    """Compute every stage on the whole batch, then pick each example's answer with masks —
    what early-exit code that does not route does."""

    def __init__(self, nodes: nn.ModuleDict, stop1: torch.Tensor, stop2: torch.Tensor):
        super().__init__(nodes)
        self.stop1, self.stop2 = stop1[:, None], stop2[:, None]

    def forward(self, x):
        s1, s2, s3 = self.s1(x), self.s2(x), self.s3(x)
        self.q1(s1)
        self.q2(s2)
        return torch.where(self.stop1, s1, torch.where(self.stop2, s2, s3))


class CascadeRouted(CascadeFull):
    """The cascade routed by hand with index tensors computed in advance: each stage on its
    own examples (index_select), the answers merged with index_copy_ — the executor's tensor
    work without its decisions and bookkeeping. Its time ÷ the ideal separates what smaller
    batches cost the layers themselves from what the executor adds."""

    def __init__(self, nodes: nn.ModuleDict, stop1: torch.Tensor, stop2: torch.Tensor):
        super().__init__(nodes)
        self.to2 = (~stop1).nonzero()[:, 0]
        self.to3 = (~stop1 & ~stop2).nonzero()[:, 0]

    def forward(self, x):
        s1 = self.s1(x)
        self.q1(s1)
        s2 = self.s2(x.index_select(0, self.to2))
        self.q2(s2)
        s3 = self.s3(x.index_select(0, self.to3))
        y = torch.empty_like(s1)
        y.copy_(s1)
        y.index_copy_(0, self.to2, s2)
        return y.index_copy_(0, self.to3, s3)


def cascade_actions(batch: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """70 % stop after stage 1, 15 % after stage 2, 15 % run stage 3 (random examples)."""
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(seed))
    n1, n2 = round(0.70 * batch), round(0.15 * batch)
    stop1 = torch.zeros(batch, dtype=torch.bool)
    stop2 = torch.zeros(batch, dtype=torch.bool)
    stop1[order[:n1]] = True
    stop2[order[n1:n1 + n2]] = True
    # action 0 = run the next stage, 1 = stop (cascade3.d2: Q1 => S2 | skip)
    return {"Q1": stop1.long(), "Q2": stop2.long()}, stop1, stop2


def t3_t4(quick: bool) -> tuple[str, str, list[dict]]:
    graph = d2graph.load(ROOT / "benchmarks" / "cascade3.d2")
    executor = build(graph).to(DEVICE)
    cost = {n.name: n.cost for n in graph.nodes}
    batches = (256, 1024) if quick else (256, 1024, 4096)
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch)).to(DEVICE)
        actions, stop1, stop2 = cascade_actions(batch)
        full, masked = CascadeFull(executor.nodes), CascadeMasked(executor.nodes, stop1.to(DEVICE), stop2.to(DEVICE))
        routed = CascadeRouted(executor.nodes, stop1.to(DEVICE), stop2.to(DEVICE))
        run = lambda: executor(x, mode="force", actions=actions)  # noqa: E731
        with torch.inference_mode():
            r = run()
            check_close(r.output, masked(x), f"T3 batch {batch}")
            check_close(routed(x), masked(x), f"T3 batch {batch}, hand-routed")
            expected = torch.where(stop1, cost["S1"] + cost["Q1"],
                                   torch.where(stop2, cost["S1"] + cost["Q1"] + cost["S2"] + cost["Q2"],
                                               torch.tensor(graph.full_cost)))
            assert torch.equal(r.cost.cpu(), expected), "the executor's cost accounting disagrees with the IR"
            ideal = graph.full_cost / r.cost.double().mean().item()
            times = measure({"executor": run, "static full": lambda: full(x), "compute all + mask": lambda: masked(x),
                             "hand-routed": lambda: routed(x)},
                            seconds=4 if quick else 50, min_rounds=7, max_rounds=300)
            stages = measure({"S1, Q1": lambda: full.q1(full.s1(x)), "S2, Q2": lambda: full.q2(full.s2(x)),
                              "S3": lambda: full.s3(x)}, seconds=2 if quick else 20, min_rounds=7, max_rounds=300)
        # What the machine allows if every stage ran as efficiently per example on its share
        # of the batch as on the whole batch: each stage's full-batch time, weighted by the
        # share of examples that reach it (1, then those in stage 2 / 3), per round.
        reach = (1.0, int((~stop1).sum()) / batch, int((~stop1 & ~stop2).sum()) / batch)
        time_ideal = statistics.median(sum(ts) / sum(f * t for f, t in zip(reach, ts))
                                       for ts in zip(stages["S1, Q1"], stages["S2, Q2"], stages["S3"]))
        achieved = median_ratio(times, "static full", "executor")
        versus_mask = median_ratio(times, "compute all + mask", "executor")
        lo, hi = quartiles([a / ideal for a in ratios(times, "static full", "executor")])
        by_hand = median_ratio(times, "static full", "hand-routed") / ideal
        versus_hand = median_ratio(times, "executor", "hand-routed") - 1
        rows.append(dict(batch=batch, ideal=ideal, time_ideal=time_ideal, achieved=achieved, efficiency=achieved / ideal,
                         q1=lo, q3=hi, by_hand=by_hand, versus_hand=versus_hand, routed_ms=med_ms(times, "hand-routed"),
                         versus_mask=versus_mask, executor_ms=med_ms(times, "executor"),
                         full_ms=med_ms(times, "static full"), mask_ms=med_ms(times, "compute all + mask"),
                         rounds=len(times["executor"]), stage2=int((~stop1).sum()), stage3=int((~stop1 & ~stop2).sum())))
    t3 = ["| batch | examples in stage 2 / 3 | static full ms | executor ms | FLOP-ideal speed-up | achieved speed-up "
          "| achieved ÷ ideal | IQR | rounds | target | met | hand-routed ms | hand-routed ÷ ideal | executor vs hand-routed "
          "| time-ideal speed-up (stage times) | achieved ÷ time-ideal |",
          "|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    t4 = ["| batch | compute all + mask ms | executor ms | executor faster by | rounds | target | met |",
          "|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        target = {256: 0.80, 4096: 0.90}.get(r["batch"])
        t3.append(f"| {r['batch']} | {r['stage2']} / {r['stage3']} | {r['full_ms']:.2f} | {r['executor_ms']:.2f} "
                  f"| {r['ideal']:.2f}× | {r['achieved']:.2f}× | {r['efficiency']:.2f} | {r['q1']:.2f} … {r['q3']:.2f} "
                  f"| {r['rounds']} | " + (f"≥ {target:.2f} | {mark(r['efficiency'] >= target)}" if target else "– | –")
                  + f" | {r['routed_ms']:.2f} | {r['by_hand']:.2f} | {r['versus_hand']:+.1%} | {r['time_ideal']:.2f}× "
                  f"| {r['achieved'] / r['time_ideal']:.2f} |")
        t4.append(f"| {r['batch']} | {r['mask_ms']:.2f} | {r['executor_ms']:.2f} | {r['versus_mask']:.2f}× | {r['rounds']} | "
                  + ("≥ 3× | " + mark(r["versus_mask"] >= 3) if r["batch"] == 256 else "– | –") + " |")
    return "\n".join(t3), "\n".join(t4), rows


# --- T3v: the ViT with an exit after each block -----------------------------------------------

VIT_STAGES = (("B1", "E1", "D1"), ("B2", "E2", "D2"), ("B3", "E3", "D3"), ("B4", "E4", None))
VIT_LEAVE = (0.50, 0.20, 0.15, 0.15)  # shares of the examples leaving at exit 1, 2, 3, 4


class VitFull(nn.Module):
    """Every block, exit and decision of vit_early_exit on every example (decision k reads
    exits 1..k concatenated, as the graph's `merge=concat`); returns every exit's scores."""

    def __init__(self, nodes: nn.ModuleDict):
        super().__init__()
        self.stages = [(nodes[b], nodes[e], nodes[d] if d else None) for b, e, d in VIT_STAGES]

    def forward(self, x):
        h, exits = x, []
        for block, exit_, decide in self.stages:
            h = block(h)
            exits.append(exit_(h))
            if decide is not None:
                decide(torch.cat(exits, dim=1))
        return exits


def t3_vit(quick: bool) -> tuple[str, list[dict]]:
    graph = d2graph.load(ROOT / "examples" / "vit_early_exit.d2")
    executor = build(graph).to(DEVICE)
    nodes, cost = executor.nodes, {n.name: n.cost for n in graph.nodes}
    full = VitFull(nodes)
    rows = []
    for batch in ((256,) if quick else (64, 256, 1024)):
        x = torch.rand(batch, 1, 32, 32, generator=torch.Generator().manual_seed(batch)).to(DEVICE)
        order = torch.randperm(batch, generator=torch.Generator().manual_seed(0))
        leave = torch.empty(batch, dtype=torch.long)  # the exit (0-based) each example leaves at
        bounds = [0] + [round(batch * sum(VIT_LEAVE[:k + 1])) for k in range(4)]
        for k in range(4):
            leave[order[bounds[k]:bounds[k + 1]]] = k
        # action 0 = skip (leave here), 1 = run the next block
        actions = {d: (leave > k).long() for k, (_, _, d) in enumerate(VIT_STAGES) if d}
        run = lambda: executor(x, mode="force", actions=actions)  # noqa: E731
        with torch.inference_mode():
            r = run()
            exits = torch.stack(full(x))  # [4, B, classes]
            check_close(r.output, exits[leave.to(DEVICE), torch.arange(batch, device=DEVICE)], f"T3v batch {batch}")
            prefix = [0.0]
            for b, e, d in VIT_STAGES:
                prefix.append(prefix[-1] + cost[b] + cost[e] + (cost[d] if d else 0))
            assert torch.equal(r.cost.cpu(), torch.tensor(prefix[1:])[leave].to(r.cost.dtype)), \
                "the executor's cost accounting disagrees with the IR"
            ideal = graph.full_cost / r.cost.double().mean().item()
            times = measure({"executor": run, "static full": lambda: full(x)},
                            seconds=4 if quick else 40, min_rounds=7, max_rounds=300)
            hidden, outs = [x], []
            for block, exit_, _ in full.stages:
                hidden.append(block(hidden[-1]))
                outs.append(exit_(hidden[-1]))

            def stage(k):
                block, exit_, decide = full.stages[k]
                h = block(hidden[k])
                s = exit_(h)
                if decide is not None:
                    decide(torch.cat(outs[:k] + [s], dim=1))

            per_stage = measure({f"stage {k + 1}": (lambda k=k: stage(k)) for k in range(4)},
                                seconds=2 if quick else 20, min_rounds=7, max_rounds=300)
        reach = [float((leave >= k).double().mean()) for k in range(4)]
        time_ideal = statistics.median(sum(ts) / sum(f * t for f, t in zip(reach, ts))
                                       for ts in zip(*(per_stage[f"stage {k + 1}"] for k in range(4))))
        achieved = median_ratio(times, "static full", "executor")
        lo, hi = quartiles([a / ideal for a in ratios(times, "static full", "executor")])
        rows.append(dict(batch=batch, ideal=ideal, time_ideal=time_ideal, achieved=achieved, q1=lo, q3=hi,
                         full_ms=med_ms(times, "static full"), executor_ms=med_ms(times, "executor"),
                         rounds=len(times["executor"]), reach=reach))
    table = ["| batch | examples reaching block 2 / 3 / 4 | static full ms | executor ms | FLOP-ideal speed-up "
             "| achieved speed-up | achieved ÷ FLOP-ideal | IQR | time-ideal speed-up (stage times) "
             "| achieved ÷ time-ideal | rounds |",
             "|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        reached = " / ".join(f"{round(f * r['batch'])}" for f in r["reach"][1:])
        table.append(f"| {r['batch']} | {reached} | {r['full_ms']:.2f} | {r['executor_ms']:.2f} | {r['ideal']:.2f}× "
                     f"| {r['achieved']:.2f}× | {r['achieved'] / r['ideal']:.2f} | {r['q1']:.2f} … {r['q3']:.2f} "
                     f"| {r['time_ideal']:.2f}× | {r['achieved'] / r['time_ideal']:.2f} | {r['rounds']} |")
    return "\n".join(table), rows


# --- T5: fixed cost per control node ------------------------------------------------------------


def chain_text(k: int) -> str:
    """K blocks; block i: control Qi on H(i-1) chooses Ai or Bi (fc(8) each), and Hi
    (fc(8), merge=select) joins the two branches."""
    lines = ["graph chain {", "  input x [8]", "  output y", "  node H0 = fc(8)", "  x -> H0"]
    for i in range(1, k + 1):
        lines += [f"  control Q{i} = fc(2)", f"  node A{i} = fc(8)", f"  node B{i} = fc(8)",
                  f"  node H{i} [merge=select] = fc(8)",
                  f"  H{i - 1} -> Q{i}, A{i}, B{i}", f"  Q{i} => A{i} | B{i}", f"  A{i}, B{i} -> H{i}"]
    return "\n".join(lines + [f"  H{k} -> y", "}"])


class ChainStatic(nn.Module):
    """Every example through Ai: H0, then Qi, Ai, Hi per block (the same calls as the executor
    when nobody changes branch)."""

    def __init__(self, nodes: nn.ModuleDict, k: int):
        super().__init__()
        self.h0 = nodes["H0"]
        self.blocks = [(nodes[f"Q{i}"], nodes[f"A{i}"], nodes[f"H{i}"]) for i in range(1, k + 1)]

    def forward(self, x):
        h = self.h0(x)
        for q, a, hh in self.blocks:
            q(h)
            h = hh(a(h))
        return h


class ChainRouted(nn.Module):
    """The split batch routed by hand with precomputed index tensors: per block, Qi on all,
    Ai and Bi on their halves (index_select), Hi on the merge (index_copy_) — the tensor
    operations the executor performs, with no decisions and no bookkeeping."""

    def __init__(self, nodes: nn.ModuleDict, k: int, to_a: torch.Tensor, to_b: torch.Tensor):
        super().__init__()
        self.h0 = nodes["H0"]
        self.blocks = [(nodes[f"Q{i}"], nodes[f"A{i}"], nodes[f"B{i}"], nodes[f"H{i}"]) for i in range(1, k + 1)]
        self.to_a, self.to_b = to_a, to_b

    def forward(self, x):
        h = self.h0(x)
        for q, a, b, hh in self.blocks:
            q(h)
            ya, yb = a(h.index_select(0, self.to_a)), b(h.index_select(0, self.to_b))
            m = torch.empty((h.shape[0], ya.shape[1]), dtype=ya.dtype)
            m.index_copy_(0, self.to_a, ya)
            m.index_copy_(0, self.to_b, yb)
            h = hh(m)
        return h


def t5(quick: bool) -> tuple[str, list[dict]]:
    k, batch = 16, 64
    graphs = {n: d2graph.check(chain_text(n))[0] for n in (0, k)}
    executors = {n: build(g) for n, g in graphs.items()}
    for n, ex in executors.items():
        with torch.no_grad():
            for i in range(1, n + 1):
                ex.nodes[f"Q{i}"][-1].bias.copy_(torch.tensor([1e4, -1e4]))  # argmax: everybody to Ai
    x = torch.randn(batch, 8, generator=torch.Generator().manual_seed(0))
    half = torch.randperm(batch, generator=torch.Generator().manual_seed(1)) < batch // 2
    split = {n: {f"Q{i}": half.long() for i in range(1, n + 1)} for n in executors}
    to_a, to_b = (~half).nonzero()[:, 0], half.nonzero()[:, 0]
    static = {n: ChainStatic(ex.nodes, n) for n, ex in executors.items()}
    routed = {n: ChainRouted(ex.nodes, n, to_a, to_b) for n, ex in executors.items()}
    with torch.inference_mode():
        for n, ex in executors.items():
            r = ex(x)
            assert all(r.rows[f"A{i}"].full for i in range(1, n + 1))
            check_close(r.output, static[n](x), f"T5 K={n} same branch")
            r = ex(x, mode="force", actions=split[n])
            assert all(r.rows[f"B{i}"].n == batch // 2 for i in range(1, n + 1))
            check_close(r.output, routed[n](x), f"T5 K={n} split")
        variants = {}
        for n, ex in executors.items():
            variants[f"same {n}"] = lambda ex=ex: ex(x)
            variants[f"static {n}"] = lambda n=n: static[n](x)
            variants[f"split {n}"] = lambda ex=ex, n=n: ex(x, mode="force", actions=split[n])
            variants[f"routed {n}"] = lambda n=n: routed[n](x)
        times = measure(variants, seconds=5 if quick else 40, min_rounds=20, max_rounds=3000, inner=5)

    def per_control(a: str, b: str) -> list[float]:
        """µs per control node, per round: (executor − baseline) at K, less the same at K = 0."""
        return [((ak - bk) - (a0 - b0)) / k * 1e6 for ak, bk, a0, b0 in
                zip(times[f"{a} {k}"], times[f"{b} {k}"], times[f"{a} 0"], times[f"{b} 0"])]

    us = lambda name: statistics.median(times[name]) * 1e6  # noqa: E731
    # one fc(8) node call in this context: the static chain's calls, K = 16 against K = 0
    call_us = statistics.median((a - b) / (3 * k) for a, b in zip(times[f"static {k}"], times["static 0"])) * 1e6
    rows = [
        dict(case="no example changes branch (argmax, all to Ai)", baseline="static chain (same calls)",
             executor_us=us(f"same {k}"), baseline_us=us(f"static {k}"), per=statistics.median(per_control("same", "static")),
             fixed=statistics.median(a - b for a, b in zip(times["same 0"], times["static 0"])) * 1e6, target=6.0),
        dict(case="batch split 50/50 at every control node (force)", baseline="hand-routed (same index ops)",
             executor_us=us(f"split {k}"), baseline_us=us(f"routed {k}"), per=statistics.median(per_control("split", "routed")),
             fixed=statistics.median(a - b for a, b in zip(times["split 0"], times["routed 0"])) * 1e6, target=15.0),
        dict(case="batch split 50/50 at every control node (force)", baseline="static chain (no routing at all)",
             executor_us=us(f"split {k}"), baseline_us=us(f"static {k}"), per=statistics.median(per_control("split", "static")),
             fixed=statistics.median(a - b for a, b in zip(times["split 0"], times["static 0"])) * 1e6, target=15.0),
    ]
    lines = [f"K = {k} blocks (Qi, Ai, Bi, Hi: fc(2) / fc(8) nodes), batch {batch}, {len(times[f'same {k}'])} rounds "
             f"of 5 calls. In this context one fc(8) node call of the static chain takes {call_us:.1f} µs, and the "
             f"hand-routed chain spends {(us(f'routed {k}') - us(f'static {k}')) / k:.1f} µs more per block than the "
             "static one (index_select ×2, empty, index_copy_ ×2 and the call of the second branch).", "",
             "| case | baseline | executor µs / pass | baseline µs / pass | per-pass fixed cost µs (K = 0) "
             "| µs per control node | in fc(8) calls | target | met |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['baseline']} | {r['executor_us']:.0f} | {r['baseline_us']:.0f} | {r['fixed']:.0f} "
                     f"| {r['per']:.1f} | {r['per'] / call_us:.1f} | ≤ {r['target']:.0f} µs | {mark(r['per'] <= r['target'])} |")
    return "\n".join(lines), rows


# --- memory ------------------------------------------------------------------------------------


def peak_bytes(f: Callable[[], object]) -> int:
    """Peak bytes of tensors allocated and alive at once during f(), by the CPU allocator's
    own accounting as torch.profiler records it (`profile_memory=True`: one event per
    allocation and free, each carrying the running total). Tensors alive before the call
    (weights, input) are not counted; the output is (it is alive at the end)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = f()
        del out
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as file:
            events = json.load(file)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    return max(totals, default=0)


def memory(quick: bool) -> tuple[str, list[dict]]:
    rows = []
    batch = 256
    for label, path in (("high_low", ROOT / "examples" / "high_low.d2"),
                        ("high_low_wide", ROOT / "benchmarks" / "high_low_wide.d2")):
        graph = d2graph.load(path)
        executor = build(graph)
        with torch.no_grad():
            executor.nodes["Q1"][-1].bias.copy_(torch.tensor([1e4, -1e4]))
        x = torch.randn(batch, 1, 32, 32, generator=torch.Generator().manual_seed(0))
        path_module, all_module = HighLowPath(executor.nodes), HighLowAll(executor.nodes)
        with torch.inference_mode():
            for mode, ex_f, st_f in (("argmax (one path)", lambda: executor(x).output, lambda: path_module(x)),
                                     ("all", lambda: executor(x, mode="all").output, lambda: all_module(x))):
                ex_f(), st_f()  # warm-up outside the profile
                e, s = peak_bytes(ex_f), peak_bytes(st_f)
                rows.append(dict(graph=label, batch=batch, mode=mode, executor=e, static=s))
    # for contrast, the cascade of T3 (70 % / 15 % / 15 %), where the executor skips work
    graph = d2graph.load(ROOT / "benchmarks" / "cascade3.d2")
    executor = build(graph)
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    actions, stop1, stop2 = cascade_actions(batch)
    full, masked = CascadeFull(executor.nodes), CascadeMasked(executor.nodes, stop1, stop2)
    with torch.inference_mode():
        run = lambda: executor(x, mode="force", actions=actions).output  # noqa: E731
        run(), full(x), masked(x)
        e = peak_bytes(run)
        rows.append(dict(graph="cascade3 (T3 routing)", batch=batch, mode="force vs static full", executor=e,
                         static=peak_bytes(lambda: full(x))))
        rows.append(dict(graph="cascade3 (T3 routing)", batch=batch, mode="force vs compute all + mask", executor=e,
                         static=peak_bytes(lambda: masked(x))))
    lines = ["| graph | batch | mode | static peak MiB | executor peak MiB | executor ÷ static |",
             "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['graph']} | {r['batch']} | {r['mode']} | {r['static'] / 2**20:.2f} | "
                     f"{r['executor'] / 2**20:.2f} | {r['executor'] / r['static']:.2f} |")
    return "\n".join(lines), rows


# --- the report ----------------------------------------------------------------------------------


def settle_allocator() -> str:
    """Make repeated passes reuse freed memory instead of fresh pages; say how.

    With glibc's defaults, blocks above its mmap threshold (at most 32 MiB) are mapped for
    each allocation and unmapped when freed, so every pass of a network with big
    activations faults in fresh pages again. That cost falls mostly on the variant with
    the biggest tensors — the static networks — and made early T3 runs look better for
    the executor than routing alone explains (1.6× the FLOP-ideal speed-up at batch
    1024), and depend on whether T1 had run first. Turning mmap and trimming off
    (mallopt) serves every block from the heap, as a caching allocator would."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
        if libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1):
            return "glibc malloc with mmap and trimming off (mallopt), so freed blocks are reused"
    except (OSError, AttributeError):
        pass
    block = torch.ones(31 * 2**20 // 4)  # at least raise glibc's dynamic mmap threshold
    del block
    return "the platform's default C allocator (mallopt unavailable)"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs (shared with other jobs), {platform.system()} "
            f"{platform.release()}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer batches and rounds: a smoke test, not the numbers")
    p.add_argument("--write", action="store_true", help=f"write the tables into {DOC.relative_to(ROOT)}")
    p.add_argument("--only", nargs="*", choices=("t1", "t3", "vit", "t5", "memory"), help="run these parts only")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: T3 on the GPU (with --only t3)")
    args = p.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and (set(args.only or ()) != {"t3"} or not torch.cuda.is_available()):
        p.error("--device cuda runs T3 only (`--only t3`), on a machine where torch sees a GPU")
    torch.set_num_threads(1)
    allocator = settle_allocator()
    only = set(args.only or ("t1", "t3", "vit", "t5", "memory"))

    started = time.strftime("%Y-%m-%d %H:%M")
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    sections = []
    if "t1" in only:
        table, _ = t1(args.quick)
        sections.append(("T1 — all examples active: executor vs static module", table))
    if "t3" in only:
        t3_table, t4_table, _ = t3_t4(args.quick)
        sections.append(("T3 — 3-stage cascade (70 % / 15 % / 15 % leave after stage 1 / 2 / 3)", t3_table))
        sections.append(("T4 — the same cascade against compute-every-stage-and-mask", t4_table))
    if "vit" in only:
        table, _ = t3_vit(args.quick)
        sections.append(("T3v — ViT with an exit after each block (50 % / 20 % / 15 % / 15 % leave at exit 1 / 2 / 3 / 4)",
                         table))
    if "t5" in only:
        table, _ = t5(args.quick)
        sections.append(("T5 — fixed cost per control node, tiny nodes", table))
    if "memory" in only:
        table, _ = memory(args.quick)
        sections.append(("Memory — peak bytes of one forward pass (all examples active; the T3 cascade for contrast)", table))
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

    load = (f"; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
            if load_before and load_after else "")
    command = " ".join(["python benchmarks/bench_executor.py", *(argv if argv is not None else sys.argv[1:])])
    command = command.replace(" --write", "")
    gpu = f", GPU {torch.cuda.get_device_name(DEVICE)}" if DEVICE.type == "cuda" else ""
    header = (f"Measured {started} in {time.perf_counter() - t0:.0f} s with `{command}` on: {machine()}{gpu}{load}; "
              f"{allocator}.")
    out = [header, ""]
    for title, table in sections:
        out += [f"### {title}", "", table, ""]
    text = "\n".join(out)
    print(text)
    if args.write:
        doc = DOC.read_text(encoding="utf-8")
        if doc.count(BEGIN) != 1 or doc.count(END) != 1:
            print(f"error: {DOC} needs one {BEGIN} and one {END} line", file=sys.stderr)
            return 2
        before, rest = doc.split(BEGIN)
        _, after = rest.split(END)
        DOC.write_text(f"{before}{BEGIN}\n{text}\n{END}{after}", encoding="utf-8")
        print(f"wrote {DOC.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Deployment runtime benchmarks: d2graph.runtime against the executor and a static module.

    python benchmarks/bench_runtime.py            # prints the tables (a few minutes)
    python benchmarks/bench_runtime.py --quick    # fewer rounds (a smoke test)
    python benchmarks/bench_runtime.py --write    # also write them into docs/performance.md

Two shipped examples are trained briefly into run folders (the numbers are about routing and
calls, not accuracy) and exported (`export_run`, pt2; ONNX too when the `d2graph[onnx]` extra
is installed). Then, in ONE process, with `torch.set_num_threads(1)` (and one onnxruntime
thread), in eval mode under `torch.inference_mode()`, on the SAME weights and inputs:

  batch 1    for one test image per exit/branch the policy sends images to: the runtime,
             the executor applying the same policy (`policies.run_policy`, what `d2graph
             eval` and the trainers run) and a static module — a plain function calling
             the very nodes that image's path runs (control nodes included), in order, on
             the executor's own submodules — against each other. Outputs are checked equal
             (allclose) before timing.
  batch 256  the runtime against the executor with the same policy, on 256 test images
             (actions and costs checked identical first).
  onnx       the ONNX runtime's throughput against the pt2 runtime's, batch 256 (CPU), and the
             share of images it routes as the pt2 runtime does (onnxruntime rounds differently
             in the last bits, so a near-tie decision can go the other way; outputs are
             checked equal where the routing agrees).

Each round runs every variant once, interleaved (the order reversed every other round); a
row reports the median over rounds of the per-round ratio, with its interquartile range
(benchmarks/bench_executor.py's `measure`). The executor's threshold policy decides from a
pass of every node over the batch and then runs the routed pass (policies.py), so on
`early_exit` the executor does up to twice the work; `high_low`'s learned control node
decides inside the one pass.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import d2graph  # noqa: E402
from bench_executor import machine, measure, quartiles, ratios, settle_allocator  # noqa: E402
from d2graph import runtime  # noqa: E402
from d2graph.export import export_run  # noqa: E402
from d2graph.paths import nodes_run  # noqa: E402
from d2graph.policies import evaluating, run_policy  # noqa: E402
from d2graph.runs import Run, resolve, train  # noqa: E402

DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- deploy-bench:begin -->", "<!-- deploy-bench:end -->"
EXAMPLES = ("high_low", "early_exit")
TARGET_BATCH1 = 1.10


def trained_export(name: str, base: Path, onnx: bool):
    path = ROOT / "examples" / f"{name}.d2"
    graph = d2graph.load(path)
    stage = graph.train.stages[-1]
    extra = [f"stage.{stage.name}.epochs=1"] if stage.trainer in ("qlearning", "reinforce", "costsensitive") else []
    config = resolve(graph, ["data.n=600", "batch=50", "stage.backbone.epochs=2", "threads=1", *extra])
    run = Run.create(graph, path.read_text(encoding="utf-8"), config, base / name / "run")
    trained = train(graph, config, run, quiet=True, echo=None, evaluate=False)
    pt2 = export_run(run.folder, base / name / "pt2")
    onnx_folder = export_run(run.folder, base / name / "onnx", format="onnx") if onnx else None
    return trained, pt2, onnx_folder


def static_path(executor, nodes):
    """A plain function running `nodes` (one static path) in graph order on the executor's own
    submodules: what a hand-written network for that path computes, with no routing."""
    graph = executor.graph
    wanted = set(nodes)
    order = [n for n in graph.nodes if n.name in wanted or n.kind == "output"]
    modules = executor.nodes
    first = graph.inputs[0].name

    def run(x):
        env = {first: x}
        for node in order:
            present = [(env[e.source], e) for e in node.inputs if e.source in env]
            if node.merge == "select":
                h = present[0][0]
            elif node.merge == "concat":
                h = torch.cat([v for v, _ in present], dim=1)
            else:
                h = present[0][0]
                for v, _ in present[1:]:
                    h = h + v
            env[node.name] = h if node.kind == "output" else modules[node.name](h)
        return env[graph.outputs[0].name]

    return run


def row(times, a, b):
    r = ratios(times, a, b)
    q1, q3 = quartiles(r)
    return statistics.median(r), q1, q3


def bench_example(name: str, base: Path, quick: bool, onnx: bool) -> tuple[list[str], list[str], list[str]]:
    trained, pt2, onnx_folder = trained_export(name, base, onnx)
    executor, policy = trained.executor.eval(), trained.policy
    net = runtime.load(pt2)
    x = torch.cat([trained.data.test.tensors[0], trained.data.val.tensors[0]])[:256].contiguous()
    seconds, lo, hi = (1.0, 20, 200) if quick else (8.0, 100, 3000)

    def executor_run(batch):
        return lambda: run_policy(executor, policy, batch)

    with evaluating(executor):
        # batch 256: identical routing first
        expected, got = run_policy(executor, policy, x), net(x)
        torch.testing.assert_close(got.output, expected.output, rtol=1e-4, atol=1e-5)
        assert np.array_equal(got.cost, expected.cost.numpy())
        # batch 1: one image per exit the policy uses
        per_exit = {}
        for i in range(len(x)):
            per_exit.setdefault(int(got.exit[i]), i)
        batch1 = []
        for exit_index, i in sorted(per_exit.items()):
            xi = x[i:i + 1].clone()
            p = net(xi)
            actions = {q: int(a[0]) for q, a in p.actions.items() if a[0] >= 0}
            static = static_path(executor, nodes_run(executor.graph, actions))
            torch.testing.assert_close(static(xi), p.output, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(run_policy(executor, policy, xi).output, p.output, rtol=1e-4, atol=1e-5)
            times = measure({"runtime": lambda xi=xi: net(xi), "executor": executor_run(xi),
                             "static": lambda xi=xi, s=static: s(xi)}, seconds, lo, hi)
            rt_static, q1, q3 = row(times, "runtime", "static")
            ex_static, e1, e3 = row(times, "executor", "static")
            exit_name = net.exit_names[exit_index]
            batch1.append(
                f"| {name} | {exit_name} ({', '.join(f'{q}={a + 1}' for q, a in actions.items())}) | "
                f"{statistics.median(times['static']) * 1e3:.3f} | {statistics.median(times['runtime']) * 1e3:.3f} | "
                f"{statistics.median(times['executor']) * 1e3:.3f} | **{rt_static:.3f}×** ({q1:.3f}–{q3:.3f}) | "
                f"{ex_static:.3f}× ({e1:.3f}–{e3:.3f}) | {len(times['static'])} | "
                f"{'**yes**' if rt_static <= TARGET_BATCH1 else '**no**'} |")
        times = measure({"runtime": lambda: net(x), "executor": executor_run(x)}, seconds * 2, max(lo // 5, 10),
                        max(hi // 10, 20))
        r, q1, q3 = row(times, "runtime", "executor")
        batch256 = [f"| {name} | {policy.kind} | {statistics.median(times['executor']) * 1e3:.2f} | "
                    f"{statistics.median(times['runtime']) * 1e3:.2f} | **{r:.3f}×** ({q1:.3f}–{q3:.3f}) | "
                    f"{len(times['runtime'])} | {'**yes**' if r <= 1.0 else '**no**'} |"]
    onnx_rows = []
    if onnx_folder is not None:
        net_onnx = runtime.load(onnx_folder, threads=1)
        xn = x.numpy()
        p = net_onnx(xn)
        # onnxruntime's kernels round differently in the last bits: an image whose decision
        # is a near-tie may take the other branch. Where the routing agrees, so must the outputs.
        same = np.all([p.actions[q] == got.actions[q] for q in p.actions], axis=0) if p.actions else \
            np.ones(len(xn), bool)
        np.testing.assert_allclose(p.output[same], got.output.numpy()[same], rtol=1e-4, atol=1e-5)
        times = measure({"onnx": lambda: net_onnx(xn), "pt2": lambda: net(x)}, seconds * 2, max(lo // 5, 10),
                        max(hi // 10, 20))
        r, q1, q3 = row(times, "pt2", "onnx")  # pt2 time / onnx time = onnx throughput / pt2 throughput
        onnx_rows.append(f"| {name} | {256 / statistics.median(times['pt2']):,.0f} | "
                         f"{256 / statistics.median(times['onnx']):,.0f} | **{r:.2f}×** ({q1:.2f}–{q3:.2f}) | "
                         f"{same.mean():.1%} ({int((~same).sum())} of {len(same)}) | {len(times['onnx'])} |")
    return batch1, batch256, onnx_rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds: a smoke test, not the numbers")
    p.add_argument("--write", action="store_true", help=f"write the tables into {DOC.relative_to(ROOT)}")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    allocator = settle_allocator()
    try:
        import onnxruntime  # noqa: F401  (optional: the d2graph[onnx] extra)
        import onnxscript  # noqa: F401
        onnx = True
    except ImportError:
        onnx = False
    started = time.time()
    load_before = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    b1, b256, on = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in EXAMPLES:
            a, b, c = bench_example(name, Path(tmp), args.quick, onnx)
            b1 += a
            b256 += b
            on += c
            print(f"{name} done", file=sys.stderr)
    load_after = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M', time.gmtime(started))} UTC in {time.time() - started:.0f} s with "
        f"`python benchmarks/bench_runtime.py{' --quick' if args.quick else ''}` on: {machine()}; load average "
        f"{load_before} before, {load_after} after; {allocator}.",
        "",
        "**Batch 1** — one image per exit the policy uses; time ÷ the static module running that image's path "
        f"(target for the runtime ≤ {TARGET_BATCH1:.2f}×):",
        "",
        "| graph | exit (actions) | static ms | runtime ms | executor ms | runtime ÷ static (IQR) | "
        "executor ÷ static (IQR) | rounds | runtime ≤ 1.10× |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
        *b1,
        "",
        "**Batch 256** — the runtime against the executor applying the same policy (target ≤ 1.00×):",
        "",
        "| graph | policy | executor ms | runtime ms | runtime ÷ executor (IQR) | rounds | met |",
        "|---|---|---:|---:|---:|---:|---|",
        *b256,
        "",
    ]
    if on:
        lines += ["**ONNX** — throughput of the ONNX runtime (onnxruntime, 1 thread) against the pt2 runtime, "
                  "batch 256:", "",
                  "| graph | pt2 images/s | onnx images/s | onnx ÷ pt2 throughput (IQR) | same routing as pt2 (differ) | "
                  "rounds |",
                  "|---|---:|---:|---:|---:|---:|", *on, ""]
    else:
        lines += ["(ONNX not measured: the `d2graph[onnx]` extra is not installed.)", ""]
    text = "\n".join(lines)
    print(text)
    if args.write:
        doc = DOC.read_text(encoding="utf-8")
        if BEGIN not in doc:
            raise SystemExit(f"{DOC} has no {BEGIN} marker")
        head, rest = doc.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        DOC.write_text(head + BEGIN + "\n" + text + END + tail, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

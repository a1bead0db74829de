"""Compiled nodes (`compile = true`, torch.compile per node) against eager ones.

For each graph, two executors with the same weights — one eager, one with
`Executor.compile_nodes()` — in one process on one thread:
  - inference: a batch routed by random actions (so each node gets a different number of
    rows every batch, as under a policy), eval mode, `torch.inference_mode()`;
  - training: one step of the `supervised` loss (every head, mode `all`) with Adam.
Both run interleaved (order swapped every round) after a warm-up that pays the compiling;
the script prints the medians, their ratio and the time the compiling took.

    python benchmarks/bench_compile.py [--graphs early_exit,eenet_resnet] [--batch 256] [--rounds 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import d2graph
from d2graph.executor import compile
from d2graph.paths import heads

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graphs", default="early_exit,eenet_resnet", help="examples/ graphs, comma-separated")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}; threads {args.threads}; batch {args.batch}; "
          f"load average before: {Path('/proc/loadavg').read_text().split()[:3]}")
    for name in args.graphs.split(","):
        graph = d2graph.load(ROOT / "examples" / f"{name}.d2")
        torch.manual_seed(0)
        eager = compile(graph)
        compiled = compile(graph)
        compiled.load_state_dict(eager.state_dict())
        t0 = time.perf_counter()
        compiled.compile_nodes()
        names = heads(graph)
        shape = graph.inputs[0].out_shape
        g = torch.Generator().manual_seed(0)
        x = torch.randn((args.batch, *shape), generator=g)
        y = torch.randint(0, 10, (args.batch,), generator=g)
        optimisers = {id(m): torch.optim.Adam(m.parameters(), lr=1e-4) for m in (eager, compiled)}

        def infer(executor, seed):
            executor.eval()
            actions = {q.name: torch.randint(0, len(q.actions), (args.batch,),
                                             generator=torch.Generator().manual_seed(seed))
                       for q in graph.control_nodes}
            with torch.inference_mode():
                return executor(x, mode="force", actions=actions).output

        def step(executor):
            executor.train()
            r = executor(x, mode="all", keep=names)
            loss = sum(F.cross_entropy(r.values[h][1], y) for h in names) / len(names)
            opt = optimisers[id(executor)]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for seed in range(3):  # the compiling (and recompiling for dynamic shapes) happens here
            infer(compiled, seed)
        torch.testing.assert_close(infer(compiled, 99), infer(eager, 99), rtol=1e-4, atol=1e-4)
        for _ in range(3):  # both take the same steps, so they keep the same weights
            step(compiled)
            step(eager)
        warm = time.perf_counter() - t0
        times = {k: [] for k in ("infer eager", "infer compiled", "step eager", "step compiled")}
        for r in range(args.rounds):
            pairs = [("eager", eager), ("compiled", compiled)]
            for label, executor in pairs if r % 2 == 0 else pairs[::-1]:
                t = time.perf_counter()
                infer(executor, 1000 + r)
                times[f"infer {label}"].append(time.perf_counter() - t)
                t = time.perf_counter()
                step(executor)
                times[f"step {label}"].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{name}: compiling and warm-up {warm:.0f} s; inference (random routes) eager "
              f"{med['infer eager'] * 1e3:.1f} ms, compiled {med['infer compiled'] * 1e3:.1f} ms "
              f"(compiled ÷ eager {med['infer compiled'] / med['infer eager']:.2f}); training step eager "
              f"{med['step eager'] * 1e3:.1f} ms, compiled {med['step compiled'] * 1e3:.1f} ms "
              f"({med['step compiled'] / med['step eager']:.2f})")
    print(f"load average after: {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    main()

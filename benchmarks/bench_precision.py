"""What `precision = bf16` does to training: the time of an epoch and the accuracy reached.

For each graph, one epoch of the train block's backbone stage at `fp32` and at `bf16`
(torch.autocast), in one process on one thread, interleaved (order swapped every other
round) so that both share the machine's momentary load; then the whole train block at each
precision (`--full`), to compare test accuracy and cost.

    python benchmarks/bench_precision.py [--graphs early_exit,eenet_resnet] [--n 2000] [--rounds 3] [--full]

On a CPU without bfloat16 instructions autocast emulates them, so bf16 is expected to be
slower there; the setting is for GPUs (benchmarks/gpu_check.sh runs this on one).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import d2graph
from d2graph.runs import resolve, train

ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = ("fp32", "bf16")


def run(graph, overrides: list[str], stages: slice | None):
    config = resolve(graph, overrides)
    t0 = time.perf_counter()
    trained = train(graph, config, None, quiet=True, echo=None, evaluate=stages is None, stages=stages)
    return time.perf_counter() - t0, trained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graphs", default="early_exit,eenet_resnet", help="examples/ graphs, comma-separated")
    ap.add_argument("--n", type=int, default=2000, help="examples in all for the epoch timing (train split: 70%%)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--full", action="store_true", help="also train each graph's whole train block at each precision")
    args = ap.parse_args()
    print(f"torch {torch.__version__}; threads {args.threads}; device {args.device}; "
          f"load average before: {Path('/proc/loadavg').read_text().split()[:3]}")
    common = [f"threads={args.threads}", f"device={args.device}"]
    for name in args.graphs.split(","):
        graph = d2graph.load(ROOT / "examples" / f"{name}.d2")
        first = graph.train.stages[0].name
        times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
        for r in range(args.rounds):
            for p in PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]:
                seconds, _ = run(graph, [*common, f"precision={p}", f"data.n={args.n}", f"stage.{first}.epochs=1"],
                                 slice(0, 1))
                times[p].append(seconds)
        ratios = [b / a for a, b in zip(times["fp32"], times["bf16"])]
        print(f"{name}, n={args.n}, one epoch of `{first}`: fp32 {statistics.median(times['fp32']):.2f} s, "
              f"bf16 {statistics.median(times['bf16']):.2f} s (medians of {args.rounds}); bf16/fp32 median "
              f"{statistics.median(ratios):.2f}, rounds {', '.join(f'{x:.2f}' for x in ratios)}")
        if args.full:
            for p in PRECISIONS:
                seconds, trained = run(graph, [*common, f"precision={p}"], None)
                test = trained.reports["test"]
                print(f"{name}, the whole train block at {p}: {seconds:.0f} s, test accuracy {test.accuracy:.2%} "
                      f"at {test.cost_fraction:.3f} of the full cost")
    print(f"load average after: {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    main()

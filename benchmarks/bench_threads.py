"""What torch's thread count does to a training epoch: its time, and whether its numbers change.

For each graph, one epoch of the train block's first stage (the backbone) at each thread
count, in one process, the counts interleaved (order reversed every other round) so that
they share the machine's momentary load; then the same stage for --epochs epochs in a run
folder per count, to compare the logged metrics (train loss, validation score: 6 digits).

    python benchmarks/bench_threads.py [--n 2000] [--rounds 5] [--threads 1,2] [--epochs 4]

Prints the medians, the per-round ratios to the first count, whether the trained weights are
bit-identical (and their largest difference), and whether the logged metrics are equal.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import d2graph
from d2graph.runs import Run, resolve, train

ROOT = Path(__file__).resolve().parent.parent


def backbone(graph, n: int, threads: int, epochs: int = 1, folder: Path | None = None):
    """Seconds and the result of the first stage at `threads` threads (a run folder when given)."""
    first = graph.train.stages[0].name
    config = resolve(graph, [f"data.n={n}", f"threads={threads}", f"stage.{first}.epochs={epochs}"])
    run = Run.create(graph, "", config, folder) if folder is not None else None
    t0 = time.perf_counter()
    trained = train(graph, config, run, quiet=True, echo=None, evaluate=False, stages=slice(0, 1))
    return time.perf_counter() - t0, trained, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graphs", default="high_low,early_exit", help="examples/ graphs, comma-separated")
    ap.add_argument("--n", type=int, default=2000, help="examples in all (train split: 70%%)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    ap.add_argument("--epochs", type=int, default=4, help="epochs for the logged-metrics comparison (0: skip)")
    args = ap.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    print(f"torch {torch.__version__}; load average before: {Path('/proc/loadavg').read_text().split()[:3]}")
    for name in args.graphs.split(","):
        graph = d2graph.load(ROOT / "examples" / f"{name}.d2")
        times: dict[int, list[float]] = {t: [] for t in counts}
        weights = {}
        for r in range(args.rounds):
            for t in counts if r % 2 == 0 else counts[::-1]:
                seconds, trained, _ = backbone(graph, args.n, t)
                times[t].append(seconds)
                weights[t] = trained.executor.state_dict()
        first = counts[0]
        for t in counts[1:]:
            ratios = [b / a for a, b in zip(times[first], times[t])]
            same = all(torch.equal(weights[first][k], weights[t][k]) for k in weights[first])
            diff = max((weights[first][k].double() - weights[t][k].double()).abs().max().item() for k in weights[first])
            print(f"{name}, n={args.n}, one epoch: {first} thread(s) {statistics.median(times[first]):.3f} s, "
                  f"{t} threads {statistics.median(times[t]):.3f} s (medians of {args.rounds}); ratio {t}/{first}: "
                  f"median {statistics.median(ratios):.2f}, rounds {', '.join(f'{x:.2f}' for x in ratios)}; "
                  f"weights bit-identical: {same} (largest difference {diff:.3g})")
        if args.epochs:
            rows = {}
            with tempfile.TemporaryDirectory() as tmp:
                for t in counts:
                    seconds, _, run = backbone(graph, args.n, t, args.epochs, Path(tmp) / f"threads-{t}")
                    rows[t] = [(r["train_loss"], r["val_score"]) for r in run.rows()]
                    print(f"{name}, {args.epochs} epochs in a run folder, {t} thread(s): {seconds:.1f} s, "
                          f"(train loss, val score) per epoch {rows[t]}")
            print(f"{name}: logged metrics equal across thread counts: {len({tuple(r) for r in rows.values()}) == 1}")
    print(f"load average after: {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    main()

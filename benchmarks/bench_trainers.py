"""Training speed of each trainer: examples per second of one stage, on this machine.

Runs, for each (example graph, trainer) pair, a train block of two stages — `supervised`
for one epoch (the backbone), then the trainer — on cluttered digits, and reports the
policy stage's training examples per second (examples of the training split times its
epochs, over the stage's wall time, validation included). One torch thread unless
--threads is given, so the numbers compare across trainers and machines of one kind.

    python benchmarks/bench_trainers.py [--n 2000] [--threads 1]

Prints a Markdown table for docs/performance.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import d2graph
from d2graph.runs import resolve, train

ROOT = Path(__file__).resolve().parent.parent

CASES = [  # graph, trainer call (one or two epochs: speed, not accuracy)
    ("early_exit", "supervised(epochs=1)"),
    ("cascade", "qlearning(epochs=1, minibag=32, bag=mean)"),
    ("high_low", "qlearning(epochs=1, minibag=32, bag=mean)"),
    ("guan_cascade", "reinforce(epochs=1)"),
    ("guan_cascade", "reinforce(epochs=1, freeze=true)"),
    ("early_exit", "threshold(budget=0.5)"),
    ("early_exit", "costsensitive(budget=0.5)"),
    ("ann_network_selection", "costsensitive(budget=0.5)"),
    ("early_exit", "eenet(budget=0.5)"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="canvases in all (train split: 70%%)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    print("| graph | trainer | train examples | epochs | seconds | examples / s |\n|---|---|---:|---:|---:|---:|")
    for name, call in CASES:
        graph = d2graph.load(ROOT / "examples" / f"{name}.d2")
        config = resolve(graph, [f"data.n={args.n}", "stage.backbone.epochs=1", f"threads={args.threads}"])
        trainer = call.split("(")[0]
        params = dict(p.split("=") for p in call[len(trainer) + 1:-1].split(", ") if p)
        base = train(graph, config, None, quiet=True, echo=None, evaluate=False, stages=slice(0, 1))
        spec = {"name": "timed", "trainer": trainer,
                "params": {**{p.name: p.default for p in d2graph.schema.TRAINERS.get(trainer).schema.params},
                           **{k: d2graph.runs.parse_value(v) for k, v in params.items()}}}
        config.stages = [spec]
        t0 = time.perf_counter()
        train(graph, config, None, quiet=True, echo=None, evaluate=False, start=base)
        seconds = time.perf_counter() - t0
        epochs = int(spec["params"].get("epochs", 1)) if trainer in ("supervised", "qlearning", "reinforce") else 1
        n = len(base.data.train) * epochs
        print(f"| {name} | `{call}` | {n:,} | {epochs} | {seconds:.2f} | {n / seconds:,.0f} |")


if __name__ == "__main__":
    main()

"""A synthetic 10-class task with vector inputs: policies measured on data the examples never saw.

    python benchmarks/synthetic/make_data.py [--n 20000] [--seed 0] [--out benchmarks/synthetic/clusters.npz]
    python benchmarks/synthetic/make_data.py --binary    # binary.npz, for binary_cascade.d2
    python benchmarks/synthetic/make_data.py --deep      # deep.npz, for four_exits.d2

scikit-learn's `make_classification`: 32 features (12 informative), 10 classes of 4 Gaussian
clusters each, 5% of the labels flipped. The clusters make capacity matter (measured, 10
epochs of Adam on 16,000 examples: a linear model 31%, a 16-unit MLP 51%, 64 units 69%,
256 units 75%), so cheap and dear networks disagree on which examples they get right —
what routing needs. Deterministic in --seed. Writes `x` float32 [N, 32] and `y` int64 [N]
to an .npz that the `.d2` files beside this script read with `npz(path=...)`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.datasets import make_classification


def clusters_task(n: int = 20000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x, y = make_classification(n_samples=n, n_features=32, n_informative=12, n_classes=10,
                               n_clusters_per_class=4, class_sep=1.5, flip_y=0.05, random_state=seed)
    return x.astype(np.float32), y.astype(np.int64)


def binary_task(n: int = 12000, seed: int = 11) -> tuple[np.ndarray, np.ndarray]:
    """A binary task, a quarter of it positive (what `qlearning`'s F1 reward is for): 24
    features, 6 clusters per class, 3% of the labels flipped."""
    x, y = make_classification(n_samples=n, n_features=24, n_informative=10, n_classes=2, weights=[0.75, 0.25],
                               n_clusters_per_class=6, class_sep=1.0, flip_y=0.03, random_state=seed)
    return x.astype(np.float32), y.astype(np.int64)


def deep_task(n: int = 16000, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """A 6-class task of 20 features (10 informative, 3 clusters per class, 3% of the labels
    flipped) on which four_exits.d2's deepest network overfits: its third exit answers as
    well as its fourth at a ninth of the cost."""
    x, y = make_classification(n_samples=n, n_features=20, n_informative=10, n_classes=6, n_clusters_per_class=3,
                               class_sep=1.2, flip_y=0.03, random_state=seed)
    return x.astype(np.float32), y.astype(np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", action="store_true",
                    help="the binary task instead (12,000 examples, seed 11, binary.npz by default)")
    ap.add_argument("--deep", action="store_true",
                    help="the task four_exits.d2 reads (16,000 examples, seed 7, deep.npz by default)")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    task, n, seed, name = ((binary_task, 12000, 11, "binary.npz") if args.binary else
                           (deep_task, 16000, 7, "deep.npz") if args.deep else (clusters_task, 20000, 0, "clusters.npz"))
    args.out = args.out or str(Path(__file__).with_name(name))
    x, y = task(args.n or n, seed if args.seed is None else args.seed)
    np.savez(args.out, x=x, y=y)
    print(f"{args.out}: x {list(x.shape)}, y {list(y.shape)}, {len(np.unique(y))} classes")


if __name__ == "__main__":
    main()

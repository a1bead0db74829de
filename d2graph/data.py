"""Built-in data sets and a user's own arrays, as train / validation / test splits.

In:  a data set name and its arguments as written in a `train { data = ... }` block
     (`digits`, `cluttered_digits(size=32)`, `npz("my.npz")`), plus a seed.
Out: `Splits` — three `torch.utils.data.TensorDataset`s of (x float32 [N, C, H, W] or
     [N, F], y int64 [N]), the number of classes, the per-example input shape, and
     per-example metadata for the synthetic sets.
Guarantees:
  - everything runs offline: the digits are scikit-learn's bundled copy, nothing is fetched;
  - the same arguments and seed give identical arrays (numpy Generators, no global state);
  - splits are disjoint and stratified by the original label; `cluttered_digits` splits the
    *source* digits before drawing canvases, so no test canvas shows a training digit;
  - a user's mistake (missing file, wrong shapes, bad labels, a graph that does not fit the
    data) is a `D2GraphError` carrying one `Diagnostic` with a code from the table below.

Importing this module registers `digits`, `cluttered_digits` and `npz` in
`schema.DATASETS`, which the checker validates `data = ...` against.

Diagnostic codes (E9xx, data):
  E901  the file does not exist or is not a readable .npz archive
  E902  an array is missing from the .npz (`x`, `y`, or half of an `x_val`/`y_val` pair)
  E903  wrong shapes: x and y lengths differ, y is not 1-D, x is not [N, F] / [N, H, W] /
        [N, C, H, W], or the splits' example shapes differ
  E904  labels that are not integers or lie outside [0, classes)
  E905  the graph's input shape differs from the data's example shape (or it has several inputs)
  E906  the graph's output is narrower than the number of classes
  E907  data set arguments that cannot be honoured (e.g. `scale_max` larger than the
        canvas, a class subset naming an unknown class, split fractions summing to >= 1)

Example:
    >>> from d2graph import data
    >>> s = data.load("digits", seed=0, classes=[0, 1, 2])
    >>> s.classes, s.input_shape
    (3, (1, 8, 8))
    >>> print(s.describe())
    digits: 375 train / 81 val / 81 test, x [1, 8, 8], 3 classes
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from .diagnostics import D2GraphError, Diagnostic, did_you_mean
from .schema import DATASETS, Param, Schema

__all__ = ["DatasetSpec", "Splits", "check_compatible", "cluttered_digits", "digits", "load", "npz",
           "split_indices"]

SPLITS = ("train", "val", "test")


# --- results ------------------------------------------------------------------------------


@dataclass
class Splits:
    """A data set cut into train / validation / test.

    `meta[split]` maps a name to one numpy value per example of that split (for the
    synthetic sets: which source digit, its scale and place, how many clutter fragments),
    so evaluations can break results down by difficulty.
    """

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    classes: int
    input_shape: tuple[int, ...]
    meta: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def __getitem__(self, split: str) -> TensorDataset:
        if split not in SPLITS:
            raise KeyError(split)
        return getattr(self, split)

    # Training examples kept from the function nodes' training (`hold_out`): a policy learnt
    # on them sees each path's accuracy as on unseen data, not as on data it memorised.
    holdout: TensorDataset | None = None

    def describe(self) -> str:
        sizes = " / ".join(f"{len(self[s]):,} {s}" for s in SPLITS)
        if self.holdout is not None:
            sizes = sizes.replace(" train", f" train (+ {len(self.holdout):,} held out)", 1)
        shape = "[" + ", ".join(str(d) for d in self.input_shape) + "]"
        return f"{self.name}: {sizes}, x {shape}, {self.classes} classes"

    def hold_out(self, fraction: float, seed: int) -> Splits:
        """These splits with a random `fraction` of the training examples moved to `holdout`
        (stratified by label, at least one example per class kept for training); `self` is
        unchanged. The same seed holds out the same examples.

        Example:
            >>> s = load("digits", seed=0, classes=[0, 1]).hold_out(0.25, seed=0)
            >>> len(s.train), len(s.holdout)
            (189, 63)
        """
        x, y = self.train.tensors
        rng = np.random.default_rng(seed)
        labels = y.numpy()
        held = []
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            k = min(int(round(fraction * len(members))), len(members) - 1)
            held.append(rng.permutation(members)[:k])
        out = np.zeros(len(labels), dtype=bool)
        out[np.concatenate(held)] = True
        keep, away = torch.from_numpy(np.flatnonzero(~out)), torch.from_numpy(np.flatnonzero(out))
        meta = dict(self.meta)
        if "train" in meta:
            meta["train"] = {k: v[keep.numpy()] for k, v in meta["train"].items()}
            meta["holdout"] = {k: v[away.numpy()] for k, v in self.meta["train"].items()}
        return Splits(self.name, TensorDataset(x[keep], y[keep]), self.val, self.test, self.classes,
                      self.input_shape, meta, TensorDataset(x[away], y[away]))


@dataclass(frozen=True)
class DatasetSpec:
    """A registry entry: the schema the checker binds `data = name(...)` against, and
    `load(**bound_args, seed=..., root=...) -> Splits`."""

    schema: Schema
    load: Callable[..., Splits]


def load(name: str, *, seed: int = 0, root: str | Path | None = None, **args: Any) -> Splits:
    """Bind `args` to the named data set's schema (defaults filled in, mistakes reported as
    diagnostics) and load it. `root` is the folder relative `npz` paths are read from (the
    .d2 file's folder); the current directory when None.

    Example:
        >>> load("cluttered_digits", seed=1, n=600).input_shape
        (1, 32, 32)
    """
    spec = DATASETS.get(name)
    if spec is None:
        raise D2GraphError([Diagnostic(
            "E811", f"unknown data set `{name}`{did_you_mean(name, DATASETS.names())}",
            help="data sets: " + ", ".join(f"`{k}`" for k in DATASETS.names()))])
    # The checker hands over lists frozen into tuples; the schema's kinds expect lists.
    bound, diags = spec.schema.bind([], [(k, _thaw(v), None, None) for k, v in args.items()], what="data set")
    if any(d.is_error for d in diags):
        raise D2GraphError(diags)
    if "root" in inspect.signature(spec.load).parameters:
        return spec.load(**bound, seed=seed, root=root)
    return spec.load(**bound, seed=seed)


def _thaw(v: Any) -> Any:
    return [_thaw(x) for x in v] if isinstance(v, (tuple, list)) else v


def _error(code: str, message: str, help: str = "") -> D2GraphError:
    # Data errors have no place in the .d2 file to point at (E905/E906 do, and build their own).
    return D2GraphError([Diagnostic(code, message, help=help)])


# --- splitting ----------------------------------------------------------------------------


def split_indices(labels: np.ndarray, val: float, test: float, rng: np.random.Generator,
                  needed: tuple[str, ...] = SPLITS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train / val / test indices into `labels`, each sorted.

    Every class is cut with the same fractions (rounded per class), so a small class
    subset or a rare positive class still appears in every split. A split not in `needed`
    (one a user's file provides itself) may come out empty.

    Example:
        >>> tr, va, te = split_indices(np.arange(100) % 2, 0.2, 0.1, np.random.default_rng(0))
        >>> len(tr), len(va), len(te)
        (70, 20, 10)
    """
    _check_fractions(val, test)
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val, n_test = round(val * len(idx)), round(test * len(idx))
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val:n_val + n_test])
        parts[0].append(idx[n_val + n_test:])
    out = tuple(np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts)
    for name, p in zip(SPLITS, out):
        if len(p) == 0 and name in needed:
            raise _error("E907", f"the {name} split would be empty",
                         help="use more examples, or fractions that leave examples in every split")
    return out  # type: ignore[return-value]


def _check_fractions(val: float, test: float) -> None:
    if val + test >= 1:
        raise _error("E907", f"`val` + `test` = {val + test:g} leaves nothing to train on",
                     help="the two fractions must sum to less than 1, e.g. `val=0.15, test=0.15`")


def _relabel(original: np.ndarray, known: int, classes: Any, binary: int, what: str
             ) -> tuple[np.ndarray, np.ndarray, int]:
    """(which examples to keep, their new labels, the number of classes) for a class subset
    (relabelled 0..k-1 in the order given) and/or a one-vs-rest task (1 = `binary`)."""
    subset = [int(c) for c in (classes or ())]
    for c in subset + ([binary] if binary != -1 else []):
        if not 0 <= c < known:
            raise _error("E907", f"{what} has no class {c}",
                         help=f"its classes are 0 to {known - 1}; `binary=-1` turns the one-vs-rest task off")
    if len(set(subset)) != len(subset):
        raise _error("E907", f"the class subset {subset} names a class twice", help="list each class once")
    if subset and binary != -1 and binary not in subset:
        raise _error("E907", f"`binary={binary}` is not in the class subset {subset}",
                     help="add it to `classes` or leave `classes` empty")
    keep = np.isin(original, subset) if subset else np.ones(len(original), bool)
    if binary != -1:
        return keep, (original[keep] == binary).astype(np.int64), 2
    if subset:
        lookup = np.full(known, -1, np.int64)
        lookup[subset] = np.arange(len(subset))
        return keep, lookup[original[keep]], len(subset)
    return keep, original.astype(np.int64), known


def _datasets(x: torch.Tensor, y: torch.Tensor, parts) -> list[TensorDataset]:
    return [TensorDataset(x[torch.as_tensor(p)], y[torch.as_tensor(p)]) for p in parts]


def _rng(seed: int, *stream: int) -> np.random.Generator:
    # One independent stream per purpose, so e.g. changing `n` never moves the split.
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *stream])


# --- digits -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 scikit-learn digits as float32 [N, 8, 8] in [0, 1] and int64 labels."""
    table = None
    # Importing sklearn.datasets takes seconds (scipy and more) for a 60 KB table that
    # load_digits just reads from its package folder; read that file directly when it is
    # where load_digits keeps it (the test suite checks both give the same arrays).
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.origin:
        csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            table = np.loadtxt(csv, delimiter=",")
    if table is None or table.shape != (1797, 65):
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise _error("E901", "the built-in digits need scikit-learn, which is not installed",
                         help="install it with `pip install scikit-learn`") from None
        bunch = load_digits()
        table = np.column_stack([bunch.data, bunch.target])
    images = (table[:, :64].reshape(-1, 8, 8) / 16.0).astype(np.float32)  # the scans hold counts 0..16
    labels = table[:, 64].astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


FRACTIONS = (
    Param("val", "fraction", 0.15, doc="fraction of the examples held out for validation"),
    Param("test", "fraction", 0.15, doc="fraction of the examples held out for the test"),
)
SUBSET = (
    Param("classes", "ints", (), doc="class subset to keep, relabelled 0..k-1 in the order given; [] keeps all"),
    Param("binary", "int", -1, doc="one-vs-rest task: label 1 for this class, 0 for the others; -1 = off"),
)

DIGITS = Schema("digits", (
    Param("size", "posint", 8, doc="side of the image in pixels (bilinear resize from 8)"),
    Param("pad", "nonneg", 0, doc="zero pixels added on every side after resizing"),
    *SUBSET, *FRACTIONS,
), doc="scikit-learn's bundled handwritten digits: 1,797 real 8×8 scans, 10 classes")


def digits(size: int = 8, pad: int = 0, classes=(), binary: int = -1, val: float = 0.15,
           test: float = 0.15, *, seed: int = 0) -> Splits:
    """scikit-learn's digits as [N, 1, size + 2·pad, size + 2·pad] in [0, 1].

    Example:
        >>> digits(size=16, pad=8, binary=3).input_shape, digits(binary=3).classes
        ((1, 32, 32), 2)
    """
    images, original = _bundled_digits()
    keep, y, k = _relabel(original, 10, classes, binary, "`digits`")
    source = np.flatnonzero(keep)
    x = torch.from_numpy(images[source].copy()).unsqueeze(1)
    if size != 8:
        # antialias only matters when shrinking; it keeps thin strokes from vanishing.
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < 8)
        x = x.clamp_(0, 1)
    if pad:
        x = F.pad(x, (pad, pad, pad, pad))
    parts = split_indices(original[source], val, test, _rng(seed, 0))
    train, val_, test_ = _datasets(x.contiguous(), torch.from_numpy(y), parts)
    side = size + 2 * pad
    return Splits("digits", train, val_, test_, k, (1, side, side),
                  {s: {"source": source[p]} for s, p in zip(SPLITS, parts)})


# --- cluttered digits ---------------------------------------------------------------------

# Cluttered-MNIST recipe (Mnih et al. 2014, used by D²NN against DCN) on the bundled digits:
# one digit rescaled and placed at random on a larger canvas, plus small fragments cut from
# other digits. Each canvas is one of two kinds:
#   hard  the digit's side is uniform in [scale_min, scale_max] px, its place uniform over
#         the canvas (fully inside), and 1..clutter fragments (uniform count) are added;
#   easy  the digit's side is uniform in the upper half of [scale_min, scale_max], it sits
#         in the centre give or take size/16 px, and no fragment is added.
# `easy` is the fraction of easy canvases, exactly round(easy · n_split) in every split.
# A fragment is a random 4–6 px square crop of another source digit of the same split,
# drawn as an 8×8 px patch at a random place (it may overlap the digit); pixels add up and
# are clipped to [0, 1].
FRAGMENT = 8  # canvas pixels per fragment side

CLUTTERED = Schema("cluttered_digits", (
    Param("size", "posint", 32, doc="side of the square canvas in pixels"),
    Param("clutter", "nonneg", 3, doc="most clutter fragments on a hard canvas"),
    Param("scale_min", "posint", 12, doc="smallest side of the placed digit in pixels"),
    Param("scale_max", "posint", 20, doc="largest side of the placed digit in pixels"),
    Param("n", "posint", 8000, doc="canvases in all, shared out by the split fractions"),
    Param("easy", "fraction", 0.25, doc="fraction of easy canvases: large centred digit, no clutter"),
    *SUBSET, *FRACTIONS,
), doc="Cluttered-MNIST-style canvases drawn deterministically from the bundled digits")


def cluttered_digits(size: int = 32, clutter: int = 3, scale_min: int = 12, scale_max: int = 20,
                     n: int = 8000, easy: float = 0.25, classes=(), binary: int = -1,
                     val: float = 0.15, test: float = 0.15, *, seed: int = 0) -> Splits:
    """Cluttered canvases [N, 1, size, size] in [0, 1]; see the recipe above.

    `meta[split]` holds per canvas: `source` (index of the digit in scikit-learn's set),
    `scale` (side in px), `left`/`top` (place in px), `fragments` (count), `easy` (bool),
    `clutter_source` ([N, clutter]: the digit each fragment was cut from, -1 for none).

    Example:
        >>> s = cluttered_digits(n=1000, easy=0.5)
        >>> s.input_shape, int(s.meta["test"]["easy"].sum()), len(s.test)
        ((1, 32, 32), 75, 150)
    """
    if not scale_min <= scale_max <= size:
        raise _error("E907", f"the digit's side must satisfy scale_min <= scale_max <= size; "
                     f"got {scale_min}, {scale_max} and {size}",
                     help=f"lower `scale_max` to at most {size} or raise `size`" if scale_max > size
                     else "`scale_min` is the smaller side: swap the two")
    _check_fractions(val, test)
    key = (size, clutter, scale_min, scale_max, n, float(easy), tuple(int(c) for c in (classes or ())),
           int(binary), float(val), float(test), int(seed))
    name, parts, k, meta = _cluttered_cached(*key)
    # Copies, so a caller that edits a batch in place cannot corrupt the cache.
    datasets = [TensorDataset(x.clone(), y.clone()) for x, y in parts]
    return Splits(name, *datasets, k, (1, size, size),
                  {s: {m: v.copy() for m, v in d.items()} for s, d in meta.items()})


@functools.lru_cache(maxsize=8)
def _cluttered_cached(size, clutter, scale_min, scale_max, n, easy, classes, binary, val, test, seed):
    images, original = _bundled_digits()
    keep, y_all, k = _relabel(original, 10, classes, binary, "`cluttered_digits`")
    pool_all = np.flatnonzero(keep)
    label_of = np.full(len(original), -1, np.int64)
    label_of[pool_all] = y_all
    # Split the *source digits* first: every canvas of a split (and its clutter) is drawn
    # from that split's digits only, so the test set measures generalisation to new writing.
    source_parts = split_indices(original[pool_all], val, test, _rng(seed, 0))
    n_val, n_test = round(n * val), round(n * test)
    counts = (n - n_val - n_test, n_val, n_test)
    if min(counts) == 0:
        raise _error("E907", f"n={n} canvases leave a split empty", help="raise `n` or the split fractions")
    src = torch.tensor(images).unsqueeze(1)
    parts, meta = [], {}
    for i, (name, part, count) in enumerate(zip(SPLITS, source_parts, counts)):
        x, m = _render(src, pool_all[part], count, size, clutter, scale_min, scale_max, easy, _rng(seed, 1, i))
        parts.append((x, torch.from_numpy(label_of[m["source"]])))
        meta[name] = m
    return "cluttered_digits", parts, k, meta


def _render(src: torch.Tensor, pool: np.ndarray, count: int, size: int, clutter: int,
            scale_min: int, scale_max: int, easy: float, rng: np.random.Generator):
    """`count` canvases from the source digits `pool` (indices into `src` [M, 1, 8, 8])."""
    # Every pool digit is used about equally often: concatenated permutations, not draws
    # with replacement.
    reps = -(-count // len(pool))
    source = pool[np.concatenate([rng.permutation(len(pool)) for _ in range(reps)])[:count]]
    is_easy = np.zeros(count, bool)
    is_easy[rng.permutation(count)[:round(easy * count)]] = True

    scale = rng.integers(scale_min, scale_max + 1, count)
    big = rng.integers(-(-(scale_min + scale_max) // 2), scale_max + 1, count)
    scale = np.where(is_easy, big, scale)
    room = size - scale
    left = rng.random(count) * (room + 1)
    top = rng.random(count) * (room + 1)
    # Integer places keep the strokes as sharp as the resize leaves them.
    left, top = np.floor(left), np.floor(top)
    jitter = max(1, size // 16)
    centre_left = np.clip(room // 2 + rng.integers(-jitter, jitter + 1, count), 0, room)
    centre_top = np.clip(room // 2 + rng.integers(-jitter, jitter + 1, count), 0, room)
    left = np.where(is_easy, centre_left, left)
    top = np.where(is_easy, centre_top, top)
    fragments = np.where(is_easy, 0, rng.integers(1, clutter + 1, count) if clutter else 0)

    whole = np.tile(np.array([0.0, 0.0, 8.0, 8.0]), (count, 1))
    dst = np.stack([left, top, left + scale, top + scale], 1)
    canvas = _paste(src, source, whole, dst, size)

    frag = min(FRAGMENT, size)
    clutter_source = np.full((count, clutter), -1, np.int64)
    for j in range(clutter):
        # Draw for every canvas, then keep the rows that get a j-th fragment, so the random
        # stream does not depend on which rows those are.
        # A nonzero shift along the (sorted) pool: always another image than the digit's own.
        other = pool[(np.searchsorted(pool, source) + rng.integers(1, max(2, len(pool)), count)) % len(pool)]
        side = rng.integers(4, 7, count)
        # The outer ring of the 8×8 scans is mostly blank; crops start inside it so a
        # fragment carries ink.
        cx = rng.integers(1, 8 - side)
        cy = rng.integers(1, 8 - side)
        fx = np.floor(rng.random(count) * (size - frag + 1))
        fy = np.floor(rng.random(count) * (size - frag + 1))
        rows = np.flatnonzero(fragments > j)
        clutter_source[rows, j] = other[rows]
        if len(rows) == 0:
            continue
        crop = np.stack([cx, cy, cx + side, cy + side], 1)[rows]
        place = np.stack([fx, fy, fx + frag, fy + frag], 1)[rows]
        canvas.index_add_(0, torch.from_numpy(rows), _paste(src, other[rows], crop, place, size))
    canvas.clamp_(0, 1)
    meta = {"source": source, "scale": scale, "left": left.astype(np.int64), "top": top.astype(np.int64),
            "fragments": fragments.astype(np.int64), "clutter_source": clutter_source, "easy": is_easy}
    return canvas, meta


def _paste(src: torch.Tensor, which: np.ndarray, box_src: np.ndarray, box_dst: np.ndarray,
           size: int) -> torch.Tensor:
    """Draw the box `box_src` (x0, y0, x1, y1 in source pixels) of each source image
    `src[which]` into the box `box_dst` of an empty size×size canvas, bilinearly.

    One `grid_sample` for the whole batch: each canvas pixel centre is mapped back into its
    source image; pixels whose centre falls outside the destination box stay zero.
    """
    m = len(which)
    b_src = torch.from_numpy(box_src.astype(np.float32))
    b_dst = torch.from_numpy(box_dst.astype(np.float32))
    centre = torch.arange(size, dtype=torch.float32) + 0.5
    h, w = src.shape[-2:]

    def axis(lo: int, hi: int, extent: int):
        step = (b_src[:, hi] - b_src[:, lo]) / (b_dst[:, hi] - b_dst[:, lo])
        pos = b_src[:, lo, None] + (centre[None, :] - b_dst[:, lo, None]) * step[:, None]
        inside = (centre[None, :] >= b_dst[:, lo, None]) & (centre[None, :] < b_dst[:, hi, None])
        return 2 * pos / extent - 1, inside  # grid_sample's [-1, 1] with align_corners=False

    gx, in_x = axis(0, 2, w)
    gy, in_y = axis(1, 3, h)
    grid = torch.stack((gx[:, None, :].expand(m, size, size), gy[:, :, None].expand(m, size, size)), -1)
    out = F.grid_sample(src[torch.from_numpy(which)], grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out * (in_y[:, :, None] & in_x[:, None, :]).unsqueeze(1)


# --- a user's arrays ----------------------------------------------------------------------

NPZ = Schema("npz", (
    Param("path", "str", doc="path of a .npz file holding `x`, `y` and optionally "
                             "`x_val`, `y_val`, `x_test`, `y_test`"),
    Param("num_classes", "nonneg", 0, doc="number of classes; 0 = the largest label + 1"),
    *SUBSET, *FRACTIONS,
), doc="a user's own arrays from a NumPy .npz file")


def npz(path: str, num_classes: int = 0, classes=(), binary: int = -1, val: float = 0.15,
        test: float = 0.15, *, seed: int = 0, root: str | Path | None = None) -> Splits:
    """A user's arrays: x [N, F], [N, H, W] (a channel axis is added) or [N, C, H, W]; y [N]
    integer labels in [0, num_classes). Splits given as `x_val`/`y_val`, `x_test`/`y_test`
    are used as they are; a missing one is cut from `x`/`y` with its fraction and the seed.
    A relative `path` is read from `root` (the .d2 file's folder) when given.

    Example:
        >>> npz("mine.npz", seed=0).describe()                 # doctest: +SKIP
        'mine.npz: 700 train / 150 val / 150 test, x [20], 3 classes'
    """
    file = Path(path)
    if root is not None and not file.is_absolute():
        file = Path(root) / file
    if not file.is_file():
        raise _error("E901", f"data file `{path}` does not exist",
                     help=f"looked for {file.resolve()}; write the path relative to the .d2 file")
    try:
        with np.load(file, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise _error("E901", f"`{path}` is not a readable .npz archive ({type(e).__name__})",
                     help="save the arrays with `numpy.savez(path, x=..., y=...)`") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise _error("E902", f"`{path}` has no array `{key}`",
                         help=f"it holds {_names(arrays)}; save the inputs as `x` and the labels as `y`")
    given = {}
    for split in ("val", "test"):
        pair = [f"x_{split}" in arrays, f"y_{split}" in arrays]
        if any(pair) and not all(pair):
            have, lack = (f"x_{split}", f"y_{split}") if pair[0] else (f"y_{split}", f"x_{split}")
            raise _error("E902", f"`{path}` has `{have}` but no `{lack}`", help="give both arrays of a split, or neither")
        if all(pair):
            given[split] = (arrays[f"x_{split}"], arrays[f"y_{split}"])

    xs = {"": arrays["x"], **{f"_{s}": given[s][0] for s in given}}
    ys = {"": arrays["y"], **{f"_{s}": given[s][1] for s in given}}
    example = None
    for suffix, x in xs.items():
        y = ys[suffix]
        if y.ndim != 1:
            raise _error("E903", f"`y{suffix}` in `{path}` has shape {list(y.shape)}; labels must be one integer per example",
                         help="save the labels as a 1-D array of class indices, not one-hot rows")
        if x.ndim not in (2, 3, 4) or x.dtype.kind not in "biuf":
            raise _error("E903", f"`x{suffix}` in `{path}` has shape {list(x.shape)} and dtype {x.dtype}",
                         help="x must hold numbers shaped [N, F], [N, H, W] or [N, C, H, W]")
        if len(x) != len(y):
            raise _error("E903", f"`x{suffix}` in `{path}` holds {len(x)} examples but `y{suffix}` holds {len(y)} labels",
                         help="give one label per example, in the same order")
        if example is not None and x.shape[1:] != example:
            raise _error("E903", f"`x{suffix}` in `{path}` holds examples of shape {list(x.shape[1:])}, `x` of {list(example)}",
                         help="every split must hold examples of one shape")
        example = x.shape[1:]

    labels = {s: _labels(y, f"y{s}", path) for s, y in ys.items()}
    biggest = max(int(v.max()) for v in labels.values() if len(v)) if any(len(v) for v in labels.values()) else 0
    known = num_classes or biggest + 1
    for s, v in labels.items():
        if len(v) and (v.min() < 0 or v.max() >= known):
            bad = int(v.min()) if v.min() < 0 else int(v.max())
            raise _error("E904", f"`y{s}` in `{path}` holds the label {bad}, outside [0, {known})",
                         help="labels are class indices 0..classes-1"
                         + ("; raise `num_classes` or fix the labels" if num_classes else ""))

    def tensor(x):
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return t.unsqueeze(1) if t.ndim == 3 else t  # [N, H, W] → one channel

    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    meta: dict[str, dict[str, np.ndarray]] = {}
    keep, y_main, k = _relabel(labels[""], known, classes, binary, f"`{path}`")
    x_main = tensor(arrays["x"])[torch.from_numpy(np.flatnonzero(keep))]
    missing = [s for s in ("val", "test") if s not in given]
    if missing:
        # Only the splits the file lacks are cut from x; the others keep their fraction at 0.
        cut = {s: (val if s == "val" else test) if s in missing else 0.0 for s in ("val", "test")}
        parts = split_indices(labels[""][keep], cut["val"], cut["test"], _rng(seed, 0), ("train", *missing))
    else:
        parts = (np.arange(len(y_main)), None, None)
    rows = np.flatnonzero(keep)
    for i, s in enumerate(SPLITS):
        if s in given:
            kk, ys_, _ = _relabel(labels[f"_{s}"], known, classes, binary, f"`{path}`")
            out[s] = (tensor(given[s][0])[torch.from_numpy(np.flatnonzero(kk))], torch.from_numpy(ys_))
            meta[s] = {"index": np.flatnonzero(kk)}
        else:
            p = torch.from_numpy(parts[i])
            out[s] = (x_main[p], torch.from_numpy(y_main)[p])
            meta[s] = {"index": rows[parts[i]]}
    return Splits(Path(path).name, *(TensorDataset(*out[s]) for s in SPLITS), k,
                  tuple(int(d) for d in out["train"][0].shape[1:]), meta)


def _labels(y: np.ndarray, name: str, path: str) -> np.ndarray:
    if y.dtype.kind in "iub":
        return y.astype(np.int64)
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        return y.astype(np.int64)  # whole numbers saved as floats (e.g. from pandas) are fine
    raise _error("E904", f"`{name}` in `{path}` holds labels that are not integers (dtype {y.dtype})",
                 help="labels are class indices; convert one-hot or probability rows with `argmax`")


def _names(arrays: dict) -> str:
    return ", ".join(f"`{k}`" for k in sorted(arrays)) or "no arrays"


# --- data against a graph -----------------------------------------------------------------


def check_compatible(splits: Splits, graph) -> None:
    """Raise a D2GraphError (E905) when the graph's input shape is not the data's example
    shape, or (E906) when an output of the graph has fewer scores than there are classes.

    Example:
        >>> check_compatible(digits(size=8), d2graph.load("examples/high_low.d2"))  # doctest: +SKIP
        Traceback (most recent call last):
        d2graph.diagnostics.D2GraphError: error[E905]: graph `high_low` takes input [1, 32, 32] but ...
    """
    data_shape = tuple(splits.input_shape)
    inputs = graph.inputs
    if len(inputs) != 1:
        raise _error("E905", f"graph `{graph.name}` has {len(inputs)} inputs; a data set feeds exactly one",
                     help="declare one `input` node")
    node = inputs[0]
    want = tuple(node.out_shape or ())
    if want != data_shape:
        hint = ""
        if math.prod(want) == math.prod(data_shape):
            hint = "; the sizes agree, so a `flatten` or a different input declaration may be all it takes"
        elif splits.name == "digits" and len(want) == 3 and want[1] == want[2]:
            hint = f"; `digits(size={want[1]})` draws the digits at that size"
        elif splits.name == "cluttered_digits" and len(want) == 3 and want[1] == want[2]:
            hint = f"; `cluttered_digits(size={want[1]})` draws canvases of that size"
        raise D2GraphError([Diagnostic(
            "E905", f"graph `{graph.name}` takes input {_shape(want)} but {splits.name} gives examples "
                    f"of shape {_shape(data_shape)}",
            node.span, f"`{node.name}` is declared {_shape(want)}",
            help=f"declare `input {node.name} {_shape(data_shape)}` or change the data set's arguments{hint}")])
    for out in graph.outputs:
        shape = tuple(out.out_shape or ())
        width = shape[-1] if shape else 0
        if len(shape) != 1 or width < splits.classes:
            raise D2GraphError([Diagnostic(
                "E906", f"output `{out.name}` gives {_shape(shape)} but {splits.name} has "
                        f"{splits.classes} classes",
                out.span, f"needs a vector of at least {splits.classes} class scores",
                help=f"end the nodes feeding `{out.name}` with `fc({splits.classes})`")])


def _shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


DATASETS.register("digits", DatasetSpec(DIGITS, digits))
DATASETS.register("cluttered_digits", DatasetSpec(CLUTTERED, cluttered_digits))
DATASETS.register("npz", DatasetSpec(NPZ, npz))

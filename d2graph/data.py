"""Built-in data sets and a user's own arrays, as train / validation / test splits.

In:  a data set name and its arguments as written in a `train { data = ... }` block
     (`digits`, `cluttered_digits(size=32)`, `npz("my.npz")`), plus a seed.
Out: `Splits` — three `torch.utils.data.TensorDataset`s of (x float32 [N, C, H, W] or
     [N, F], or int64 token ids [N, T] for `negated_keywords`; y int64 [N]), the number of classes, the per-example input shape, and
     per-example metadata for the synthetic sets.
Guarantees:
  - everything runs offline: the digits are scikit-learn's bundled copy, nothing is fetched;
  - the same arguments and seed give identical arrays (numpy Generators, no global state);
  - splits are disjoint and stratified by the original label; `cluttered_digits` splits the
    *source* digits before drawing canvases, so no test canvas shows a training digit;
  - a user's mistake (missing file, wrong shapes, bad labels, a graph that does not fit the
    data) is a `D2GraphError` carrying one `Diagnostic` with a code from the table below;
  - nothing large is allocated before it is known to fit: an .npz file's shapes and dtypes
    are read from its array headers first, and every data set's estimated peak memory is
    checked against `memory_limit()` before it is built (E909); `example_shape` gives the
    per-example shape without building anything, so a graph that does not fit is told first;
  - no NaN or infinity reaches training from a user's arrays (E908).

Importing this module registers `digits`, `cluttered_digits`, `negated_keywords` and `npz` in
`schema.DATASETS`, which the checker validates `data = ...` against.

Diagnostic codes (E9xx, data):
  E901  the file does not exist or is not a readable .npz archive (image_data.py uses it, and
        E903, E904, E907 and E909, for its files and folders too)
  E902  an array is missing from the .npz (`x`, `y`, or half of an `x_val`/`y_val` pair)
  E903  wrong shapes: x and y lengths differ, y is not 1-D, x is not [N, F] / [N, H, W] /
        [N, C, H, W], or the splits' example shapes differ
  E904  labels that are not integers or lie outside [0, classes)
  E905  the graph's input shape differs from the data's example shape (or it has several inputs),
        or a token input meets real values (or an input of real values meets token ids)
  E906  the graph's output is narrower than the number of classes
  E907  data set arguments that cannot be honoured (e.g. `scale_max` larger than the
        canvas, a class subset naming an unknown class, split fractions summing to >= 1)
  E908  inputs or labels that hold a NaN or an infinity (inputs as float32)
  E909  a data set too large to build in memory: its estimated peak, from the arguments or
        the .npz headers, exceeds `memory_limit()` (refused before anything is allocated)

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
import os
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

__all__ = ["IMAGE_OPTIONS", "Augmentation", "AugmentedDataset", "DatasetSpec", "Splits", "check_compatible",
           "check_fits", "check_fractions", "check_input", "check_label_range", "cluttered_digits", "data_error",
           "data_path", "digits", "example_shape", "fractions_to_cut", "image_splits", "load", "memory_limit", "npz",
           "relabel", "require_memory", "rows_of", "split_indices", "split_rng"]

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
        train = TensorDataset(rows_of(x, keep), y[keep])
        if isinstance(self.train, AugmentedDataset):  # the held-out examples are not augmented
            train = AugmentedDataset(rows_of(x, keep), y[keep], augmentation=self.train.augmentation)
        return Splits(self.name, train, self.val, self.test, self.classes, self.input_shape, meta,
                      TensorDataset(rows_of(x, away), y[away]))


@dataclass(frozen=True)
class DatasetSpec:
    """A registry entry: the schema the checker binds `data = name(...)` against, and
    `load(**bound_args, seed=..., root=...) -> Splits`; `shape(**bound_args, root=...)`, when
    given, is the per-example input shape `load` will give, found without loading (so a
    graph that does not fit is told so before a large data set is built)."""

    schema: Schema
    load: Callable[..., Splits]
    shape: Callable[..., tuple[int, ...]] | None = None


def load(name: str, *, seed: int = 0, root: str | Path | None = None, **args: Any) -> Splits:
    """Bind `args` to the named data set's schema (defaults filled in, mistakes reported as
    diagnostics) and load it. `root` is the folder relative `npz` paths are read from (the
    .d2 file's folder); the current directory when None.

    Example:
        >>> load("cluttered_digits", seed=1, n=600).input_shape
        (1, 32, 32)
    """
    spec, bound = _bind(name, args)
    try:
        if "root" in inspect.signature(spec.load).parameters:
            return spec.load(**bound, seed=seed, root=root)
        return spec.load(**bound, seed=seed)
    except MemoryError:  # the estimate (E909) let it through, but the machine had less to give
        raise data_error("E909", f"the data set `{name}` ran out of memory while it was built",
                         help="make it smaller, or lower D2GRAPH_MEMORY_LIMIT so that it is refused up front") from None


def example_shape(name: str, *, root: str | Path | None = None, **args: Any) -> tuple[int, ...] | None:
    """The per-example input shape `load(name, **args)` will give, found without building the
    data set (from the arguments, or from an .npz file's array headers), or None when the data
    set cannot say. Raises what `load` would for a malformed file or arguments that cannot fit
    in memory (E901–E904, E909).

    Example:
        >>> example_shape("digits", size=16, pad=8)
        (1, 32, 32)
    """
    spec, bound = _bind(name, args)
    if spec.shape is None:
        return None
    if "root" in inspect.signature(spec.shape).parameters:
        return tuple(spec.shape(**bound, root=root))
    return tuple(spec.shape(**bound))


def _bind(name: str, args: dict[str, Any]) -> tuple[DatasetSpec, dict[str, Any]]:
    spec = DATASETS.get(name)
    if spec is None:
        raise D2GraphError([Diagnostic(
            "E811", f"unknown data set `{name}`{did_you_mean(name, DATASETS.names())}",
            help="data sets: " + ", ".join(f"`{k}`" for k in DATASETS.names()))])
    # The checker hands over lists frozen into tuples; the schema's kinds expect lists.
    bound, diags = spec.schema.bind([], [(k, _thaw(v), None, None) for k, v in args.items()], what="data set")
    if any(d.is_error for d in diags):
        raise D2GraphError(diags)
    return spec, bound


def _thaw(v: Any) -> Any:
    return [_thaw(x) for x in v] if isinstance(v, (tuple, list)) else v


def data_error(code: str, message: str, help: str = "") -> D2GraphError:
    """A data diagnostic (E9xx) as an exception, for every module that reads a data set.

    Example:
        >>> raise data_error("E901", "data file `x.npz` does not exist")   # doctest: +SKIP
    """
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
    check_fractions(val, test)
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
            raise data_error("E907", f"the {name} split would be empty",
                             help="use more examples, or fractions that leave examples in every split")
    return out  # type: ignore[return-value]


def check_fractions(val: float, test: float) -> None:
    """E907 when the `val` and `test` fractions leave nothing to train on."""
    if val + test >= 1:
        raise data_error("E907", f"`val` + `test` = {val + test:g} leaves nothing to train on",
                         help="the two fractions must sum to less than 1, e.g. `val=0.15, test=0.15`")


def relabel(original: np.ndarray, known: int, classes: Any, binary: int, what: str
             ) -> tuple[np.ndarray, np.ndarray, int]:
    """(which examples to keep, their new labels, the number of classes) for a class subset
    (relabelled 0..k-1 in the order given) and/or a one-vs-rest task (1 = `binary`)."""
    subset = [int(c) for c in (classes or ())]
    for c in subset + ([binary] if binary != -1 else []):
        if not 0 <= c < known:
            raise data_error("E907", f"{what} has no class {c}",
                             help=f"its classes are 0 to {known - 1}; `binary=-1` turns the one-vs-rest task off")
    if len(set(subset)) != len(subset):
        raise data_error("E907", f"the class subset {subset} names a class twice", help="list each class once")
    if subset and binary != -1 and binary not in subset:
        raise data_error("E907", f"`binary={binary}` is not in the class subset {subset}",
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


def rows_of(x, index: torch.Tensor):
    """The inputs `x` of a split restricted to the rows `index`: a tensor's rows, or for a
    split read from disk as it is used (`image_data.ImageFiles`) its subset, nothing read."""
    return x.subset(index) if hasattr(x, "subset") else x[index]


def split_rng(seed: int, *stream: int) -> np.random.Generator:
    """The numpy Generator for the purpose `stream` of a data set built from `seed`
    (stream 0 cuts the splits)."""
    # One independent stream per purpose, so e.g. changing `n` never moves the split.
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *stream])


# --- image options: normalisation on every split, augmentation in training only ----------

IMAGE_OPTIONS = (
    Param("crop_padding", "nonneg", 0, doc="training only: pad each image by this many black pixels on every "
                                           "side and crop it back to its size at a random place; 0 = off"),
    Param("flip", "bool", False, doc="training only: mirror each image left-right with probability 1/2"),
    Param("mean", "numbers", (), doc="per-channel mean subtracted from every split's images; [] = none"),
    Param("std", "numbers", (), doc="per-channel standard deviation every split's images are divided by; [] = none"),
)


@dataclass(frozen=True)
class Augmentation:
    """Random changes to a training batch [N, C, H, W]: a crop at a random place of each
    image padded by `crop_padding` pixels of `fill` (one value per channel: black, as the
    normalisation maps it), then a left-right mirror of each image with probability 1/2
    when `flip`. Every number is drawn from the CPU `generator` handed in, whatever the
    batch's device, so the same generator seed gives the same batch on every machine.

    Example:
        >>> a = Augmentation(crop_padding=1, flip=True, fill=(0.0,))
        >>> a(torch.ones(2, 1, 3, 3), torch.Generator().manual_seed(0)).shape
        torch.Size([2, 1, 3, 3])
    """

    crop_padding: int = 0
    flip: bool = False
    fill: tuple[float, ...] = ()

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.crop_padding
        # Drawn in full even when an option is off, so turning one on never moves the other's draws.
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        mirror = (torch.rand(n, generator=generator) < 0.5) & self.flip
        if p:
            fill = torch.tensor(self.fill or (0.0,) * c, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
            padded = fill.expand(n, c, h + 2 * p, w + 2 * p).clone()
            padded[:, :, p:p + h, p:p + w] = x
        else:
            padded = x
        across = torch.arange(w)
        rows = dy[:, None] + torch.arange(h)
        cols = dx[:, None] + torch.where(mirror[:, None], w - 1 - across, across)
        # One gather picks each example's crop, mirrored or not.
        index = (torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :])
        return padded[tuple(i.to(x.device) for i in index)]


class AugmentedDataset(TensorDataset):
    """A training split whose batches `runs.Stage.batches` passes through `augmentation`
    (seeded per step from the run's seed). Code that reads `.tensors` directly (evaluation,
    the frozen-backbone trainers' caches) sees the images unchanged."""

    def __init__(self, *tensors: torch.Tensor, augmentation: Augmentation):
        super().__init__(*tensors)
        self.augmentation = augmentation


def image_splits(name: str, parts: dict[str, tuple[torch.Tensor, torch.Tensor]], classes: int,
                 meta: dict[str, dict[str, np.ndarray]], *, crop_padding: int = 0, flip: bool = False,
                 mean=(), std=()) -> Splits:
    """`Splits` of image tensors x [N, C, H, W] in [0, 1] (`parts[split] = (x, y)`), with
    `IMAGE_OPTIONS` applied: every split normalised in place by `mean`/`std`, and the
    training split wrapped in an `AugmentedDataset` when `crop_padding` or `flip` asks
    for it. E907 when `mean`/`std` do not give one number per channel, or a `std` is not
    positive.

    Example:
        >>> x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
        >>> s = image_splits("mine", {k: (x, y) for k in SPLITS}, 2, {}, flip=True, mean=[0.5] * 3)
        >>> type(s.train).__name__, type(s.test).__name__
        ('AugmentedDataset', 'TensorDataset')
    """
    channels = parts["train"][0].shape[1]
    for option, values in (("mean", mean), ("std", std)):
        if len(values) not in (0, channels):
            raise data_error("E907", f"`{option}` gives {len(values)} numbers for images of {channels} "
                                     f"channel{'s' if channels > 1 else ''}",
                             help=f"give one number per channel, e.g. `{option}=[{', '.join(['0.5'] * channels)}]`")
    if any(v <= 0 for v in std):
        raise data_error("E907", f"`std={list(std)}` holds a number that is not positive",
                         help="each channel's standard deviation must be above 0")
    shift = torch.tensor([float(v) for v in mean] or [0.0] * channels).view(1, channels, 1, 1)
    scale = torch.tensor([float(v) for v in std] or [1.0] * channels).view(1, channels, 1, 1)
    if mean or std:
        for x, _ in parts.values():
            if isinstance(x, torch.Tensor):
                x.sub_(shift).div_(scale)
            else:  # read from disk as it is used (image_data.ImageFiles): normalised as it is read
                x.normalise(shift, scale)
    datasets = {s: TensorDataset(*parts[s]) for s in SPLITS}
    if crop_padding or flip:
        fill = tuple(float(v) for v in (-shift / scale).flatten())  # black, normalised
        datasets["train"] = AugmentedDataset(*parts["train"], augmentation=Augmentation(crop_padding, flip, fill))
    return Splits(name, *(datasets[s] for s in SPLITS), classes, tuple(int(d) for d in parts["train"][0].shape[1:]),
                  meta)


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
            raise data_error("E901", "the built-in digits need scikit-learn, which is not installed",
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
    side = size + 2 * pad
    # The resized images, the padded copy and the splits' copies, in float32.
    require_memory(3 * 1797 * side * side * 4, f"digits(size={size}, pad={pad})", "lower `size` or `pad`")
    images, original = _bundled_digits()
    keep, y, k = relabel(original, 10, classes, binary, "`digits`")
    source = np.flatnonzero(keep)
    x = torch.from_numpy(images[source].copy()).unsqueeze(1)
    if size != 8:
        # antialias only matters when shrinking; it keeps thin strokes from vanishing.
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < 8)
        x = x.clamp_(0, 1)
    if pad:
        x = F.pad(x, (pad, pad, pad, pad))
    parts = split_indices(original[source], val, test, split_rng(seed, 0))
    train, val_, test_ = _datasets(x.contiguous(), torch.from_numpy(y), parts)
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
        raise data_error("E907", f"the digit's side must satisfy scale_min <= scale_max <= size; "
                         f"got {scale_min}, {scale_max} and {size}",
                         help=f"lower `scale_max` to at most {size} or raise `size`" if scale_max > size
                         else "`scale_min` is the smaller side: swap the two")
    check_fractions(val, test)
    # The peak while a split is drawn: its canvases, grid_sample's sampling grid (two floats
    # a pixel), its output and the masked copy, then the copies handed out; in float32.
    require_memory(6 * n * size * size * 4, f"cluttered_digits(n={n}, size={size})", "lower `n` or `size`")
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
    keep, y_all, k = relabel(original, 10, classes, binary, "`cluttered_digits`")
    pool_all = np.flatnonzero(keep)
    label_of = np.full(len(original), -1, np.int64)
    label_of[pool_all] = y_all
    # Split the *source digits* first: every canvas of a split (and its clutter) is drawn
    # from that split's digits only, so the test set measures generalisation to new writing.
    source_parts = split_indices(original[pool_all], val, test, split_rng(seed, 0))
    n_val, n_test = round(n * val), round(n * test)
    counts = (n - n_val - n_test, n_val, n_test)
    if min(counts) == 0:
        raise data_error("E907", f"n={n} canvases leave a split empty", help="raise `n` or the split fractions")
    src = torch.tensor(images).unsqueeze(1)
    parts, meta = [], {}
    for i, (name, part, count) in enumerate(zip(SPLITS, source_parts, counts)):
        x, m = _render(src, pool_all[part], count, size, clutter, scale_min, scale_max, easy, split_rng(seed, 1, i))
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


def check_label_range(labels: dict[str, np.ndarray], known: int, help: str) -> None:
    """E904 when an array of integer `labels` (keyed by how the message names it) holds a
    label outside [0, known)."""
    for name, v in labels.items():
        if len(v) and (v.min() < 0 or v.max() >= known):
            bad = int(v.min()) if v.min() < 0 else int(v.max())
            raise data_error("E904", f"{name} holds the label {bad}, outside [0, {known})", help=help)


def fractions_to_cut(given, val: float, test: float) -> dict[str, float]:
    """The validation and test fractions to cut from the training examples when the data
    `given` some splits of its own: only a split it lacks is cut; the others take 0."""
    return {s: 0.0 if s in given else (val if s == "val" else test) for s in ("val", "test")}


def npz(path: str, num_classes: int = 0, classes=(), binary: int = -1, val: float = 0.15,
        test: float = 0.15, *, seed: int = 0, root: str | Path | None = None) -> Splits:
    """A user's arrays: x [N, F], [N, H, W] (a channel axis is added) or [N, C, H, W]; y [N]
    integer labels in [0, num_classes). Splits given as `x_val`/`y_val`, `x_test`/`y_test`
    are used as they are; a missing one is cut from `x`/`y` with its fraction and the seed.
    A relative `path` is read from `root` (the .d2 file's folder) when given. The shapes
    and dtypes are checked from the archive's array headers before any array is read, and
    the memory the arrays will take against `memory_limit()` (E909); inputs that hold a NaN
    or an infinity (as float32, the type the network computes in) are refused (E908).

    Example:
        >>> npz("mine.npz", seed=0).describe()                 # doctest: +SKIP
        'mine.npz: 700 train / 150 val / 150 test, x [20], 3 classes'
    """
    file = data_path(path, root)
    given = _check_headers(_npz_headers(file, path), path)
    try:
        with np.load(file, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files if k in ("x", "y", *(f"{a}_{s}" for s in given
                                                                                  for a in "xy"))}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise data_error("E901", f"`{path}` is not a readable .npz archive ({type(e).__name__})",
                         help="save the arrays with `numpy.savez(path, x=..., y=...)`") from None
    suffixes = ["", *(f"_{s}" for s in given)]
    # One float32 copy of each input, the type the network computes in: a float64 beyond
    # float32's range turns infinite here, so the finiteness check looks at this copy.
    with np.errstate(over="ignore"):  # reported below, as E908
        xs = {s: np.ascontiguousarray(arrays.pop(f"x{s}"), dtype=np.float32) for s in suffixes}
    for s, x in xs.items():
        _check_finite(x, f"x{s}", path)
    labels = {s: _labels(arrays[f"y{s}"], f"y{s}", path) for s in suffixes}
    biggest = max(int(v.max()) for v in labels.values() if len(v)) if any(len(v) for v in labels.values()) else 0
    known = num_classes or biggest + 1
    check_label_range({f"`y{s}` in `{path}`": v for s, v in labels.items()}, known,
                      help="labels are class indices 0..classes-1"
                           + ("; raise `num_classes` or fix the labels" if num_classes else ""))

    def tensor(x):
        t = torch.from_numpy(x)
        return t.unsqueeze(1) if t.ndim == 3 else t  # [N, H, W] → one channel

    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    meta: dict[str, dict[str, np.ndarray]] = {}
    keep, y_main, k = relabel(labels[""], known, classes, binary, f"`{path}`")
    x_main = tensor(xs[""])[torch.from_numpy(np.flatnonzero(keep))]
    missing = [s for s in ("val", "test") if s not in given]
    if missing:
        cut = fractions_to_cut(given, val, test)
        parts = split_indices(labels[""][keep], cut["val"], cut["test"], split_rng(seed, 0), ("train", *missing))
    else:
        parts = (np.arange(len(y_main)), None, None)
    rows = np.flatnonzero(keep)
    for i, s in enumerate(SPLITS):
        if s in given:
            kk, ys_, _ = relabel(labels[f"_{s}"], known, classes, binary, f"`{path}`")
            out[s] = (tensor(xs[f"_{s}"])[torch.from_numpy(np.flatnonzero(kk))], torch.from_numpy(ys_))
            meta[s] = {"index": np.flatnonzero(kk)}
        else:
            p = torch.from_numpy(parts[i])
            out[s] = (x_main[p], torch.from_numpy(y_main)[p])
            meta[s] = {"index": rows[parts[i]]}
    return Splits(Path(path).name, *(TensorDataset(*out[s]) for s in SPLITS), k,
                  tuple(int(d) for d in out["train"][0].shape[1:]), meta)


def data_path(path: str, root: str | Path | None, kind: str = "file") -> Path:
    """`path` as written in a `data = ...` call, relative to `root` (the .d2 file's folder)
    unless absolute; E901 when there is no such `kind` there: "file", "folder" or
    "file or folder"."""
    file = Path(path)
    if root is not None and not file.is_absolute():
        file = Path(root) / file
    found = (file.is_file() and "file" in kind) or (file.is_dir() and "folder" in kind)
    if not found:
        what = "does not exist" if not file.exists() else f"is not a {kind}"
        raise data_error("E901", f"data {'file' if kind == 'file' else 'path'} `{path}` {what}",
                         help=f"looked for {file.resolve()}; write the path relative to the .d2 file")
    return file


NPY_MAGIC = b"\x93NUMPY"  # the first bytes of a .npy file (numpy.lib.format)


def _npz_headers(file: Path, path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each array's shape and dtype, read from its .npy header inside the archive: no array
    data is read (a small archive may unpack to gigabytes)."""
    try:
        with open(file, "rb") as f:
            start = f.read(len(NPY_MAGIC))
    except OSError as e:
        raise data_error("E901", f"`{path}` cannot be read ({e.strerror})", help="check the file's permissions") from None
    if start == NPY_MAGIC:
        raise data_error("E901", f"`{path}` is a .npy file, which holds one array; `npz` needs an .npz archive holding "
                                 "the inputs `x` and the labels `y`",
                         help="save both arrays in one archive: `numpy.savez(\"data.npz\", x=x, y=y)`")
    headers = {}
    try:
        with zipfile.ZipFile(file) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue  # numpy.savez writes every array as NAME.npy
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
                    else:  # 3.0 is only written for structured dtypes with non-Latin-1 field names
                        raise ValueError(f"array format {version}")
                headers[info.filename[:-4]] = (tuple(int(d) for d in shape), np.dtype(dtype))
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, RuntimeError) as e:
        raise data_error("E901", f"`{path}` is not a readable .npz archive ({type(e).__name__})",
                         help="save the arrays with `numpy.savez(path, x=..., y=...)`") from None
    return headers


def _check_headers(headers: dict[str, tuple[tuple[int, ...], np.dtype]], path: str) -> list[str]:
    """E902–E904 and E909 from the arrays' headers alone; returns the splits the file gives
    itself ("val", "test")."""
    for key in ("x", "y"):
        if key not in headers:
            raise data_error("E902", f"`{path}` has no array `{key}`",
                             help=f"it holds {_names(headers)}; save the inputs as `x` and the labels as `y`")
    given = []
    for split in ("val", "test"):
        pair = [f"x_{split}" in headers, f"y_{split}" in headers]
        if any(pair) and not all(pair):
            have, lack = (f"x_{split}", f"y_{split}") if pair[0] else (f"y_{split}", f"x_{split}")
            raise data_error("E902", f"`{path}` has `{have}` but no `{lack}`", help="give both arrays of a split, or neither")
        if all(pair):
            given.append(split)
    example = None
    needed = 0
    for suffix in ["", *(f"_{s}" for s in given)]:
        (x_shape, x_type), (y_shape, y_type) = headers[f"x{suffix}"], headers[f"y{suffix}"]
        if len(y_shape) != 1:
            raise data_error("E903", f"`y{suffix}` in `{path}` has shape {list(y_shape)}; labels must be one integer per "
                                 "example", help="save the labels as a 1-D array of class indices, not one-hot rows")
        _check_label_type(y_type, f"y{suffix}", path)
        if len(x_shape) not in (2, 3, 4) or x_type.kind not in "biuf":
            raise data_error("E903", f"`x{suffix}` in `{path}` has shape {list(x_shape)} and dtype {x_type}",
                             help="x must hold numbers shaped [N, F], [N, H, W] or [N, C, H, W]")
        if x_shape[0] != y_shape[0]:
            raise data_error("E903", f"`x{suffix}` in `{path}` holds {x_shape[0]} examples but `y{suffix}` holds "
                                 f"{y_shape[0]} labels", help="give one label per example, in the same order")
        if example is not None and x_shape[1:] != example:
            raise data_error("E903", f"`x{suffix}` in `{path}` holds examples of shape {list(x_shape[1:])}, `x` of "
                                 f"{list(example)}", help="every split must hold examples of one shape")
        example = x_shape[1:]
        # The arrays as stored, a float32 copy of x, and the split copies cut from it.
        needed += math.prod(x_shape) * (x_type.itemsize + 3 * 4) + math.prod(y_shape) * (y_type.itemsize + 2 * 8)
    require_memory(needed, f"`{path}`", "use fewer or smaller examples")
    return given


def _check_finite(x: np.ndarray, name: str, path: str) -> None:
    """E908 when an input holds a NaN or an infinity: one such value makes every loss it
    touches NaN, and the network trains to chance without a word."""
    nan = int(np.count_nonzero(np.isnan(x)))
    inf = int(np.count_nonzero(np.isinf(x)))
    if nan or inf:
        first = int(np.flatnonzero((~np.isfinite(x.reshape(len(x), -1))).any(axis=1))[0])
        what = " and ".join(f"{n:,} {kind}" for n, kind in ((nan, "NaN"), (inf, "infinite")) if n)
        raise data_error("E908", f"`{name}` in `{path}` holds {what} value{'s' if nan + inf > 1 else ''} "
                                 f"(as float32; the first in example {first})",
                         help="replace or drop them before saving, e.g. `x = numpy.nan_to_num(x)` or keep the rows "
                              "where `numpy.isfinite(x).all(axis=1)`; values beyond ±3.4e38 overflow float32")


def _check_label_type(dtype: np.dtype, name: str, path: str) -> None:
    if dtype.kind in "US":
        raise data_error("E904", f"`{name}` in `{path}` holds strings (dtype {dtype}); labels must be integer class "
                                 "indices 0..classes-1",
                         help="map each label to an integer before saving, e.g. "
                              "`names, y = numpy.unique(y, return_inverse=True)` (keep `names` to read the classes back)")
    if dtype.kind not in "iubf":
        raise data_error("E904", f"`{name}` in `{path}` holds labels that are not integers (dtype {dtype})",
                         help="labels are class indices 0..classes-1, saved as an integer array")


def _labels(y: np.ndarray, name: str, path: str) -> np.ndarray:
    _check_label_type(y.dtype, name, path)
    if y.dtype.kind in "iub":
        return y.astype(np.int64)
    if not np.all(np.isfinite(y)):
        bad = int(np.count_nonzero(~np.isfinite(y)))
        raise data_error("E908", f"`{name}` in `{path}` holds {bad:,} NaN or infinite label{'s' if bad > 1 else ''} "
                                 f"(the first in example {int(np.flatnonzero(~np.isfinite(y))[0])})",
                         help="every example needs a class index; drop the examples without one")
    if np.all(y == np.round(y)):
        return y.astype(np.int64)  # whole numbers saved as floats (e.g. from pandas) are fine
    raise data_error("E904", f"`{name}` in `{path}` holds labels that are not integers (dtype {y.dtype})",
                     help="labels are class indices; convert one-hot or probability rows with `argmax`")


def _names(arrays: dict) -> str:
    return ", ".join(f"`{k}`" for k in sorted(arrays)) or "no arrays"


# --- memory -------------------------------------------------------------------------------


def memory_limit() -> int:
    """The most bytes a data set may take while it is built: the environment variable
    `D2GRAPH_MEMORY_LIMIT` (bytes, e.g. `8e9`) when set, else half the machine's physical
    memory (8 GB where the platform does not say).

    Example:
        >>> memory_limit() > 0
        True
    """
    text = os.environ.get("D2GRAPH_MEMORY_LIMIT")
    if text:
        try:
            return int(float(text))
        except ValueError:
            raise data_error("E909", f"D2GRAPH_MEMORY_LIMIT={text!r} is not a number of bytes",
                             help="e.g. `D2GRAPH_MEMORY_LIMIT=8e9` for 8 GB, or unset it (half the physical memory)") \
                from None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (AttributeError, ValueError, OSError):  # not a POSIX system
        return 8 * 10**9


def require_memory(needed: int, what: str, help: str) -> None:
    """E909 when building `what` would take more than `memory_limit()` bytes (an estimate of
    the peak, from the shapes alone): refused before a byte is allocated, instead of a
    MemoryError (or the machine swapping) half-way.

    Example:
        >>> require_memory(10**18, "cluttered_digits(n=10**12)", "lower `n`")   # doctest: +SKIP
        Traceback (most recent call last):
        d2graph.diagnostics.D2GraphError: error[E909]: cluttered_digits(n=10**12) would need about 1 EB ...
    """
    limit = memory_limit()
    if needed > limit:
        source = "D2GRAPH_MEMORY_LIMIT" if os.environ.get("D2GRAPH_MEMORY_LIMIT") else "half the physical memory"
        raise data_error("E909", f"{what} would need about {_bytes(needed)} of memory to load, more than the limit of "
                                 f"{_bytes(limit)} ({source})",
                         help=f"{help}; the limit is the environment variable D2GRAPH_MEMORY_LIMIT (bytes) when set")


def _bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


# --- data against a graph -----------------------------------------------------------------


def check_compatible(splits: Splits, graph) -> None:
    """Raise a D2GraphError (E905) when the graph's input shape is not the data's example
    shape, or (E906) when an output of the graph has fewer scores than there are classes.

    Example:
        >>> check_compatible(digits(size=8), d2graph.load("examples/high_low.d2"))  # doctest: +SKIP
        Traceback (most recent call last):
        d2graph.diagnostics.D2GraphError: error[E905]: graph `high_low` takes input [1, 32, 32] but ...
    """
    check_input(graph, splits.input_shape, splits.name)
    node = graph.inputs[0]
    x = splits.train.tensors[0]
    data_tokens = isinstance(x, torch.Tensor) and not x.is_floating_point()
    if node.tokens != data_tokens:
        given, wanted = ("token ids", "real values") if data_tokens else ("real values", "token ids")
        raise D2GraphError([Diagnostic(
            "E905", f"graph `{graph.name}` takes {wanted} but {splits.name} gives {given}", node.span,
            f"`{node.name}` is declared with {wanted}",
            help=f"declare `input {node.name} tokens {_shape(splits.input_shape)}`" if data_tokens
            else f"declare `input {node.name} {_shape(splits.input_shape)}` (without `tokens`)")])
    for out in graph.outputs:
        shape = tuple(out.out_shape or ())
        width = shape[-1] if shape else 0
        if len(shape) != 1 or width < splits.classes:
            raise D2GraphError([Diagnostic(
                "E906", f"output `{out.name}` gives {_shape(shape)} but {splits.name} has "
                        f"{splits.classes} classes",
                out.span, f"needs a vector of at least {splits.classes} class scores",
                help=f"end the nodes feeding `{out.name}` with `fc({splits.classes})`")])


def check_input(graph, shape: tuple[int, ...], name: str) -> None:
    """E905 unless `graph` has one input, of the per-example `shape` that the data set `name`
    gives. Run before a data set is built (with `example_shape`) and after.

    Example:
        >>> check_input(d2graph.load("examples/high_low.d2"), (1, 32, 32), "digits")  # doctest: +SKIP
    """
    data_shape = tuple(shape)
    inputs = graph.inputs
    if len(inputs) != 1:
        raise data_error("E905", f"graph `{graph.name}` has {len(inputs)} inputs; a data set feeds exactly one",
                         help="declare one `input` node")
    node = inputs[0]
    want = tuple(node.out_shape or ())
    if want != data_shape:
        hint = ""
        if math.prod(want) == math.prod(data_shape):
            hint = "; the sizes agree, so a `flatten` or a different input declaration may be all it takes"
        elif name == "digits" and len(want) == 3 and want[1] == want[2]:
            hint = f"; `digits(size={want[1]})` draws the digits at that size"
        elif name == "cluttered_digits" and len(want) == 3 and want[1] == want[2]:
            hint = f"; `cluttered_digits(size={want[1]})` draws canvases of that size"
        raise D2GraphError([Diagnostic(
            "E905", f"graph `{graph.name}` takes input {_shape(want)} but {name} gives examples "
                    f"of shape {_shape(data_shape)}",
            node.span, f"`{node.name}` is declared {_shape(want)}",
            help=f"declare `input {node.name} {_shape(data_shape)}` or change the data set's arguments{hint}")])


def check_fits(graph, name: str, *, root: str | Path | None = None, **args: Any) -> None:
    """E905 when the data set `name(**args)` would give examples of another shape than the
    graph's input, found without building it (`example_shape`); nothing when it cannot say.
    `check_compatible` checks the built data set in full.

    Example:
        >>> check_fits(d2graph.load("examples/high_low.d2"), "digits", size=8)   # doctest: +SKIP
        Traceback (most recent call last):
        d2graph.diagnostics.D2GraphError: error[E905]: graph `high_low` takes input [1, 32, 32] but ...
    """
    shape = example_shape(name, root=root, **args)
    if shape is not None:
        shown = Path(str(args["path"])).name if name == "npz" else name  # as `npz` names its Splits
        check_input(graph, shape, shown)


# --- negated keywords: a synthetic token task -----------------------------------------------

# A sentence-classification task drawn deterministically, for token graphs (BERT-style
# exits) without downloading a corpus. Token ids: 0 padding, 1 `not`, then `keywords`
# keyword ids per class (class c owns ids 2 + c·keywords … 2 + (c+1)·keywords − 1), the rest
# filler words. A sentence is `length` tokens at most, at least half of that; its label is
# the class whose keywords occur most often *not* right after `not`. Two kinds:
#   easy  2–4 keywords of the label's class, no `not`, nothing else that counts;
#   hard  a (2–4) counted keywords of the label c and 0–1 negated ones; a− 1 counted
#         keywords of one other class o and enough negated ones that o's keywords occur
#         MORE often than c's: counting words without reading `not` picks o, the wrong
#         class. Deciding needs each keyword's left neighbour (attention with positions).
# Keywords and `not keyword` pairs sit at random places among the filler words.
NOT_ID = 1

NEGATED_KEYWORDS = Schema("negated_keywords", (
    Param("n", "posint", 8000, doc="sentences in all, shared out by the split fractions"),
    Param("length", "posint", 32, doc="tokens per example: the longest sentence; shorter ones are padded with id 0"),
    Param("vocab", "posint", 64, doc="token ids in [0, vocab): padding, `not`, the keywords, filler words"),
    Param("num_classes", "posint", 4, doc="classes"),
    Param("keywords", "posint", 3, doc="keyword ids per class"),
    Param("easy", "fraction", 0.4, doc="fraction of easy sentences: keywords of one class only, no `not`"),
    *FRACTIONS,
), doc="sentences labelled by their most frequent non-negated keyword class (token ids, padding 0)")


def negated_keywords(n: int = 8000, length: int = 32, vocab: int = 64, num_classes: int = 4, keywords: int = 3,
                     easy: float = 0.4, val: float = 0.15, test: float = 0.15, *, seed: int = 0) -> Splits:
    """Token-id sentences [N, length] (int64, 0 = padding at the end) and labels; see the
    recipe above. `meta[split]["easy"]` marks the easy sentences, `meta[split]["length"]`
    gives each sentence's real length.

    Example:
        >>> s = negated_keywords(n=400)
        >>> s.input_shape, s.classes, s.train.tensors[0].dtype
        ((32,), 4, torch.int64)
    """
    check_fractions(val, test)
    filler = vocab - 2 - num_classes * keywords
    if filler < 1 or num_classes < 2:
        raise data_error("E907", f"`negated_keywords` needs at least 2 classes and a vocabulary with room for "
                         f"padding, `not`, {num_classes}×{keywords} keywords and one filler word; vocab={vocab} "
                         f"has none left", help=f"raise `vocab` to at least {3 + num_classes * keywords}")
    if length // 2 < 15:  # a hard sentence has up to 4 + 2·1 + 3 + 2·3 = 15 tokens that count
        raise data_error("E907", f"`negated_keywords` needs `length` ≥ 30, so that its shortest sentences "
                         f"(half the length) hold a hard example's keywords; got {length}",
                         help="raise `length` to 30 or more")
    require_memory(3 * n * length * 8, f"negated_keywords(n={n}, length={length})", "lower `n` or `length`")
    parts, is_easy, lengths = _negated_cached(n, length, vocab, num_classes, keywords, float(easy), float(val),
                                              float(test), int(seed))
    # Copies, so a caller that edits a batch in place cannot corrupt the cache.
    datasets = [TensorDataset(x.clone(), y.clone()) for x, y in parts]
    return Splits("negated_keywords", *datasets, num_classes, (length,),
                  {s: {"easy": is_easy[s].copy(), "length": lengths[s].copy()} for s in SPLITS})


@functools.lru_cache(maxsize=8)
def _negated_cached(n, length, vocab, num_classes, keywords, easy, val, test, seed):
    filler = vocab - 2 - num_classes * keywords
    rng = split_rng(seed, 1)
    x = np.zeros((n, length), dtype=np.int64)
    y = rng.integers(0, num_classes, n)
    is_easy = rng.random(n) < easy
    lengths = rng.integers(length // 2, length + 1, n)

    def word(c: int) -> int:
        return 2 + c * keywords + int(rng.integers(keywords))

    for i in range(n):
        c = int(y[i])
        if is_easy[i]:
            units = [[word(c)] for _ in range(int(rng.integers(2, 5)))]
        else:
            a = int(rng.integers(2, 5))
            o = int((c + rng.integers(1, num_classes)) % num_classes)
            neg_c = int(rng.integers(0, 2))
            # o occurs a − 1 + neg_o times, c occurs a + neg_c times: one more for o
            neg_o = neg_c + 2
            units = ([[word(c)] for _ in range(a)] + [[NOT_ID, word(c)] for _ in range(neg_c)]
                     + [[word(o)] for _ in range(a - 1)] + [[NOT_ID, word(o)] for _ in range(neg_o)])
        order = rng.permutation(len(units))
        used = sum(len(u) for u in units)
        # The filler words fall into the len(units) + 1 gaps around the units.
        gaps = np.bincount(rng.integers(0, len(units) + 1, int(lengths[i]) - used), minlength=len(units) + 1)
        sentence: list[int] = []
        for k, j in enumerate(order):
            sentence += list(2 + num_classes * keywords + rng.integers(0, filler, gaps[k]))
            sentence += units[j]
        sentence += list(2 + num_classes * keywords + rng.integers(0, filler, gaps[-1]))
        x[i, :len(sentence)] = sentence
    parts = split_indices(y, val, test, split_rng(seed, 0))
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    return ([(x_t[torch.as_tensor(p)], y_t[torch.as_tensor(p)]) for p in parts],
            {s: is_easy[p] for s, p in zip(SPLITS, parts)}, {s: lengths[p] for s, p in zip(SPLITS, parts)})


def _negated_keywords_shape(length: int = 32, **_: Any) -> tuple[int, ...]:
    return (length,)


def _digits_shape(size: int = 8, pad: int = 0, **_: Any) -> tuple[int, ...]:
    return (1, size + 2 * pad, size + 2 * pad)


def _cluttered_shape(size: int = 32, **_: Any) -> tuple[int, ...]:
    return (1, size, size)


def _npz_shape(path: str, *, root: str | Path | None = None, **_: Any) -> tuple[int, ...]:
    headers = _npz_headers(data_path(path, root), path)
    _check_headers(headers, path)
    shape = headers["x"][0][1:]
    return (1, *shape) if len(shape) == 2 else shape  # [N, H, W] gets a channel axis


def _shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


DATASETS.register("digits", DatasetSpec(DIGITS, digits, _digits_shape))
DATASETS.register("cluttered_digits", DatasetSpec(CLUTTERED, cluttered_digits, _cluttered_shape))
DATASETS.register("npz", DatasetSpec(NPZ, npz, _npz_shape))
DATASETS.register("negated_keywords", DatasetSpec(NEGATED_KEYWORDS, negated_keywords, _negated_keywords_shape))

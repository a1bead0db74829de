"""Data sets read from a user's own image files: CIFAR-10/100 and class-per-folder images.

In:  `data = cifar10("cifar-10-python.tar.gz")`, `cifar100(path, labels=coarse)` or
     `image_folder("photos", size=64)` in a train block, plus a seed and the .d2 file's folder.
Out: `data.Splits` of x float32 [N, C, H, W] (in [0, 1], or normalised by `mean`/`std`) and
     y int64 [N], like every other data set; the training split augmented per batch when
     `crop_padding` or `flip` asks for it (`data.AugmentedDataset`, applied by `runs.Stage`).
Guarantees:
  - nothing is downloaded: the user points at files they already have;
  - nothing in a file is executed. CIFAR's batches are pickles; they are read by an
    unpickler that admits exactly the globals a plain numpy array needs (`_reconstruct`,
    `ndarray`, `dtype`, and `_codecs.encode` to latin-1 for files re-pickled by Python 3)
    and refuses any other before it is called (E901, naming the refused global);
  - images are read eagerly, after the memory they will take has been checked against
    `data.memory_limit()` (E909); or, with `image_folder(lazy=true)`, kept as files
    (`ImageFiles`, standing for a split's x tensor) and read a batch at a time when a
    stage, the evaluation or a trainer's cache indexes it, decoded by `workers` threads —
    the same tensors as the eager read, so the same run. An unreadable file is then found
    when its batch is read (E901 stops the run; its last checkpoint stays);
  - the same files, arguments and seed give identical splits; CIFAR's official test batch is
    the test split, and the validation split is cut from the training batches, stratified,
    with the seed (as `npz` cuts a split its file lacks);
  - a malformed file or folder is one `D2GraphError` naming the file: E901 (missing path,
    an unreadable archive, batch or image, a refused global, a folder without class folders
    or a class folder without images), E903 (a batch of the wrong shape), E904 (labels out
    of range, split folders naming different classes), E907 (arguments), E909 (memory).

Importing this module registers `cifar10`, `cifar100` and `image_folder` in
`schema.DATASETS`.

Example:
    >>> from d2graph import data
    >>> s = data.load("cifar10", path="cifar-10-python.tar.gz", seed=0)   # doctest: +SKIP
    >>> print(s.describe())                                               # doctest: +SKIP
    cifar-10: 45,000 train / 5,000 val / 10,000 test, x [3, 32, 32], 10 classes
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .data import (IMAGE_OPTIONS, SPLITS, SUBSET, DatasetSpec, Splits, check_fractions, check_label_range, data_error,
                   data_path, fractions_to_cut, image_splits, relabel, require_memory, rows_of, split_indices,
                   split_rng)
from .schema import DATASETS, Param, Schema

__all__ = ["ImageFiles", "cifar10", "cifar100", "image_folder", "read_array_pickle"]


# --- pickles that may hold arrays and nothing else ------------------------------------------


def _latin1(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Python 3 pickles bytes at protocols 0-2 as `_codecs.encode(text, "latin1")`; any other
    # codec is refused, so the one callable admitted can only turn text into bytes.
    if encoding not in ("latin1", "latin-1") or errors != "strict":
        raise _Refused(f"_codecs.encode(..., {encoding!r})")
    return text.encode("latin1")


# The function numpy pickles arrays with, taken from numpy itself: its module moved from
# numpy.core to numpy._core in numpy 2, and the official CIFAR files name the old one.
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1,
}


class _Refused(Exception):
    """A pickle asked for a global outside ALLOWED_GLOBALS (the global's dotted name)."""


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found


def read_array_pickle(data: bytes, what: str) -> Any:
    """The object pickled in `data`, read without running anything from it: dicts, lists,
    numbers, bytes and plain numpy arrays (no object arrays) only. Python 2 strings come
    back as bytes, as CIFAR's own loading code reads them. E901 naming `what` when the
    pickle is malformed or asks for anything else.

    Example:
        >>> read_array_pickle(pickle.dumps({b"data": np.zeros(3, np.uint8)}, 2), "a batch")[b"data"]
        array([0, 0, 0], dtype=uint8)
        >>> read_array_pickle(pickle.dumps(print), "a batch")          # doctest: +SKIP
        d2graph.diagnostics.D2GraphError: error[E901]: a batch asks to call `builtins.print` ...
    """
    try:
        value = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _Refused as e:
        raise data_error("E901", f"{what} asks to call `{e}`; it was refused and nothing in the file was run",
                         help="a CIFAR batch holds only arrays, lists and bytes; use an untouched copy of the "
                              "official python-version files") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            UnicodeDecodeError, OverflowError, RecursionError) as e:
        raise data_error("E901", f"{what} is not a readable pickle ({type(e).__name__}: {e})",
                         help="the file may be truncated or damaged; use an untouched copy") from None
    _refuse_objects(value, what)
    return value


def _refuse_objects(value: Any, what: str) -> None:
    # An object array's items are unpickled like the rest (so nothing ran), but nothing in
    # these formats needs one, and it would reach torch as Python objects.
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, np.ndarray) and v.dtype.hasobject:
            raise data_error("E901", f"{what} holds an array of Python objects",
                             help="the official CIFAR batches hold uint8 images and integer labels")
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)


# --- CIFAR ----------------------------------------------------------------------------------

CIFAR_SIDE = 32
CIFAR_PIXELS = 3 * CIFAR_SIDE * CIFAR_SIDE  # a row of `data`: 1024 red, 1024 green, 1024 blue


def _cifar_files(path: str, root: str | Path | None, folder_name: str, names: list[str]) -> dict[str, bytes]:
    """The bytes of each named batch file, from a .tar.gz archive or an extracted folder (the
    folder itself or the one holding `folder_name/`). E901 when the path, a file, or the
    archive is missing or unreadable."""
    where = data_path(path, root, "file or folder")
    found: dict[str, bytes] = {}
    if where.is_dir():
        folder = where / folder_name if (where / folder_name).is_dir() else where
        for name in names:
            file = folder / name
            if not file.is_file():
                raise data_error("E901", f"`{path}` has no `{name}`",
                                 help=f"point at the official archive or at the extracted `{folder_name}/` folder, "
                                      f"which holds {', '.join(f'`{n}`' for n in names)}")
            _require_batch_memory(file.stat().st_size, path)
            try:
                found[name] = file.read_bytes()
            except OSError as e:
                raise data_error("E901", f"`{file}` cannot be read ({e.strerror})",
                                 help="check the file's permissions") from None
        return found
    try:
        with tarfile.open(where, "r:*") as archive:
            members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
            for name in names:
                member = members.get(name)
                if member is None:
                    raise data_error("E901", f"the archive `{path}` has no `{name}`",
                                     help=f"use the official python-version archive ({folder_name}/ inside), "
                                          "not the binary or MATLAB one")
                _require_batch_memory(member.size, path)
                found[name] = archive.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise data_error("E901", f"`{path}` is not a readable .tar.gz archive ({type(e).__name__})",
                         help="point at the official python-version archive, or at the folder it extracts to") \
            from None
    return found


def _require_batch_memory(size: int, path: str) -> None:
    # A batch's bytes, its float32 copy, and the split copies cut from it (pickled uint8
    # images take one byte a pixel).
    require_memory(13 * size, f"a batch of `{path}`", "use a smaller data set")


def _cifar_batch(raw: bytes, name: str, path: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 3, 32, 32], labels int64 [N]) from one unpickled batch."""
    what = f"`{name}` in `{path}`"
    batch = read_array_pickle(raw, what)
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = ", ".join(f"`{k.decode('latin1') if isinstance(k, bytes) else k}`" for k in batch) \
            if isinstance(batch, dict) else f"a {type(batch).__name__}"
        raise data_error("E901", f"{what} is not a CIFAR batch: it holds {keys or 'nothing'}",
                         help=f"a batch is a dict with `data` and `{label_key.decode()}`; check that the "
                              "path is the python-version CIFAR data set the call names")
    images = batch[b"data"]
    labels = np.asarray(batch[label_key])
    if not isinstance(images, np.ndarray) or images.ndim != 2 or images.shape[1] != CIFAR_PIXELS \
            or images.dtype != np.uint8:
        shape = list(images.shape) if isinstance(images, np.ndarray) else type(images).__name__
        raise data_error("E903", f"`data` in {what} is {shape}, not uint8 rows of {CIFAR_PIXELS} pixels",
                         help="use an untouched copy of the official python-version files")
    if labels.ndim != 1 or len(labels) != len(images) or labels.dtype.kind not in "iu":
        raise data_error("E903", f"{what} holds {len(images)} images but its labels are {labels.shape} "
                                 f"of {labels.dtype}", help="use an untouched copy of the official files")
    return images.reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE), labels.astype(np.int64)


def _cifar(name: str, path: str, folder_name: str, train_names: list[str], test_name: str, label_key: bytes,
           known: int, classes, binary: int, val: float, seed: int, root, options: dict) -> Splits:
    check_fractions(val, 0.0)
    raw = _cifar_files(path, root, folder_name, [*train_names, test_name])
    parts = [_cifar_batch(raw.pop(n), n, path, label_key) for n in [*train_names, test_name]]
    x_train = np.concatenate([x for x, _ in parts[:-1]])
    y_train = np.concatenate([y for _, y in parts[:-1]])
    x_test, y_test = parts[-1]
    check_label_range({f"a training batch of `{path}`": y_train, f"`{test_name}` of `{path}`": y_test}, known,
                      help=f"{name} has {known} classes; use an untouched copy of the official files")
    keep, y_kept, k = relabel(y_train, known, classes, binary, f"`{name}`")
    rows = np.flatnonzero(keep)
    train_part, val_part, _ = split_indices(y_train[rows], val, 0.0, split_rng(seed, 0), ("train", "val"))
    keep_test, y_test_kept, _ = relabel(y_test, known, classes, binary, f"`{name}`")
    test_rows = np.flatnonzero(keep_test)

    def images(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).to(torch.float32).div_(255)

    out = {"train": (images(x_train[rows[train_part]]), torch.from_numpy(y_kept[train_part])),
           "val": (images(x_train[rows[val_part]]), torch.from_numpy(y_kept[val_part])),
           "test": (images(x_test[test_rows]), torch.from_numpy(y_test_kept))}
    # `index`: each example's place in the official training batches (in order) or test batch.
    meta = {"train": {"index": rows[train_part]}, "val": {"index": rows[val_part]}, "test": {"index": test_rows}}
    return image_splits(name, out, k, meta, **options)


CIFAR_VAL = Param("val", "fraction", 0.1, doc="fraction of the training images held out for validation "
                                              "(the official test batch is the test split)")

CIFAR10 = Schema("cifar10", (
    Param("path", "str", doc="the official `cifar-10-python.tar.gz`, or the `cifar-10-batches-py` folder it "
                             "extracts to"),
    *SUBSET, CIFAR_VAL, *IMAGE_OPTIONS,
), doc="CIFAR-10 from the user's copy of the official python-version files: 32×32 colour images, 10 classes")


def cifar10(path: str, classes=(), binary: int = -1, val: float = 0.1, crop_padding: int = 0, flip: bool = False,
            mean=(), std=(), *, seed: int = 0, root: str | Path | None = None) -> Splits:
    """CIFAR-10 as x [N, 3, 32, 32] in [0, 1] (before `mean`/`std`): `data_batch_1`..`5` give
    the training and validation splits, `test_batch` the test split.

    Example:
        >>> cifar10("cifar-10-python.tar.gz", flip=True, crop_padding=4).input_shape   # doctest: +SKIP
        (3, 32, 32)
    """
    return _cifar("cifar-10", path, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                  b"labels", 10, classes, binary, val, seed, root,
                  dict(crop_padding=crop_padding, flip=flip, mean=mean, std=std))


CIFAR100 = Schema("cifar100", (
    Param("path", "str", doc="the official `cifar-100-python.tar.gz`, or the `cifar-100-python` folder it "
                             "extracts to"),
    Param("labels", "choice", "fine", choices=("fine", "coarse"),
          doc="`fine`: the 100 classes; `coarse`: the 20 superclasses"),
    *SUBSET, CIFAR_VAL, *IMAGE_OPTIONS,
), doc="CIFAR-100 from the user's copy of the official python-version files: 32×32 colour images, "
       "100 classes (or 20 superclasses)")


def cifar100(path: str, labels: str = "fine", classes=(), binary: int = -1, val: float = 0.1, crop_padding: int = 0,
             flip: bool = False, mean=(), std=(), *, seed: int = 0, root: str | Path | None = None) -> Splits:
    """CIFAR-100 as x [N, 3, 32, 32] in [0, 1] (before `mean`/`std`), labelled by its 100
    fine classes or (`labels="coarse"`) its 20 superclasses: `train` gives the training and
    validation splits, `test` the test split.

    Example:
        >>> cifar100("cifar-100-python", labels="coarse").classes                    # doctest: +SKIP
        20
    """
    known = 100 if labels == "fine" else 20
    return _cifar("cifar-100", path, "cifar-100-python", ["train"], "test", f"{labels}_labels".encode(), known,
                  classes, binary, val, seed, root, dict(crop_padding=crop_padding, flip=flip, mean=mean, std=std))


def _cifar_shape(**_: Any) -> tuple[int, ...]:
    return (3, CIFAR_SIDE, CIFAR_SIDE)


# --- class-per-folder images ----------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

IMAGE_FOLDER = Schema("image_folder", (
    Param("path", "str", doc="a folder with one sub-folder of images per class (`path/CLASS/*.png`), or with "
                             "`train/`, `val/` and `test/` folders laid out so"),
    Param("size", "posint", 32, doc="side in pixels every image is resized to (bilinear, aspect ratio not kept)"),
    Param("channels", "posint", 3, doc="3: RGB; 1: grayscale"),
    *SUBSET,
    Param("val", "fraction", 0.15, doc="fraction of the images held out for validation, when there is no `val/`"),
    Param("test", "fraction", 0.15, doc="fraction of the images held out for the test, when there is no `test/`"),
    *IMAGE_OPTIONS,
    Param("lazy", "bool", False, doc="read each batch's images from disk when it is used, instead of all of them "
                                     "at the start: for image sets larger than memory"),
    Param("workers", "posint", 4, doc="threads that decode a batch's images when `lazy`"),
), doc="the user's images, one folder per class (ImageNet-style), read with Pillow")


def _class_files(folder: Path, path: str) -> dict[str, list[Path]]:
    """Each class name (a sub-folder, sorted) → its image files, sorted. E901 when there is no
    class folder, or a class folder holds no image."""
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    shown = f"`{path}`" if folder.name == Path(path).name else f"`{path}/{folder.name}`"
    if not classes:
        raise data_error("E901", f"{shown} holds no class folders",
                         help="put each class's images in a folder of its own: `PATH/cat/1.png`, `PATH/dog/2.jpg`; "
                              "the sorted folder names are the classes 0, 1, ...")
    files = {}
    for d in classes:
        images = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise data_error("E901", f"the class folder `{d.name}` in {shown} holds no images",
                             help=f"add its images ({', '.join(IMAGE_SUFFIXES)}) or remove the folder")
        files[d.name] = images
    return files


def _read_images(files: list[Path], size: int, channels: int, path: str, pool: ThreadPoolExecutor | None = None
                 ) -> torch.Tensor:
    """The images as float32 [N, channels, size, size] in [0, 1]; E901 naming a file that
    Pillow cannot read. With a `pool`, its threads decode the files (Pillow lets go of the
    GIL while it decodes and resizes)."""
    out = np.empty((len(files), size, size, channels), np.uint8)

    def read(i: int) -> None:
        out[i] = _read_image(files[i], size, channels, path)

    if pool is None or len(files) < 2:
        for i in range(len(files)):
            read(i)
    else:
        for _ in pool.map(read, range(len(files))):  # re-raises a reader's E901 here
            pass
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(torch.float32).div_(255).contiguous()


def _read_image(file: Path, size: int, channels: int, path: str) -> np.ndarray:
    try:
        with Image.open(file) as image:
            image = image.convert("RGB" if channels == 3 else "L")  # decodes the whole file: a truncated one fails here
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(image, np.uint8).reshape(size, size, channels)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise data_error("E901", f"the image `{file}` in `{path}` cannot be read ({type(e).__name__}: {e})",
                         help="replace or delete the file; Pillow must be able to open every image") from None


class ImageFiles:
    """A split's inputs kept as image files and read when indexed (`image_folder(lazy=true)`):
    in place of the x tensor [N, C, size, size] of a `TensorDataset`, it has `len`, `shape`,
    `size(dim)` and `dtype`, and indexing it by a slice or an index tensor reads those
    images into a float32 tensor, normalised by `shift`/`scale` ([1, C, 1, 1]), decoded by a
    pool of `workers` threads. `subset(index)` is another `ImageFiles` (nothing is read).

    Example:
        >>> x = ImageFiles(files, 32, 3, "photos")          # doctest: +SKIP
        >>> x[torch.tensor([4, 0])].shape                   # doctest: +SKIP
        torch.Size([2, 3, 32, 32])
    """

    dtype = torch.float32

    def __init__(self, files: list[Path], size: int, channels: int, path: str, workers: int = 4,
                 shift: torch.Tensor | None = None, scale: torch.Tensor | None = None):
        self.files, self.side, self.channels, self.path, self.workers = list(files), size, channels, path, workers
        self.shift, self.scale = shift, scale
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.files), self.channels, self.side, self.side))

    @property
    def ndim(self) -> int:
        return 4

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def normalise(self, shift: torch.Tensor, scale: torch.Tensor) -> None:
        """Have every read divided: (x − shift) / scale ([1, C, 1, 1] each)."""
        self.shift, self.scale = shift, scale

    def subset(self, index) -> ImageFiles:
        return ImageFiles([self.files[i] for i in _positions(index, len(self.files))], self.side, self.channels,
                          self.path, self.workers, self.shift, self.scale)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, int):
            return self[[index]][0]
        chosen = [self.files[i] for i in _positions(index, len(self.files))]
        if self._pool is None and self.workers > 1:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="d2graph-images")
        x = _read_images(chosen, self.side, self.channels, self.path, self._pool)
        if self.shift is not None:
            x.sub_(self.shift).div_(self.scale)
        return x

    def __getstate__(self) -> dict:  # a thread pool does not pickle; a copy makes its own
        return {**self.__dict__, "_pool": None}


def _positions(index, n: int) -> list[int]:
    if isinstance(index, slice):
        return list(range(n))[index]
    if isinstance(index, (torch.Tensor, np.ndarray)):
        return [int(i) for i in index.reshape(-1).tolist()]
    return [int(i) for i in index]


def image_folder(path: str, size: int = 32, channels: int = 3, classes=(), binary: int = -1, val: float = 0.15,
                 test: float = 0.15, crop_padding: int = 0, flip: bool = False, mean=(), std=(), lazy: bool = False,
                 workers: int = 4, *, seed: int = 0, root: str | Path | None = None) -> Splits:
    """A user's images as x [N, channels, size, size] in [0, 1] (before `mean`/`std`), read
    eagerly (see the module's guarantees), or with `lazy` kept as files and read a batch
    at a time (`ImageFiles`, `workers` decoding threads). The class folders' sorted names are the labels
    0, 1, .... When `path/train/` exists its class folders are the training split, and
    `path/val/` and `path/test/`, where present, the other two (they must name the same
    classes, E904); a split without a folder is cut from the training images with its
    fraction and the seed, as when there is no `train/` at all.

    Example:
        >>> image_folder("photos", size=64).describe()                     # doctest: +SKIP
        'photos: 700 train / 150 val / 150 test, x [3, 64, 64], 3 classes'
    """
    if channels not in (1, 3):
        raise data_error("E907", f"`channels={channels}`: images are read as 3 (RGB) or 1 (grayscale) channels",
                         help="use `channels=3` or `channels=1`")
    folder = data_path(path, root, "folder")
    given = [s for s in SPLITS if (folder / s).is_dir()] if (folder / "train").is_dir() else []
    found = {s: _class_files(folder / s, path) for s in given} if given else {"train": _class_files(folder, path)}
    names = sorted(found["train"])
    for s, files in found.items():
        if sorted(files) != names:
            extra, lack = sorted(set(files) - set(names)), sorted(set(names) - set(files))
            raise data_error("E904", f"`{path}/{s}` names other classes than `{path}/train`"
                                     + (f": it adds {', '.join(extra)}" if extra else "")
                                     + (f"{';' if extra else ':'} it lacks {', '.join(lack)}" if lack else ""),
                             help="every split folder needs one folder per class, with the same names")
    missing = [s for s in ("val", "test") if s not in found]
    cut = fractions_to_cut(found, val, test)
    check_fractions(cut["val"], cut["test"])
    count = sum(len(v) for files in found.values() for v in files.values())
    if not lazy:  # uint8 pixels, their float32 copy, and the split copies cut from it
        require_memory(count * channels * size * size * 9, f"image_folder(\"{path}\", size={size})",
                       "lower `size`, use fewer images, or read them as they are used: `lazy=true`")

    def read(files: list[Path]):
        return ImageFiles(files, size, channels, path, workers) if lazy else _read_images(files, size, channels, path)

    def listed(split: str) -> tuple[list[Path], np.ndarray]:
        files = found[split]
        return ([f for c in names for f in files[c]],
                np.concatenate([np.full(len(files[c]), i, np.int64) for i, c in enumerate(names)]))

    out, meta = {}, {}
    files, labels = listed("train")
    keep, y, k = relabel(labels, len(names), classes, binary, f"`{path}`")
    rows = np.flatnonzero(keep)
    parts = split_indices(labels[rows], cut["val"], cut["test"], split_rng(seed, 0), ("train", *missing))
    x = read([files[r] for r in rows])
    for i, s in enumerate(SPLITS):
        if s in found and s != "train":
            s_files, s_labels = listed(s)
            s_keep, s_y, _ = relabel(s_labels, len(names), classes, binary, f"`{path}`")
            chosen = [s_files[r] for r in np.flatnonzero(s_keep)]
            out[s] = (read(chosen), torch.from_numpy(s_y))
        else:
            p = torch.from_numpy(parts[i])
            out[s] = (rows_of(x, p), torch.from_numpy(y)[p])
            chosen = [files[rows[j]] for j in parts[i]]
        meta[s] = {"file": np.array([str(f.relative_to(folder)) for f in chosen], dtype=str)}
    return image_splits(Path(path).name, out, k, meta, crop_padding=crop_padding, flip=flip, mean=mean, std=std)


def _image_folder_shape(size: int = 32, channels: int = 3, **_: Any) -> tuple[int, ...]:
    return (channels, size, size)


DATASETS.register("cifar10", DatasetSpec(CIFAR10, cifar10, _cifar_shape))
DATASETS.register("cifar100", DatasetSpec(CIFAR100, cifar100, _cifar_shape))
DATASETS.register("image_folder", DatasetSpec(IMAGE_FOLDER, image_folder, _image_folder_shape))

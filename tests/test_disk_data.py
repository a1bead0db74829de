"""Data sets read from the user's files: CIFAR-10/100 in the official python-version format
(archive and folder), class-per-folder images, and the image options (normalisation on every
split, augmentation in training only). The files are built here, tiny, in the exact formats."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from d2graph import data
from d2graph.cli import main
from d2graph.diagnostics import D2GraphError
from d2graph.distributed import Group
from d2graph.image_data import ImageFiles, read_array_pickle
from d2graph.runs import Stage

PER_BATCH = 10  # images in each tiny CIFAR batch


class _Python2Pickler(pickle._Pickler):
    """Writes pickles as Python 2's cPickle wrote the official CIFAR files: strings as
    BINSTRING opcodes (read back as bytes with encoding="bytes"), numpy's array function
    under its numpy 1 name `numpy.core.multiarray._reconstruct`, protocol 2."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + len(obj).to_bytes(4, "little") + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes

    def save_global(self, obj, name=None):
        if obj is np.ndarray.__reduce__(np.zeros(0))[0]:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    dispatch[type(len)] = save_global


def _py2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def _write_cifar10(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(_py2_pickle({
            b"batch_label": f"training batch {i} of 5".encode(), b"labels": [j % 10 for j in range(PER_BATCH)],
            b"data": _images(PER_BATCH, i), b"filenames": [f"img_{i}_{j}.png".encode() for j in range(PER_BATCH)]}))
    (folder / "test_batch").write_bytes(_py2_pickle({
        b"batch_label": b"testing batch 1 of 1", b"labels": [j % 10 for j in range(PER_BATCH)],
        b"data": _images(PER_BATCH, 9), b"filenames": [f"test_{j}.png".encode() for j in range(PER_BATCH)]}))
    (folder / "batches.meta").write_bytes(_py2_pickle({
        b"num_cases_per_batch": PER_BATCH, b"num_vis": 3072,
        b"label_names": [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                               "horse", "ship", "truck")]}))
    return folder


def _write_cifar100(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name, n, seed in (("train", 200, 1), ("test", 100, 2)):
        fine = [j % 100 for j in range(n)]
        (folder / name).write_bytes(_py2_pickle({
            b"filenames": [f"{name}_{j}.png".encode() for j in range(n)], b"batch_label": f"{name} batch".encode(),
            b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine], b"data": _images(n, seed)}))
    (folder / "meta").write_bytes(_py2_pickle({b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                                               b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}))
    return folder


def _tar_gz(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    base = tmp_path_factory.mktemp("cifar")
    c10 = _write_cifar10(base / "cifar-10-batches-py")
    c100 = _write_cifar100(base / "cifar-100-python")
    return SimpleNamespace(base=base, c10=c10, c10_tar=_tar_gz(c10, base / "cifar-10-python.tar.gz"),
                           c100=c100, c100_tar=_tar_gz(c100, base / "cifar-100-python.tar.gz"))


def _refuse(call, fragment: str, code: str = "E901") -> str:
    with pytest.raises(D2GraphError) as e:
        call()
    text = str(e.value)
    assert f"[{code}]" in text and fragment in text, text
    return text


# --- CIFAR ----------------------------------------------------------------------------------


def test_the_python2_writer_makes_the_official_format():
    # The official batches name numpy 1's module and hold no `_codecs` global (Python 2 strings).
    raw = _py2_pickle({b"data": _images(2, 0), b"labels": [1, 2]})
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw and b"_codecs" not in raw
    assert raw[:2] == b"\x80\x02"


@pytest.mark.parametrize("which", ["c10", "c10_tar", "base"])
def test_cifar10_reads_the_archive_and_the_folder_alike(cifar, which):
    s = data.load("cifar10", path=str(getattr(cifar, which)), val=0.2, seed=3)
    assert (s.classes, s.input_shape) == (10, (3, 32, 32))
    assert (len(s.train), len(s.val), len(s.test)) == (40, 10, 10)
    x, y = s.test.tensors
    assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    # The official layout: 1024 red, then green, then blue values, row by row.
    first = _images(PER_BATCH, 9)[0]
    assert torch.equal(x[0], torch.from_numpy(first.reshape(3, 32, 32)).float() / 255)
    assert y.tolist() == [j % 10 for j in range(PER_BATCH)]
    assert sorted(s.val.tensors[1].tolist()) == list(range(10))  # stratified


def test_cifar10_splits_depend_on_the_seed_only(cifar):
    a = data.load("cifar10", path=str(cifar.c10), val=0.2, seed=1)
    b = data.load("cifar10", path=str(cifar.c10_tar), val=0.2, seed=1)
    c = data.load("cifar10", path=str(cifar.c10), val=0.2, seed=2)
    assert torch.equal(a.val.tensors[0], b.val.tensors[0])
    assert not torch.equal(a.val.tensors[0], c.val.tensors[0])


def test_cifar100_fine_and_coarse_labels(cifar):
    fine = data.load("cifar100", path=str(cifar.c100_tar), val=0.5)
    coarse = data.load("cifar100", path=str(cifar.c100), labels="coarse", val=0.5)
    assert (fine.classes, coarse.classes) == (100, 20)
    assert torch.equal(fine.test.tensors[1] // 5, coarse.test.tensors[1])
    assert (len(fine.train), len(fine.val), len(fine.test)) == (100, 100, 100)


def test_a_pickle_that_asks_to_run_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (__import__("os").system, (f"touch {marker}",))

    folder = _write_cifar10(tmp_path / "cifar-10-batches-py")
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    text = _refuse(lambda: data.load("cifar10", path=str(folder)), "data_batch_3")
    assert "`posix.system`" in text or "`os.system`" in text
    assert "refused" in text and not marker.exists()
    # Inside an archive too, and for any global other than the array's own.
    _tar_gz(folder, tmp_path / "evil.tar.gz")
    _refuse(lambda: data.load("cifar10", path=str(tmp_path / "evil.tar.gz")), "refused")
    assert not marker.exists()
    _refuse(lambda: read_array_pickle(pickle.dumps(print), "a batch"), "`builtins.print`")
    _refuse(lambda: read_array_pickle(pickle.dumps(np.array([1, "a"], dtype=object)), "b"), "Python objects")


def test_a_python3_repickled_batch_is_read(tmp_path):
    # Python 3 at protocol 2 writes bytes through `_codecs.encode(..., "latin1")`.
    arrays = {b"data": _images(3, 0), b"labels": [0, 1, 2]}
    back = read_array_pickle(pickle.dumps(arrays, protocol=2), "b")
    assert np.array_equal(back[b"data"], arrays[b"data"]) and back[b"labels"] == [0, 1, 2]


@pytest.mark.parametrize("damage,fragment,code", [
    (lambda f: (f / "data_batch_2").unlink(), "has no `data_batch_2`", "E901"),
    (lambda f: (f / "test_batch").write_bytes(b"\x80\x02}q"), "`test_batch` in", "E901"),
    (lambda f: (f / "data_batch_1").write_bytes(_py2_pickle([1, 2])), "is not a CIFAR batch", "E901"),
    (lambda f: (f / "data_batch_1").write_bytes(_py2_pickle({b"data": np.zeros((2, 5), np.uint8), b"labels": [0, 1]})),
     "not uint8 rows of 3072", "E903"),
    (lambda f: (f / "data_batch_1").write_bytes(_py2_pickle({b"data": _images(2, 0), b"labels": [0, 10]})),
     "the label 10, outside [0, 10)", "E904"),
])
def test_a_damaged_cifar_folder_is_named(tmp_path, damage, fragment, code):
    folder = _write_cifar10(tmp_path / "cifar-10-batches-py")
    damage(folder)
    _refuse(lambda: data.load("cifar10", path=str(folder)), fragment, code)


def test_a_missing_path_or_a_bad_archive_is_E901(tmp_path):
    _refuse(lambda: data.load("cifar10", path=str(tmp_path / "nope.tar.gz")), "does not exist")
    (tmp_path / "junk.tar.gz").write_bytes(b"not an archive")
    _refuse(lambda: data.load("cifar10", path=str(tmp_path / "junk.tar.gz")), "not a readable .tar.gz archive")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("x")
    _tar_gz(tmp_path / "other", tmp_path / "other.tar.gz")
    _refuse(lambda: data.load("cifar100", path=str(tmp_path / "other.tar.gz")), "has no `train`")


GRAPH = """graph g {{
  input x [{c}, {side}, {side}]
  output y
  node a = flatten, fc({k})
  x -> a -> y
  train {{
    data = {data}
    batch = 8
    stage backbone = supervised(epochs=1)
  }}
}}
"""


def _train(tmp_path, capsys, name: str, dataset: str, c: int = 3, side: int = 32, k: int = 10) -> tuple[int, str]:
    source = tmp_path / f"{name}.d2"
    source.write_text(GRAPH.format(c=c, side=side, k=k, data=dataset))
    code = main(["train", str(source), "--out", str(tmp_path / f"run_{name}"), "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_a_graph_trains_on_cifar10_and_cifar100(cifar, tmp_path, capsys):
    code, out = _train(tmp_path, capsys, "c10", f'cifar10(path="{cifar.c10_tar}", val=0.2, flip=true, '
                                                f'crop_padding=4, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])')
    assert code == 0, out
    code, out = _train(tmp_path, capsys, "c100", f'cifar100(path="{cifar.c100}", labels=coarse, val=0.5)', k=20)
    assert code == 0, out


def test_the_shipped_cifar10_example_trains_on_the_archive_format(cifar, tmp_path, capsys):
    """examples/cifar/eenet_resnet_cifar10.d2 as shipped, pointed at an archive in CIFAR-10's
    exact format (50 training images), for one epoch: the backbone, EENet's scores, a report."""
    example = Path(__file__).resolve().parent.parent / "examples" / "cifar" / "eenet_resnet_cifar10.d2"
    sets = [f"data.path={cifar.c10_tar}", "data.val=0.2", "batch=16", "stage.backbone.epochs=1",
            "stage.policy.epochs=5", "threads=1"]
    code = main(["train", str(example), *(a for o in sets for a in ("--set", o)), "--out", str(tmp_path / "run"),
                 "--quiet"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "eenet_resnet_cifar10: test accuracy" in out.out
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["test"]["n"] == PER_BATCH and report["policy"].startswith("eenet")


def test_data_mistakes_through_the_cli_are_messages_not_tracebacks(cifar, tmp_path, capsys):
    code, out = _train(tmp_path, capsys, "missing", 'cifar10(path="nowhere")')
    assert code != 0 and "E901" in out and "Traceback" not in out
    code, out = _train(tmp_path, capsys, "mean", f'cifar10(path="{cifar.c10}", val=0.2, mean=[0.5])')
    assert code != 0 and "E907" in out and "one number per channel" in out and "Traceback" not in out
    code, out = _train(tmp_path, capsys, "shape", f'cifar10(path="{cifar.c10}")', side=16)
    assert code != 0 and "E905" in out and "Traceback" not in out
    assert main(["check", str(tmp_path / "missing.d2")]) == 0  # `check` does not read data files
    capsys.readouterr()


# --- image folders --------------------------------------------------------------------------


def _write_folder(folder: Path, per_class: int = 4, classes=("cat", "dog"), size=(10, 7)) -> Path:
    rng = np.random.default_rng(len(str(folder)))
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / c / f"{i}.{['png', 'jpg', 'bmp'][i % 3]}")
    return folder


def test_image_folder_labels_classes_by_sorted_folder_names(tmp_path):
    folder = _write_folder(tmp_path / "pets", per_class=10, classes=("zebra", "ant", "cat"))
    s = data.load("image_folder", path=str(folder), size=8, val=0.2, test=0.2, seed=0)
    assert (s.classes, s.input_shape) == (3, (3, 8, 8))
    assert (len(s.train), len(s.val), len(s.test)) == (18, 6, 6)
    for split in ("train", "val", "test"):
        names = [f.split("/")[0] for f in s.meta[split]["file"]]
        assert [["ant", "cat", "zebra"].index(n) for n in names] == s[split].tensors[1].tolist()
    grey = data.load("image_folder", path=str(folder), size=5, channels=1, val=0.2, test=0.2)
    assert grey.input_shape == (1, 5, 5)


def test_image_folder_uses_train_val_test_folders(tmp_path):
    base = tmp_path / "set"
    _write_folder(base / "train", per_class=6)
    _write_folder(base / "val", per_class=2)
    s = data.load("image_folder", path=str(base), size=6, test=0.5, seed=0)
    # val/ is used as it is; there is no test/, so the test split is cut from train/.
    assert (len(s.train), len(s.val), len(s.test)) == (6, 4, 6)
    assert all(f.startswith("val/") for f in s.meta["val"]["file"])
    _write_folder(base / "test", per_class=1, classes=("cat", "dog", "eel"))
    _refuse(lambda: data.load("image_folder", path=str(base), size=6), "it adds eel", "E904")


def test_image_folder_mistakes_name_the_folder_or_file(tmp_path):
    _refuse(lambda: data.load("image_folder", path=str(tmp_path / "none")), "does not exist")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "a.png")
    _refuse(lambda: data.load("image_folder", path=str(tmp_path / "flat")), "holds no class folders")
    folder = _write_folder(tmp_path / "pets")
    (folder / "eel").mkdir()
    (folder / "eel" / "notes.txt").write_text("no images here")
    _refuse(lambda: data.load("image_folder", path=str(folder)), "class folder `eel`")
    (folder / "eel" / "broken.png").write_bytes(Image.open(folder / "cat" / "0.png").tobytes()[:50])
    _refuse(lambda: data.load("image_folder", path=str(folder)), "broken.png")
    good = io.BytesIO()
    Image.new("RGB", (30, 30), "red").save(good, format="PNG")
    (folder / "eel" / "broken.png").write_bytes(good.getvalue()[:len(good.getvalue()) // 2])  # truncated
    _refuse(lambda: data.load("image_folder", path=str(folder)), "broken.png")


def test_a_graph_trains_on_an_image_folder(tmp_path, capsys):
    folder = _write_folder(tmp_path / "pets", per_class=10)
    code, out = _train(tmp_path, capsys, "pets", f'image_folder(path="{folder.name}", size=8, flip=true)',
                       side=8, k=2)
    assert code == 0, out
    config = json.loads((tmp_path / "run_pets" / "config.json").read_text())
    assert config["data"]["args"]["flip"] is True


def test_lazy_image_folder_reads_the_same_tensors_and_trains_the_same_run(tmp_path, capsys):
    """`lazy=true` keeps the images as files and reads each batch when it is used: the same
    splits and values as the eager read (normalised, held out, a row at a time or by an index
    tensor), so the same training run; a file that breaks later stops the run with E901."""
    base = tmp_path / "set"
    _write_folder(base / "train", per_class=12)
    _write_folder(base / "test", per_class=3)
    args = dict(path=str(base), size=8, val=0.25, seed=1, mean=[0.5, 0.4, 0.3], std=[0.2, 0.3, 0.4])
    eager = data.load("image_folder", **args)
    lazy = data.load("image_folder", **args, lazy=True, workers=3)
    assert isinstance(lazy.train.tensors[0], ImageFiles) and not isinstance(eager.train.tensors[0], ImageFiles)
    assert lazy.describe() == eager.describe()
    eager, lazy = eager.hold_out(0.25, seed=2), lazy.hold_out(0.25, seed=2)
    for split in ("train", "val", "test", "holdout"):
        (xe, ye), (xl, yl) = getattr(eager, split).tensors, getattr(lazy, split).tensors
        assert torch.equal(ye, yl)
        assert torch.equal(xl[torch.arange(len(yl)).flip(0)], xe.flip(0)), split
        assert torch.equal(xl[1:3], xe[1:3]) and torch.equal(xl[0], xe[0])
    runs = {}
    for mode in ("false", "true"):
        source = tmp_path / f"lazy_{mode}.d2"
        source.write_text(GRAPH.format(c=3, side=8, k=2, data=f'image_folder(path="set", size=8, val=0.25, '
                                                                f'flip=true, crop_padding=1, lazy={mode})'))
        assert main(["train", str(source), "--out", str(tmp_path / f"run_{mode}"), "--quiet"]) == 0
        capsys.readouterr()
        runs[mode] = (tmp_path / f"run_{mode}" / "metrics.jsonl").read_text()
    assert runs["true"] == runs["false"]
    (base / "train" / "cat" / "1.jpg").write_bytes(b"not an image any more")
    assert main(["train", str(tmp_path / "lazy_true.d2"), "--out", str(tmp_path / "broken"), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "E901" in err and "1.jpg" in err and "Traceback" not in err


# --- normalisation and augmentation ---------------------------------------------------------


def _stage(seed: int) -> Stage:
    settings = {"seed": seed, "batch": 4}
    session = SimpleNamespace(config=SimpleNamespace(settings=settings), device=torch.device("cpu"), policy=None,
                              group=Group(), stopping=lambda: False, checkpoint_due=lambda step: False,
                              progress=lambda *a: None)
    return Stage(session, 0, "backbone", "supervised", None)


def test_augmentation_is_train_only_and_reproducible(cifar):
    s = data.load("cifar10", path=str(cifar.c10), val=0.2, crop_padding=4, flip=True)
    assert isinstance(s.train, data.AugmentedDataset)
    assert type(s.val) is type(s.test) is torch.utils.data.TensorDataset

    def epoch(seed, dataset):
        return [x for x, _ in _stage(seed).batches(dataset, 0)]

    a, b, c = epoch(0, s.train), epoch(0, s.train), epoch(1, s.train)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    plain = epoch(0, torch.utils.data.TensorDataset(*s.train.tensors))
    assert not all(torch.equal(p, q) for p, q in zip(a, plain))  # the batches were changed ...
    assert [p.shape for p in a] == [q.shape for q in plain]
    assert not all(torch.equal(p, q) for p, q in zip(a[:1], c[:1]))  # ... and the seed decides how
    # Holding examples out keeps the training split's augmentation, not the held-out one's.
    held = s.hold_out(0.25, seed=0)
    assert isinstance(held.train, data.AugmentedDataset) and not isinstance(held.holdout, data.AugmentedDataset)


def test_crop_and_flip_move_pixels_as_described():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    flipped = data.Augmentation(flip=True)(x, torch.Generator().manual_seed(0))
    mirrored = [bool(torch.equal(f, x[0].flip(-1))) for f in flipped]
    kept = [bool(torch.equal(f, x[0])) for f in flipped]
    assert all(m or k for m, k in zip(mirrored, kept)) and 16 < sum(mirrored) < 48
    cropped = data.Augmentation(crop_padding=1, fill=(-1.0,))(x, torch.Generator().manual_seed(0))
    for image in cropped:  # every crop is the image shifted by at most one pixel, padded with the fill
        inner = image[image != -1]
        assert len(inner) >= 9 and set(inner.tolist()) <= set(range(16))


def test_normalisation_applies_to_every_split(cifar):
    raw = data.load("cifar10", path=str(cifar.c10), val=0.2)
    norm = data.load("cifar10", path=str(cifar.c10), val=0.2, mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.1])
    shift = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    scale = torch.tensor([0.2, 0.2, 0.1]).view(1, 3, 1, 1)
    for split in ("train", "val", "test"):
        assert torch.allclose(norm[split].tensors[0], (raw[split].tensors[0] - shift) / scale, atol=1e-6)
    _refuse(lambda: data.load("cifar10", path=str(cifar.c10), val=0.2, std=[1, 0, 1]), "not positive", "E907")

"""Built-in data and user arrays (d2graph/data.py): deterministic, disjoint, stratified splits;
class subsets and one-vs-rest relabelling; resized / padded digits; cluttered canvases that
hold their digit and follow the documented easy/hard mix; npz round trips and every E9xx
error; the data-against-graph check; and a real-signal check that the digits are learnable
and the cluttered canvases are learnable but harder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import d2graph
from d2graph import data
from d2graph.diagnostics import D2GraphError
from d2graph.schema import DATASETS

from .conftest import ROOT

SMALL = dict(n=1000)  # cluttered sets in the tests: big enough for every check, quick to draw


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks (conftest.py)


def fresh_cluttered(**args) -> data.Splits:
    """Draw without the in-memory cache, so equality across calls is a real check."""
    data._cluttered_cached.cache_clear()
    return data.cluttered_digits(**args)


def arrays(s: data.Splits) -> list[np.ndarray]:
    return [t.numpy() for split in data.SPLITS for t in s[split].tensors]


def code_of(excinfo) -> str:
    return excinfo.value.diagnostics[0].code


# --- registry and checker -------------------------------------------------------------------


def test_registered_with_schemas():
    for name in ("digits", "cluttered_digits", "npz"):
        assert name in DATASETS and DATASETS.get(name).schema.name == name


GRAPH = """graph t {{
  input x [1, 32, 32]
  output y
  node a = flatten, fc(10)
  x -> a -> y
  train {{
    data = {data}
    stage s = supervised(epochs=1)
  }}
}}
"""


def test_checker_binds_data_arguments():
    _, diags = d2graph.check(GRAPH.format(data="cluttered_digits(size=32, classes=[0, 1], easy=0.5)"))
    assert not [d for d in diags if "data set" in d.message]
    _, diags = d2graph.check(GRAPH.format(data="cluttered_digits(size=32, clutterr=2)"))
    e804 = [d for d in diags if d.code == "E804"]
    assert e804 and "did you mean `clutter`" in e804[0].message


def test_load_binds_frozen_checker_arguments():
    # The checker freezes lists into tuples; load() must accept what it hands over.
    s = data.load("digits", seed=0, classes=(3, 5))
    assert s.classes == 2
    with pytest.raises(D2GraphError) as e:
        data.load("digitz")
    assert code_of(e) == "E811" and "did you mean `digits`" in str(e.value)
    with pytest.raises(D2GraphError) as e:
        data.load("digits", size="big")
    assert code_of(e) == "E805"


# --- digits ---------------------------------------------------------------------------------


def test_bundled_digits_are_scikit_learns():
    from sklearn.datasets import load_digits

    images, labels = data._bundled_digits()
    bunch = load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.float32
    assert np.array_equal(images * 16, bunch.images) and np.array_equal(labels, bunch.target)


def test_digits_deterministic_from_seed():
    a, b, c = data.digits(seed=0), data.digits(seed=0), data.digits(seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(arrays(a), arrays(b)))
    assert not np.array_equal(a.meta["test"]["source"], c.meta["test"]["source"])


def test_digits_splits_sizes_disjoint_stratified():
    s = data.digits()
    sizes = [len(s[p]) for p in data.SPLITS]
    assert sum(sizes) == 1797
    assert abs(sizes[1] - 0.15 * 1797) <= 10 and abs(sizes[2] - 0.15 * 1797) <= 10
    sources = [set(s.meta[p]["source"]) for p in data.SPLITS]
    assert not (sources[0] & sources[1] or sources[0] & sources[2] or sources[1] & sources[2])
    for p in data.SPLITS:
        x, y = s[p].tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 8, 8) and 0 <= x.min() and x.max() <= 1
        assert set(y.tolist()) == set(range(10))  # stratified: every class in every split
    t = data.digits(val=0.3, test=0.1)
    assert abs(len(t.val) - 0.3 * 1797) <= 10 and abs(len(t.test) - 0.1 * 1797) <= 10


def test_digits_class_subset_and_binary():
    from sklearn.datasets import load_digits

    original = load_digits().target
    s = data.digits(classes=[3, 7, 1])
    assert s.classes == 3
    for p in data.SPLITS:
        y = s[p].tensors[1].numpy()
        assert set(y) == {0, 1, 2}
        assert np.array_equal(np.array([3, 7, 1])[y], original[s.meta[p]["source"]])
    b = data.digits(binary=3)
    assert b.classes == 2 and sum(len(b[p]) for p in data.SPLITS) == 1797
    for p in data.SPLITS:
        assert np.array_equal(b[p].tensors[1].numpy(), (original[b.meta[p]["source"]] == 3).astype(int))
        assert b[p].tensors[1].sum() > 0  # the rare positive class reaches every split


def test_digits_resize_and_pad():
    s = data.digits(size=16)
    assert s.input_shape == (1, 16, 16) and s.train.tensors[0].shape[1:] == (1, 16, 16)
    p = data.digits(size=16, pad=8)
    x = p.train.tensors[0]
    assert p.input_shape == (1, 32, 32) and x.shape[1:] == (1, 32, 32)
    assert x[..., :8, :].abs().sum() == 0 and x[..., :, -8:].abs().sum() == 0
    assert torch.equal(x[..., 8:24, 8:24], s.train.tensors[0])
    small = data.digits(size=4)
    assert small.input_shape == (1, 4, 4) and 0 <= small.train.tensors[0].min() <= small.train.tensors[0].max() <= 1


def test_bad_arguments_are_E907():
    for call in (lambda: data.digits(classes=[11]), lambda: data.digits(classes=[1, 1]),
                 lambda: data.digits(binary=12), lambda: data.digits(classes=[1, 2], binary=3),
                 lambda: data.digits(val=0.5, test=0.5),
                 lambda: data.cluttered_digits(size=16, scale_max=20, **SMALL),
                 lambda: data.cluttered_digits(scale_min=20, scale_max=12, **SMALL)):
        with pytest.raises(D2GraphError) as e:
            call()
        assert code_of(e) == "E907"


# --- cluttered digits -----------------------------------------------------------------------


def test_cluttered_deterministic_from_seed():
    a, b = fresh_cluttered(seed=4, **SMALL), fresh_cluttered(seed=4, **SMALL)
    assert all(np.array_equal(x, y) for x, y in zip(arrays(a), arrays(b)))
    c = fresh_cluttered(seed=5, **SMALL)
    assert not np.array_equal(a.train.tensors[0].numpy(), c.train.tensors[0].numpy())


def test_cluttered_cache_hands_out_copies():
    a = data.cluttered_digits(**SMALL)
    a.train.tensors[0].zero_()
    assert data.cluttered_digits(**SMALL).train.tensors[0].sum() > 0


def test_cluttered_shapes_range_and_split_sizes():
    s = data.cluttered_digits(**SMALL)
    assert s.input_shape == (1, 32, 32) and s.classes == 10
    assert [len(s[p]) for p in data.SPLITS] == [700, 150, 150]
    for p in data.SPLITS:
        x, y = s[p].tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (1, 32, 32)
        assert x.min() >= 0 and x.max() <= 1
    assert data.cluttered_digits(size=24, n=200).input_shape == (1, 24, 24)


def test_cluttered_canvas_holds_its_digit():
    images, original = data._bundled_digits()
    s = data.cluttered_digits(**SMALL)
    for p in data.SPLITS:
        x, y = s[p].tensors
        m = s.meta[p]
        expected = images[m["source"]].sum(axis=(1, 2)) * (m["scale"] / 8.0) ** 2  # bilinear keeps mass
        inside = np.array([x[i, 0, t:t + k, l:l + k].sum().item()
                           for i, (t, l, k) in enumerate(zip(m["top"], m["left"], m["scale"]))])
        total = x.sum(dim=(1, 2, 3)).numpy()
        # Clutter only adds ink, so the digit's box holds at least the digit's own mass ...
        assert np.all(inside >= 0.85 * expected)
        # ... and a canvas without clutter holds the digit and nothing else.
        clean = m["fragments"] == 0
        assert clean.any() and np.allclose(total[clean], inside[clean], rtol=1e-4)
        assert np.all(np.abs(total[clean] / expected[clean] - 1) < 0.15)
        assert np.array_equal(y.numpy(), original[m["source"]])


def test_cluttered_source_digits_disjoint_across_splits():
    s = data.cluttered_digits(**SMALL)
    used = {}
    for p in data.SPLITS:
        m = s.meta[p]
        clutter = m["clutter_source"][m["clutter_source"] >= 0]
        assert not np.any(np.repeat(m["source"], m["clutter_source"].shape[1])[m["clutter_source"].ravel() >= 0]
                          == clutter)  # a fragment is never cut from the canvas's own digit
        used[p] = set(m["source"]) | set(clutter)
    assert not (used["train"] & used["test"] or used["train"] & used["val"] or used["val"] & used["test"])


def test_easy_fraction_as_documented():
    hard = data.cluttered_digits(easy=0.0, **SMALL)
    for p in data.SPLITS:
        f = hard.meta[p]["fragments"]
        assert f.min() >= 1 and f.max() <= 3 and not hard.meta[p]["easy"].any()
    mixed = data.cluttered_digits(easy=0.5, **SMALL)
    for p in data.SPLITS:
        m = mixed.meta[p]
        assert (m["fragments"] == 0).sum() == m["easy"].sum() == round(0.5 * len(mixed[p]))
        # easy: a digit from the upper half of the scale range, near the centre, no clutter
        assert np.all(m["scale"][m["easy"]] >= 16) and np.all(m["fragments"][m["easy"]] == 0)
        off_centre = np.abs(m["left"] - (32 - m["scale"]) // 2)[m["easy"]]
        assert off_centre.max() <= 2
    clean = data.cluttered_digits(easy=1.0, **SMALL)
    assert all((clean.meta[p]["fragments"] == 0).all() for p in data.SPLITS)
    none = data.cluttered_digits(clutter=0, easy=0.0, **SMALL)
    assert all((none.meta[p]["fragments"] == 0).all() for p in data.SPLITS)


def test_cluttered_class_subset_and_binary():
    s = data.cluttered_digits(classes=[2, 5], **SMALL)
    assert s.classes == 2 and set(s.train.tensors[1].tolist()) == {0, 1}
    images, original = data._bundled_digits()
    assert set(original[s.meta["train"]["source"]]) == {2, 5}
    b = data.cluttered_digits(binary=7, **SMALL)
    assert b.classes == 2
    assert np.array_equal(b.test.tensors[1].numpy(), (original[b.meta["test"]["source"]] == 7).astype(int))


# --- npz ------------------------------------------------------------------------------------


def test_npz_round_trip_and_split(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 5)).astype(np.float32), np.arange(200) % 4
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    s = data.load("npz", seed=2, path="mine.npz", root=tmp_path)
    assert s.classes == 4 and s.input_shape == (5,) and sum(len(s[p]) for p in data.SPLITS) == 200
    for p in data.SPLITS:
        xs, ys = s[p].tensors
        assert np.array_equal(xs.numpy(), x[s.meta[p]["index"]]) and np.array_equal(ys.numpy(), y[s.meta[p]["index"]])
    again = data.npz(str(tmp_path / "mine.npz"), seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(arrays(s), arrays(again)))


def test_npz_given_splits_and_images(tmp_path):
    rng = np.random.default_rng(0)
    img = lambda n: rng.random((n, 6, 6))  # noqa: E731 - [N, H, W] gets a channel axis
    np.savez(tmp_path / "s.npz", x=img(50), y=np.arange(50) % 3, x_val=img(7), y_val=np.arange(7) % 3,
             x_test=img(9), y_test=(np.arange(9) % 3).astype(np.float64))
    s = data.npz(str(tmp_path / "s.npz"))
    assert [len(s[p]) for p in data.SPLITS] == [50, 7, 9] and s.input_shape == (1, 6, 6)
    np.savez(tmp_path / "v.npz", x=img(60), y=np.arange(60) % 3, x_val=img(7), y_val=np.arange(7) % 3)
    v = data.npz(str(tmp_path / "v.npz"), test=0.2)
    assert len(v.val) == 7 and len(v.test) == 12 and len(v.train) == 48


@pytest.mark.parametrize("code, arrays_, args", [
    ("E901", None, {}),                                                     # missing file
    ("E901", "not a zip", {}),                                              # not an npz
    ("E902", dict(x=np.zeros((4, 2))), {}),                                 # no y
    ("E902", dict(x=np.zeros((4, 2)), y=np.zeros(4, int), x_val=np.zeros((2, 2))), {}),
    ("E903", dict(x=np.zeros((4, 2)), y=np.zeros(5, int)), {}),             # lengths differ
    ("E903", dict(x=np.zeros((4, 2)), y=np.zeros((4, 3), int)), {}),        # one-hot labels
    ("E903", dict(x=np.zeros((4, 2)), y=np.zeros(4, int), x_val=np.zeros((2, 3)), y_val=np.zeros(2, int)), {}),
    ("E904", dict(x=np.zeros((4, 2)), y=np.array([0, 1, 5, 1])), {"num_classes": 3}),
    ("E904", dict(x=np.zeros((4, 2)), y=np.array([0, -1, 1, 1])), {}),
    ("E904", dict(x=np.zeros((4, 2)), y=np.array([0.0, 0.5, 1.0, 1.0])), {}),
])
def test_npz_errors(tmp_path, code, arrays_, args):
    path = tmp_path / "bad.npz"
    if isinstance(arrays_, str):
        path.write_text(arrays_)
    elif arrays_ is not None:
        np.savez(path, **arrays_)
    with pytest.raises(D2GraphError) as e:
        data.npz(str(path), **args)
    assert code_of(e) == code
    assert "bad.npz" in str(e.value) and "help:" in str(e.value)


@pytest.mark.parametrize("arrays_, fragment", [
    (dict(x=np.array([[0.0, np.nan], [1, 2], [3, 4], [5, 6]]), y=np.arange(4) % 2), "`x` in `bad.npz` holds 1 NaN value"),
    (dict(x=np.array([[0.0, np.inf], [1, -np.inf], [3, 4], [5, 6]]), y=np.arange(4) % 2), "2 infinite values"),
    (dict(x=np.array([[0.0, 1e300], [1, 2], [3, 4], [5, 6]]), y=np.arange(4) % 2), "1 infinite value"),  # float32
    (dict(x=np.zeros((4, 2)), y=np.arange(4) % 2, x_val=np.full((2, 2), np.nan), y_val=np.arange(2)),
     "`x_val` in `bad.npz` holds 4 NaN values (as float32; the first in example 0)"),
    (dict(x=np.zeros((4, 2)), y=np.array([0.0, np.nan, 1.0, 1.0])), "`y` in `bad.npz` holds 1 NaN or infinite"),
])
def test_npz_non_finite_values_are_E908_naming_the_array_and_the_count(tmp_path, arrays_, fragment):
    np.savez(tmp_path / "bad.npz", **arrays_)
    with pytest.raises(D2GraphError) as e:
        data.npz("bad.npz", root=tmp_path)
    assert code_of(e) == "E908" and fragment in str(e.value), str(e.value)


def test_npz_string_labels_say_they_are_strings(tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 2)), y=np.array(list("abab")))
    with pytest.raises(D2GraphError) as e:
        data.npz(str(tmp_path / "bad.npz"))
    text = str(e.value)
    assert code_of(e) == "E904" and "holds strings (dtype <U1)" in text and "integer" in text
    assert "numpy.unique(y, return_inverse=True)" in text and "argmax" not in text and "one-hot" not in text


def test_a_npy_file_is_refused_clearly(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((4, 2)))
    with pytest.raises(D2GraphError) as e:
        data.npz(str(tmp_path / "bad.npy"))
    assert code_of(e) == "E901" and ".npy file, which holds one array" in str(e.value)
    assert "numpy.savez" in str(e.value)


def _archive_of_headers(path, **shapes):
    """An .npz whose arrays have headers but no data: only a reader that checks the headers
    before reading the arrays can get past it to the right diagnostic."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        for name, (shape, descr) in shapes.items():
            buf = io.BytesIO()
            np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
            z.writestr(f"{name}.npy", buf.getvalue())


def test_npz_shapes_and_size_are_checked_from_the_headers_before_loading(tmp_path, monkeypatch):
    from d2graph.runs import Config, load_data

    graph = d2graph.load(ROOT / "examples" / "high_low.d2")  # input [1, 32, 32]
    _archive_of_headers(tmp_path / "wide.npz", x=((1000, 100), "<f4"), y=((1000,), "<i8"))
    config = Config("high_low", {"name": "npz", "args": {"path": "wide.npz"}}, {"seed": 0}, [])
    with pytest.raises(D2GraphError) as e:
        load_data(config, graph, tmp_path)
    assert code_of(e) == "E905" and "wide.npz gives examples of shape [100]" in str(e.value)
    # 2 MB on disk can be 2 GB in memory: the headers say how much before a byte is read
    _archive_of_headers(tmp_path / "huge.npz", x=((2 * 10**6, 1, 32, 32), "<f4"), y=((2 * 10**6,), "<i8"))
    monkeypatch.setenv("D2GRAPH_MEMORY_LIMIT", "1e9")
    for attempt in (lambda: data.npz(str(tmp_path / "huge.npz")),
                    lambda: load_data(Config("high_low", {"name": "npz", "args": {"path": "huge.npz"}}, {"seed": 0},
                                             []), graph, tmp_path)):
        with pytest.raises(D2GraphError) as e:
            attempt()
        assert code_of(e) == "E909", str(e.value)
        assert "would need about 32.8 GB of memory to load, more than the limit of 1.0 GB (D2GRAPH_MEMORY_LIMIT)" \
            in str(e.value)


@pytest.mark.parametrize("name, args, fragment", [
    ("cluttered_digits", {"n": 10**8}, "cluttered_digits(n=100000000, size=32) would need about 2.5 TB"),
    ("digits", {"size": 100000}, "digits(size=100000, pad=0) would need about"),
])
def test_generated_data_too_large_for_memory_is_E909(name, args, fragment):
    with pytest.raises(D2GraphError) as e:
        data.load(name, **args)
    assert code_of(e) == "E909" and fragment in str(e.value) and "half the physical memory" in str(e.value)
    assert "D2GRAPH_MEMORY_LIMIT" in str(e.value)


# --- data against a graph -------------------------------------------------------------------


def test_check_compatible_with_high_low():
    graph = d2graph.load(ROOT / "examples" / "high_low.d2")
    data.check_compatible(data.cluttered_digits(size=32, **SMALL), graph)
    data.check_compatible(data.digits(size=16, pad=8), graph)
    data.check_compatible(data.digits(size=32, binary=3), graph)  # 2 classes on a 10-wide output
    with pytest.raises(D2GraphError) as e:
        data.check_compatible(data.digits(size=8), graph)
    assert code_of(e) == "E905"
    assert "[1, 32, 32]" in str(e.value) and "[1, 8, 8]" in str(e.value) and "digits(size=32)" in str(e.value)


def test_check_compatible_output_too_narrow():
    graph, diags = d2graph.check("graph narrow {\n  input x [1, 8, 8]\n  output y\n"
                                 "  node a = flatten, fc(2)\n  x -> a -> y\n}\n")
    assert graph is not None, diags
    data.check_compatible(data.digits(binary=0), graph)
    with pytest.raises(D2GraphError) as e:
        data.check_compatible(data.digits(), graph)
    assert code_of(e) == "E906" and "10 classes" in str(e.value)


# --- real signal ----------------------------------------------------------------------------


def softmax_regression(s: data.Splits, steps: int = 300) -> float:
    torch.manual_seed(0)
    x, y = s.train.tensors
    model = torch.nn.Linear(x[0].numel(), s.classes)
    opt = torch.optim.Adam(model.parameters(), 0.05)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x.flatten(1)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt, yt = s.test.tensors
    with torch.no_grad():
        return (model(xt.flatten(1)).argmax(1) == yt).float().mean().item()


def small_cnn(s: data.Splits, epochs: int = 4) -> float:
    """Two convolutions and a global max-pool: the same model fits 8×8 digits and 32×32 canvases."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 5, stride=2, padding=2), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, s.classes))
    opt = torch.optim.Adam(net.parameters(), 5e-3)
    x, y = s.train.tensors
    order = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=order)
        for i in range(0, len(x), 32):
            b = perm[i:i + 32]
            loss = torch.nn.functional.cross_entropy(net(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    xt, yt = s.test.tensors
    with torch.no_grad():
        return (net(xt).argmax(1) == yt).float().mean().item()


def test_digits_are_learnable():
    assert softmax_regression(data.digits()) > 0.9


def test_cluttered_digits_are_learnable_but_harder():
    plain = small_cnn(data.digits())
    cluttered = small_cnn(data.cluttered_digits(n=2000))
    assert plain > 0.9
    assert 0.3 < cluttered < plain - 0.15, (cluttered, plain)

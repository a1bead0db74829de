"""Plots: the files are written, whole, and the same rows give the same bytes."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from d2graph.plots import tradeoff_plot, training_plot  # noqa: E402

POINTS = (
    [{"method": "learned", "cost_fraction": c, "accuracy": a, "budget": c}
     for c, a in [(0.6, 0.9), (0.1, 0.6), (0.3, 0.8)]]
    + [{"method": "threshold", "cost_fraction": c, "accuracy": a, "budget": c} for c, a in [(0.3, 0.75), (0.5, 0.85)]]
    + [{"method": "static", "cost_fraction": c, "accuracy": a, "budget": None, "path": p}
       for c, a, p in [(0.05, 0.5, "Q1=2"), (1.0, 0.92, "Q1=1")]]
)

ROWS = ([{"stage": "backbone", "trainer": "supervised", "epoch": e, "train_loss": 2 / e, "val_score": 0.5 + e / 20}
         for e in (1, 2, 3)]
        + [{"stage": "policy", "trainer": "qlearning", "epoch": e, "train_loss": None, "val_score": 0.7 - e / 10,
            "val_accuracy": 0.7, "val_cost_fraction": 1 - e / 10} for e in (1, 2)]
        + [{"stage": "calibrate", "trainer": "threshold", "tau": 0.5, "val_accuracy": 0.66, "val_cost_fraction": 0.4}]
        + [{"stage": "backbone", "trainer": "supervised", "epoch": 4}])  # no numbers: left out


def test_tradeoff_plot_writes_png_and_svg(tmp_path):
    paths = tradeoff_plot(POINTS, tmp_path / "sub" / "tradeoff", title="cascade: accuracy vs cost")
    assert paths == [tmp_path / "sub" / "tradeoff.png", tmp_path / "sub" / "tradeoff.svg"]
    png, svg = (p.read_bytes() for p in paths)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    assert svg.lstrip().startswith(b"<?xml") and b"</svg>" in svg
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["tradeoff.png", "tradeoff.svg"]  # no temp files


def test_tradeoff_plot_is_deterministic(tmp_path):
    a = tradeoff_plot(POINTS, tmp_path / "a", title="t")
    b = tradeoff_plot(list(reversed(POINTS)), tmp_path / "b", title="t")  # order of points does not matter
    for x, y in zip(a, b):
        assert x.read_bytes() == y.read_bytes(), x.name
    assert b"Date" not in a[1].read_bytes()
    c = tradeoff_plot(POINTS[:-1], tmp_path / "c", title="t")
    assert c[1].read_bytes() != a[1].read_bytes()  # and the comparison above can fail


def test_tradeoff_plot_of_another_metric(tmp_path):
    points = [{**p, "f1": p["accuracy"] / 2} for p in POINTS]
    paths = tradeoff_plot(points, tmp_path / "f1", title="t", metric="f1")
    assert all(p.stat().st_size > 0 for p in paths)


def test_training_plot(tmp_path):
    paths = training_plot(ROWS, tmp_path / "training")
    assert [p.name for p in paths] == ["training.png", "training.svg"]
    assert paths[0].read_bytes().startswith(b"\x89PNG")
    again = training_plot(ROWS, tmp_path / "again")
    assert again[1].read_bytes() == paths[1].read_bytes()
    assert training_plot([{"stage": "s", "epoch": 1}], tmp_path / "none") == []
    assert not (tmp_path / "none.png").exists()
    fewer = training_plot(ROWS[:-2], tmp_path / "fewer")  # without the calibrated stage: another drawing
    assert fewer[1].read_bytes() != paths[1].read_bytes()

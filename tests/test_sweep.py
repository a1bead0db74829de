"""`d2graph sweep` over several seeds, method specs, and the area under the accuracy–cost
curve: per-seed rows, mean ± std that equal numpy's, a hand-computed AUC, clear errors."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest

import d2graph
from d2graph.cli import main
from d2graph.diagnostics import D2GraphError
from d2graph.sweep import Sweep, area_under_curve, aucs, parse_method, sweep

from .conftest import ROOT

EARLY = ROOT / "examples" / "early_exit.d2"
TINY = ["data.n=300", "batch=32", "stage.backbone.epochs=1"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "two"
    result = sweep(d2graph.load(EARLY), EARLY, budgets=[0.3, 0.6], methods=["threshold", "uniform"],
                   overrides=TINY, seeds=2, out=out, echo=None)
    return result, out


def test_two_seeds_give_per_seed_rows_and_runs(two_seeds):
    result, out = two_seeds
    assert result.seeds == [0, 1]
    rows = list(csv.DictReader((out / "curve.csv").open()))
    for seed in ("0", "1"):
        mine = [(r["method"], r["budget"]) for r in rows if r["seed"] == seed]
        assert mine.count(("threshold", "0.3")) == 1 and mine.count(("uniform", "0.6")) == 1
        assert sum(m == "static" for m, _ in mine) == 3
        assert (out / f"seed-{seed}" / "backbone.pt").is_file()
        assert json.loads((out / f"seed-{seed}" / "config.json").read_text())["settings"]["seed"] == int(seed)
    assert (out / "tradeoff.png").stat().st_size > 1000 and (out / "tradeoff.svg").is_file()


def test_static_paths_are_named_by_their_exit(two_seeds):
    result, _ = two_seeds
    labels = sorted({r["policy"] for r in result.rows if r["method"] == "static"})
    assert labels == ["static path exit at B3 (Q1=2, Q2=2)", "static path exit at H1 (Q1=1)",
                      "static path exit at H2 (Q1=2, Q2=1)"]


def test_the_summary_is_numpys_mean_and_std_over_the_seeds(two_seeds):
    result, out = two_seeds
    summary = list(csv.DictReader((out / "curve_summary.csv").open()))
    assert len(summary) == 2 * 2 + 3  # threshold and uniform at two budgets, three static paths
    for s in summary:
        group = [r for r in result.rows if r["method"] == s["method"]
                 and (r["budget"] is None and not s["budget"] or s["budget"] and r["budget"] == float(s["budget"]))
                 and (r["method"] != "static" or r["policy"] == s["policy"])]
        assert int(s["n"]) == len(group) == 2
        for key in ("accuracy", "cost_fraction"):
            values = np.array([r[key] for r in group])
            assert float(s[f"{key}_mean"]) == pytest.approx(values.mean(), abs=1e-12)
            assert float(s[f"{key}_std"]) == pytest.approx(values.std(ddof=1), abs=1e-12)
    auc = {r["method"]: r for r in csv.DictReader((out / "auc.csv").open())}
    assert set(auc) == {"threshold", "uniform"}
    per_seed = [float(v) for v in auc["threshold"]["per_seed"].split(";")]
    assert float(auc["threshold"]["auc_mean"]) == pytest.approx(np.mean(per_seed), abs=1e-6)
    table = result.table()
    assert "± " in table and "| n |" in table and "area under" in table


def test_area_under_a_hand_made_curve():
    # From the cheapest static path (0.1) to 1.0: flat at 0.5 up to 0.2 (0.05), a trapezoid
    # from (0.2, 0.5) to (0.6, 0.7) (0.24), flat at 0.7 to 1.0 (0.28): 0.57 over a width of 0.9.
    points = [(0.6, 0.7), (0.2, 0.5)]
    assert area_under_curve(points, 0.1, 1.0) == pytest.approx(0.57 / 0.9)
    assert area_under_curve([(0.5, 0.8)], 0.1) == pytest.approx(0.8)  # one point: flat
    assert area_under_curve([(0.05, 0.4), (0.55, 0.9)], 0.3, 1.0) == pytest.approx(
        (0.25 * (0.65 + 0.9) / 2 + 0.45 * 0.9) / 0.7)  # clipped at the left end
    assert area_under_curve([], 0.1) is None and area_under_curve([(0.5, 0.5)], 1.0) is None
    rows = [{"seed": s, "method": m, "cost_fraction": c, "accuracy": a}
            for s, m, c, a in [(0, "static", 0.1, 0.3), (0, "static", 1.0, 0.9), (0, "t", 0.2, 0.5), (0, "t", 0.6, 0.7),
                               (1, "static", 0.1, 0.3), (1, "static", 1.0, 0.9), (1, "t", 0.5, 0.8)]]
    (t,) = aucs(rows)
    assert t["method"] == "t" and t["n"] == 2 and t["cost_from"] == 0.1
    assert t["auc_mean"] == pytest.approx((0.57 / 0.9 + 0.8) / 2)
    assert t["auc_std"] == pytest.approx(np.std([0.57 / 0.9, 0.8], ddof=1))


def test_method_specs_parse_and_check():
    spec = parse_method("threshold:measure=entropy")
    assert (spec.label, spec.trainer, spec.params, spec.grid) == ("threshold:measure=entropy", "threshold",
                                                                  {"measure": "entropy"}, None)
    grid = parse_method("qlearning:epochs=1:lambda=0.3/0.5")
    assert grid.label == "qlearning:epochs=1" and grid.params == {"epochs": 1} and grid.grid == ("lambda", (0.3, 0.5))
    assert parse_method("static").label == "best-static"
    for text, fragment in [("thresold", "did you mean `threshold`"), ("supervised", "not a policy trainer"),
                           ("threshold:measur=entropy", "did you mean `measure`"),
                           ("threshold:measure", "not `KEY=VALUE`"), ("threshold:measure=entropi", "measure"),
                           ("threshold:budget=0.3:budget=0.5", "given twice")]:
        with pytest.raises(D2GraphError) as e:
            parse_method(text)
        assert e.value.diagnostics[0].code == "E920" and fragment in e.value.diagnostics[0].message, text


def test_seeds_below_one_are_a_usage_error(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:  # argparse's usage error: exit 2, no traceback
        main(["sweep", str(EARLY), "--seeds", "0"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "--seeds" in err and "positive integer" in err and "Traceback" not in err
    with pytest.raises(D2GraphError, match="--seeds"):
        sweep(d2graph.load(EARLY), EARLY, budgets=[0.5], seeds=0, out=tmp_path / "x", echo=None)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()  # nothing trained


@pytest.mark.parametrize("spec, fragment", [("threshold:measure=entropi", "measure"),
                                            ("thresold", "did you mean `threshold`")])
def test_a_bad_method_spec_exits_2_with_a_message(spec, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(EARLY), "--methods", spec]) == 2
    err = capsys.readouterr().err
    assert "[E920]" in err and fragment in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # checked before any training


@pytest.fixture(scope="module")
def one_seed(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "one"
    sweep(d2graph.load(EARLY), EARLY, budgets=[0.5], methods=["uniform"], overrides=TINY, out=out, echo=None)
    return out


def _contents(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("which", ["one seed", "two seeds", "a seed's folder"])
def test_a_sweep_folder_is_never_taken_for_a_run(which, one_seed, two_seeds, tmp_path, capsys):
    """`train --resume` (or `--out`) of a sweep folder used to rewrite it into a run, and
    `render --stats` advised exactly that; both now say what the folder is and what works."""
    folder = {"one seed": one_seed, "two seeds": two_seeds[1], "a seed's folder": two_seeds[1] / "seed-1"}[which]
    assert json.loads((folder / "sweep.json").read_text())["graph"] == "early_exit"
    before = _contents(folder)
    assert main(["train", "--resume", str(folder), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "[E922]" in err and "`d2graph sweep` made it" in err and "would rewrite it into a run" in err
    assert main(["train", str(EARLY), "--set", "data.n=300", "--out", str(folder), "--quiet"]) == 2
    assert "[E922]" in capsys.readouterr().err
    assert main(["render", str(EARLY), "-o", str(tmp_path / "g.dot"), "--stats", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "accuracy–cost curves of many policies" in err and "--resume" not in err and "Traceback" not in err
    assert "--stats takes the folder of a finished `d2graph train` run" in err
    assert _contents(folder) == before  # untouched


def test_a_finished_sweep_is_not_overwritten(one_seed, capsys):
    argv = ["sweep", str(EARLY), *(f"--set={o}" for o in TINY), "--budgets", "0.5", "--methods", "uniform",
            "--out", str(one_seed), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already holds a sweep" in err and "--resume" not in err


def test_sweep_tables_give_percentages_as_train_does(two_seeds, one_seed):
    """Accuracy and cost in percent, as `d2graph train` prints them; the CSV keeps fractions."""
    result, _ = two_seeds
    text = result.table()
    threshold = next(line for line in text.splitlines() if line.startswith("| threshold | 30% | 2 |"))
    acc, cost = threshold.split(" | ")[3:5]
    assert re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d%", acc) and re.fullmatch(r"\d+\.\d ± \d+\.\d%", cost)
    assert re.search(r"^\| threshold \| 2 \| \d+\.\d\d ± \d+\.\d\d% \|$", text, re.M)  # the AUC
    curve = json.loads((one_seed / "curve.json").read_text())
    one = Sweep(curve["graph"], one_seed, rows=curve["rows"], seeds=curve["seeds"])
    row = next(r for r in curve["rows"] if r["method"] == "uniform")
    assert (f"| uniform | 50% | {100 * row['accuracy']:.2f}% | {100 * row['cost_fraction']:.1f}% | "
            f"{100 * row['val_cost_fraction']:.1f}% |") in one.table()
    assert float(next(csv.DictReader((one_seed / "curve.csv").open()))["cost_fraction"]) <= 1.0

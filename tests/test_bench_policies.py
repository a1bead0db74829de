"""benchmarks/bench_policies.py: a quick run on one example writes the curve files and a
summary.md with the mean ± std table, the AUC per method and the command (about 30 s)."""

from __future__ import annotations

import csv
import importlib.util

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_policies", ROOT / "benchmarks" / "bench_policies.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_the_summary(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "policies"
    assert bench.main(["--examples", "early_exit", "--quick", "--seeds", "2", "--out", str(out)]) == 0
    text = (out / "summary.md").read_text()
    assert "python benchmarks/bench_policies.py --examples early_exit --quick --seeds 2" in text
    assert "d2graph sweep" in text and "| method | budget | n | test accuracy | test cost | val cost |" in text
    for method in ("threshold:measure=maxprob", "threshold:measure=entropy", "uniform", "best-static", "oracle"):
        assert f"| `{method}` | 0.20 | 2 |" in text, method
    assert "| method | n | AUC | per seed |" in text and " ± " in text
    assert "early_exit/tradeoff.png" in text
    rows = list(csv.DictReader((out / "early_exit" / "curve.csv").open()))
    assert {r["seed"] for r in rows} == {"0", "1"}
    # The joint trainers have no budget here: one row per value of their cost parameter and seed.
    joint = [r for r in rows if r["method"].startswith("reinforce")]
    assert joint and all(r["budget"] == "" for r in joint) and len({r["param"] for r in joint}) == 4
    assert (out / "early_exit" / "auc.csv").is_file() and (out / "early_exit" / "tradeoff.svg").is_file()
    assert text.strip() in capsys.readouterr().out
    with pytest.raises(SystemExit):  # an earlier run's folder is not overwritten silently
        bench.main(["--examples", "early_exit", "--quick", "--seeds", "1", "--out", str(out)])


def test_the_plan_sweeps_the_files_own_joint_trainer():
    import d2graph

    bench = _bench()
    methods, param, overrides = bench.plan(d2graph.load(ROOT / "examples" / "guan_cascade.d2"), quick=False)
    assert param == "stage.policy.alpha=0.1,0.5,1,2" and overrides == []
    assert "qlearning:lambda=0.3/0.5/0.7/0.9" in methods and not any(m.startswith("reinforce") for m in methods)
    methods, param, _ = bench.plan(d2graph.load(ROOT / "examples" / "early_exit.d2"), quick=False)
    assert param is None and "reinforce:budget=none:alpha=0.1/0.5/1/2" in methods
    _, param, _ = bench.plan(d2graph.load(ROOT / "examples" / "high_low.d2"), quick=False)
    assert param == "stage.policy.lambda=0.3,0.5,0.7,0.75,0.9"  # the file's own λ = 0.75 among the grid
    # --skip leaves methods out, but never the file's own trainer
    methods, param, _ = bench.plan(d2graph.load(ROOT / "examples" / "hierarchy.d2"), quick=False,
                                   skip=("costsensitive", "reinforce", "qlearning"))
    assert param.startswith("stage.policy.lambda=") and "uniform" in methods
    assert not any(m.startswith(("costsensitive", "reinforce")) for m in methods)
    with pytest.raises(SystemExit):
        bench.main(["--examples", "hierarchy", "--skip", "costsensitve"])


def test_glance_tables_from_hand_made_rows():
    bench = _bench()

    def row(method, budget="", param="", at="", policy="", acc=0.5, std=0.01, cost=0.2):
        return {"method": method, "budget": budget, "param": param, "calibrated_to": at, "policy": policy,
                "accuracy_mean": acc, "accuracy_std": std, "cost_fraction_mean": cost}

    summary = [
        row("qlearning", param="policy.lambda=0.9", acc=0.70, cost=0.6),
        row("qlearning", param="policy.lambda=0.3", acc=0.55, cost=0.1),
        row("threshold", budget="0.2", acc=0.60, cost=0.201),
        row("threshold", budget="0.6", at="policy.lambda=0.9", acc=0.66),
        row("threshold", budget="0.1", at="policy.lambda=0.3", acc=0.50),
        row("reinforce:budget=none", param="alpha=0.5", acc=0.61, cost=0.3),
        row("static", policy="static path exit at H1 (Q1=1)", acc=0.3, std=0.0, cost=0.05),
    ]
    auc = [{"method": "qlearning", "auc_mean": "0.65", "auc_std": "0.02"}]
    text = bench.glance(summary, auc)
    assert "| `threshold` | 60.0 ± 1.0 (0.201) | — |" in text
    # The file's own points, cheapest first, and the threshold calibrated to each one's cost.
    assert "| method | lambda=0.3 | lambda=0.9 | AUC |" in text
    assert "| `qlearning` | 55.0 ± 1.0 (0.100) | 70.0 ± 1.0 (0.600) | 65.0 ± 2.0 |" in text
    assert "| `threshold` at that cost | 50.0 ± 1.0 | 66.0 ± 1.0 |  |" in text
    assert "`reinforce:budget=none`: alpha=0.5: 61.0 ± 1.0 (0.300); AUC —." in text
    assert "Static paths: exit at H1 (Q1=1) 30.0 ± 0.0 (0.050)." in text

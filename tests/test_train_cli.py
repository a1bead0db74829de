"""`d2graph train`, `eval`, `sweep` and `render --stats` from the command line: outputs,
files, and clear errors with exit 2 (never a traceback) for every mistake."""

from __future__ import annotations

import csv
import json
import re

import pytest

from d2graph.cli import main

from .conftest import ROOT

EARLY = str(ROOT / "examples" / "early_exit.d2")
SMALL = ["--set", "data.n=400", "--set", "batch=32", "--set", "stage.backbone.epochs=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "early"
    assert main(["train", EARLY, *SMALL, "--out", str(folder), "--quiet"]) == 0
    return folder


def test_train_prints_accuracy_cost_and_the_run_folder(run, capsys):
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "mean cost" in out and "path" in out and "exit" in out
    report = json.loads((run / "report.json").read_text())
    assert set(report) >= {"policy", "val", "test"}
    assert (run / "graph.svg").is_file() or (run / "graph.dot").is_file()


def test_eval_json_matches_the_run_report(run, capsys):
    assert main(["eval", str(run), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    report = json.loads((run / "report.json").read_text())["test"]
    assert data["accuracy"] == report["accuracy"] and data["mean_cost"] == report["mean_cost"]
    assert main(["eval", EARLY, "--checkpoint", str(run / "best.pt"), "--split", "val"]) == 0


def test_print_config_shows_every_default(capsys):
    assert main(["train", EARLY, "--print-config", "--set", "seed=4"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["settings"]["seed"] == 4 and config["settings"]["optimizer"] == "adam"
    assert config["stages"][1] == {"name": "policy", "trainer": "threshold",
                                   "params": {"measure": "maxprob", "budget": 0.5, "drop": -1}}


@pytest.mark.parametrize("argv, code, fragment", [
    (["train", "nope.d2"], "E010", "no such file"),
    (["train", EARLY, "--set", "sed=1"], "E920", "did you mean `seed`"),
    (["train", EARLY, "--resume", "somewhere"], "E920", "--resume"),
    (["train"], "E920", "needs a .d2 file"),
    (["train", "--resume", "nowhere"], "E922", "no run folder"),
    (["eval", "nowhere"], "E922", "no run folder or .d2 file"),
    (["eval", EARLY], "E920", "--checkpoint"),
    (["render", EARLY, "-o", "x.svg", "--stats", "nowhere"], "E922", "no run folder"),
    (["sweep", EARLY, "--methods", "supervised"], "E920", "not a policy trainer"),
])
def test_mistakes_exit_2_with_a_message(argv, code, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"[{code}]" in err and fragment in err and "Traceback" not in err


def test_a_damaged_checkpoint_is_E922(run, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes((run / "last.pt").read_bytes()[:100])
    assert main(["eval", EARLY, "--checkpoint", str(bad)]) == 2
    assert "[E922]" in capsys.readouterr().err


@pytest.mark.parametrize("damage", [lambda b: b[:100], lambda b: b"garbage, not a checkpoint\n"])
def test_a_damaged_checkpoint_is_named_with_the_choices_that_exist(damage, run, tmp_path, capsys):
    """One clean sentence (no torch internals cut mid-sentence) and only advice that works:
    `--resume` has no choice of checkpoint; `eval` does."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "last.pt").write_bytes(damage((run / "last.pt").read_bytes()))
    assert main(["eval", str(copy)]) == 2
    err = capsys.readouterr().err
    assert f"error[E922]: {copy / 'last.pt'} is not a d2graph checkpoint, or it is damaged" in err
    assert "`--checkpoint best`" in err and "Pytorch" not in err and "miniz" not in err
    assert main(["eval", str(copy), "--checkpoint", "best"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(copy), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not a d2graph checkpoint, or it is damaged" in err and "Pytorch" not in err
    assert "continues only from last.pt" in err and f"d2graph eval {copy} --checkpoint best" in err
    assert "other checkpoint" not in err and "Traceback" not in err


def test_a_run_folder_is_not_overwritten(run, capsys):
    assert main(["train", EARLY, *SMALL, "--out", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def _broken_early_exit(tmp_path):
    """early_exit.d2 with heads too narrow for its 10 classes (E906 when training starts)."""
    path = tmp_path / "early_exit.d2"
    path.write_text((ROOT / "examples" / "early_exit.d2").read_text().replace("let classes = 10", "let classes = 5"))
    return path


def test_a_run_that_failed_before_training_does_not_block_its_retry(tmp_path, capsys):
    path, out = _broken_early_exit(tmp_path), tmp_path / "run"
    argv = ["train", str(path), *SMALL, "--out", str(out), "--quiet"]
    assert main(argv) == 2
    assert "[E906]" in capsys.readouterr().err
    assert main(["train", "--resume", str(out)]) == 2  # nothing to resume: said so, with the way out
    err = capsys.readouterr().err
    assert "[E922]" in err and "before training started" in err and f"--out {out}" in err
    path.write_text((ROOT / "examples" / "early_exit.d2").read_text())  # fixed
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "starting it again" in err and "already holds a run" not in err
    assert "let classes = 10" in (out / "early_exit.d2").read_text() and (out / "last.pt").is_file()
    assert main(argv) == 2 and "already holds a run" in capsys.readouterr().err  # a real run is kept


def test_a_sweep_that_failed_before_training_does_not_block_its_retry(tmp_path, capsys):
    path, out = _broken_early_exit(tmp_path), tmp_path / "sweep"
    argv = ["sweep", str(path), *SMALL, "--budgets", "0.5", "--methods", "uniform", "--out", str(out)]
    assert main(argv) == 2
    assert "[E906]" in capsys.readouterr().err
    path.write_text((ROOT / "examples" / "early_exit.d2").read_text())
    assert main(argv) == 0
    assert "starting it again" in capsys.readouterr().err and (out / "curve.csv").is_file()


def test_render_stats_draws_execution_rates(run, tmp_path, capsys):
    out = tmp_path / "g.dot"
    assert main(["render", EARLY, "-o", str(out), "--stats", str(run)]) == 0
    assert "ran " in out.read_text()
    assert main(["render", str(ROOT / "examples" / "cascade.d2"), "-o", str(out), "--stats", str(run)]) == 2


def test_sweep_writes_the_curve_and_the_plot(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", EARLY, *SMALL, "--budgets", "0.3,0.6", "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader((out / "curve.csv").open()))
    methods = [r["method"] for r in rows]
    assert methods.count("threshold") == 2 and methods.count("uniform") == 2 and methods.count("oracle") == 2
    assert methods.count("static") == 3  # exit 1, exit 2, the full network
    for r in rows:
        if r["method"] == "threshold":  # deterministic; uniform meets its budget in expectation
            assert float(r["val_cost_fraction"]) <= float(r["budget"]) + 0.02
    assert {float(r["cost_fraction"]) for r in rows if r["method"] == "static"} >= {1.0}
    assert (out / "tradeoff.png").stat().st_size > 1000 and (out / "tradeoff.svg").is_file()
    assert "threshold" in capsys.readouterr().out


def test_sweep_over_a_policy_parameter_matches_the_other_methods_to_its_costs(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", EARLY, *SMALL, "--param", "stage.policy.budget=0.3,0.6", "--methods", "uniform",
                 "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader((out / "curve.csv").open()))
    swept = [r for r in rows if r["method"] == "threshold"]
    assert [r["param"] for r in swept] == ["policy.budget=0.3", "policy.budget=0.6"]
    reached = sorted(round(float(r["val_cost_fraction"]), 4) for r in swept)
    assert sorted(float(r["budget"]) for r in rows if r["method"] == "uniform") == reached
    assert main(["sweep", EARLY, "--param", "stage.policy.budgt=0.3"]) == 2
    assert "did you mean `budget`" in capsys.readouterr().err


def test_policy_export_and_fit_on_predictions(run, tmp_path, capsys):
    preds = tmp_path / "preds"
    assert main(["policy", "export", str(run), "--out", str(preds)]) == 0
    assert (preds / "logits_single.pth").is_file()
    assert "3 exits" in capsys.readouterr().out
    assert main(["policy", "fit", "--predictions", str(preds), "--budget", "0.3,0.6", "--trainer",
                 "eenet,threshold,entropy,patience", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["budget"], r["method"]) for r in rows][:3] == [(0.3, "eenet"), (0.3, "threshold (maxprob)"),
                                                              (0.3, "threshold (entropy)")]
    assert rows[3]["method"].startswith("patience (")
    assert all(r["val_cost_fraction"] <= r["budget"] + 1e-9 for r in rows)
    assert main(["policy", "fit", "--predictions", str(tmp_path / "none"), "--budget", "0.5"]) == 2
    assert "[E924]" in capsys.readouterr().err
    assert main(["policy", "fit", "--predictions", str(preds), "--budget", "0.5", "--trainer", "oracle"]) == 2
    capsys.readouterr()


def test_policy_fit_takes_eenet_parameters(run, tmp_path, capsys):
    preds = tmp_path / "preds"
    assert main(["policy", "export", str(run), "--out", str(preds)]) == 0
    capsys.readouterr()
    fit = ["policy", "fit", "--predictions", str(preds), "--budget", "0.4", "--trainer", "eenet", "--format", "json"]
    rows = {}
    for name, extra in (("default", []), ("paper", ["--set", "utility=right", "--set", "sorted_probs=false"]),
                        ("paper again", ["--set", "utility=right", "--set", "sorted_probs=false"])):
        assert main(fit + extra) == 0
        rows[name] = json.loads(capsys.readouterr().out)[0]
    assert rows["paper"] == rows["paper again"] and rows["paper"] != rows["default"]  # the parameters reached the fit
    for bad, said in ((["--set", "budget=0.3"], "the budget is `--budget`"), (["--set", "utilty=right"], "did you mean"),
                      (["--set", "utility=some"], "utility"), (["--set", "lr=0"], "lr=0"), (["--set", "lr"], "key=value")):
        assert main(fit + bad) == 2
        assert said in capsys.readouterr().err


def test_policy_export_of_a_graph_without_exits_names_no_trainer(tmp_path, capsys):
    """Export refuses a graph that is not a multi-exit chain in its own words, not as an error of
    the eenet trainer, which the user did not ask for."""
    path = tmp_path / "plain.d2"
    path.write_text("graph plain {\n  input x [1, 8, 8]\n  output y\n  node A = flatten, fc(10)\n  x -> A -> y\n"
                    "  train {\n    data = digits\n    stage backbone = supervised(epochs=1)\n  }\n}\n")
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["policy", "export", str(tmp_path / "run"), "--out", str(tmp_path / "preds")]) == 2
    err = capsys.readouterr().err
    assert "[E921]" in err and "no per-exit predictions" in err and "has no control node" in err
    assert "eenet" not in err and "Traceback" not in err and not (tmp_path / "preds").exists()


TWO_VALIDATING = """graph tiny {
  input x [1, 8, 8]
  output y [merge=select]
  node A = flatten, fc(10)
  node B = flatten, fc(32), relu, fc(10)
  control Q = flatten, fc(2)
  x -> A, B, Q
  Q => skip | B
  B, A -> y
  train {
    data = digits
    stage backbone = supervised(epochs=2)
    stage policy = reinforce(epochs=2, alpha=0.5)
  }
}
"""


def test_best_checkpoint_says_which_stage_and_epoch_it_holds(run, capsys):
    """best.pt of a run whose last stage (a threshold) does not validate is the backbone's best
    epoch, before the policy existed: `eval --checkpoint best` says so instead of silently
    evaluating another model than the run's."""
    import torch

    state = torch.load(run / "best.pt", weights_only=True)
    assert state["best_of"]["stage"] == "backbone" and state["best_of"]["epoch"] == 1
    assert main(["eval", str(run), "--checkpoint", "best"]) == 0
    err = capsys.readouterr().err
    assert "best.pt holds stage `backbone` at epoch 1" in err and "last stage that validates" in err
    assert "(`policy`) is not in it" in err and "`--checkpoint last` is the run's final model" in err
    assert main(["eval", str(run)]) == 0
    assert "best.pt" not in capsys.readouterr().err  # last.pt is the run's model: nothing to say


def test_best_checkpoint_is_from_the_last_stage_that_validates(tmp_path, capsys):
    import torch

    path = tmp_path / "tiny.d2"
    path.write_text(TWO_VALIDATING)
    out = tmp_path / "run"
    assert main(["train", str(path), "--out", str(out), "--quiet"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    policy = [r for r in rows if r["stage"] == "policy" and "val_score" in r]
    best = max(policy, key=lambda r: r["val_score"])  # the first of equal scores
    state = torch.load(out / "best.pt", weights_only=True)
    assert state["best_of"]["stage"] == "policy" and state["best_of"]["epoch"] == best["epoch"]
    capsys.readouterr()
    assert main(["eval", str(out), "--checkpoint", "best"]) == 0
    err = capsys.readouterr().err
    assert f"best.pt holds stage `policy` at epoch {best['epoch']}" in err and "not in it" not in err


def _listed(path, begin="<!-- run-folder:begin -->", end="<!-- run-folder:end -->") -> set[str]:
    """The file names a doc lists between its run-folder markers (`GRAPH.d2` standing for the copy)."""
    text = path.read_text(encoding="utf-8")
    assert text.count(begin) == 1 and text.count(end) == 1, path
    section = text[text.index(begin):text.index(end)]
    return {name for name in re.findall(r"`([\w.]+\.[a-z0-9]+)`", section) if not name.startswith("d2graph")}


def test_a_run_folder_holds_the_training_plot_and_what_the_docs_list(run):
    png = run / "training.png"
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 5000
    assert (run / "training.svg").is_file()
    files = {p.name.replace("early_exit.d2", "GRAPH.d2") for p in run.iterdir()}
    assert "graph.dot" in files  # written whether or not `dot` is installed
    for doc in (ROOT / "docs" / "cli.md", ROOT / "README.md"):
        assert _listed(doc) == files | {"graph.svg"}, doc  # graph.svg: only where Graphviz is


def test_the_report_puts_the_full_network_next_to_the_policy(run):
    """report.txt: the policy named once; the full network's accuracy beside the policy's;
    each control node's action shares add up to 100% (of the examples it ran for); exits
    shallowest first."""
    text = (run / "report.txt").read_text()
    report = json.loads((run / "report.json").read_text())
    assert text.count(report["policy"]) == 1 and "routed by" not in text
    full = report["full_network"]
    assert full["path"] == "Q1=2 Q2=2" and full["test"]["cost_fraction"] == 1.0
    assert "full network: path Q1=2 Q2=2 (every node runs" in text
    header, val, test = (line.split() for line in text.split("\n\n")[1].splitlines())
    assert " ".join(header) == "split examples policy accuracy policy cost full network accuracy"
    for row, split in ((val, "val"), (test, "test")):
        assert row[0] == split and row[2] == f"{report[split]['accuracy']:.1%}"
        assert row[4] == f"{full[split]['accuracy']:.1%}"
    shares = re.findall(r"^Q\d +[\d.]+% ((?: \d+:\d+%)+)$", text, re.M)
    assert len(shares) == 4  # Q1 and Q2, on val and test
    for line in shares:
        assert sum(int(p) for p in re.findall(r":(\d+)%", line)) == 100, line
    for table in text.split("\n\nexit")[1:]:
        exits = [line.split()[0] for line in table.strip().splitlines()[1:] if line.strip()]
        exits = exits[:exits.index("test:")] if "test:" in exits else exits
        assert len(exits) >= 2 and exits == sorted(exits, key=["H1", "H2", "B3"].index), exits  # shallowest first


@pytest.mark.parametrize("edit, fragment", [
    (lambda c: c["settings"].update(batch=0), "`settings.batch` must be a positive integer, not 0"),
    (lambda c: c["settings"].update(lr="fast"), '`settings.lr` must be a number, not "fast"'),
    (lambda c: c["settings"].update(seed=None), "`settings.seed` must be an integer, not null"),
    (lambda c: c["settings"].update(device="tpu"), '`settings.device` must be one of `auto`, `cpu`, `cuda`, not "tpu"'),
    (lambda c: c["settings"].update(optimizer="lbfgs"), '`settings.optimizer` must be one of `adam`, `adamw`, `sgd`'),
    (lambda c: c["data"].pop("args"), '`data` must be {"name": DATA SET, "args": {...}}'),
    (lambda c: c["stages"][0]["params"].update(epochs="many"), "argument `epochs` of trainer `supervised`"),
    (lambda c: c.update(graph="../../x"), '`graph` must be the graph\'s name'),
])
def test_a_hand_edited_config_is_refused_by_every_command_that_reads_the_run(edit, fragment, run, tmp_path, capsys):
    """Checked with the train block's schemas; the graph's name never leads out of the run folder
    (where a copy of the source waits that would otherwise be read)."""
    import shutil

    copy = tmp_path / "a" / "b" / "run"
    shutil.copytree(run, copy)
    (tmp_path / "a" / "x.d2").write_text((copy / "early_exit.d2").read_text())
    config = json.loads((copy / "config.json").read_text())
    edit(config)
    (copy / "config.json").write_text(json.dumps(config))
    for argv in (["eval", str(copy)], ["train", "--resume", str(copy), "--quiet"],
                 ["render", EARLY, "-o", str(tmp_path / "g.dot"), "--stats", str(copy)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "[E922]" in err and fragment in err and "Traceback" not in err and "internal error" not in err, err


def test_eval_refuses_a_checkpoint_of_another_version_of_the_graph(run, tmp_path, capsys):
    swapped = tmp_path / "early_exit.d2"
    swapped.write_text((ROOT / "examples" / "early_exit.d2").read_text().replace("Q2 => skip | B3", "Q2 => B3 | skip"))
    assert main(["eval", str(swapped), "--checkpoint", str(run / "last.pt")]) == 2
    err = capsys.readouterr().err
    assert "[E922]" in err and "was trained on another version of graph `early_exit`" in err


def test_a_diverging_run_exits_2_with_a_diagnostic_and_no_nan_in_its_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", EARLY, "--set", "data.n=300", "--set", "batch=32", "--set", "stage.backbone.epochs=1",
            "--set", "optimizer=sgd", "--set", "lr=1e12", "--out", str(out), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error[E925]: training diverged: stage `backbone` has a training loss of nan" in err, err
    assert "lower one (`--set lr=...`; it is 1e+12)" in err and "Traceback" not in err
    assert not (out / "last.pt").exists() and not (out / ".d2graph.lock").exists()
    for line in (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))


def test_a_run_on_a_relative_npz_path_evaluates_from_anywhere(tmp_path, capsys, monkeypatch):
    # The .d2 file names its data relative to itself; `eval` and `--resume` read the source
    # copy inside the run folder, so the run keeps the folder the data was read from.
    import numpy as np

    project = tmp_path / "project"
    project.mkdir()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    np.savez(project / "data.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    (project / "g.d2").write_text('graph g {\n  input x [8]\n  output y\n  node a = fc(2)\n  x -> a -> y\n'
                                  '  train {\n    data = npz(path="data.npz")\n'
                                  '    stage backbone = supervised(epochs=1)\n  }\n}\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", str(project / "g.d2"), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert main(["eval", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data_root"] == str(project.resolve())
    capsys.readouterr()

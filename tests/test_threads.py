"""The train block's `threads` and `--threads`: parsed and checked like the other settings,
overriding the file from the command line, recorded in config.json (old runs without it still
load), applied while a command computes and undone afterwards."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

import d2graph
from d2graph import threads
from d2graph.cli import main
from d2graph.runs import Run, Stage, resolve

from .conftest import ROOT, ctrl_c_after

# The modules (`d2graph.evaluate` is also the package's verb, so they are looked up by name).
EVALUATE, BENCH = importlib.import_module("d2graph.evaluate"), importlib.import_module("d2graph.bench")
EARLY = ROOT / "examples" / "early_exit.d2"
SMALL = ["--set", "data.n=400", "--set", "batch=32", "--set", "stage.backbone.epochs=1"]
SMALL_API = ["data.n=400", "batch=32", "backbone.epochs=1"]
OUTSIDE = 3  # torch's count set by a test before a command runs: not one a command picks here


def _with_setting(tmp_path, value: str):
    """early_exit.d2 with `threads = value` in its train block."""
    path = tmp_path / "early_exit.d2"
    path.write_text(EARLY.read_text().replace("    lr = 0.003\n", f"    lr = 0.003\n    threads = {value}\n", 1))
    return path


@pytest.fixture
def outside():
    """torch's count set to OUTSIDE for the test, and put back after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(OUTSIDE)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def seen(monkeypatch):
    """torch's thread count at every training step."""
    counts: list[int] = []
    real = Stage.step

    def step(self, loss, n):
        counts.append(torch.get_num_threads())
        real(self, loss, n)

    monkeypatch.setattr(Stage, "step", step)
    return counts


# --- the setting -------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [("2", 2), ("auto", "auto")])
def test_the_setting_is_read_from_the_train_block(value, expected, tmp_path):
    graph = d2graph.load(_with_setting(tmp_path, value))
    assert dict(graph.train.settings)["threads"] == expected


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "true", '"4"'])
def test_a_bad_setting_is_E805_naming_what_it_takes(value, tmp_path):
    graph, diags = d2graph.check(_with_setting(tmp_path, value).read_text(), "early_exit.d2")
    assert graph is None
    [d] = [d for d in diags if d.is_error]
    assert d.code == "E805" and "`threads` must be a positive integer or `auto`" in d.message


def test_a_bad_override_is_E920(capsys):
    assert main(["train", str(EARLY), "--print-config", "--set", "threads=0"]) == 2
    err = capsys.readouterr().err
    assert "[E920]" in err and "`threads` must be a positive integer or `auto`" in err


@pytest.mark.parametrize("omp, cpus, expected", [
    (None, 1, 1), (None, 2, 1), (None, 4, 3), (None, 64, threads.AUTO_CAP),
    ("3", 2, 3),                        # the environment's count is taken as it is
    ("0", 4, 3), ("many", 4, 3),        # one torch would not take is not
])
def test_auto_leaves_a_cpu_free_and_respects_OMP_NUM_THREADS(omp, cpus, expected, monkeypatch):
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    monkeypatch.setattr(threads, "available_cpus", lambda: cpus)
    assert threads.auto_threads() == expected
    assert threads.thread_count("auto") == expected and threads.thread_count(5) == 5


def test_resolve_fixes_auto_to_a_count(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    graph = d2graph.load(EARLY)
    assert resolve(graph).settings["threads"] == 3
    assert resolve(graph, ["threads=2"]).settings["threads"] == 2


# --- the command line --------------------------------------------------------------------


def test_the_flag_overrides_the_file(tmp_path, capsys, monkeypatch):
    path = _with_setting(tmp_path, "2")
    assert main(["train", str(path), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["threads"] == 2
    assert main(["train", str(path), "--print-config", "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["threads"] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert main(["train", str(path), "--print-config", "--threads", "auto"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["threads"] == 3


@pytest.mark.parametrize("command", [["train", "F"], ["sweep", "F"], ["eval", "RUN"], ["bench", "F"],
                                     ["policy", "export", "RUN", "--out", "O"]])
@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5", ""])
def test_a_bad_flag_exits_2_with_a_message(command, value, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--threads", value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--threads: expected a positive integer or `auto`" in err and "Traceback" not in err


def test_train_records_the_count_it_used_and_eval_uses_it(tmp_path, capsys, monkeypatch, outside, seen):
    out = tmp_path / "run"
    assert main(["train", str(EARLY), *SMALL, "--threads", "1", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["settings"]["threads"] == 1
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == OUTSIDE  # put back for the caller of main()

    counts: list[int] = []
    real = EVALUATE.evaluate
    monkeypatch.setattr(EVALUATE, "evaluate", lambda *a, **k: counts.append(torch.get_num_threads()) or real(*a, **k))
    assert main(["eval", str(out)]) == 0  # the run's count, not this process's
    assert counts == [1] and torch.get_num_threads() == OUTSIDE


def test_a_run_without_the_setting_still_loads(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(EARLY), *SMALL, "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    del config["settings"]["threads"]  # as written before the setting existed
    (out / "config.json").write_text(json.dumps(config))
    assert Run.open(out).config.settings["threads"] == "auto"
    assert main(["eval", str(out)]) == 0
    assert main(["eval", str(out), "--threads", "1"]) == 0


def test_resume_takes_the_flag_and_says_when_it_differs_from_the_run(tmp_path, capsys, monkeypatch, outside, seen):
    out = tmp_path / "run"
    ctrl_c_after(monkeypatch, stage=0, epoch=0, step=2)
    assert main(["train", str(EARLY), *SMALL, "--threads", "1", "--out", str(out), "--quiet"]) == 130
    monkeypatch.undo()
    config = json.loads((out / "config.json").read_text())
    config["settings"]["threads"] = 2  # as a run on another machine might have recorded
    (out / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    counts: list[int] = []
    real = Stage.step
    monkeypatch.setattr(Stage, "step", lambda self, loss, n: counts.append(torch.get_num_threads()) or
                        real(self, loss, n))
    assert main(["train", "--resume", str(out), "--threads", "1", "--quiet"]) == 0
    assert "resuming on 1 thread(s), not the 2 in the run's config.json" in capsys.readouterr().err
    assert counts and set(counts) == {1} and torch.get_num_threads() == OUTSIDE


def test_sweep_computes_on_the_flag_and_records_it(tmp_path, capsys, outside, seen):
    out = tmp_path / "sweep"
    assert main(["sweep", str(EARLY), *SMALL, "--budgets", "0.5", "--methods", "uniform", "--threads", "1",
                 "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["settings"]["threads"] == 1
    assert seen and set(seen) == {1} and torch.get_num_threads() == OUTSIDE


def test_bench_runs_on_the_flag_and_puts_the_count_back(capsys, outside, monkeypatch):
    counts: list[int] = []
    real = BENCH.bench
    monkeypatch.setattr(BENCH, "bench", lambda *a, **k: counts.append(torch.get_num_threads()) or real(*a, **k))
    assert main(["bench", str(ROOT / "examples" / "high_low.d2"), "--batch", "4", "--rounds", "1",
                 "--threads", "1"]) == 0
    assert counts == [1] and torch.get_num_threads() == OUTSIDE


# --- the Python API ----------------------------------------------------------------------


def test_the_api_trains_on_the_setting_and_restores_torchs_count(outside, seen):
    graph = d2graph.load(EARLY)
    trained = d2graph.train(graph, [*SMALL_API, "threads=1"])
    assert trained.config.settings["threads"] == 1
    assert seen and set(seen) == {1} and torch.get_num_threads() == OUTSIDE


def test_the_count_is_restored_when_training_fails(outside, monkeypatch):
    def fail(self, loss, n):
        raise RuntimeError("stop here")

    monkeypatch.setattr(Stage, "step", fail)
    with pytest.raises(RuntimeError, match="stop here"):
        d2graph.train(d2graph.load(EARLY), [*SMALL_API, "threads=1"])
    assert torch.get_num_threads() == OUTSIDE

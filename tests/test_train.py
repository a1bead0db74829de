"""Training runs end to end: config resolution and its errors, run folders, checkpoints,
deterministic reruns, interruption and resume (in-process and with a real Ctrl-C)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import d2graph
from d2graph.diagnostics import D2GraphError
from d2graph.runs import Interrupted, Run, load_checkpoint, resolve, train
from d2graph.trainers.baselines import StaticTrainer

from .conftest import ROOT, ctrl_c_after

EXAMPLES = ROOT / "examples"

SMALL = ["data.n=500", "batch=32", "stage.backbone.epochs=2"]


def _codes(excinfo) -> list[str]:
    return [d.code for d in excinfo.value.diagnostics]


@pytest.fixture(scope="module")
def early_exit():
    return d2graph.load(EXAMPLES / "early_exit.d2")


def test_every_example_has_a_train_block_that_resolves():
    for path in sorted(EXAMPLES.glob("*.d2")):
        config = resolve(d2graph.load(path))
        # the token example trains on the built-in token task, every other on the canvases
        assert config.data["name"] == ("negated_keywords" if path.stem == "bert_early_exit" else "cluttered_digits")
        assert [s["name"] for s in config.stages] == ["backbone", "policy"]
        assert config.settings["seed"] == 0 and config.settings["batch"] == 64  # defaults filled in


def test_overrides_apply_to_settings_data_and_stages(early_exit):
    config = resolve(early_exit, ["seed=3", "data.n=900", "stage.policy.budget=0.3", "backbone.epochs=1",
                                  "optimizer=sgd", "policy.measure=entropy"])
    assert config.settings["seed"] == 3 and config.settings["optimizer"] == "sgd"
    assert config.data["args"]["n"] == 900
    assert config.stage("policy")["params"]["budget"] == 0.3
    assert config.stage("policy")["params"]["measure"] == "entropy"
    assert config.stage("backbone")["params"]["epochs"] == 1
    assert json.loads(config.text()) == config.to_json()


@pytest.mark.parametrize("override, fragment", [
    ("sed=3", "did you mean `seed`"),
    ("seed=three", "must be an integer"),
    ("stage.policy.budgt=0.3", "did you mean `budget`"),
    ("stage.policy.budget=2", "between 0 and 1"),
    ("stage.polcy.budget=0.3", "did you mean `stage.policy.budget`"),
    ("data.size=-1", "positive integer"),
    ("data=mnist", "unknown data set"),
    ("seed", "is not `key=value`"),
])
def test_bad_overrides_are_E920_with_a_hint(early_exit, override, fragment):
    with pytest.raises(D2GraphError) as e:
        resolve(early_exit, [override])
    assert _codes(e) == ["E920"]
    assert fragment in e.value.diagnostics[0].message


def test_a_graph_without_train_block_is_E923():
    graph, diags = d2graph.check("graph g {\n input x [4]\n output y\n node A = fc(2)\n x -> A -> y\n}\n")
    with pytest.raises(D2GraphError) as e:
        resolve(graph)
    assert _codes(e) == ["E923"]


def test_a_trainer_that_does_not_suit_the_graph_fails_before_training(tmp_path):
    graph = d2graph.load(EXAMPLES / "high_low.d2")
    config = resolve(graph, SMALL)
    config.stages[1] = {"name": "policy", "trainer": "threshold",
                        "params": {"measure": "maxprob", "budget": 0.5, "drop": -1}}
    t = time.perf_counter()
    with pytest.raises(D2GraphError) as e:
        train(graph, config, None, quiet=True, echo=None)
    assert _codes(e) == ["E921"] and time.perf_counter() - t < 5


def _run(graph, tmp_path, name, overrides=SMALL):
    config = resolve(graph, overrides)
    run = Run.create(graph, (EXAMPLES / f"{graph.name}.d2").read_text(), config, tmp_path / name)
    return run, config


def test_a_run_folder_holds_everything_and_reruns_are_identical(early_exit, tmp_path):
    reports = []
    for name in ("a", "b"):
        run, config = _run(early_exit, tmp_path, name)
        trained = train(early_exit, config, run, quiet=True, echo=None)
        reports.append(trained.reports["test"].to_json())
        for f in ("early_exit.d2", "config.json", "metrics.jsonl", "metrics.csv", "last.pt", "best.pt",
                  "report.json", "report.txt"):
            assert (run.folder / f).is_file(), f
    assert reports[0] == reports[1]
    a, b = ((tmp_path / n / "metrics.jsonl").read_text() for n in ("a", "b"))
    assert a == b and len(a.splitlines()) == 3  # two epochs and the calibration
    state = load_checkpoint(tmp_path / "a" / "last.pt")
    assert state["complete"] and state["policy"]["kind"] == "threshold"
    # the copied source reproduces the run
    assert d2graph.load(tmp_path / "a" / "early_exit.d2") == early_exit
    # the report is honest: the cost is within the budget the policy was calibrated to, on validation
    assert trained.reports["val"].cost_fraction <= 0.5 + 0.02


def test_interrupted_run_resumes_to_the_same_result(early_exit, tmp_path, monkeypatch):
    run, config = _run(early_exit, tmp_path, "whole")
    whole = train(early_exit, config, run, quiet=True, echo=None).reports["test"].to_json()

    run, config = _run(early_exit, tmp_path, "cut")
    ctrl_c_after(monkeypatch, stage=0, epoch=0, step=5)  # during the 6th step of the first epoch
    with pytest.raises(Interrupted):
        train(early_exit, config, run, quiet=True, echo=None)
    monkeypatch.undo()
    state = load_checkpoint(run.folder / "last.pt")
    assert (state["stage_index"], state["epoch"], state["step"]) == (0, 0, 6)
    resumed = train(early_exit, config, Run.open(run.folder), resume=True, quiet=True, echo=None)
    assert resumed.reports["test"].to_json() == whole
    assert (tmp_path / "whole" / "metrics.jsonl").read_text() == (run.folder / "metrics.jsonl").read_text()


def test_corrupt_and_foreign_checkpoints_are_E922(early_exit, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(D2GraphError) as e:
        load_checkpoint(tmp_path / "junk.pt")
    assert _codes(e) == ["E922"]
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(D2GraphError) as e:
        load_checkpoint(tmp_path / "other.pt")
    assert _codes(e) == ["E922"]
    with pytest.raises(D2GraphError) as e:
        Run.open(tmp_path / "nowhere")
    assert _codes(e) == ["E922"]


def _cli(*args, cwd, **kw):
    return subprocess.Popen([sys.executable, "-m", "d2graph", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kw)


def test_ctrl_c_saves_a_checkpoint_exits_130_and_resume_finishes(tmp_path):
    sets = [a for o in SMALL + ["stage.backbone.epochs=8"] for a in ("--set", o)]
    p = _cli("train", str(EXAMPLES / "early_exit.d2"), *sets, "--out", str(tmp_path / "run"), cwd=tmp_path)
    for line in p.stderr:  # wait until training has begun
        if "epoch 1:" in line:
            break
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["stage_index"] == 0 and not state["complete"]
    p = _cli("train", "--resume", str(tmp_path / "run"), "--quiet", cwd=tmp_path)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "test accuracy" in out and str(tmp_path / "run") in out
    assert load_checkpoint(tmp_path / "run" / "last.pt")["complete"]


class PluggedTrainer(StaticTrainer):
    """A trainer as another package would ship it (see the entry-point test)."""

    name = "plugged"


def test_trainer_plugins_register_from_entry_points(monkeypatch):
    """A package's trainer, declared under the entry-point group, becomes usable by name in
    a .d2 file; a broken plugin only warns."""
    from importlib.metadata import EntryPoint

    import d2graph.trainers as trainers
    from d2graph.schema import TRAINERS

    good = EntryPoint("plugged", f"{__name__}:PluggedTrainer", trainers.ENTRY_POINT_GROUP)
    broken = EntryPoint("broken", "no_such_package.trainers:Nope", trainers.ENTRY_POINT_GROUP)
    monkeypatch.setattr(trainers, "entry_points", lambda group: [good, broken])
    monkeypatch.setattr(TRAINERS, "entries", dict(TRAINERS.entries))  # forget the plugin afterwards
    text = (EXAMPLES / "early_exit.d2").read_text().replace("threshold(measure=maxprob, budget=0.5)",
                                                             "plugged(budget=0.6)")
    assert d2graph.check(text)[0] is None  # unknown before the plugin loads
    with pytest.warns(UserWarning, match="broken"):
        assert trainers.load_plugins() == ["plugged"]
    graph, diagnostics = d2graph.check(text)
    assert graph is not None and graph.train.stages[1].trainer == "plugged"


def test_a_cosine_schedule_decays_the_learning_rate_to_zero_by_the_last_step():
    from d2graph.trainers.supervised import learning_rate_at

    rates = [learning_rate_at(t, 8, 0.01, "cosine") for t in range(9)]
    assert rates[0] == 0.01 and rates[-1] == pytest.approx(0.0, abs=1e-15)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert learning_rate_at(5, 8, 0.01, "constant") == 0.01


# --- runs that must stop, runs that were killed, folders two runs want ------------------------


def _strict_rows(path) -> list[dict]:
    """metrics.jsonl as strict JSON: NaN and Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(early_exit, tmp_path, monkeypatch):
    from d2graph.runs import Stage

    real_step = Stage.step

    def nan_in_epoch_2(self, loss, n):  # as if the weights had blown up during the second epoch
        real_step(self, float("nan") if (self.epoch, self.steps_done) == (1, 3) else loss, n)

    monkeypatch.setattr(Stage, "step", nan_in_epoch_2)
    run, config = _run(early_exit, tmp_path, "nan")
    with pytest.raises(D2GraphError) as e:
        train(early_exit, config, run, quiet=True, echo=None)
    assert _codes(e) == ["E925"]
    text = str(e.value)
    assert "training loss of nan at epoch 2, step 4" in text and "--set lr=" in text
    assert "last.pt holds the last good state (stage `backbone` after epoch 1)" in text
    state = load_checkpoint(run.folder / "last.pt")
    assert (state["stage_index"], state["epoch"], state["step"]) == (0, 1, 0)
    assert all(torch.isfinite(w).all() for w in state["weights"].values() if w.is_floating_point())
    rows = _strict_rows(run.folder / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1]


def test_a_run_killed_mid_epoch_resumes_from_its_mid_epoch_checkpoint(early_exit, tmp_path, monkeypatch):
    """`checkpoint_every` saves last.pt within an epoch; a process killed outright (no Ctrl-C
    handler, no `finally` that saves) resumes from there to the metrics of a run never killed,
    and the resume removes the temporary files the killed writer left (only those)."""
    from d2graph.runs import Stage

    overrides = [*SMALL, "checkpoint_every=4"]
    run, config = _run(early_exit, tmp_path, "whole", overrides)
    whole = train(early_exit, config, run, quiet=True, echo=None).reports["test"].to_json()

    class Killed(BaseException):
        pass

    real_step = Stage.step

    def killed_after_step_7_of_epoch_2(self, loss, n):
        real_step(self, loss, n)
        if (self.index, self.epoch, self.steps_done) == (0, 1, 6):
            raise Killed

    monkeypatch.setattr(Stage, "step", killed_after_step_7_of_epoch_2)
    run, config = _run(early_exit, tmp_path, "killed", overrides)
    with pytest.raises(Killed):
        train(early_exit, config, run, quiet=True, echo=None)
    monkeypatch.undo()
    state = load_checkpoint(run.folder / "last.pt")
    assert (state["stage_index"], state["epoch"], state["step"]) == (0, 1, 4)  # not the end of epoch 1
    stale = [".last.pt.k2j4h6g8.tmp", ".metrics.jsonl.a_b3c4d5.tmp"]
    kept = [".notes.tmp", "mine.tmp", ".last.pt.short.tmp"]
    for name in stale + kept:
        (run.folder / name).write_bytes(b"half a file")
    (run.folder / ".d2graph.lock").write_text("999999\n")  # a killed process's: its flock went with it
    resumed = train(early_exit, config, Run.open(run.folder), resume=True, quiet=True, echo=None)
    assert resumed.reports["test"].to_json() == whole
    assert (tmp_path / "whole" / "metrics.jsonl").read_text() == (run.folder / "metrics.jsonl").read_text()
    assert not any((run.folder / name).exists() for name in stale + [".d2graph.lock"])
    assert all((run.folder / name).exists() for name in kept)


def test_checkpoint_seconds_saves_within_an_epoch_when_the_time_has_come(early_exit, tmp_path, monkeypatch):
    import d2graph.runs as runs

    clock = iter(range(0, 10**6, 40))  # every look at the clock: 40 s later
    monkeypatch.setattr(runs.time, "monotonic", lambda: next(clock))
    saved = []
    real_save = Run.save
    monkeypatch.setattr(Run, "save", lambda self, name, state: (saved.append((name, state["epoch"], state["step"])),
                                                                 real_save(self, name, state)))
    run, config = _run(early_exit, tmp_path, "timed", ["data.n=300", "batch=32", "stage.backbone.epochs=1",
                                                      "checkpoint_seconds=100"])
    train(early_exit, config, run, quiet=True, echo=None, evaluate=False)
    mid = [(epoch, step) for name, epoch, step in saved if name == "last" and step]
    assert mid and all(epoch == 0 for epoch, _ in mid) and len(mid) < 7  # 7 steps: not at every one


def test_resume_refuses_a_checkpoint_of_another_version_of_the_graph(early_exit, tmp_path, monkeypatch):
    run, config = _run(early_exit, tmp_path, "swapped", ["data.n=300", "batch=32", "stage.backbone.epochs=1"])
    ctrl_c_after(monkeypatch, stage=0, epoch=0, step=2)
    with pytest.raises(Interrupted):
        train(early_exit, config, run, quiet=True, echo=None)
    monkeypatch.undo()
    copy = run.folder / "early_exit.d2"
    source = copy.read_text()
    assert "Q1 => skip | B2" in source
    copy.write_text(source.replace("Q1 => skip | B2", "Q1 => B2 | skip"))  # the same weights fit
    swapped = d2graph.load(copy)
    with pytest.raises(D2GraphError) as e:
        train(swapped, config, Run.open(run.folder), resume=True, quiet=True, echo=None)
    assert _codes(e) == ["E922"] and "trained on another version of graph `early_exit`" in str(e.value)
    # a checkpoint written before checkpoints carried a fingerprint still loads
    state = load_checkpoint(run.folder / "last.pt")
    del state["fingerprint"]
    torch.save(state, run.folder / "last.pt")
    train(swapped, config, Run.open(run.folder), resume=True, quiet=True, echo=None, evaluate=False)


def test_two_runs_started_in_one_folder_at_once_one_is_refused(early_exit, tmp_path):
    import threading

    config = resolve(early_exit, SMALL)
    source = (EXAMPLES / "early_exit.d2").read_text()
    start = threading.Barrier(2)
    made, refused = [], []

    def attempt():
        start.wait()
        try:
            made.append(Run.create(early_exit, source, config, tmp_path / "one"))
        except D2GraphError as e:
            refused.append(e)

    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and len(refused) == 1
    assert _codes_of(refused[0]) == ["E922"] and "is in use: another d2graph process" in str(refused[0])
    made[0].lock.release()  # what `train` does when it ends
    assert not (tmp_path / "one" / ".d2graph.lock").exists()
    Run.create(early_exit, source, config, tmp_path / "one").lock.release()  # free again: no checkpoint yet


def _codes_of(error) -> list[str]:
    return [d.code for d in error.diagnostics]


def test_bf16_precision_computes_the_layers_in_bfloat16_and_the_run_finishes(early_exit, tmp_path, monkeypatch):
    """`precision = bf16` puts training and the run's evaluation under torch.autocast: a
    convolution's output is bfloat16 there, the weights stay float32, and the run completes
    with a report like an fp32 one."""
    seen = set()
    real = torch.nn.Conv2d.forward

    def recording(self, x):
        out = real(self, x)
        seen.add(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Conv2d, "forward", recording)
    run, config = _run(early_exit, tmp_path, "bf16", SMALL + ["precision=bf16"])
    trained = train(early_exit, config, run, quiet=True, echo=None)
    assert seen == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in trained.executor.parameters())
    assert json.loads((run.folder / "config.json").read_text())["settings"]["precision"] == "bf16"
    assert load_checkpoint(run.folder / "last.pt")["complete"]
    assert 0 < trained.reports["val"].cost_fraction <= 0.5 + 0.02
    seen.clear()
    run, config = _run(early_exit, tmp_path, "fp32")
    train(early_exit, config, run, quiet=True, echo=None, evaluate=False)
    assert seen == {torch.float32}

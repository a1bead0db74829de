"""Deployment: every shipped example, trained briefly into a run folder, exported with
`export_run` and loaded with `d2graph.runtime`, predicts what the executor predicts with the
same policy — outputs within float tolerance, actions and per-example costs identical — at
batch 1 and batch 256 (the token graph on int64 ids from its data set, padded rows among
them); the runtime needs none of the front end; broken folders and inputs are clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import d2graph
from d2graph import runtime
from d2graph.diagnostics import D2GraphError
from d2graph.export import export, export_run
from d2graph.paths import action_order, current_head
from d2graph.policies import StaticPolicy, evaluating, run_policy
from d2graph.runs import Run, resolve, train
from d2graph.trainers.baselines import OraclePolicy, PatiencePolicy, ThresholdPolicy, exit_chains
from d2graph.trainers.reinforce import OffsetPolicy

from .conftest import EXAMPLES, ROOT

# Tiny runs: what is compared is the routing of the same weights, not their accuracy.
TINY = ["data.n=160", "batch=40", "stage.backbone.epochs=1", "threads=1"]
EPOCHS_OF_POLICY = ("qlearning", "reinforce", "costsensitive")
# After one epoch the shipped budget makes PABEE's patience 1 (everybody leaves at the first
# exit); a larger one gives patience 2, whose decisions split the batch at D2 and D3, so the
# padding masks are gathered for part of the batch.
OVERRIDES = {"bert_early_exit": ["stage.policy.budget=0.9"]}


def _codes(excinfo) -> list[str]:
    return [d.code for d in excinfo.value.diagnostics]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """Per example: (trained executor, policy, 256 inputs, its run's export loaded, the run folder)."""
    out = {}
    base = tmp_path_factory.mktemp("deploy")
    for path in EXAMPLES:
        graph = d2graph.load(path)
        policy_stage = graph.train.stages[-1]
        extra = [f"stage.{policy_stage.name}.epochs=1"] if policy_stage.trainer in EPOCHS_OF_POLICY else []
        config = resolve(graph, TINY + extra + OVERRIDES.get(graph.name, []))
        run = Run.create(graph, path.read_text(encoding="utf-8"), config, base / "runs" / graph.name)
        result = train(graph, config, run, quiet=True, echo=None, evaluate=False)
        folder = export_run(run.folder, base / "deploy" / graph.name)
        x = torch.cat([result.data.test.tensors[0], result.data.val.tensors[0]])
        x = torch.cat([x] * (256 // len(x) + 1))[:256]  # 256 real examples (images, or token ids)
        out[graph.name] = (result.executor.eval(), result.policy, x, runtime.load(folder), run.folder)
    return out


def _same(executor, policy, net, x) -> None:
    with evaluating(executor):
        expected = run_policy(executor, policy, x)
    got = net(x)
    for name, value in expected.outputs.items():
        torch.testing.assert_close(got.outputs[name], value, rtol=1e-4, atol=1e-5)
    for q, actions in expected.actions.items():
        assert np.array_equal(got.actions[q], actions.numpy()), q
    assert np.array_equal(got.cost, expected.cost.numpy())
    assert got.cost.dtype == expected.cost.numpy().dtype


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_the_runtime_predicts_what_the_executor_does(trained, path):
    executor, policy, x, net, _ = trained[path.stem]
    assert net.policy == policy.describe()
    if net.tokens:  # ids from the data set: some rows padded, their masks carried to the programs
        assert x.dtype == torch.int64 and 0 < int((x == 0).any(1).sum()) < len(x)
    _same(executor, policy, net, x)  # batch 256
    for i in range(0, 256, 37):  # batch 1: every example on its own path
        _same(executor, policy, net, x[i:i + 1])
    # The decisions split the batch somewhere (else the routing was never exercised).
    split = [q for q, a in net(x).actions.items() if len(np.unique(a[a >= 0])) > 1]
    if path.stem not in ("guan_cascade", "chain"):  # a one-epoch policy may send everybody one way
        assert split, "no control node split the batch"


def test_the_trained_policies_are_exported_as_their_rules(trained):
    kinds = {name: {n["name"]: n["rule"]["kind"] for n in entry[3].manifest["nodes"] if "rule" in n}
             for name, entry in trained.items()}
    assert set(kinds["early_exit"].values()) == {"cutoff"}  # threshold
    assert set(kinds["eenet_resnet"].values()) == {"cutoff"}  # EENet's scorers
    assert "plus" in kinds["ann_network_selection"].values()  # costsensitive
    assert set(kinds["high_low"].values()) == {"argmax"}  # learned control nodes (qlearning)
    assert set(kinds["bert_early_exit"].values()) == {"cutoff"}  # patience
    manifest = runtime.read_manifest(trained["eenet_resnet"][3].folder)
    assert sorted(manifest["files"]) == ["nodes/D1.pt2", "nodes/D2.pt2", "nodes/E1.pt2", "nodes/E2.pt2",
                                         "nodes/E3.pt2", "nodes/S1.pt2", "nodes/S2.pt2", "nodes/S3.pt2",
                                         "nodes/Stem.pt2", "policy/D1.pt2", "policy/D2.pt2"]
    assert manifest["source"] == (ROOT / "examples" / "eenet_resnet.d2").read_text(encoding="utf-8")
    assert manifest["inputs"] == [{"name": "x", "shape": [1, 32, 32]}]


@pytest.mark.parametrize("example, make", [
    ("guan_cascade", lambda g: OffsetPolicy(0.7, action_order(g))),
    ("early_exit", lambda g: StaticPolicy({"Q1": 1, "Q2": 0})),
    # cascade lists a control node's classifier after the control node: the rule reads it first
    ("cascade", lambda g: ThresholdPolicy("entropy", 0.3, {q.name: current_head(g, q.name) for q in g.control_nodes},
                                          {q: o[0] for q, o in action_order(g).items()},
                                          {q: o[1] for q, o in action_order(g).items()})),
    # PABEE's patience rule on early_exit's exits: stop where the last two exits agree
    ("early_exit", lambda g: PatiencePolicy(2, exit_chains(g, 10), {q: o[0] for q, o in action_order(g).items()},
                                            {q: o[1] for q, o in action_order(g).items()})),
], ids=["offset", "static", "threshold-reordered", "patience"])
def test_other_policies_export_and_agree(trained, tmp_path, example, make):
    executor, _, x, _, _ = trained[example]
    policy = make(executor.graph)
    net = runtime.load(export(executor, policy, tmp_path / "out"))
    _same(executor, policy, net, x)
    _same(executor, policy, net, x[:1])


def test_a_token_graph_carries_its_ids_and_padding_masks(trained, tmp_path, capsys):
    from d2graph import cli

    executor, policy, x, net, run_folder = trained["bert_early_exit"]
    manifest = net.manifest
    assert manifest["inputs"] == [{"name": "ids", "shape": [32], "tokens": True, "vocab": 64}]
    # every node with attention or a mean over tokens takes the mask of `ids`; the decisions do not
    padded = {n["name"]: n.get("padding") for n in manifest["nodes"] if n["file"]}
    assert padded == {"L1": "ids", "L2": "ids", "L3": "ids", "L4": "ids", "E1": "ids", "E2": "ids", "E3": "ids",
                      "E4": "ids", "D1": None, "D2": None, "D3": None}
    assert all(executor.padding_source(n) == s for n, s in padded.items())
    # The mask changes the answer (else carrying it would be untested): unmasked padding differs.
    ids = x[:8]
    with torch.inference_mode():
        h = executor.nodes["L1"](ids)
        assert not torch.allclose(h, executor.nodes["L1"](ids, ids == 0))
    # numpy ids of any integer type are token ids; floats, or ids outside the vocabulary, are E944
    assert np.array_equal(net(x.numpy().astype(np.int32)).cost, net(x).cost)
    for bad in (x.float(), x.numpy().astype(np.float64), x + 64, x - 1):
        with pytest.raises(D2GraphError) as e:
            net(bad)
        assert _codes(e) == ["E944"]
    # predict from the command line: integer arrays are read as ids, float ones refused
    assert cli.main(["export", str(run_folder), "--out", str(tmp_path / "deploy")]) == 0
    np.savez(tmp_path / "in.npz", ids=x.numpy()[:40])
    assert cli.main(["predict", str(tmp_path / "deploy"), "--input", str(tmp_path / "in.npz"),
                     "--out", str(tmp_path / "p.npz"), "--quiet"]) == 0
    with evaluating(executor):
        expected = run_policy(executor, policy, x[:40])
    with np.load(tmp_path / "p.npz") as p:
        assert np.array_equal(p["cost"], expected.cost.numpy())
    np.savez(tmp_path / "floats.npz", ids=x.numpy()[:40].astype(np.float32))
    capsys.readouterr()
    assert cli.main(["predict", str(tmp_path / "deploy"), "--input", str(tmp_path / "floats.npz"),
                     "--out", str(tmp_path / "q.npz"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error[E944]" in err and "token ids" in err and not (tmp_path / "q.npz").exists()


def test_a_policy_that_reads_labels_is_refused(trained, tmp_path):
    executor = trained["high_low"][0]
    with pytest.raises(D2GraphError) as e:
        export(executor, OraclePolicy([{"Q1": 0}], [0.5], 0.1, 0), tmp_path / "out")
    assert _codes(e) == ["E941"] and "labels" in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_an_unfinished_run_is_E940(trained, tmp_path):
    run_folder = trained["high_low"][4]
    state = torch.load(run_folder / "last.pt", weights_only=True)
    unfinished = tmp_path / "run"
    unfinished.mkdir()
    for f in ("config.json", "high_low.d2"):
        (unfinished / f).write_bytes((run_folder / f).read_bytes())
    with pytest.raises(D2GraphError) as e:
        export_run(unfinished, tmp_path / "out")
    assert _codes(e) == ["E940"] and "no last.pt" in str(e.value)
    torch.save({**state, "complete": False}, unfinished / "last.pt")
    with pytest.raises(D2GraphError) as e:
        export_run(unfinished, tmp_path / "out")
    assert _codes(e) == ["E940"] and "--resume" in e.value.diagnostics[0].help


def _copy(folder, to):
    import shutil

    shutil.copytree(folder, to)
    return to


def test_broken_export_folders_are_clear_errors(trained, tmp_path):
    folder = trained["early_exit"][3].folder
    with pytest.raises(D2GraphError) as e:
        runtime.load(tmp_path / "nowhere")
    assert _codes(e) == ["E942"]

    newer = _copy(folder, tmp_path / "newer")
    manifest = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**manifest, "version": runtime.MANIFEST_VERSION + 1}))
    with pytest.raises(D2GraphError) as e:
        runtime.load(newer)
    assert _codes(e) == ["E942"] and "version 2" in str(e.value)

    missing = _copy(folder, tmp_path / "missing")
    (missing / "nodes" / "B2.pt2").unlink()
    with pytest.raises(D2GraphError) as e:
        runtime.load(missing)
    assert _codes(e) == ["E943"] and "B2.pt2 is missing" in str(e.value)

    damaged = _copy(folder, tmp_path / "damaged")
    data = bytearray((damaged / "nodes" / "B2.pt2").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (damaged / "nodes" / "B2.pt2").write_bytes(bytes(data))
    with pytest.raises(D2GraphError) as e:
        runtime.load(damaged)
    assert _codes(e) == ["E943"] and "damaged" in str(e.value)

    (damaged / "manifest.json").write_text("{not json")
    with pytest.raises(D2GraphError) as e:
        runtime.load(damaged)
    assert _codes(e) == ["E943"]


def test_an_input_of_the_wrong_shape_is_E944(trained):
    net = trained["early_exit"][3]
    for bad in (torch.zeros(4, 1, 28, 28), torch.zeros(1, 32, 32), {"image": torch.zeros(2, 1, 32, 32)},
                torch.zeros(0, 1, 32, 32)):
        with pytest.raises(D2GraphError) as e:
            net(bad)
        assert _codes(e) == ["E944"]
    assert net(np.zeros((2, 1, 32, 32), dtype=np.float64)).output.shape == (2, 10)  # numpy, any float


def test_export_replaces_an_export_whole_and_never_another_folder(trained, tmp_path):
    executor, policy, x, _, _ = trained["early_exit"]
    out = export(executor, policy, tmp_path / "out")
    first = runtime.read_manifest(out)["files"]
    export(executor, StaticPolicy({"Q1": 0}), out)
    assert runtime.load(out).policy.startswith("static path")
    assert not (out / "policy").exists() and set(runtime.read_manifest(out)["files"]) < set(first)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(D2GraphError) as e:
        export(executor, policy, tmp_path / "mine")
    assert _codes(e) == ["E946"] and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_predict_runs_batches_and_writes_atomically(trained, tmp_path):
    executor, policy, x, net, _ = trained["early_exit"]
    arrays = runtime.predict(net, x.numpy()[:100], batch=32)
    whole = net(x[:100])
    assert np.array_equal(arrays["cost"], whole.cost) and np.array_equal(arrays["exit"], whole.exit)
    np.testing.assert_allclose(arrays["output_y"], whole.output.numpy(), rtol=1e-4, atol=1e-5)
    assert np.array_equal(arrays["prediction"], whole.output.numpy().argmax(1))
    path = runtime.write_predictions(tmp_path / "p.npz", arrays)
    with np.load(path) as saved:
        assert sorted(saved.files) == sorted(arrays)
        assert list(saved["exit_names"]) == ["B3", "H2", "H1"]
    line = runtime.summary(arrays, net)
    shares = np.bincount(whole.exit, minlength=3) / 100
    assert line.startswith("early_exit: 100 examples") and f"B3 {shares[0]:.1%}" in line
    assert [p.name for p in tmp_path.iterdir()] == ["p.npz"]


def test_the_runtime_runs_without_the_front_end(trained):
    """A deployment has torch and numpy, not lark or the checker: in a fresh interpreter,
    lark, scikit-learn, matplotlib and d2graph's front end, executor and trainers are made
    unimportable (None in sys.modules, as if not installed), and networkx may not be
    imported by any d2graph module (torch.export.load imports it itself: networkx is one
    of torch's own dependencies); the export still loads and runs a batch."""
    folder = trained["eenet_resnet"][3].folder
    script = textwrap.dedent(f"""
        import sys
        for name in ("lark", "sklearn", "matplotlib", "d2graph.check", "d2graph.syntax", "d2graph.ir",
                     "d2graph.executor", "d2graph.paths", "d2graph.trainers", "d2graph.runs", "d2graph.export"):
            sys.modules[name] = None

        class NoNetworkxForD2graph:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "networkx":
                    frame = sys._getframe(1)
                    while frame is not None and frame.f_code.co_filename.startswith("<frozen"):
                        frame = frame.f_back  # the import machinery: the importer is the first frame after it
                    if frame is not None and "/d2graph/" in frame.f_code.co_filename:
                        raise ImportError(f"{{frame.f_code.co_filename}} imports {{name}}")
                return None

        sys.meta_path.insert(0, NoNetworkxForD2graph())
        import torch
        from d2graph import runtime
        net = runtime.load({str(folder)!r})
        p = net(torch.randn(5, 1, 32, 32))
        assert p.output.shape == (5, 10) and p.cost.shape == (5,)
        front = [m for m, module in sys.modules.items() if module is not None and m.split(".")[0] == "lark"]
        print("ok", front)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok []"


def test_export_and_predict_from_the_command_line(trained, tmp_path, capsys):
    from d2graph import cli

    executor, policy, x, _, run_folder = trained["high_low"]
    assert cli.main(["export", str(run_folder), "--out", str(tmp_path / "deploy")]) == 0
    assert "wrote" in capsys.readouterr().out
    np.savez(tmp_path / "in.npz", x=x.numpy()[:50])
    assert cli.main(["predict", str(tmp_path / "deploy"), "--input", str(tmp_path / "in.npz"),
                     "--out", str(tmp_path / "p.npz"), "--batch", "16", "--quiet"]) == 0
    out = capsys.readouterr().out
    with evaluating(executor):
        expected = run_policy(executor, policy, x[:50])
    with np.load(tmp_path / "p.npz") as p:
        assert np.array_equal(p["cost"], expected.cost.numpy())
        assert np.array_equal(p["action_Q1"], expected.actions["Q1"].numpy())
        assert np.array_equal(p["prediction"], expected.output.argmax(1).numpy())
    assert out.startswith("high_low: 50 examples") and "mean cost" in out and "exits N2" in out

    np.savez(tmp_path / "small.npz", x=np.zeros((3, 1, 28, 28), np.float32))
    assert cli.main(["predict", str(tmp_path / "deploy"), "--input", str(tmp_path / "small.npz"),
                     "--out", str(tmp_path / "q.npz"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error[E944]" in err and "[B, 1, 32, 32]" in err and "Traceback" not in err
    assert not (tmp_path / "q.npz").exists()
    assert cli.main(["export", str(tmp_path), "--out", str(tmp_path / "d2")]) == 2  # not a run folder
    assert "E922" in capsys.readouterr().err

"""The ONNX format (the `d2graph[onnx]` extra): a trained run exported as ONNX programs runs
under onnxruntime with numpy alone and predicts what the executor does, at batch 1 and 256.
Skipped where onnx, onnxscript or onnxruntime is not installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import d2graph
from d2graph import runtime
from d2graph.export import export_run
from d2graph.policies import evaluating, run_policy
from d2graph.runs import Run, resolve, train

from .conftest import ROOT

for _name in ("onnx", "onnxscript", "onnxruntime"):
    pytest.importorskip(_name, reason=f"the onnx format needs the d2graph[onnx] extra ({_name} is not installed)")


@pytest.fixture(scope="module")
def high_low(tmp_path_factory, one_thread):
    path = ROOT / "examples" / "high_low.d2"
    graph = d2graph.load(path)
    config = resolve(graph, ["data.n=160", "batch=40", "stage.backbone.epochs=1", "stage.policy.epochs=1",
                             "threads=1"])
    base = tmp_path_factory.mktemp("onnx")
    run = Run.create(graph, path.read_text(encoding="utf-8"), config, base / "run")
    trained = train(graph, config, run, quiet=True, echo=None, evaluate=False)
    folder = export_run(run.folder, base / "deploy", format="onnx")
    x = torch.cat([trained.data.test.tensors[0], trained.data.val.tensors[0]] * 4)[:256]
    return trained.executor.eval(), trained.policy, x, folder


def test_the_onnx_runtime_predicts_what_the_executor_does(high_low):
    executor, policy, x, folder = high_low
    net = runtime.load(folder, threads=1)
    assert net.format == "onnx" and sorted(net.manifest["files"]) == [f"nodes/{n}.onnx" for n in
                                                                       ("N1", "N2", "N3", "Q1")]
    for batch in (x, x[:1], x[7:8]):
        with evaluating(executor):
            expected = run_policy(executor, policy, batch)
        got = net(batch.numpy())
        assert isinstance(got.output, np.ndarray)
        np.testing.assert_allclose(got.output, expected.output.numpy(), rtol=1e-4, atol=1e-5)
        assert np.array_equal(got.actions["Q1"], expected.actions["Q1"].numpy())
        assert np.array_equal(got.cost, expected.cost.numpy())


def test_the_onnx_runtime_needs_no_torch(high_low):
    """torch (and with it networkx) made unimportable: the ONNX export still runs."""
    folder = high_low[3]
    script = textwrap.dedent(f"""
        import sys
        for name in ("torch", "lark", "networkx", "sklearn", "matplotlib"):
            sys.modules[name] = None
        import numpy as np
        from d2graph import runtime
        p = runtime.load({str(folder)!r}, threads=1)(np.zeros((3, 1, 32, 32), np.float32))
        assert p.output.shape == (3, 10)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_the_onnx_runtime_carries_token_ids_and_padding_masks(tmp_path, one_thread):
    """bert_early_exit as ONNX: int64 ids in, each attention and mean program fed its rows'
    padding mask (bool), the same routing as the executor's with PABEE's patience 2."""
    path = ROOT / "examples" / "bert_early_exit.d2"
    graph = d2graph.load(path)
    config = resolve(graph, ["data.n=160", "batch=40", "stage.backbone.epochs=1", "stage.policy.budget=0.9",
                             "threads=1"])
    run = Run.create(graph, path.read_text(encoding="utf-8"), config, tmp_path / "run")
    trained = train(graph, config, run, quiet=True, echo=None, evaluate=False)
    net = runtime.load(export_run(run.folder, tmp_path / "deploy", format="onnx"), threads=1)
    assert net.tokens == {"ids": 64} and net.manifest["nodes"][1]["padding"] == "ids"
    executor, policy = trained.executor.eval(), trained.policy
    x = torch.cat([trained.data.test.tensors[0], trained.data.val.tensors[0]] * 6)[:256]
    assert 0 < int((x == 0).any(1).sum()) < len(x)  # some rows padded, some not
    for batch in (x, x[:1], x[7:8]):
        with evaluating(executor):
            expected = run_policy(executor, policy, batch)
        got = net(batch.numpy())
        np.testing.assert_allclose(got.output, expected.output.numpy(), rtol=1e-4, atol=1e-5)
        for q, actions in expected.actions.items():
            assert np.array_equal(got.actions[q], actions.numpy()), q
        assert np.array_equal(got.cost, expected.cost.numpy())
    assert len(np.unique(net(x.numpy()).actions["D2"])) > 1  # the routing split the batch

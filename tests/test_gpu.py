"""Training on a CUDA device (skipped where torch sees none: this project's CI machines).

- `device = cuda` trains a shipped example to a complete run folder, at fp32 and at bf16,
  and its test accuracy after the same steps is that of a CPU run within a few points
  (float sums run in another order on the GPU, so the runs are not bit-identical).
- Under torchrun with nccl, two processes on two GPUs finish a run (skipped below 2 GPUs).
`benchmarks/gpu_check.sh` runs this file with the executor's CUDA test and the benchmarks.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import d2graph
from d2graph.runs import Run, load_checkpoint, resolve, train

from .conftest import ROOT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SMALL = ["data.n=1000", "batch=64", "stage.backbone.epochs=3", "threads=1"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_run_on_cuda_matches_the_cpu_run(tmp_path, precision):
    graph = d2graph.load(ROOT / "examples" / "early_exit.d2")
    accuracy = {}
    for device in ("cpu", "cuda"):
        config = resolve(graph, [*SMALL, f"device={device}", f"precision={precision}"])
        run = Run.create(graph, "", config, tmp_path / device)
        trained = train(graph, config, run, quiet=True, echo=None)
        assert load_checkpoint(run.folder / "last.pt")["complete"]
        accuracy[device] = trained.reports["test"].accuracy
        if device == "cuda":
            assert next(trained.executor.parameters()).device.type == "cuda"
    assert abs(accuracy["cuda"] - accuracy["cpu"]) <= 0.05, accuracy


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_torchrun_with_nccl_on_two_gpus_finishes(tmp_path):
    sets = [a for o in [*SMALL, "device=cuda"] for a in ("--set", o)]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "d2graph", "train", str(ROOT / "examples" / "early_exit.d2"), *sets, "--out",
                        str(tmp_path / "run"), "--quiet"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "D2GRAPH_DIST_TIMEOUT": "120"})
    assert p.returncode == 0, p.stderr
    assert load_checkpoint(tmp_path / "run" / "last.pt")["complete"]

"""Data-parallel training under torchrun (d2graph.distributed), with gloo on the CPU.

- `Group.shard` splits every global batch into contiguous shares that cover it once.
- Gradient summing in a real two-process group: each process's mean gradient is weighted by
  its rows; a parameter that one process's examples did not reach counts as zero there; one
  that no process reached keeps `grad = None` (the optimiser skips it, as in one process).
- `from_main` hands process 0's value, or its error, to every process; a process that died
  makes the other's next collective fail with E927 within the timeout, not hang.
- `torchrun --nproc_per_node 2 -m d2graph train` end to end: one complete run folder, written
  by process 0 only, with the metrics of a one-process run on the same global batch; the
  joint trainers (qlearning, reinforce) finish; Ctrl-C under torchrun leaves a checkpoint
  that `--resume` under torchrun finishes.
Every subprocess is bounded by a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from d2graph.diagnostics import D2GraphError
from d2graph.distributed import Group, start
from d2graph.runs import load_checkpoint

from .conftest import ROOT

EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch build has no torch.distributed with gloo")

TINY = ["data.n=500", "batch=32", "stage.backbone.epochs=2", "threads=1"]
JOB_TIMEOUT = 240  # seconds for one torchrun job of the tiny settings (about 25 s on 2 cores)


@pytest.mark.parametrize("n, world", [(0, 2), (1, 2), (7, 2), (32, 2), (10, 3), (5, 8)])
def test_shards_cover_each_global_batch_once(n, world):
    parts = [Group(r, world).shard(n) for r in range(world)]
    rows = [i for p in parts for i in range(n)[p]]
    assert rows == list(range(n))
    assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


def test_one_process_is_the_identity():
    group = start()
    assert (group.rank, group.world, group.main) == (0, 1, True)
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.full((3,), 2.0)
    group.sync_gradients([w], 5)
    assert w.grad.tolist() == [2.0, 2.0, 2.0]
    assert group.sum([1.5, 2]) == [1.5, 2.0]
    assert group.from_main(lambda: "x") == "x"


def _worker(rank: int, world: int, store: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=20))
    group = Group(rank, world)
    out = {}
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    n = 3 if rank == 0 else 1
    # Rank 0's rows reach a only; rank 1's reach a and b; no row reaches c.
    a.grad = torch.tensor([1.0, 2.0]) if rank == 0 else torch.tensor([5.0, 6.0])
    b.grad = None if rank == 0 else torch.tensor([4.0, 8.0])
    group.sync_gradients([a, b, c], n)
    out["a"], out["b"], out["c"] = a.grad.tolist(), b.grad.tolist(), c.grad
    out["sum"] = group.sum([rank + 1.0, 1])
    out["main"] = group.from_main(lambda: {"from": rank})

    def fails():
        raise D2GraphError([])

    try:
        group.from_main(fails)
    except D2GraphError:
        out["error"] = True
    buffer = torch.full((2,), float(rank))
    module = torch.nn.Module()
    module.register_buffer("stat", buffer)
    group.copy_buffers(module)
    out["buffer"] = module.stat.tolist()
    # Then process 1 dies; process 0's next collective must fail with E927, not hang.
    if rank == 1:
        results[rank] = out
        os._exit(0)
    try:
        group.sum([1.0])
        out["after_death"] = "no error"
    except D2GraphError as e:
        out["after_death"] = e.diagnostics[0].code
    results[rank] = out


def test_gradients_are_the_global_batch_s_and_unused_parameters_stay_unused(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        ctx = mp.start_processes(_worker, args=(2, str(tmp_path / "store"), results), nprocs=2, join=False,
                                 start_method="spawn")
        for p in ctx.processes:
            p.join(timeout=120)
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                pytest.fail("a worker hung")
        got = dict(results)
    for rank in (0, 1):
        out = got[rank]
        assert out["a"] == pytest.approx([(3 * 1 + 1 * 5) / 4, (3 * 2 + 1 * 6) / 4])
        assert out["b"] == pytest.approx([1 * 4 / 4, 1 * 8 / 4])  # rank 0's rows did not reach b: zero there
        assert out["c"] is None  # no process reached c: Adam skips it, as in one process
        assert out["sum"] == [3.0, 2.0]
        assert out["main"] == {"from": 0}
        assert out["error"]
        assert out["buffer"] == [0.0, 0.0]  # process 0's statistics on every process
    assert got[0]["after_death"] == "E927"


# --- torchrun end to end --------------------------------------------------------------------


def _torchrun(*args, cwd, nproc: int = 2, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "D2GRAPH_DIST_TIMEOUT": "60"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "d2graph"] if nproc > 1 else [sys.executable, "-m", "d2graph"]
    return subprocess.Popen([*launcher, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True, **kw)


def _finish(p: subprocess.Popen, timeout: int = JOB_TIMEOUT) -> tuple[str, str]:
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"the torchrun job did not finish in {timeout} s")


def _no_traceback_of_d2graph(err: str) -> bool:
    """torchrun's agent prints a traceback of its own when a process fails or it gets a
    signal (SignalException, ChildFailedError); d2graph's processes print none."""
    return all("/d2graph/" not in part.split("torch/distributed/")[0] for part in err.split("Traceback")[1:])


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_write_one_run_with_the_one_process_metrics(tmp_path):
    """early_exit has no batch norm, so two processes on halves of each batch of 32 take the
    one-process steps, up to the order of float additions."""
    runs = {}
    for nproc in (2, 1):
        folder = tmp_path / f"run{nproc}"
        out, err = _finish(_torchrun("train", str(EXAMPLES / "early_exit.d2"), *_sets(TINY), "--out", str(folder),
                                     cwd=tmp_path, nproc=nproc))
        assert "Traceback" not in err, err
        assert "test accuracy" in out, err
        assert out.count("test accuracy") == 1  # printed by process 0 only
        runs[nproc] = folder
    assert sorted(p.name for p in runs[2].iterdir()) == sorted(p.name for p in runs[1].iterdir())
    assert load_checkpoint(runs[2] / "last.pt")["complete"]
    two, one = _rows(runs[2]), _rows(runs[1])
    assert len(two) == len(one) == 3  # logged once, not once per process
    for a, b in zip(two, one):
        assert a.keys() == b.keys()
        for k, v in b.items():
            if isinstance(v, float) and k != "tau":
                assert a[k] == pytest.approx(v, abs=1e-3), k
            elif k != "tau":
                assert a[k] == v, k
    # The threshold calibrated on the same validation outputs, up to float noise.
    assert two[-1]["tau"] == pytest.approx(one[-1]["tau"], abs=1e-3)


@pytest.mark.parametrize("example, overrides", [
    ("high_low", ["stage.policy.epochs=1"]),          # qlearning: bags, held-out rewards, mean reward
    ("guan_cascade", ["stage.policy.epochs=1"]),      # reinforce: global mean reward and cost, every head
])
def test_joint_trainers_finish_under_torchrun(tmp_path, example, overrides):
    sets = _sets(["data.n=400", "batch=32", "stage.backbone.epochs=1", "threads=1", *overrides])
    out, err = _finish(_torchrun("train", str(EXAMPLES / f"{example}.d2"), *sets, "--out", str(tmp_path / "run"),
                                 "--quiet", cwd=tmp_path))
    assert "Traceback" not in err, err
    assert "test accuracy" in out, err
    assert load_checkpoint(tmp_path / "run" / "last.pt")["complete"]
    assert [r["stage"] for r in _rows(tmp_path / "run")][-1] == "policy"


def test_ctrl_c_under_torchrun_keeps_a_checkpoint_and_resume_under_torchrun_finishes(tmp_path):
    folder = tmp_path / "run"
    p = _torchrun("train", str(EXAMPLES / "early_exit.d2"), *_sets([*TINY, "stage.backbone.epochs=4"]),
                  "--out", str(folder), cwd=tmp_path)
    for line in p.stderr:  # training has begun and a checkpoint was written
        if "epoch 1:" in line:
            break
    os.killpg(p.pid, signal.SIGINT)  # as a terminal's Ctrl-C reaches torchrun and its processes
    out, err = _finish(p)
    assert p.returncode != 0
    assert "interrupted: the last checkpoint is in" in err, err
    assert _no_traceback_of_d2graph(err), err
    state = load_checkpoint(folder / "last.pt")
    assert state["stage_index"] == 0 and not state["complete"]
    out, err = _finish(_torchrun("train", "--resume", str(folder), "--quiet", cwd=tmp_path))
    assert "Traceback" not in err, err
    assert "test accuracy" in out
    assert load_checkpoint(folder / "last.pt")["complete"]


def test_a_mistake_fails_every_process_with_its_message_and_no_hang(tmp_path):
    out, err = _finish(_torchrun("train", "--resume", str(tmp_path / "nowhere"), cwd=tmp_path))
    assert err.count("error[E922]: no run folder") == 2, err  # each process says why it stops
    assert _no_traceback_of_d2graph(err), err


def test_other_commands_refuse_to_run_under_torchrun(tmp_path):
    """Each process would run the whole command and write the same files."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0"}
    p = subprocess.run([sys.executable, "-m", "d2graph", "sweep", str(EXAMPLES / "early_exit.d2"), "--out",
                        str(tmp_path / "s")], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "E920" in p.stderr and "only `train` runs under torchrun" in p.stderr
    assert not (tmp_path / "s").exists()

"""The cost of d2graph's gradient summing against PyTorch's DistributedDataParallel.

Two processes (gloo on the CPU, one thread each) train the same static graph — every node of
an example graph on every example (executor mode `all`, each head's cross-entropy) — with
two ways of making a step the global batch's:
  - `ddp`:     the executor wrapped in `DistributedDataParallel` (plain: no unused-parameter
               search, since every parameter is used on a static graph);
  - `d2graph`: the executor as is, `Group.sync_gradients` before the optimiser step (one
               all-reduce of the flattened gradients, a used-flag per parameter and the rows:
               what lets a dynamic graph leave branches unused on a process) and
               `Group.copy_buffers` after it (as DDP broadcasts its buffers).
(Control nodes do not act in mode `all`, so their parameters are frozen for both: plain DDP
fails on a parameter that gets no gradient.) The two alternate step by step (order swapped every round) so that they share the machine's
momentary load; each process times its own steps and the script prints the medians of
process 0 and their ratio, per example graph.

    python benchmarks/bench_distributed.py [--graphs early_exit,eenet_resnet] [--batch 64] [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import d2graph
from d2graph.distributed import Group
from d2graph.executor import compile
from d2graph.paths import heads

ROOT = Path(__file__).resolve().parent.parent


class Heads(torch.nn.Module):
    """The executor in mode `all`: the mean of every head's cross-entropy (a static graph)."""

    def __init__(self, executor):
        super().__init__()
        self.executor = executor
        self.heads = heads(executor.graph)
        for name, module in executor.nodes.items():  # control nodes do not act in mode `all`
            if executor.graph[name].kind != "node":
                module.requires_grad_(False)

    def forward(self, x, y):
        r = self.executor(x, mode="all", keep=self.heads)
        return sum(F.cross_entropy(r.values[h][1], y) for h in self.heads) / len(self.heads)


def _worker(rank: int, world: int, store: str, args, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    group = Group(rank, world)
    out = {}
    for name in args.graphs.split(","):
        graph = d2graph.load(ROOT / "examples" / f"{name}.d2")
        torch.manual_seed(0)
        plain = Heads(compile(graph))
        torch.manual_seed(0)
        ours = Heads(compile(graph))
        wrapped = torch.nn.parallel.DistributedDataParallel(plain)
        opt_ddp = torch.optim.Adam([p for p in plain.parameters() if p.requires_grad], lr=1e-3)
        opt_ours = torch.optim.Adam([p for p in ours.parameters() if p.requires_grad], lr=1e-3)
        shape = graph.inputs[0].out_shape
        local = args.batch // world
        g = torch.Generator().manual_seed(rank)
        x, y = torch.randn((local, *shape), generator=g), torch.randint(0, 10, (local,), generator=g)

        def ddp_step():
            opt_ddp.zero_grad(set_to_none=True)
            wrapped(x, y).backward()
            opt_ddp.step()

        def our_step():
            opt_ours.zero_grad(set_to_none=True)
            ours(x, y).backward()
            group.sync_gradients(list(ours.parameters()), local)
            opt_ours.step()
            group.copy_buffers(ours)  # as DDP broadcasts its buffers (batch-norm statistics)

        times = {"ddp": [], "d2graph": []}
        steps = [("ddp", ddp_step), ("d2graph", our_step)]
        for s in range(args.steps + 3):
            for label, fn in steps if s % 2 == 0 else steps[::-1]:
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                if s >= 3:  # the first steps warm the allocator and gloo's buffers
                    times[label].append(time.perf_counter() - t0)
        params = sum(p.numel() for p in ours.parameters() if p.requires_grad)
        out[name] = {k: statistics.median(v) for k, v in times.items()} | {"params": params}
    if rank == 0:
        results.update(out)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graphs", default="early_exit,eenet_resnet", help="examples/ graphs, comma-separated")
    ap.add_argument("--batch", type=int, default=64, help="the global batch (each process: half)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps of each kind")
    args = ap.parse_args()
    print(f"torch {torch.__version__}; 2 processes, gloo, 1 thread each; global batch {args.batch}; "
          f"load average before: {Path('/proc/loadavg').read_text().split()[:3]}")
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_worker, args=(2, os.path.join(tmp, "store"), args, results), nprocs=2,
                           start_method="spawn")
        print(f"{'graph':<14} {'parameters':>10} {'DDP step (ms)':>14} {'d2graph step (ms)':>18} {'ratio':>6}")
        for name, r in results.items():
            print(f"{name:<14} {r['params']:>10,} {r['ddp'] * 1e3:>14.1f} {r['d2graph'] * 1e3:>18.1f} "
                  f"{r['d2graph'] / r['ddp']:>6.2f}")


if __name__ == "__main__":
    main()

"""Data-parallel training across processes started by `torchrun`, on torch.distributed.

In:  the environment `torchrun` gives each process it starts (`WORLD_SIZE`, `RANK`,
     `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), and the values a training step needs summed
     over all processes (gradients, losses, rewards, costs, a stop request).
Out: `start()` → a `Group` (one process when not under torchrun: every call below is
     then the identity, with no collective and no cost); `Group.shard(n)` → this process's
     rows of a global batch; `Group.sum(values)`, `Group.sync_gradients(params, n)`,
     `Group.copy_buffers(module)`, `Group.from_main(fn)`; `Group.close()`.
Guarantees:
  - Every process takes the same global batch, in the same order, and keeps a contiguous
    share of its rows (`shard`); gradients are summed weighted by each process's rows and
    divided by the global batch, so a step is the one-process step on the whole batch (up
    to the order of float additions).
  - A parameter that no example reached on some process (a branch its rows did not take)
    counts as a zero gradient there; one that no process reached keeps `grad = None`, so
    the optimiser skips it as it would in one process (Adam's moments do not decay).
  - Buffers (batch-norm statistics) are copied from process 0 after every step, so every
    process holds the same model, as DistributedDataParallel's `broadcast_buffers` does.
  - A failure of a collective — a process died, the network went away, or nothing was
    heard for `timeout` seconds (`D2GRAPH_DIST_TIMEOUT`, default 300) — raises E927, never
    hangs without bound.
Why not `DistributedDataParallel`: its reducer expects one forward per backward through
the wrapper, and tensors it can find in the module's output; d2graph's trainers call the
executor in several modes per step (the sampled route, the held-out policy batch, every
head) and read results it builds lazily. One bucketed all-reduce of the gradients before
each optimiser step is what DDP does, without those constraints (its cost is measured
against DDP's in docs/performance.md).

Example:
    >>> group = start()                          # one process: rank 0 of 1
    >>> group.world, group.shard(10)
    (1, slice(0, 10, None))
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Callable, Iterable

import torch

from .diagnostics import D2GraphError, Diagnostic

__all__ = ["Group", "distributed_error", "start", "under_torchrun"]

DEFAULT_TIMEOUT = 300  # seconds a collective waits for the other processes


def distributed_error(message: str, help: str = "") -> D2GraphError:
    """E927: the processes of a distributed run could not work together."""
    return D2GraphError([Diagnostic("E927", message, None, "", help=help)])


def under_torchrun() -> bool:
    """Whether this process is one of several that `torchrun` started."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


class Group:
    """The processes of one run. `rank` is this one's number, `world` how many there are;
    `main` is rank 0, the only one that writes the run folder and prints."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This process's rows of a global batch of `n`: contiguous, sizes differing by at most one."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def sum(self, values: Iterable[float]) -> list[float]:
        """Each value summed over the processes (float64)."""
        values = [float(v) for v in values]
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)  # on the CPU: gloo's
        self._collective("summing the step's numbers", torch.distributed.all_reduce, t)
        return t.tolist()

    def sync_gradients(self, params: Iterable[torch.nn.Parameter], n: int) -> None:
        """Make every process's gradients those of the global batch: Σ_r n_r·g_r / Σ_r n_r,
        where this process computed `g` (a mean) over its `n` rows. See the module doc for
        parameters that no example reached."""
        if self.world == 1:
            return
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        device = params[0].device  # CUDA tensors go through nccl, CPU ones through gloo
        flat = torch.cat([(p.grad.detach().float().reshape(-1) * n if p.grad is not None
                           else torch.zeros(p.numel(), device=device)).to(device) for p in params]
                         + [torch.tensor([1.0 if p.grad is not None else 0.0 for p in params] + [float(n)],
                                         device=device)])
        self._collective("summing the gradients", torch.distributed.all_reduce, flat)
        total = float(flat[-1])
        used = flat[-1 - len(params):-1]
        offset = 0
        for i, p in enumerate(params):
            k = p.numel()
            if float(used[i]) > 0:
                g = (flat[offset:offset + k] / max(total, 1.0)).view_as(p).to(p.device, p.dtype)
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.copy_(g)
            offset += k

    def copy_buffers(self, module: torch.nn.Module) -> None:
        """Every process takes process 0's buffers (batch-norm running statistics), in one
        broadcast per dtype and device (a ResNet has dozens of small buffers)."""
        if self.world == 1:
            return
        groups: dict[tuple, list[torch.Tensor]] = {}
        for b in module.buffers():
            groups.setdefault((b.dtype, b.device), []).append(b)
        for buffers in groups.values():
            flat = torch.cat([b.detach().reshape(-1) for b in buffers])
            self._collective("copying the buffers", torch.distributed.broadcast, flat, src=0)
            offset = 0
            for b in buffers:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()

    def from_main(self, fn: Callable[[], Any]) -> Any:
        """`fn()` run on process 0 and its value (or the D2GraphError it raised) given to
        every process — for reading a checkpoint once, and failing on every process alike."""
        if self.world == 1:
            return fn()
        box: list[Any] = [None]
        if self.main:
            try:
                box[0] = ("ok", fn())
            except D2GraphError as e:
                box[0] = ("error", e.diagnostics)
        self._collective("sharing process 0's state", torch.distributed.broadcast_object_list, box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise D2GraphError(value)
        return value

    def close(self, finished: bool = True) -> None:
        """Leave the process group. A process that `finished` its work first waits for the
        others to finish theirs (process 0 still evaluates and writes when the others are
        done): gloo tearing a group down under a process still in it aborted that one now and
        then ("terminate called without an active exception"). One that failed leaves at once,
        so that the others' next collective fails with a message rather than waiting."""
        if self.world > 1 and torch.distributed.is_initialized():
            if finished:
                try:
                    torch.distributed.barrier()
                except (RuntimeError, ValueError):
                    pass  # another process failed, and says so; leaving is all that is left
            torch.distributed.destroy_process_group()

    def _collective(self, doing: str, op, *args, **kwargs) -> None:
        try:
            op(*args, **kwargs)
        except (RuntimeError, ValueError) as e:  # torch's DistBackendError is a RuntimeError
            raise distributed_error(
                f"process {self.rank} of {self.world} failed while {doing}: {str(e).splitlines()[0][:200]}",
                help="another process of the run stopped (see its messages above) or cannot be reached; "
                     "restart the job with `--resume RUN` to continue from the last checkpoint") from None


def start() -> Group:
    """The process group of this run: joined from torchrun's environment when there is one
    (gloo for CPU tensors, and nccl for CUDA ones where torch has it; each process takes the
    GPU of its `LOCAL_RANK`), else one process."""
    if not under_torchrun():
        return Group()
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        timeout = float(os.environ.get("D2GRAPH_DIST_TIMEOUT", DEFAULT_TIMEOUT))
    except (KeyError, ValueError) as e:
        raise distributed_error(f"WORLD_SIZE is set but torchrun's environment is incomplete or wrong ({e})",
                                help="start the processes with `torchrun --nproc_per_node N -m d2graph train FILE`, "
                                     "or unset WORLD_SIZE for one process") from None
    backend = "gloo"
    if torch.cuda.is_available() and torch.distributed.is_nccl_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    if not torch.distributed.is_initialized():
        try:
            torch.distributed.init_process_group(backend, timeout=timedelta(seconds=timeout), rank=rank,
                                                 world_size=world)
        except (RuntimeError, ValueError) as e:
            raise distributed_error(f"process {rank} of {world} could not join the others: "
                                    f"{str(e).splitlines()[0][:200]}",
                                    help="check MASTER_ADDR / MASTER_PORT (torchrun sets them), the network "
                                         "between the machines, and that every process was started") from None
    return Group(rank, world)

"""How many CPU threads torch computes with: the train block's `threads` and `--threads`.

In:  a `threads` value: a positive integer, or `auto`.
Out: `thread_count(value)` → the integer count (`auto` resolved by `auto_threads()`);
     `using_threads(n)` → a context in which torch's operators run on `n` intra-op threads.
Guarantees:
  - `using_threads` puts torch's previous count back when it is left, however it is left,
    so a library call (`d2graph.train`, `sweep`) never changes its caller's global state.
  - `auto` does not oversubscribe the CPUs this process may run on: the count is what
    `OMP_NUM_THREADS` says when it is set to a positive integer (the user or a job
    scheduler chose it, and torch reads it too), and otherwise one less than those CPUs,
    at least 1 and at most 8 (`AUTO_CAP`) — so 1 on a 1- or 2-CPU machine.

Why: torch's default is one thread per CPU. Its threads wait for each other at the end of
every parallel operator, so when another process holds one CPU every operator waits for a
thread that is not running; on a loaded 2-CPU machine that made an fc network's epoch 20×
slower than one thread (docs/performance.md). Leaving one CPU to the rest of the machine
(the Python interpreter's own work, data loading, other jobs) avoids that. The cap is a
choice, not a measurement on this project's machines: d2graph's networks do little work
per operator, and more threads add synchronisation to each.

Example:
    >>> with using_threads(thread_count("auto")):    # doctest: +SKIP
    ...     executor(x)
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch

__all__ = ["AUTO_CAP", "auto_threads", "available_cpus", "thread_count", "using_threads"]

AUTO_CAP = 8  # the most threads `auto` picks (see the module doc)


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the system has one (it
    honours `taskset` and container cpusets), else all of the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


def auto_threads() -> int:
    """The count `threads = auto` stands for on this machine, now (see the module doc).

    Example:
        >>> auto_threads()        # doctest: +SKIP
        1
    """
    told = os.environ.get("OMP_NUM_THREADS", "").strip()
    if told.isdigit() and int(told) > 0:
        return int(told)
    return max(1, min(available_cpus() - 1, AUTO_CAP))


def thread_count(value: Any) -> int:
    """`value` (a positive integer, or `auto`) as a number of threads.

    Example:
        >>> thread_count(2), thread_count("auto") >= 1
        (2, True)
    """
    if value == "auto":
        return auto_threads()
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        # The schema and `--threads` let no other value through; a caller that skipped them is a bug.
        raise ValueError(f"threads must be a positive integer or `auto`, not {value!r}")
    return value


@contextmanager
def using_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to `count` inside, and back to what they were after.

    Example:
        >>> before = torch.get_num_threads()
        >>> with using_threads(1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)

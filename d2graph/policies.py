"""Policies: how a control decision is represented, run, saved and loaded.

In:  a compiled `Executor` and a batch.
Out: `Policy` (the protocol), the registry `POLICIES` (kind → class, filled by
     `register_policy`), the two policies every graph has (`LearnedPolicy`: the control
     nodes' own argmax; `StaticPolicy`: one static path for every example), `run_policy`
     (one forward pass routed by a policy), `save_policy` / `load_policy`, and
     `evaluating(executor)`, the context in which a policy is run for a verdict.
Guarantees:
  - `decide` returns {control: int64 [B]} for every control node (mode="force" needs them
    all) or None to let the control nodes decide (mode="argmax").
  - `state()` is plain data (numbers, strings, lists, dicts), so `save_policy` output
    goes into checkpoints that load with `weights_only=True`, and `load_policy` gives back
    a policy that decides the same.
  - `evaluating` puts the executor's train/eval mode back on leaving, even on an error.
This module sits below the trainers (which define the learned and calibrated policies),
evaluation and predictions, which all run policies; it imports only the executor and IR.

Example:
    >>> policy = load_policy(graph, {"kind": "static", "actions": {"Q1": 0}})   # doctest: +SKIP
    >>> run_policy(executor, policy, x).cost                                      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar, Iterator, Mapping

import torch
from torch import Tensor

from .executor import Executor, Result
from .ir import Graph

__all__ = ["POLICIES", "LearnedPolicy", "Policy", "StaticPolicy", "evaluating", "load_policy", "register_policy",
           "run_policy", "save_policy"]


class Policy:
    """Chooses the actions of the control nodes for a batch.

    `decide` returns {control: int64 [B]} for mode="force", or None to let the control nodes
    decide themselves (mode="argmax"). `y` is given to policies that look at the labels
    (the oracle); `generator` to random ones. A subclass sets `kind` and is made loadable
    with `@register_policy`."""

    kind: ClassVar[str]

    def decide(self, executor: Executor, x: Tensor, y: Tensor | None = None,
               generator: torch.Generator | None = None) -> dict[str, Tensor] | None:
        raise NotImplementedError  # pragma: no cover - protocol

    def state(self) -> dict[str, Any]:
        """Plain data (numbers, strings, lists, dicts) that `from_state` turns back into the policy."""
        return {}

    @classmethod
    def from_state(cls, graph: Graph, state: Mapping[str, Any]) -> Policy:
        return cls(**state)

    def describe(self) -> str:
        return self.kind


POLICIES: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Make a policy class loadable by its `kind` (`load_policy`); usable as a decorator."""
    POLICIES[cls.kind] = cls
    return cls


@register_policy
class LearnedPolicy(Policy):
    """The graph's own control nodes decide (argmax of their scores)."""

    kind = "learned"

    def decide(self, executor, x, y=None, generator=None):
        return None

    def describe(self) -> str:
        return "the control nodes' own scores (argmax)"


@register_policy
class StaticPolicy(Policy):
    """Every example takes the same actions: one static path of the graph."""

    kind = "static"

    def __init__(self, actions: Mapping[str, int]):
        self.actions = {q: int(a) for q, a in actions.items()}

    def decide(self, executor, x, y=None, generator=None):
        n = x.shape[0]
        # Control nodes the path does not reach still need an action for mode="force".
        return {q.name: torch.full((n,), self.actions.get(q.name, 0), dtype=torch.long)
                for q in executor.graph.control_nodes}

    def state(self) -> dict[str, Any]:
        return {"actions": dict(self.actions)}

    def describe(self) -> str:
        return "static path " + (", ".join(f"{q}={a + 1}" for q, a in self.actions.items()) or "(no control)")


def load_policy(graph: Graph, state: Mapping[str, Any]) -> Policy:
    """A policy back from `{"kind": ..., **policy.state()}`; ValueError if unknown."""
    state = dict(state)
    kind = state.pop("kind", None)
    if kind not in POLICIES:
        raise ValueError(f"unknown policy kind {kind!r}")
    return POLICIES[kind].from_state(graph, state)


def save_policy(policy: Policy) -> dict[str, Any]:
    """`{"kind": ..., **policy.state()}`: plain data that `load_policy` reads back."""
    return {"kind": policy.kind, **policy.state()}


def run_policy(executor: Executor, policy: Policy | None, x: Tensor, y: Tensor | None = None, *,
               keep=(), generator: torch.Generator | None = None) -> Result:
    """One forward pass routed by `policy` (None or a LearnedPolicy: the control nodes)."""
    actions = None if policy is None else policy.decide(executor, x, y, generator)
    if actions is None:
        return executor(x, keep=keep)
    return executor(x, mode="force", actions=actions, keep=keep)


@contextlib.contextmanager
def evaluating(executor: Executor, *, inference: bool = True) -> Iterator[None]:
    """Eval mode (batchnorm uses its running statistics, dropout is off, so each example is
    routed and predicted on its own) and no autograd; the executor's train/eval mode is put
    back afterwards, even when the body raises.

    `inference=True` uses `torch.inference_mode()`; `inference=False` uses `torch.no_grad()`,
    for outputs that will later be fed to a module being trained (inference tensors cannot).

    Example:
        >>> with evaluating(executor):                                   # doctest: +SKIP
        ...     result = executor(x)
    """
    was_training = executor.training
    executor.eval()
    try:
        with torch.inference_mode() if inference else torch.no_grad():
            yield
    finally:
        executor.train(was_training)

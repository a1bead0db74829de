"""The trainer protocol: what a trainer is and how it is made known.

In:  a compiled `Executor`, the data (`d2graph.data.Splits`) and a stage context (`Stage`,
     from d2graph.runs: settings, optimiser, epochs and steps that resume, the metrics log).
Out: `Trainer`, whose `fit(executor, data, stage)` trains the executor's weights in place and
     returns the `Policy` (d2graph.policies) that routes examples from then on (None: keep
     the current one); `register`, which makes a trainer known by name in `TRAINERS`; and
     `trainer_error`, the E921 a trainer raises when the graph or the data do not suit it.
Guarantees:
  - A trainer declares its parameters as a `Schema` (so the checker rejects an unknown
    parameter of a `stage` with a hint) and is registered by name in `TRAINERS`.
  - Trainers only use the executor's public modes (`all`, `force`, `explore`, `sample`,
    `argmax`) and `route` (pricing a routing without computing it) — never its internals.
What policy trainers share (budgets, calibration, path tables, an evaluation context) is
the toolkit, `d2graph.trainers.toolkit`; the facts about a graph's paths are in
`d2graph.paths` and the policies in `d2graph.policies`, below the trainers.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..diagnostics import D2GraphError
from ..executor import Executor
from ..ir import Graph
from ..policies import Policy
from ..schema import TRAINERS, Schema, trainer_error

__all__ = ["Trainer", "register", "trainer_error"]


# --- trainers -------------------------------------------------------------------------------


class Trainer:
    """Base class of trainers. Subclasses set `name`, `schema` and `role`, and implement `fit`.

    `role` is "backbone" for trainers that train the function nodes (the `supervised` stage)
    and "policy" for those that decide the routing; `d2graph sweep` trains the backbone
    stages once and repeats the policy stages for every budget. `holdout` > 0 asks for that
    share of the training examples to be kept from the function nodes (`data.holdout`).

    Example (a complete trainer):
        >>> class Always(Trainer):
        ...     name, role = "always", "policy"
        ...     schema = Schema("always", (Param("action", "nonneg", 0),))
        ...     def fit(self, executor, data, stage):
        ...         return StaticPolicy({q.name: self.params["action"] for q in executor.graph.control_nodes})
        >>> register(Always)                                    # doctest: +SKIP
    """

    name: ClassVar[str]
    schema: ClassVar[Schema]
    role: ClassVar[str] = "policy"
    # The share of the training split this trainer wants held out of the function nodes'
    # training when the train block says `holdout = auto` (`Splits.holdout`, docs/language.md).
    holdout: ClassVar[float] = 0.0

    def __init__(self, **params: Any):
        # Bound to the schema with defaults filled in, so a trainer built from Python behaves
        # as one from a .d2 file, and a wrong parameter raises the checker's diagnostic (a
        # trainer built from Python skips the checker).
        bound, diags = self.schema.bind([], [(k, v, None, None) for k, v in params.items()], what="trainer")
        if any(d.is_error for d in diags):
            raise D2GraphError(diags)
        self.params = bound

    def check_graph(self, graph: Graph) -> None:
        """Raise `trainer_error(...)` when this trainer cannot handle `graph` (called before
        any training, so a wrong pairing fails in a second, not after the backbone stage)."""

    def fit(self, executor: Executor, data, stage) -> Policy | None:  # pragma: no cover - protocol
        raise NotImplementedError


def register(trainer: type[Trainer]) -> type[Trainer]:
    """Make a trainer known to the checker and to `d2graph train` (usable as a decorator)."""
    if trainer.role not in ("backbone", "policy"):
        raise ValueError(f"trainer {trainer.name!r}: role must be 'backbone' or 'policy', not {trainer.role!r}")
    TRAINERS.register(trainer.name, trainer)
    return trainer

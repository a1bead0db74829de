"""Trainers: how the weights and the routing of a compiled graph are learned.

In:  a `stage NAME = trainer(args)` of a train block, resolved by d2graph.runs.
Out: the trainer classes, registered by name in `d2graph.schema.TRAINERS` (which the checker
     reads). The policies they return are defined in `d2graph.policies` (`POLICIES`, by
     kind) and re-exported here, where the public API has always had them.
Guarantees: the built-in trainers are registered when this package is imported, which the
checker does at its first lookup of a trainer (`TRAINERS.provided_by`); trainers of
other packages, declared under the entry-point group "d2graph.trainers" (each entry point
names a `Trainer` subclass), are registered then too. A plugin that fails to load is
reported as a warning and left out; it never breaks d2graph itself.
One module per trainer family: supervised.py (function nodes), baselines.py (threshold,
patience, uniform, oracle, static), qlearning.py (D²NN), reinforce.py (Guan et al.), costsensitive.py
(ANN, Bolukbasi et al.), eenet.py (EENet). The protocol is in base.py, what policy trainers
share (budgets, calibration, path tables, an evaluation context) in toolkit.py; how to write
one: docs/trainers.md.
"""

from __future__ import annotations

import warnings
from importlib.metadata import entry_points

from . import baselines, costsensitive, eenet, qlearning, reinforce, supervised  # noqa: F401  (register the built-in trainers)
from ..policies import POLICIES, LearnedPolicy, Policy, StaticPolicy, load_policy, run_policy, save_policy
from .base import Trainer, register

__all__ = ["POLICIES", "LearnedPolicy", "Policy", "StaticPolicy", "Trainer", "load_plugins", "load_policy",
           "register", "run_policy", "save_policy"]

ENTRY_POINT_GROUP = "d2graph.trainers"


def load_plugins() -> list[str]:
    """Register the trainers other packages declare; returns their names."""
    names = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            trainer = ep.load()
            register(trainer)
            names.append(trainer.name)
        except Exception as e:  # a broken plugin must not break d2graph
            warnings.warn(f"d2graph: trainer plugin {ep.name!r} ({ep.value}) failed to load: {e}", stacklevel=2)
    return names


load_plugins()

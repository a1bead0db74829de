"""Accuracy–cost curves: one backbone, every policy at every budget, every static path.

In:  a checked graph with a train block, budgets (fractions of the full cost), the policy
     trainers to compare, `--set` overrides, an output folder.
Out: `sweep(...)` → `Sweep`: rows {method, budget, cost_fraction, accuracy, f1, mean_cost,
     val_cost_fraction, val_accuracy}, written as curve.csv and curve.json, and the trade-off
     plot (tradeoff.png, tradeoff.svg) with every method and the static paths on one axes.
Guarantees: the backbone stages (trainers with role "backbone") are trained once, logged in
the sweep folder like a run (checkpoint `backbone.pt`); each policy is then fitted from that
same backbone for each budget — on a copy of its weights, so no point leaks into another —
calibrated on validation and reported on test. A method that cannot handle the graph
(E921) is left out with a note, not a failure. The same seed gives the same curve.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .diagnostics import D2GraphError
from .files import write_atomic
from .ir import Graph
from .schema import TRAINERS

__all__ = ["DEFAULT_METHODS", "Sweep", "sweep"]

DEFAULT_METHODS = ("threshold", "uniform", "oracle")
COLUMNS = ("method", "budget", "param", "cost_fraction", "accuracy", "f1", "mean_cost", "val_cost_fraction", "val_accuracy",
           "policy")


@dataclass
class Sweep:
    graph: str
    folder: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{self.graph}: test accuracy and mean cost (fraction of the full graph) per method and budget",
                 "| method | budget | test accuracy | test cost | val cost |", "|---|---:|---:|---:|---:|"]
        for r in self.rows:
            budget = "" if r["budget"] is None else f"{r['budget']:.2f}"
            val = "" if r["val_cost_fraction"] is None else f"{r['val_cost_fraction']:.3f}"
            name = r["policy"] if r["method"] == "static" else \
                f"{r['method']} {r['param']}" if r.get("param") else r["method"]
            lines.append(f"| {name} | {budget} | {r['accuracy']:.4f} | {r['cost_fraction']:.3f} | {val} |")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def sweep(graph: Graph, source: Path, *, budgets: list[float], methods: list[str] | None = None,
          param: str | None = None, overrides: list[str] = (), out: str | Path | None = None,
          echo=print) -> Sweep:
    """Train the backbone once, then fit each method at each budget (see the module doc).

    `param` ("stage.NAME.KEY=v1,v2,...") sweeps a parameter of one of the file's policy
    stages instead (e.g. a λ); the other methods are then calibrated to the validation
    costs that stage reached, so every curve covers the same costs."""
    from .evaluate import evaluate
    from .plots import tradeoff_plot
    from .runs import Run, derive_seed, resolve, train
    from .trainers.baselines import static_path_results

    import torch

    config = resolve(graph, overrides)
    param = _parse_param(config, param) if param is not None else None
    roles = [TRAINERS.get(s["trainer"]).role for s in config.stages]
    own = [s for s, role in zip(config.stages, roles) if role == "policy"]
    methods = list(methods) if methods is not None else \
        list(dict.fromkeys([s["trainer"] for s in own] + list(DEFAULT_METHODS)))
    for m in methods:
        if m not in TRAINERS or TRAINERS.get(m).role != "policy":
            from .runs import config_error

            policies = [n for n in TRAINERS.names() if TRAINERS.get(n).role == "policy"]
            raise config_error("E920", f"--methods: `{m}` is not a policy trainer",
                               help="policy trainers: " + ", ".join(policies))
    if out is None:
        out = Path("runs") / graph.name / ("sweep-" + time.strftime("%Y%m%d-%H%M%S"))
    run = Run.create(graph, source.read_text(), config, out)
    say = echo or (lambda text: None)
    say(f"sweep folder: {run.folder}")

    backbone = [i for i, role in enumerate(roles) if role == "backbone"]
    end = backbone[-1] + 1 if backbone else 0
    base = train(graph, config, run, root=source.resolve().parent, quiet=echo is None, echo=echo, evaluate=False,
                 stages=slice(0, end))
    run.save("backbone", {"format": 1, "graph": graph.name, "weights": base.executor.state_dict()})
    weights = copy.deepcopy(base.executor.state_dict())
    result = Sweep(graph.name, run.folder)
    classes, seed = base.data.classes, int(config.settings["seed"])
    batch = max(int(config.settings["batch"]), 256)

    def report(policy, split):
        generator = torch.Generator().manual_seed(derive_seed(seed, -2))
        return evaluate(base.executor, base.data[split], policy, classes=classes, batch=batch,
                        generator=generator, split=split)

    def fit_point(method: str, name: str, params: dict[str, Any], budget: float | None,
                  value: Any = None) -> bool:
        """Fit one policy from the backbone's weights and record its row; False if the
        method cannot handle the graph (E921)."""
        point_config = copy.deepcopy(config)
        point_config.stages = [{"name": name, "trainer": method, "params": params}]
        base.executor.load_state_dict(weights)
        try:
            fitted = train(graph, point_config, None, quiet=True, echo=None, evaluate=False, start=base)
        except D2GraphError as e:
            if any(d.code == "E921" for d in e.diagnostics):
                result.notes.append(f"{method}: {e.diagnostics[0].message}")
                say(f"skipped {method}: {e.diagnostics[0].message}")
                return False
            raise
        test, val = report(fitted.policy, "test"), report(fitted.policy, "val")
        row = {"method": method, "budget": budget, "param": value, "cost_fraction": test.cost_fraction,
               "accuracy": test.accuracy, "f1": test.f1, "mean_cost": test.mean_cost,
               "val_cost_fraction": val.cost_fraction, "val_accuracy": val.accuracy,
               "policy": fitted.policy.describe()}
        result.rows.append(row)
        run.log({"stage": "sweep", **row})
        say(f"{method} {'budget ' + str(budget) if value is None else value}: test accuracy {test.accuracy:.4f}, "
            f"cost {test.cost_fraction:.3f}")
        return True

    if param is not None:
        # The swept stage at each value; the other methods at the validation costs it reached.
        name, key, values = param
        spec = config.stage(name)
        for v in values:
            fit_point(spec["trainer"], name, {**spec["params"], key: v}, None, f"{name}.{key}={v}")
        budgets = sorted({round(r["val_cost_fraction"], 4) for r in result.rows if r["val_cost_fraction"] > 0})
        methods = [m for m in methods if m != spec["trainer"]]
    for method in methods:
        stage_spec = next((s for s in own if s["trainer"] == method), None)
        params = {**_defaults(method), **(stage_spec["params"] if stage_spec else {})}
        has_budget = any(p.name == "budget" for p in TRAINERS.get(method).schema.params)
        for budget in (budgets if has_budget else [None]):
            if not fit_point(method, stage_spec["name"] if stage_spec else method,
                             {**params, **({"budget": budget} if budget is not None else {})}, budget):
                break
    base.executor.load_state_dict(weights)
    for path in static_path_results(base.executor, base.data.test, batch):
        label = ", ".join(f"{q}={a + 1}" for q, a in path["actions"].items()) or "(no control)"
        result.rows.append({"method": "static", "budget": None, "param": None, "cost_fraction": path["cost_fraction"],
                            "accuracy": path["accuracy"], "f1": None, "mean_cost": path["cost"],
                            "val_cost_fraction": None, "val_accuracy": None, "policy": f"static path {label}"})
    _write(result, run.folder)
    points = [{"method": r["method"], "cost_fraction": r["cost_fraction"], "accuracy": r["accuracy"],
               "budget": r["budget"], "label": r["policy"]} for r in result.rows]
    tradeoff_plot(points, run.folder / "tradeoff", title=f"{graph.name}: accuracy vs cost (test)")
    return result


def _parse_param(config, text: str) -> tuple[str, str, list[Any]]:
    """"stage.policy.lambda=0.1,0.3" → ("policy", "lambda", [0.1, 0.3]), each value checked."""
    from .runs import apply_override, config_error, parse_value

    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    parts = parts[1:] if parts[:1] == ["stage"] else parts
    values = [parse_value(v) for v in raw.split(",") if v.strip()]
    if not sep or len(parts) != 2 or not values:
        raise config_error("E920", f"--param {text!r} is not `stage.NAME.PARAMETER=v1,v2,...`",
                           help="e.g. `--param stage.policy.lambda=0.1,0.3,1`")
    for v in values:  # the same checks as --set, on a scratch copy
        apply_override(copy.deepcopy(config), f"stage.{parts[0]}.{parts[1]}={v}")
    if TRAINERS.get(config.stage(parts[0])["trainer"]).role != "policy":
        raise config_error("E920", f"--param: stage `{parts[0]}` is not a policy stage",
                           help="sweep a parameter of a stage that decides the routing")
    return parts[0], parts[1], values


def _defaults(method: str) -> dict[str, Any]:
    return {p.name: p.default for p in TRAINERS.get(method).schema.params if not p.required}


def _write(result: Sweep, folder: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.rows)
    write_atomic(folder / "curve.csv", buf.getvalue())
    write_atomic(folder / "curve.json", json.dumps({"graph": result.graph, "rows": result.rows,
                                                    "notes": result.notes}, indent=2) + "\n")

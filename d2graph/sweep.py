"""Accuracy–cost curves: one backbone, every policy at every budget, every static path — per seed.

In:  a checked graph with a train block, budgets (fractions of the full cost), the policy
     methods to compare (trainer names, or method specs `TRAINER:KEY=VALUE[:KEY=VALUE...]`,
     a value may be a grid `V1/V2/...`), `--set` overrides, a number of seeds, an output folder.
Out: `sweep(...)` → `Sweep`: rows {seed, method, budget, param, calibrated_to, cost_fraction,
     accuracy, f1, mean_cost, val_cost_fraction, val_accuracy, policy}, written as curve.csv
     and curve.json; per (method, budget/param) the mean ± standard deviation over seeds
     (`Sweep.summary`, curve_summary.csv); the area under each method's accuracy–cost curve
     per seed and its mean ± std (`Sweep.auc`, auc.csv); and the trade-off plot
     (tradeoff.png, tradeoff.svg) with every method and the static paths on one axes — each
     method's mean curve with a band of ± one standard deviation of accuracy when seeds > 1.
Guarantees: for each seed (seed, seed+1, ..., seed+N−1; the seed also draws the data, as
`--set seed=` does) the backbone stages (trainers with role "backbone") are trained once,
logged like a run (checkpoint `backbone.pt`; in the sweep folder for one seed, in
`seed-S/` for several); each policy is then fitted from that same backbone for each budget —
on a copy of its weights, so no point leaks into another — calibrated on validation and
reported on test. A method that cannot handle the graph (E921) is left out with a note, not
a failure. The same seed gives the same curve. `sweep.json` in the sweep folder (and in each
`seed-S/`) marks it as a sweep's: `train --resume`/`--out` refuse it (E922) instead of
rewriting it into a run. The whole sweep computes on the config's `threads` (each seed's
config.json records the count); torch's own count is restored when `sweep` returns.

Area under the curve (`area_under_curve`): for one method and one seed, its points
(test cost fraction, test accuracy) sorted by cost (ties by accuracy) are joined by straight
lines and extended flat beyond its ends (left at its cheapest point's accuracy, right at its
dearest point's); the area under that line between the cost of the cheapest static path and
1.0 (the full graph), divided by the width of that interval, is a mean accuracy over costs.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .diagnostics import D2GraphError, Diagnostic, did_you_mean
from .files import write_atomic
from .ir import Graph
from .schema import TRAINERS

__all__ = ["DEFAULT_METHODS", "MethodSpec", "Sweep", "area_under_curve", "parse_method", "summarise", "sweep"]

DEFAULT_METHODS = ("threshold", "uniform", "oracle")
STATIC = "static"  # the method name of the static-path rows
BEST_STATIC = "best-static"  # the label of the `static` trainer's rows (not to be taken for static paths)
COLUMNS = ("seed", "method", "budget", "param", "calibrated_to", "cost_fraction", "accuracy", "f1", "mean_cost",
           "val_cost_fraction", "val_accuracy", "policy")
STATS = ("accuracy", "cost_fraction", "val_cost_fraction", "val_accuracy")
SUMMARY_COLUMNS = ("method", "budget", "param", "calibrated_to", "policy", "n",
                   *(f"{k}_{s}" for k in STATS for s in ("mean", "std")))
AUC_COLUMNS = ("method", "n", "auc_mean", "auc_std", "per_seed", "seeds", "cost_from", "cost_to", "points")


# --- method specs -------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    """A method of a sweep: a policy trainer and parameters that override its defaults (and
    the file's own stage of that trainer). `grid` is one parameter fitted at several values
    (a curve of its own, like `--param`); `label` names the rows (`method` column)."""

    label: str
    trainer: str
    params: dict[str, Any] = field(default_factory=dict)
    grid: tuple[str, tuple[Any, ...]] | None = None


def _error(message: str, help: str) -> D2GraphError:
    return D2GraphError([Diagnostic("E920", message, None, "", help=help)])


def _policy_trainers() -> list[str]:
    return [n for n in TRAINERS.names() if TRAINERS.get(n).role == "policy"]


def parse_method(text: str) -> MethodSpec:
    """`threshold` or `threshold:measure=entropy` (or `qlearning:lambda=0.3/0.5/0.7`, a grid)
    → a MethodSpec, each parameter checked against the trainer's schema; E920 otherwise.

    Example:
        >>> parse_method("threshold:measure=entropy")
        MethodSpec(label='threshold:measure=entropy', trainer='threshold', params={'measure': 'entropy'}, grid=None)
    """
    from .runs import parse_value

    form = "`TRAINER` or `TRAINER:KEY=VALUE[:KEY=VALUE...]` (a grid: `KEY=V1/V2/...`)"
    parts = [p.strip() for p in text.strip().split(":")]
    trainer, pairs = parts[0], parts[1:]
    policies = _policy_trainers()
    if trainer not in policies:
        raise _error(f"--methods: `{trainer}` is not a policy trainer{did_you_mean(trainer, policies)}",
                     "policy trainers: " + ", ".join(policies) + f"; a method is {form}")
    schema = TRAINERS.get(trainer).schema
    names = [p.name for p in schema.params]
    params: dict[str, Any] = {}
    grid = None
    fixed: list[str] = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise _error(f"--methods: `{text}`: `{pair}` is not `KEY=VALUE`", f"a method is {form}, "
                         "e.g. `threshold:measure=entropy`")
        if key not in names:
            raise _error(f"--methods: `{text}`: trainer `{trainer}` has no parameter `{key}`"
                         f"{did_you_mean(key, names)}", f"its signature is `{schema.signature()}`")
        if key in params or (grid and grid[0] == key):
            raise _error(f"--methods: `{text}`: `{key}` is given twice", f"a method is {form}")
        values = [parse_value(v) for v in raw.split("/")]
        for v in values:
            _check(schema, {**params, key: v}, text)
        if len(values) > 1:
            if grid is not None:
                raise _error(f"--methods: `{text}`: only one parameter may take several values",
                             "sweep one parameter per method spec")
            grid = (key, tuple(values))
        else:
            params[key] = values[0]
            fixed.append(f"{key}={raw.strip()}")
    label = BEST_STATIC if trainer == "static" else trainer
    return MethodSpec(":".join([label, *fixed]), trainer, params, grid)


def _check(schema, params: dict[str, Any], text: str) -> None:
    _, diags = schema.bind([], [(k, v, None, None) for k, v in params.items()], None, "trainer")
    errors = [d for d in diags if d.severity == "error"]
    if errors:
        raise _error(f"--methods: `{text}`: {errors[0].message}", errors[0].help or "")


# --- statistics -----------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n − 1 in the denominator; 0.0 for one value)."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _group_key(row: dict[str, Any]) -> tuple:
    budget = None if row.get("calibrated_to") else row["budget"]
    return (row["method"], budget, row.get("param"), row.get("calibrated_to"),
            row["policy"] if row["method"] == STATIC else None)


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, budget, param, calibrated_to, static path): n and the mean and sample
    standard deviation over seeds of test accuracy, test cost, validation cost and validation
    accuracy; in the order the groups first appear. A row calibrated to a swept value
    (`calibrated_to`) is grouped by that value, its budget (the cost it reached) averaged."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_group_key(r), []).append(r)
    out = []
    for (method, _, param, calibrated, policy), group in groups.items():
        budgets = [r["budget"] for r in group if r["budget"] is not None]
        row = {"method": method, "budget": _mean_std(budgets)[0], "param": param, "calibrated_to": calibrated,
               "policy": policy, "n": len(group)}
        for k in STATS:
            row[f"{k}_mean"], row[f"{k}_std"] = _mean_std([r[k] for r in group])
        out.append(row)
    return out


def area_under_curve(points: list[tuple[float, float]], lo: float, hi: float = 1.0) -> float | None:
    """The mean accuracy of a curve over costs [lo, hi] (see the module doc): `points` are
    (cost, accuracy); the curve joins them sorted by cost (ties by accuracy) and runs flat
    beyond its ends. None without points or when hi ≤ lo.

    Example:
        >>> area_under_curve([(0.2, 0.5), (0.6, 0.7)], 0.0, 1.0)  # 0.2·0.5 + 0.4·0.6 + 0.4·0.7
        0.62
    """
    if not points or hi <= lo:
        return None
    pts = sorted((float(x), float(y)) for x, y in points)
    line = [(min(lo, pts[0][0]), pts[0][1]), *pts, (max(hi, pts[-1][0]), pts[-1][1])]
    area = 0.0
    for (x1, y1), (x2, y2) in zip(line, line[1:]):
        left, right = max(x1, lo), min(x2, hi)
        if right <= left or x2 <= x1:
            continue
        y_left = y1 + (y2 - y1) * (left - x1) / (x2 - x1)
        y_right = y1 + (y2 - y1) * (right - x1) / (x2 - x1)
        area += (right - left) * (y_left + y_right) / 2
    return round(area / (hi - lo), 12)


def aucs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method (not the static paths): the area under its curve for each seed (between that
    seed's cheapest static path and 1.0) and their mean ± sample standard deviation."""
    seeds = list(dict.fromkeys(r["seed"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != STATIC))
    out = []
    for method in methods:
        per_seed, used, lows, n_points = [], [], [], []
        for s in seeds:
            static = [r["cost_fraction"] for r in rows if r["seed"] == s and r["method"] == STATIC]
            points = [(r["cost_fraction"], r["accuracy"]) for r in rows if r["seed"] == s and r["method"] == method]
            lo = min(static) if static else 0.0
            value = area_under_curve(points, lo, 1.0)
            if value is not None:
                per_seed.append(value)
                used.append(s)
                lows.append(lo)
                n_points.append(len(points))
        if not per_seed:
            continue
        mean, std = _mean_std(per_seed)
        out.append({"method": method, "n": len(per_seed), "auc_mean": mean, "auc_std": std,
                    "per_seed": ";".join(f"{v:.6f}" for v in per_seed), "seeds": ";".join(map(str, used)),
                    "cost_from": min(lows), "cost_to": 1.0, "points": ";".join(map(str, n_points))})
    return out


# --- the sweep ------------------------------------------------------------------------------


@dataclass
class Sweep:
    graph: str
    folder: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)

    @property
    def summary(self) -> list[dict[str, Any]]:
        return summarise(self.rows)

    @property
    def auc(self) -> list[dict[str, Any]]:
        return aucs(self.rows)

    def table(self) -> str:
        """The rows (one seed) or the mean ± std over seeds (several), then the AUC per method;
        accuracies and costs in percent, as `d2graph train` prints them (the CSV files keep
        fractions)."""
        if len(self.seeds) > 1:
            lines = [f"{self.graph}: test accuracy and mean cost (% of the full graph's cost) per method and "
                     f"budget, mean ± standard deviation over seeds {', '.join(map(str, self.seeds))}",
                     "| method | budget | n | test accuracy | test cost | val cost |", "|---|---:|---:|---:|---:|---:|"]
            for r in self.summary:
                lines.append(f"| {_name(r)} | {_percent(r['budget'], 0)} | {r['n']} | {_pm(r, 'accuracy', 2)} | "
                             f"{_pm(r, 'cost_fraction', 1)} | {_pm(r, 'val_cost_fraction', 1)} |")
        else:
            lines = [f"{self.graph}: test accuracy and mean cost (% of the full graph's cost) per method and budget",
                     "| method | budget | test accuracy | test cost | val cost |", "|---|---:|---:|---:|---:|"]
            for r in self.rows:
                lines.append(f"| {_name(r)} | {_percent(r['budget'], 0)} | {_percent(r['accuracy'], 2)} | "
                             f"{_percent(r['cost_fraction'], 1)} | {_percent(r['val_cost_fraction'], 1)} |")
        auc = self.auc
        if auc:
            lo = min(a["cost_from"] for a in auc)
            lines += ["", f"area under the accuracy–cost curve (mean test accuracy over costs {lo:.1%}–100%)",
                      "| method | n | AUC |", "|---|---:|---:|"]
            lines += [f"| {a['method']} | {a['n']} | "
                      + (_pm(a, "auc", 2) if len(self.seeds) > 1 else _percent(a["auc_mean"], 2)) + " |" for a in auc]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _name(r: dict[str, Any]) -> str:
    if r["method"] == STATIC:
        return r["policy"]
    name = f"{r['method']} {r['param']}" if r.get("param") else r["method"]
    return f"{name} (at {r['calibrated_to']})" if r.get("calibrated_to") else name


def _percent(value: float | None, digits: int) -> str:
    """0.815 → "81.50%" (digits=2); None → ""; a budget like 0.25 keeps its digits (25%, not 20%)."""
    if value is None:
        return ""
    text = f"{100 * value:.{digits}f}"
    if digits == 0 and abs(float(text) - 100 * value) > 1e-9:  # a budget with more digits than whole percent
        text = f"{100 * value:g}"
    return text + "%"


def _pm(r: dict[str, Any], key: str, digits: int) -> str:
    """Mean ± standard deviation in percent: "81.50 ± 0.40%"."""
    mean, std = r[f"{key}_mean"], r[f"{key}_std"]
    return "" if mean is None else f"{100 * mean:.{digits}f} ± {100 * std:.{digits}f}%"


def sweep(graph: Graph, source: Path, *, budgets: list[float] | None = None, methods: list[str] | None = None,
          param: str | None = None, overrides: list[str] = (), out: str | Path | None = None,
          seeds: int = 1, echo=print) -> Sweep:
    """Train the backbone once per seed, then fit each method at each budget (see the module doc).

    `methods` are trainer names or method specs (`parse_method`). `param`
    ("stage.NAME.KEY=v1,v2,...") sweeps a parameter of one of the file's policy stages (e.g.
    a λ); the other methods are then calibrated to the validation costs that stage reached
    (and, if `budgets` are given too, to those budgets), so every curve covers the same costs.
    Without `param`, `budgets` default to 0.2, 0.3, 0.5, 0.7. `seeds` (≥ 1) repeats the whole
    sweep for seeds seed, seed+1, ..., seed+seeds−1."""
    from .runs import SWEEP_FILE, config_error, resolve
    from .threads import using_threads

    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise config_error("E920", f"--seeds must be a positive integer, not {seeds!r}",
                           help="e.g. `--seeds 3` repeats the sweep for seeds s, s+1, s+2")
    config = resolve(graph, overrides)
    # The whole sweep, policies and evaluation included, on the config's threads (restored after).
    with using_threads(config.settings["threads"]):
        param_spec = _parse_param(config, param) if param is not None else None
        specs = [parse_method(m) for m in methods] if methods is not None else None
        if budgets is None and param is None:
            budgets = [0.2, 0.3, 0.5, 0.7]
        first = int(config.settings["seed"])
        if out is None:
            out = Path("runs") / graph.name / ("sweep-" + time.strftime("%Y%m%d-%H%M%S"))
        out = Path(out)
        say = echo or (lambda text: None)
        result = Sweep(graph.name, out, seeds=list(range(first, first + seeds)))
        # sweep.json marks the folder (and each seed's) as a sweep's, so that it is never taken for a run.
        marker = {"graph": graph.name, "seeds": result.seeds, "budgets": budgets, "methods": methods, "param": param,
                  "overrides": list(overrides)}
        if seeds > 1:
            if any(out.glob("seed-*/*.pt")):
                raise config_error("E922", f"{out} already holds a sweep", help="a sweep cannot be continued; choose "
                                                                                "another --out")
            out.mkdir(parents=True, exist_ok=True)
            write_atomic(out / SWEEP_FILE, json.dumps(marker, indent=2) + "\n")
        for s in result.seeds:
            folder = out if seeds == 1 else out / f"seed-{s}"
            if seeds > 1:
                say(f"seed {s}")
            _sweep_seed(graph, source, resolve(graph, [*overrides, f"seed={s}"]), result, folder, budgets=budgets,
                        specs=specs, param=param_spec, say=say, echo=echo, marker={**marker, "seed": s})
        if seeds > 1:
            write_atomic(out / f"{graph.name}.d2", source.read_text())
        _write(result, out)
        _plot(result, out)
        return result


def _sweep_seed(graph: Graph, source: Path, config, result: Sweep, folder: Path, *, budgets, specs, param,
                say, echo, marker: dict[str, Any]) -> None:
    """One seed's sweep: train the backbone into the run `folder`, fit every method, append the rows."""
    from .evaluate import evaluate
    from .paths import answering_head, heads
    from .runs import Run, computing_in, derive_seed, train
    from .trainers.baselines import static_path_results

    import torch

    roles = [TRAINERS.get(s["trainer"]).role for s in config.stages]
    own = [s for s, role in zip(config.stages, roles) if role == "policy"]
    if specs is None:
        specs = [parse_method(m) for m in dict.fromkeys([s["trainer"] for s in own] + list(DEFAULT_METHODS))]
    seed = int(config.settings["seed"])
    run = Run.create(graph, source.read_text(), config, folder, sweep=marker)
    if run.restarted:
        say(f"note: {run.folder} held a sweep that stopped before its first checkpoint; starting it again there")
    say(f"sweep folder: {run.folder}")

    backbone = [i for i, role in enumerate(roles) if role == "backbone"]
    end = backbone[-1] + 1 if backbone else 0
    base = train(graph, config, run, root=source.resolve().parent, quiet=echo is None, echo=echo, evaluate=False,
                 stages=slice(0, end))
    run.save("backbone", {"format": 1, "graph": graph.name, "weights": base.executor.state_dict()})
    weights = copy.deepcopy(base.executor.state_dict())
    classes = base.data.classes
    batch = max(int(config.settings["batch"]), 256)
    rows: list[dict[str, Any]] = []

    def report(policy, split):
        generator = torch.Generator().manual_seed(derive_seed(seed, -2))
        with computing_in(config, next(base.executor.parameters(), torch.empty(0)).device):
            return evaluate(base.executor, base.data[split], policy, classes=classes, batch=batch,
                            generator=generator, split=split)

    def fit_point(label: str, trainer: str, name: str, params: dict[str, Any], budget: float | None,
                  value: Any = None, calibrated: list[str] | tuple = ()) -> bool:
        """Fit one policy from the backbone's weights and record its row (one per label in
        `calibrated`, the swept values whose cost it was calibrated to); False if the
        method cannot handle the graph (E921)."""
        point_config = copy.deepcopy(config)
        point_config.stages = [{"name": name, "trainer": trainer, "params": params}]
        base.executor.load_state_dict(weights)
        try:
            fitted = train(graph, point_config, None, quiet=True, echo=None, evaluate=False, start=base)
        except D2GraphError as e:
            if any(d.code == "E921" for d in e.diagnostics):
                note = f"{label}: {e.diagnostics[0].message}"
                if note not in result.notes:
                    result.notes.append(note)
                say(f"skipped {label}: {e.diagnostics[0].message}")
                return False
            raise
        test, val = report(fitted.policy, "test"), report(fitted.policy, "val")
        for at in (calibrated or [None]):
            row = {"seed": seed, "method": label, "budget": budget, "param": value, "calibrated_to": at,
                   "cost_fraction": test.cost_fraction, "accuracy": test.accuracy, "f1": test.f1,
                   "mean_cost": test.mean_cost, "val_cost_fraction": val.cost_fraction,
                   "val_accuracy": val.accuracy, "policy": fitted.policy.describe()}
            rows.append(row)
            run.log({"stage": "sweep", **row})
        where = ("budget " + str(budget)) if budget is not None else ""
        say(f"{label} {' '.join(str(w) for w in (value, where) if w)}: test accuracy {test.accuracy:.4f}, "
            f"cost {test.cost_fraction:.3f}")
        return True

    targets: list[tuple[float, list[str]]] = [(b, []) for b in (budgets or [])]
    if param is not None:
        # The swept stage at each value; the other methods at the validation costs it reached.
        name, key, values = param
        spec = config.stage(name)
        reached: dict[float, list[str]] = {}
        for v in values:
            label = f"{name}.{key}={v}"
            if fit_point(spec["trainer"], spec["trainer"], name, {**spec["params"], key: v}, None, label):
                cost = round(rows[-1]["val_cost_fraction"], 4)
                if cost > 0:
                    reached.setdefault(cost, []).append(label)
        targets += sorted(reached.items())
        specs = [m for m in specs if m.label != spec["trainer"]]
    for m in specs:
        stage_spec = next((s for s in own if s["trainer"] == m.trainer), None)
        params = {**_defaults(m.trainer), **(stage_spec["params"] if stage_spec else {}), **m.params}
        # A spec that sets the budget itself (`reinforce:budget=none:...`) is fitted at that budget only.
        has_budget = "budget" not in m.params and any(p.name == "budget" for p in TRAINERS.get(m.trainer).schema.params)
        grid = [(f"{m.grid[0]}={v}", {m.grid[0]: v}) for v in m.grid[1]] if m.grid else [(None, {})]
        name = stage_spec["name"] if stage_spec else m.trainer
        applies = True
        for value, extra in grid:
            for budget, calibrated in (targets if has_budget else [(None, [])]):
                point = {**params, **extra, **({"budget": budget} if budget is not None else {})}
                if not fit_point(m.label, m.trainer, name, point, budget, value, calibrated):
                    applies = False
                    break
            if not applies:
                break
    base.executor.load_state_dict(weights)
    # Where the graph has several exits, the reader looks for the exit, not the actions.
    graph = base.executor.graph
    several = len(heads(graph)) > 1
    way = "exit at" if graph.outputs[0].merge == "select" else "via"
    for path in static_path_results(base.executor, base.data.test, batch):
        label = ", ".join(f"{q}={a + 1}" for q, a in path["actions"].items()) or "(no control)"
        head = answering_head(graph, path["nodes"]) if several else None
        if head:
            label = f"{way} {head} ({label})"
        rows.append({"seed": seed, "method": STATIC, "budget": None, "param": None, "calibrated_to": None,
                     "cost_fraction": path["cost_fraction"], "accuracy": path["accuracy"], "f1": None,
                     "mean_cost": path["cost"], "val_cost_fraction": None, "val_accuracy": None,
                     "policy": f"static path {label}"})
    result.rows += rows


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


def _csv(rows: list[dict[str, Any]], columns) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _write(result: Sweep, folder: Path) -> None:
    summary, auc = result.summary, result.auc
    write_atomic(folder / "curve.csv", _csv(result.rows, COLUMNS))
    write_atomic(folder / "curve_summary.csv", _csv(summary, SUMMARY_COLUMNS))
    write_atomic(folder / "auc.csv", _csv(auc, AUC_COLUMNS))
    write_atomic(folder / "curve.json", json.dumps({"graph": result.graph, "seeds": result.seeds, "rows": result.rows,
                                                    "summary": summary, "auc": auc, "notes": result.notes},
                                                   indent=2) + "\n")


def _plot(result: Sweep, folder: Path) -> None:
    from .plots import tradeoff_plot

    title = f"{result.graph}: accuracy vs cost (test)"
    if len(result.seeds) == 1:
        points = [{"method": r["method"], "cost_fraction": r["cost_fraction"], "accuracy": r["accuracy"],
                   "budget": r["budget"], "label": r["policy"]} for r in result.rows]
        tradeoff_plot(points, folder / "tradeoff", title=title)
        return
    points = [{"method": r["method"], "cost_fraction": r["cost_fraction_mean"], "accuracy": r["accuracy_mean"],
               "accuracy_std": r["accuracy_std"], "budget": r["budget"], "label": r["policy"]}
              for r in result.summary]
    tradeoff_plot(points, folder / "tradeoff", title=f"{title}, mean ± std over {len(result.seeds)} seeds",
                  spread="accuracy_std")

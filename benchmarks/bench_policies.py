"""Policy quality: every routing method on every shipped example, over several seeds.

For each example graph (`examples/*.d2`, or those named with --examples) it runs the
multi-seed `d2graph sweep` (`d2graph.sweep.sweep(..., seeds=N)`): per seed, the file's
backbone stages are trained once and every method is fitted on that backbone, calibrated on
validation and reported on test. The methods are the built-in policy trainers:

- `threshold:measure=maxprob`, `threshold:measure=entropy`, `uniform`, `best-static` (the
  `static` trainer), `oracle`, `costsensitive`, `eenet` — at each budget (default 0.2, 0.3,
  0.5);
- the joint trainers, which have no budget, at a small grid of their cost parameter:
  `qlearning` λ ∈ {0.3, 0.5, 0.7, 0.9} and `reinforce` α ∈ {0.1, 0.5, 1, 2}. When the file's own
  policy stage is one of them, its parameter is swept with `--param` over the grid and the
  file's own value (the budgeted methods
  are then also calibrated to the validation costs it reached, rows marked "at ..."); the
  other joint trainer is fitted as a method spec with a grid (`reinforce:alpha=0.1/0.5/1/2`).

A method that cannot handle a graph (E921) is skipped with a note. Every point and static
path lands on the same accuracy–cost axes.

Writes, under --out (default benchmarks/results/policies/): one sweep folder per example
(`EXAMPLE/`: curve.csv, curve_summary.csv, auc.csv, curve.json, tradeoff.png/.svg, and the
per-seed runs `seed-S/`), and `summary.md`: per example, the mean ± standard deviation table
(rows: method × budget or swept value; columns: test accuracy, test cost, validation cost),
the area under each method's accuracy–cost curve, the notes, the plot, and the command that
produced it. The Markdown is also printed.

    python benchmarks/bench_policies.py [--examples early_exit,cascade] [--seeds 3]
        [--budgets 0.2,0.3,0.5] [--out benchmarks/results/policies] [--quick] [--overwrite]
        [--skip costsensitive]

`--quick` is a smoke run (a minute or so per example): 400 canvases, one backbone epoch, one
epoch of the joint trainers and few of the others. Its numbers mean nothing.
One torch thread unless --threads is given.
"""

from __future__ import annotations

import argparse
import csv
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

import d2graph
from d2graph.runs import resolve
from d2graph.schema import TRAINERS
from d2graph.sweep import sweep

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BUDGETED = ["threshold:measure=maxprob", "threshold:measure=entropy", "uniform", "static", "oracle",
            "costsensitive", "eenet"]
GRIDS = {"qlearning": ("lambda", (0.3, 0.5, 0.7, 0.9)), "reinforce": ("alpha", (0.1, 0.5, 1, 2))}
QUICK_DATA = ["data.n=400", "batch=32"]
QUICK_EPOCHS = {"costsensitive": 3, "eenet": 20, "qlearning": 1, "reinforce": 1}


def plan(graph, *, quick: bool, skip: tuple[str, ...] = ()) -> tuple[list[str], str | None, list[str]]:
    """(methods, param, overrides) of one example's sweep: see the module doc. `skip` names
    methods to leave out (`costsensitive`, `reinforce`, ...; never the file's own trainer,
    whose swept parameter places the other methods)."""
    config = resolve(graph)
    overrides = list(QUICK_DATA) if quick else []
    own = None
    for stage in config.stages:
        role = TRAINERS.get(stage["trainer"]).role
        if role == "backbone" and quick:
            overrides.append(f"stage.{stage['name']}.epochs=1")
        elif role == "policy" and own is None:
            own = stage
    methods = [m + (f":epochs={QUICK_EPOCHS[m]}" if quick and m in QUICK_EPOCHS else "") for m in BUDGETED
               if m.split(":")[0] not in skip]
    param = None
    for trainer, (key, values) in GRIDS.items():
        if own is not None and own["trainer"] == trainer:
            shipped = own["params"].get(key)  # the file's own value is always among the points
            grid = sorted({*values, shipped}) if isinstance(shipped, (int, float)) else values
            param = f"stage.{own['name']}.{key}=" + ",".join(map(str, grid))
            if quick:
                overrides.append(f"stage.{own['name']}.epochs={QUICK_EPOCHS[trainer]}")
        elif trainer not in skip:
            epochs = f":epochs={QUICK_EPOCHS[trainer]}" if quick else ""
            # No budget: a joint trainer is placed on the axes by its cost parameter alone.
            budget = ":budget=none" if any(p.name == "budget" for p in TRAINERS.get(trainer).schema.params) else ""
            methods.append(f"{trainer}{budget}{epochs}:{key}=" + "/".join(map(str, values)))
    return methods, param, overrides


def sweep_command(path: Path, *, budgets, methods, param, overrides, seeds, out: Path) -> str:
    """The `d2graph sweep` command line that does what the benchmark does for one example."""
    argv = ["d2graph", "sweep", _relative(path), "--budgets", ",".join(map(str, budgets)),
            "--methods", ",".join(methods), "--seeds", str(seeds)]
    if param:
        argv += ["--param", param]
    for o in overrides:
        argv += ["--set", o]
    return shlex.join(argv + ["--out", _relative(out)])


def _relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _pm(mean, std, scale: float, digits: int, unit: str = "") -> str:
    if mean is None:
        return "—"
    return f"{mean * scale:.{digits}f}{unit} ± {std * scale:.{digits}f}"


def _name(r) -> str:
    if r["method"] == "static":
        return r["policy"]
    name = f"`{r['method']}`" + (f" {r['param']}" if r.get("param") else "")
    return name + (f" (at {r['calibrated_to']})" if r.get("calibrated_to") else "")


def _number(value) -> float | None:
    return None if value in (None, "") else float(value)


def glance(summary: list[dict], auc: list[dict]) -> str:
    """The comparison at a glance: one row per method, test accuracy (mean ± std, %) and test
    cost at each budget, and its AUC; then, when the file's own joint trainer was swept, one
    column per value of its parameter, the budgeted methods calibrated to the cost it reached
    there; then the other joint trainers' points and the static paths. Reads the rows of
    `curve_summary.csv` and `auc.csv` (or the sweep's result), numbers or strings."""
    def acc(r) -> str:
        return _pm(_number(r["accuracy_mean"]), _number(r["accuracy_std"]) or 0.0, 100, 1)

    def point(r) -> str:
        return f"{acc(r)} ({_number(r['cost_fraction_mean']):.3f})"

    areas = {a["method"]: _pm(_number(a["auc_mean"]), _number(a["auc_std"]) or 0.0, 100, 1) for a in auc}
    own = list(dict.fromkeys(r["calibrated_to"] for r in summary if r.get("calibrated_to")))
    budgets = sorted({_number(r["budget"]) for r in summary if _number(r["budget"]) is not None and not r.get("calibrated_to")})
    budgeted = list(dict.fromkeys(r["method"] for r in summary if _number(r["budget"]) is not None
                                  and not r.get("calibrated_to") and r["method"] != "static"))
    lines = []
    if budgeted:
        lines += ["| method | " + " | ".join(f"budget {b:g}" for b in budgets) + " | AUC |",
                  "|---|" + "---:|" * (len(budgets) + 1)]
        for m in budgeted:
            cells = [next((point(r) for r in summary if r["method"] == m and not r.get("calibrated_to")
                           and _number(r["budget"]) is not None and abs(_number(r["budget"]) - b) < 1e-9), "—")
                     for b in budgets]
            lines.append(f"| `{m}` | " + " | ".join(cells) + f" | {areas.get(m, '—')} |")
    if own:
        mine = [r for r in summary if r.get("param") in own and _number(r["budget"]) is None]
        trainer = mine[0]["method"] if mine else "?"
        cost = {r["param"]: _number(r["cost_fraction_mean"]) for r in mine}
        own.sort(key=lambda v: cost.get(v, 0.0))  # cheapest point first
        lines += ["", "| method | " + " | ".join(v.split("=", 1)[0].rsplit(".", 1)[-1] + "=" + v.split("=", 1)[1] for v in own) + " | AUC |",
                  "|---|" + "---:|" * (len(own) + 1)]
        lines.append(f"| `{trainer}` | " + " | ".join(next((point(r) for r in mine if r["param"] == v), "—") for v in own)
                     + f" | {areas.get(trainer, '—')} |")
        for m in dict.fromkeys(r["method"] for r in summary if r.get("calibrated_to")):
            cells = [next((acc(r) for r in summary if r["method"] == m and r.get("calibrated_to") == v), "—") for v in own]
            lines.append(f"| `{m}` at that cost | " + " | ".join(cells) + " |  |")
    others = [r for r in summary if r.get("param") and r.get("param") not in own and _number(r["budget"]) is None]
    for m in dict.fromkeys(r["method"] for r in others):
        points = "; ".join(f"{r['param']}: {point(r)}" for r in others if r["method"] == m)
        lines += ["", f"`{m}`: {points}; AUC {areas.get(m, '—')}."]
    static = [r for r in summary if r["method"] == "static" and r.get("policy")]
    if static:
        lines += ["", "Static paths: " + "; ".join(f"{r['policy'].removeprefix('static path ')} {point(r)}" for r in static) + "."]
    return "\n".join(lines)


def section(name: str, path: Path, result, command: str, seconds: float, folder: Path, out: Path) -> str:
    lines = [f"## {name} (`{_relative(path)}`)", "", "```sh", command, "```", "",
             f"Seeds {', '.join(map(str, result.seeds))}; {seconds:.0f} s. Test accuracy, test cost and validation cost "
             "(fractions of the full graph's cost) as mean ± sample standard deviation over the seeds; "
             "n is the number of seeds with that row.", "",
             "At a glance (test accuracy %, test cost in brackets):", "", glance(result.summary, result.auc), "",
             "Every row:", "",
             "| method | budget | n | test accuracy | test cost | val cost |", "|---|---:|---:|---:|---:|---:|"]
    for r in result.summary:
        budget = "—" if r["budget"] is None else f"{r['budget']:.2f}"
        lines.append(f"| {_name(r)} | {budget} | {r['n']} | {_pm(r['accuracy_mean'], r['accuracy_std'], 100, 1, '%')} "
                     f"| {_pm(r['cost_fraction_mean'], r['cost_fraction_std'], 1, 3)} "
                     f"| {_pm(r['val_cost_fraction_mean'], r['val_cost_fraction_std'], 1, 3)} |")
    auc = result.auc
    if auc:
        lo = min(a["cost_from"] for a in auc)
        lines += ["", f"Area under each method's accuracy–cost curve between the cheapest static path ({lo:.3f}) "
                      "and the full graph (1.0), as a mean test accuracy (docs/cli.md, `d2graph sweep`):", "",
                  "| method | n | AUC | per seed |", "|---|---:|---:|---|"]
        lines += [f"| `{a['method']}` | {a['n']} | {_pm(a['auc_mean'], a['auc_std'], 100, 1, '%')} | "
                  + ", ".join(f"{float(v) * 100:.1f}%" for v in a["per_seed"].split(";")) + " |" for a in auc]
    if result.notes:
        lines += [""] + [f"- note: {n}" for n in result.notes]
    plot = (folder / "tradeoff.png").resolve().relative_to(out.resolve())
    lines += ["", f"![accuracy against cost, {name}]({plot.as_posix()})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", default=None,
                    help="comma-separated example names (early_exit) or .d2 paths (default: every examples/*.d2)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per example, from the train block's seed (default 3)")
    ap.add_argument("--budgets", default="0.2,0.3,0.5", help="comma-separated cost fractions (default 0.2,0.3,0.5)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "policies"),
                    help="output folder (default benchmarks/results/policies/)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny data, one backbone epoch")
    ap.add_argument("--overwrite", action="store_true", help="replace an example's folder left by an earlier run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--skip", default="", metavar="METHODS",
                    help="comma-separated methods to leave out, e.g. costsensitive where its convolutional policies "
                         "make each fit take minutes (the file's own trainer is always run)")
    ap.add_argument("--glance", nargs="+", metavar="FOLDER",
                    help="print the at-a-glance tables of finished sweep folders (curve_summary.csv, auc.csv) and stop")
    args = ap.parse_args(argv)
    if args.glance:
        for folder in map(Path, args.glance):
            try:
                with open(folder / "curve_summary.csv", newline="") as f:
                    summary = list(csv.DictReader(f))
                auc_file = folder / "auc.csv"
                auc = list(csv.DictReader(auc_file.open(newline=""))) if auc_file.is_file() else []
            except OSError as e:
                ap.error(f"--glance {folder}: not a finished sweep folder ({e.strerror}: {e.filename})")
            print(f"## {folder}\n\n{glance(summary, auc)}\n")
        return 0
    if args.seeds < 1:
        ap.error(f"--seeds must be a positive integer, not {args.seeds}")
    try:
        budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--budgets: expected comma-separated numbers like 0.2,0.5, not {args.budgets!r}")
    if not budgets or any(not 0 < b <= 1 for b in budgets):
        ap.error(f"--budgets are fractions of the full cost, in (0, 1]: {args.budgets!r}")
    skip = tuple(m.strip() for m in args.skip.split(",") if m.strip())
    known = sorted({m.split(":")[0] for m in BUDGETED} | set(GRIDS))
    if any(m not in known for m in skip):
        ap.error(f"--skip {args.skip!r}: the methods are {', '.join(known)}")
    names = [n.strip() for n in args.examples.split(",") if n.strip()] if args.examples else None
    paths = sorted(EXAMPLES.glob("*.d2")) if names is None else \
        [Path(n) if n.endswith(".d2") else EXAMPLES / f"{n}.d2" for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        known = ", ".join(p.stem for p in sorted(EXAMPLES.glob("*.d2")))
        ap.error(f"no such example: {', '.join(missing)} (examples: {known})")
    out = Path(args.out)
    for path in paths:
        folder = out / path.stem
        if folder.exists() and any(folder.iterdir()):
            if not args.overwrite:
                ap.error(f"{folder} holds an earlier run: remove it, pass --overwrite, or choose another --out")
            shutil.rmtree(folder)
    torch.set_num_threads(args.threads)

    command = shlex.join(["python", "benchmarks/bench_policies.py", *argv])
    started = time.strftime("%Y-%m-%d %H:%M")
    sections = []
    t_all = time.perf_counter()
    for path in paths:
        graph = d2graph.load(path)
        methods, param, overrides = plan(graph, quick=args.quick, skip=skip)
        overrides = [*overrides, f"threads={args.threads}"]  # the sweep sets torch's threads from its config
        folder = out / path.stem
        print(f"== {path.stem}: {len(methods)} methods, seeds {args.seeds}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        result = sweep(graph, path, budgets=budgets, methods=methods, param=param, overrides=overrides,
                       out=folder, seeds=args.seeds, echo=lambda text: print(text, file=sys.stderr, flush=True))
        seconds = time.perf_counter() - t0
        equivalent = sweep_command(path, budgets=budgets, methods=methods, param=param, overrides=overrides,
                                   seeds=args.seeds, out=folder)
        sections.append(section(path.stem, path, result, equivalent, seconds, folder, out))
    header = ["# Policy quality over seeds", "", "Written by", "", "```sh", command, "```", "",
              f"started {started}, {time.perf_counter() - t_all:.0f} s in all; Python {platform.python_version()}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.machine()}."
              + (" **Quick smoke run (tiny data, one epoch): the numbers mean nothing.**" if args.quick else ""),
              "", "Each example's section gives the equivalent `d2graph sweep` command; its folder holds the "
              "per-seed rows (curve.csv), the summary (curve_summary.csv), the AUC (auc.csv) and the plot.", ""]
    text = "\n".join(header + sections)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {out / 'summary.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

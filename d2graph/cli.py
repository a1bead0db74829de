"""argv → library calls → exit code. The only module that prints.

Commands: `check`, `fmt`, `render`, `bench`, `train`, `eval`, `sweep`, `policy`, `export`,
`predict`, and `lsp` (the language server, `d2graph.lsp`, imported only by that command: pygls
is an optional extra). Those that run a network (`bench`, `train`, `eval`, `sweep`, `policy export`,
`predict`) take `--threads` and compute on that many torch threads (else the file's or the run's
`threads` setting).
Exit codes: 0 success · 1 `check` found errors, or `fmt --check` found a file to
reformat · 2 usage errors and malformed input to any other command · 3 a required
external tool is missing (Graphviz's `dot`) · 130 interrupted · 70 internal error.
Guarantees: a user's mistake never shows a Python traceback (`--debug` shows one);
files are written atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Sequence

from .diagnostics import D2GraphError, Diagnostic, did_you_mean
from .files import write_atomic

EXIT_OK, EXIT_FOUND, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 70, 130
# Exit code 3 (a required tool is missing) is carried by the error itself: render.RenderError.exit_code;
# `lsp` returns it when the optional pygls is not installed.
EXIT_MISSING_TOOL = 3


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors that say what to do and exit 2 (its default code)."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"error: {message}\n  = help: run `{self.prog} --help` for the options\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="d2graph", description="Dynamic neural networks from .d2 graph files.")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for internal errors")
    p.add_argument("--version", action="version", version=f"d2graph {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    p.subcommands = sub.choices  # name → parser: a wrong flag is reported by its command's parser

    c = sub.add_parser("check", help="check .d2 files and report every problem")
    c.add_argument("files", nargs="+", metavar="FILE")
    c.add_argument("--ir", action="store_true", help="print the checked graph, one line per node")
    c.add_argument("--format", choices=("text", "json"), default="text", help="diagnostics as text or JSON")
    c.add_argument("--allow-imports", action="store_true", help="allow module(\"pkg.mod:Class\") layers")

    f = sub.add_parser("fmt", help="rewrite .d2 files in the canonical layout")
    f.add_argument("files", nargs="+", metavar="FILE")
    f.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file would change")

    r = sub.add_parser("render", help="draw graphs as SVG, PNG or DOT")
    r.add_argument("files", nargs="+", metavar="FILE")
    r.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="OUT.svg, OUT.png or OUT.dot; with several files, a folder (one drawing each)")
    r.add_argument("--format", choices=("svg", "png", "dot"), default=None,
                   help="the drawing format when OUT is a folder (default svg); a file OUT's extension picks its own")
    r.add_argument("--stats", metavar="RUN",
                   help="a run folder: draw each node's execution rate and the traffic on each edge")
    r.add_argument("--allow-imports", action="store_true", help="allow module(\"pkg.mod:Class\") layers")

    b = sub.add_parser("bench", help="cost and latency of the dynamic executor and of each static path")
    b.add_argument("file", metavar="FILE")
    b.add_argument("--batch", type=_positive_int, default=256, help="examples per batch (default 256)")
    b.add_argument("--rounds", type=_positive_int, default=20, help="timed rounds per row (default 20)")
    _add_threads(b, "the train block's `threads`, else auto")
    b.add_argument("--allow-imports", action="store_true", help="allow module(\"pkg.mod:Class\") layers")

    t = sub.add_parser("train", help="run the train block of a .d2 file: stages, checkpoints, report")
    t.add_argument("file", nargs="?", metavar="FILE", help="the .d2 file (not needed with --resume)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override the train block: seed=1, data.n=2000, stage.policy.budget=0.3 (repeatable)")
    t.add_argument("--out", metavar="DIR", help="the run folder (default runs/<graph>/<timestamp>)")
    t.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last.pt")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and stop")
    _add_threads(t, "the train block's `threads`; with --resume, the count the run recorded")
    t.add_argument("--quiet", action="store_true", help="print only the final summary")
    t.add_argument("--allow-imports", action="store_true", help="allow module(\"pkg.mod:Class\") layers")

    e = sub.add_parser("eval", help="evaluate a run (or a .d2 file with a checkpoint): accuracy, cost, paths")
    e.add_argument("target", metavar="RUN|FILE", help="a run folder, or a .d2 file given with --checkpoint")
    e.add_argument("--checkpoint", metavar="NAME|PATH", default="last",
                   help="last (the run's final model; the default), best (the best epoch of the run's last stage "
                        "that validates, without the stages after it; a note says which), or a path to a .pt file")
    e.add_argument("--split", choices=("train", "val", "test"), default="test", help="the split (default test)")
    e.add_argument("--format", choices=("text", "json"), default="text", help="a table or JSON")
    _add_threads(e, "the count the run recorded, or the file's `threads`")

    s = sub.add_parser("sweep", help="accuracy-cost curve: each budget, each baseline, each static path")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--budgets", type=_budgets, default=None,
                   help="comma-separated cost fractions (default 0.2,0.3,0.5,0.7; with --param: none but "
                        "the costs it reaches)")
    s.add_argument("--methods", type=_names, default=None,
                   help="comma-separated policy trainers or method specs TRAINER:KEY=VALUE[:KEY=VALUE...] to "
                        "compare (default: the file's own policy stages, threshold, uniform, oracle)")
    s.add_argument("--param", metavar="stage.NAME.KEY=V1,V2,...",
                   help="sweep a parameter of one of the file's policy stages (e.g. a λ) instead of budgets; "
                        "the other methods are calibrated to the costs it reaches")
    s.add_argument("--seeds", type=_positive_int, default=1, metavar="N",
                   help="repeat the sweep (backbone and policies) for seeds s, s+1, ..., s+N-1 and report the "
                        "mean and standard deviation (default 1)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override the train block (repeatable)")
    s.add_argument("--out", metavar="DIR", help="the sweep folder (default runs/<graph>/sweep-<timestamp>)")
    _add_threads(s, "the train block's `threads`")
    s.add_argument("--quiet", action="store_true", help="print only the final table")
    s.add_argument("--allow-imports", action="store_true", help="allow module(\"pkg.mod:Class\") layers")

    ls = sub.add_parser("lsp", help="a language server for editors (diagnostics, hover, completion, formatting)")
    ls.add_argument("--stdio", action="store_true",
                    help="talk over stdin/stdout (the default and only transport; accepted because editors pass it)")

    pol = sub.add_parser("policy", help="policies on per-exit predictions: export them from a run, fit on them")
    psub = pol.add_subparsers(dest="policy_command", metavar="ACTION", parser_class=_Parser)
    psub.required = True
    pol.subcommands = psub.choices
    pe = psub.add_parser("export", help="write a run's per-exit predictions in the MSDNet/EENet layout")
    pe.add_argument("run", metavar="RUN", help="a run folder of a multi-exit chain")
    pe.add_argument("--out", required=True, metavar="DIR", help="the predictions folder to write")
    pe.add_argument("--checkpoint", metavar="NAME|PATH", default="last", help="last, best, or a .pt file")
    _add_threads(pe, "the count the run recorded")
    pf = psub.add_parser("fit", help="fit policies on per-exit predictions and compare them per budget")
    pf.add_argument("--predictions", required=True, metavar="DIR",
                    help="a folder with logits_single.pth and flops.pth / costs.json / seconds.csv")
    pf.add_argument("--trainer", type=_names, default=["eenet", "threshold"],
                    help="comma-separated: eenet, threshold, entropy, margin, patience (default eenet,threshold)")
    pf.add_argument("--budget", type=_budgets, required=True, metavar="B[,B...]",
                    help="comma-separated fractions of the full (last exit's) cost")
    pf.add_argument("--seed", type=int, default=0, help="seed of the learned rules (default 0)")
    pf.add_argument("--set", action="append", default=[], metavar="K=V", dest="eenet_params",
                    help="a parameter of `eenet` other than its budget, e.g. --set utility=right (repeatable)")
    pf.add_argument("--format", choices=("text", "json"), default="text", help="a table or JSON")

    x = sub.add_parser("export", help="write a finished run as one program per node and a manifest (for "
                                      "d2graph.runtime and `predict`)")
    x.add_argument("run", metavar="RUN", help="a finished `d2graph train` run folder")
    x.add_argument("--out", required=True, metavar="DIR", help="the export folder to write (an export there is "
                                                               "replaced whole)")
    x.add_argument("--format", choices=("pt2", "onnx"), default="pt2",
                   help="torch.export programs (default) or ONNX (needs `pip install 'd2graph[onnx]'`)")

    pr = sub.add_parser("predict", help="batched inference with an export folder: predictions, exits, cost")
    pr.add_argument("export", metavar="DIR", help="a folder `d2graph export` wrote")
    pr.add_argument("--input", required=True, metavar="DATA.npz",
                    help="an .npz with one array per graph input (named as the input; `x` or a file's only "
                         "array also works for a one-input graph), [N, *shape]")
    pr.add_argument("--out", required=True, metavar="PREDICTIONS.npz", help="where to write the predictions")
    pr.add_argument("--batch", type=_positive_int, default=256, help="examples per batch (default 256)")
    _add_threads(pr, "auto")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _budgets(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.2,0.5, not {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"budgets are fractions of the full cost, in (0, 1]: {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {value}")
    return value


def _add_threads(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--threads", type=_threads, default=None, metavar="N|auto",
                        help=f"torch's CPU threads: a positive integer or auto (default: {default})")


def _threads(text: str) -> int | str:
    """`--threads`: a positive integer or `auto` (checked here: a bad value is a usage error, exit 2)."""
    if text.strip() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or `auto`, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or `auto`, not {value}: torch needs at "
                                         "least one thread")
    return value


def _using_threads(flag: int | str | None, setting):
    """A context with torch's threads for a command: `--threads` when given, else `setting`
    (the file's or the run's `threads`); torch's count is restored after, for callers of `main`."""
    from .threads import thread_count, using_threads  # imports torch, which `fmt` and `--version` never need

    return using_threads(thread_count(setting if flag is None else flag))


def _unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """The message for arguments `parser` (a command's) does not know: a did-you-mean among its
    flags, or, for a train-block setting or a stage parameter, the `--set` that changes it."""
    flags = [f for action in parser._actions for f in action.option_strings]  # (see below)
    message = f"unrecognized arguments: {' '.join(extras)}"
    first = next((e for e in extras if e.startswith("--")), None)
    if first is None:
        return message
    name = first[2:].split("=", 1)[0]
    if "--set" in flags:  # `train`, `sweep`: what the train block sets is changed with --set
        from .schema import TRAIN_SETTINGS, TRAINERS  # plain data; no torch

        settings = [param.name for param in TRAIN_SETTINGS.params]
        stage_params = {param.name for trainer in TRAINERS.names() for param in TRAINERS.get(trainer).schema.params}
        if name in settings:
            return message + f" (a train-block setting: `--set {name}=VALUE`)"
        if name in stage_params:
            return message + f" (a stage parameter: `--set STAGE.{name}=VALUE`, e.g. `--set backbone.{name}=3`)"
    # argparse keeps a parser's arguments in `_actions`; it has no public list of its flags.
    return message + did_you_mean(first.split("=", 1)[0], flags)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # reported by the command that was given them, with its own usage
        command = parser.subcommands[args.command]
        if getattr(args, "policy_command", None):
            command = command.subcommands[args.policy_command]
        command.error(_unrecognized(command, extras))
    try:
        if args.command != "train" and _under_torchrun():
            # Every process would run the whole command and write the same files.
            raise _usage(f"`d2graph {args.command}` runs in one process; only `train` runs under torchrun",
                         f"run `d2graph {args.command} ...` without torchrun (docs/scaling.md)")
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except D2GraphError as e:  # malformed input to a command other than `check`
        _print_diagnostics(e.diagnostics)
        return getattr(e, "exit_code", EXIT_USAGE)
    except BrokenPipeError:
        return EXIT_OK
    except Exception:
        if args.debug:
            traceback.print_exc()
        else:
            kind = sys.exc_info()[0].__name__
            print(f"internal error ({kind}): this is a bug in d2graph, not in your file; "
                  "rerun with --debug and report the traceback", file=sys.stderr)
        return EXIT_INTERNAL


# --- commands --------------------------------------------------------------------------------


def cmd_check(args) -> int:
    from .check import load
    from .runs import stage_problems

    everything: list[Diagnostic] = []
    failed = unreadable = False
    for path in args.files:
        try:
            graph = load(path, allow_imports=args.allow_imports)
        except D2GraphError as e:
            everything += e.diagnostics
            failed = True
            unreadable |= any(d.code in ("E010", "E011") for d in e.diagnostics)
            if args.format == "text":
                _print_diagnostics(e.diagnostics)
            continue
        # The checker's warnings, and a trainer that cannot train this graph, found now.
        found = [*graph.warnings, *stage_problems(graph)]
        everything += found
        if args.format == "text":
            _print_diagnostics(found)
        if any(d.is_error for d in found):
            failed = True
            continue
        if args.format == "text":
            if args.ir:
                print(graph)
            else:
                from .ir import format_cost

                unit = "" if any(n.cost_declared for n in graph.nodes) else " MACs"  # declared costs: user's unit
                print(f"{path}: ok — {len(graph.nodes)} nodes, {len(graph.control_nodes)} control, "
                      f"full cost {format_cost(graph.full_cost)}{unit} per example")
    if args.format == "json":
        errors = sum(d.is_error for d in everything)
        print(json.dumps({"diagnostics": [d.to_json() for d in everything], "errors": errors,
                          "warnings": len(everything) - errors}, indent=2))
    elif failed:
        errors = sum(d.is_error for d in everything)
        print(f"{errors} error{'s' if errors != 1 else ''} found", file=sys.stderr)
    if unreadable:  # a path that is not a readable file is a usage error, not a finding
        return EXIT_USAGE
    return EXIT_FOUND if failed else EXIT_OK


def cmd_fmt(args) -> int:
    from .fmt import format_source
    from .syntax import read_source

    changed, broken = [], False
    for path in args.files:
        try:
            text = read_source(path)
            new = format_source(text, path)
        except D2GraphError as e:
            _print_diagnostics(e.diagnostics)
            broken = True
            continue
        if new == text:
            continue
        changed.append(path)
        if args.check:
            print(f"{path}: would be reformatted")
        else:
            write_atomic(Path(path), new)
            print(f"{path}: formatted")
    if broken:
        return EXIT_USAGE
    return EXIT_FOUND if (args.check and changed) else EXIT_OK


def cmd_render(args) -> int:
    from .check import load
    from .render import FORMATS, render

    out = Path(args.output)
    said_folder = out.is_dir() or args.output.endswith(("/", "\\"))
    to_folder = len(args.files) > 1 or said_folder
    if to_folder and not said_folder and (out.suffix.lower() in FORMATS or out.exists()):
        raise _usage(f"-o {args.output} names a file, but {len(args.files)} files are given: with several files, "
                     "-o must be a folder (one drawing each)",
                     f"give a folder, e.g. `-o {out.with_suffix('')}/` (the format is --format, default svg), "
                     "or draw one file at a time")
    if not to_folder and args.format is not None and out.suffix.lower() != f".{args.format}":
        raise _usage(f"--format {args.format} does not match -o {args.output}: a file's own extension picks its format",
                     f"write `-o {out.with_suffix('.' + args.format)}`"
                     + (f", or `-o {out}/` for a folder" if not out.suffix else ", or leave out --format"))
    graphs = [load(f, allow_imports=args.allow_imports) for f in args.files]  # all checked before drawing
    stats = _run_stats(args.stats, graphs) if args.stats else None
    for path, graph in zip(args.files, graphs):
        _print_diagnostics(graph.warnings)
        target = out / f"{Path(path).stem}.{args.format or 'svg'}" if to_folder else out
        print(f"wrote {render(graph, target, stats)}")
    return EXIT_OK


def cmd_bench(args) -> int:
    from .bench import bench, bench_table
    from .check import load
    from .executor import require_buildable

    graph = load(args.file, allow_imports=args.allow_imports)
    require_buildable(graph)
    setting = dict(graph.train.settings).get("threads", "auto") if graph.train is not None else "auto"
    with _using_threads(args.threads, setting):
        print(bench_table(bench(graph, batch=args.batch, rounds=args.rounds)))
    return EXIT_OK


def cmd_train(args) -> int:
    from .distributed import start

    group = start()  # one process, unless torchrun started this one among several
    finished = False
    try:
        code = _train_command(args, group)
        finished = True
        return code
    finally:
        group.close(finished)


def _train_command(args, group) -> int:
    from .check import check_text, load
    from .executor import require_buildable
    from .runs import Interrupted, Run, make_trainers, refuse_sweep, resolve, train
    from .syntax import read_source

    def prepare():
        """The graph, config and run (process 0 makes or opens the run folder; under torchrun
        the others get the source and config from it, and no folder)."""
        if args.resume:
            if args.file or args.overrides or args.out:
                raise _usage("--resume continues a run as it was configured",
                             "give only the run folder: `d2graph train --resume RUN`")
            refuse_sweep(args.resume, "--resume")
            run = Run.open(args.resume)
            source = run.source
            graph = load(source, allow_imports=args.allow_imports)
            config = run.config
            if args.threads is not None:  # the machine's, not the run's: it may be busier than the first one
                from .threads import thread_count

                recorded, config.settings["threads"] = config.settings["threads"], thread_count(args.threads)
                if config.settings["threads"] != recorded:
                    print(f"note: resuming on {config.settings['threads']} thread(s), not the {recorded} in the run's "
                          "config.json: the metrics may differ in their last digits from an uninterrupted run",
                          file=sys.stderr)
            return graph, source, config, run
        if not args.file:
            raise _usage("train needs a .d2 file (or --resume RUN)", "e.g. `d2graph train examples/early_exit.d2`")
        graph = load(args.file, allow_imports=args.allow_imports)
        require_buildable(graph)  # before a run folder is made for it
        source = Path(args.file)
        config = resolve(graph, _with_threads(args))
        make_trainers(config, graph)  # a trainer that refuses the graph, before the run folder too
        if args.print_config:
            return graph, source, config, None
        config.data_root = str(source.resolve().parent)
        run = Run.create(graph, read_source(args.file), config, args.out)
        if run.restarted:
            print(f"note: {run.folder} held a run that stopped before its first checkpoint; starting it again there",
                  file=sys.stderr)
        return graph, source, config, run

    prepared = []

    def on_main():
        prepared.append(prepare())
        graph, source, config, _ = prepared[0]
        # What the other processes need to check the same graph (nothing in one process).
        return (read_source(source) if group.world > 1 else None), str(source), config

    text, name, config = group.from_main(on_main)
    if group.main:
        graph, source, config, run = prepared[0]
    else:  # the same graph and config as process 0, and no run folder
        source, run = Path(name), None
        graph = check_text(text, name, allow_imports=args.allow_imports)
    if args.print_config:
        if group.main:
            print(config.text(), end="")
        return EXIT_OK
    if group.main:
        _print_diagnostics(graph.warnings)
    echo = (lambda text: print(text, file=sys.stderr)) if not args.quiet and group.main else None
    if echo:
        echo(f"run folder: {run.folder}" + (f" (process 0 of {group.world} writes it)" if group.world > 1 else ""))
    try:
        trained = train(graph, config, run, resume=bool(args.resume), root=config.data_folder(source),
                        quiet=args.quiet or not group.main, echo=echo, group=group)
    except Interrupted:
        if group.main:
            print(f"interrupted: the last checkpoint is in {run.folder / 'last.pt'}; continue with "
                  f"`d2graph train --resume {run.folder}`", file=sys.stderr)
        return EXIT_INTERRUPTED
    if group.main:
        print(_summary(graph, trained.reports["test"], trained.policy.describe(), trained.full.get("test")))
        print(f"run folder: {run.folder}")
    return EXIT_OK


def _with_threads(args) -> list[str]:
    """The command's `--set` overrides, and `--threads` as the override of the setting it is."""
    return args.overrides + ([f"threads={args.threads}"] if args.threads is not None else [])


def _summary(graph, report, policy: str, full=None) -> str:
    from .ir import format_cost

    f1 = f", F1 {report.f1:.3f}" if report.f1 is not None else ""
    if full is not None:  # the number a user compares first
        f1 += f" (full network {full.accuracy:.2%})"
    return (f"{graph.name}: test accuracy {report.accuracy:.2%}{f1}, mean cost {format_cost(report.mean_cost)} "
            f"per example ({report.cost_fraction:.1%} of the full graph), policy: {policy}")


def cmd_eval(args) -> int:
    from .check import load
    from .evaluate import evaluate
    from .runs import Run, computing_in, resolve

    target = Path(args.target)
    if not target.exists():
        raise D2GraphError([Diagnostic("E922", f"no run folder or .d2 file {target}", None, "",
                                       help="give a folder that `d2graph train` created, or a .d2 file "
                                            "with --checkpoint PATH")])
    if target.is_dir():
        config = Run.open(target).config
    else:
        if args.checkpoint in ("last", "best"):
            raise _usage("evaluating a .d2 file needs --checkpoint PATH (a .pt file of a run)",
                         "or give the run folder: `d2graph eval runs/<graph>/<timestamp>`")
        graph = load(target)
        config = resolve(graph)
    import torch

    # The data set is built (cluttered_digits draws its images with torch) on these threads too.
    with _using_threads(args.threads, config.settings["threads"]):
        if target.is_dir():
            trained = _load_run(target, args.checkpoint)
        else:
            trained = _restore(graph, config, target.resolve().parent, Path(args.checkpoint))
        splits, policy, executor = trained["splits"], trained["policy"], trained["executor"]
        with computing_in(trained["config"], next(executor.parameters(), torch.empty(0)).device):
            report = evaluate(executor, splits[args.split], policy, classes=splits.classes, split=args.split,
                              generator=torch.Generator().manual_seed(int(trained["config"].settings["seed"])))
    if args.format == "json":
        print(json.dumps({"policy": policy.describe(), **report.to_json()}, indent=2))
    else:
        print(report.table())  # its second line names the policy
    return EXIT_OK


def cmd_sweep(args) -> int:
    from .check import load
    from .executor import require_buildable
    from .sweep import sweep

    graph = load(args.file, allow_imports=args.allow_imports)
    require_buildable(graph)  # before a sweep folder is made for it
    _print_diagnostics(graph.warnings)
    echo = (lambda text: print(text, file=sys.stderr)) if not args.quiet else None
    result = sweep(graph, Path(args.file), budgets=args.budgets, methods=args.methods, param=args.param,
                   overrides=_with_threads(args), out=args.out, seeds=args.seeds, echo=echo)
    print(result.table())
    print(f"sweep folder: {result.folder}")
    return EXIT_OK


def cmd_policy(args) -> int:
    from . import predictions

    if args.policy_command == "export":
        from .runs import Run

        with _using_threads(args.threads, Run.open(args.run).config.settings["threads"]):
            trained = _load_run(args.run, args.checkpoint)
            pred = predictions.from_executor(trained["executor"], trained["splits"])
        print(f"wrote {predictions.save(pred, args.out)} ({pred.exits} exits: {', '.join(pred.exit_names)})")
        return EXIT_OK
    from .trainers.eenet import fit_on_predictions, patience_on_predictions, threshold_on_predictions

    rules = {"eenet": None, "patience": None, "threshold": "maxprob", "maxprob": "maxprob", "entropy": "entropy",
             "margin": "margin"}
    unknown = [t for t in args.trainer if t not in rules]
    if unknown:
        raise _usage(f"--trainer: no policy `{unknown[0]}` works on predictions",
                     "choose from " + ", ".join(f"`{r}`" for r in rules))
    eenet_params = _eenet_params(args.eenet_params)
    pred = predictions.load(args.predictions)
    for note in pred.notes:
        print(f"note: {note}", file=sys.stderr)
    rows = []
    for budget in args.budget:
        for trainer in args.trainer:
            if trainer == "eenet":
                _, report = fit_on_predictions(pred, budget, args.seed, **eenet_params)
            elif trainer == "patience":
                _, report = patience_on_predictions(pred, budget)
                report["method"] = f"patience ({report['patience']} agree)"
            else:
                _, report = threshold_on_predictions(pred, budget, rules[trainer])
                report["method"] = f"threshold ({rules[trainer]})"
            rows.append({"budget": budget, "method": report["method"],
                         **{f"{s}_{k}": (report[s] or {}).get(k) for s in ("val", "test")
                            for k in ("accuracy", "cost_fraction")}})
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    print(f"{args.predictions}: {pred.exits} exits, {pred.val_probs.shape[1]:,} validation and "
          f"{pred.test_probs.shape[1]:,} test examples")
    print("| budget | method | val accuracy | val cost | test accuracy | test cost |\n|---:|---|---:|---:|---:|---:|")
    for r in rows:
        cells = [f"{r[k]:.4f}" if r[k] is not None else "—" for k in
                 ("val_accuracy", "val_cost_fraction", "test_accuracy", "test_cost_fraction")]
        print(f"| {r['budget']:.2f} | {r['method']} | " + " | ".join(cells) + " |")
    return EXIT_OK


def _eenet_params(settings: list[str]) -> dict:
    """`policy fit --set K=V ...` as `eenet`'s parameters, checked as the trainer checks a
    `.d2` stage's (its schema, then its own checks); the budget comes from `--budget`."""
    from .runs import parse_value
    from .schema import TRAINERS

    trainer = TRAINERS.get("eenet")
    names = [p.name for p in trainer.schema.params if p.name != "budget"]
    settable = "settable: " + ", ".join(f"`{n}`" for n in names) + "; the budget is `--budget`"
    given = {}
    for text in settings:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep:
            raise _usage(f"--set {text!r}: not `key=value`", settable)
        if key not in names:
            raise _usage(f"--set {text!r}: `eenet` has no parameter `{key}` that --set can give"
                         + did_you_mean(key, names), settable)
        given[key] = parse_value(raw)
    params = trainer(**given).params  # the schema's and the trainer's checks (E921)
    return {k: v for k, v in params.items() if k in given}


def cmd_lsp(args) -> int:
    try:
        # Imported here: pygls is an optional extra, and no other command may need it.
        from .lsp import serve
    except ImportError as e:
        if (e.name or "").split(".")[0] not in ("pygls", "lsprotocol"):
            raise
        print(f"error: `d2graph lsp` needs the `{e.name.split('.')[0]}` package, which is not installed\n"
              '  = help: pip install "d2graph[lsp]"', file=sys.stderr)
        return EXIT_MISSING_TOOL
    serve(_version())
    return EXIT_OK


def cmd_export(args) -> int:
    from .export import export_run
    from .runtime import read_manifest

    folder = export_run(args.run, args.out, format=args.format)
    manifest = read_manifest(folder)
    print(f"wrote {folder} ({manifest['graph']}: {len(manifest['files'])} {args.format} programs; policy: "
          f"{manifest['policy']['describe']})")
    return EXIT_OK


def cmd_predict(args) -> int:
    from . import runtime

    net = runtime.load(args.export)
    arrays = _read_inputs(Path(args.input), net)
    with _using_threads(args.threads, "auto") if net.format == "pt2" else contextlib.nullcontext():
        predicted = runtime.predict(net, arrays, batch=args.batch, progress=not args.quiet)
    runtime.write_predictions(args.out, predicted)
    print(runtime.summary(predicted, net))
    print(f"wrote {args.out}")
    return EXIT_OK


def _read_inputs(path: Path, net) -> dict:
    """The graph's inputs from an .npz: each by its input's name, or, for a graph of one input,
    the file's only array (E944 when an input is missing, or a token input's array is not of
    integers)."""
    import numpy as np

    from .runtime import runtime_error

    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as e:
        raise runtime_error("E944", f"cannot read {path} as an .npz ({e})",
                            "save the inputs with numpy.savez(path, x=array)") from None
    names = list(net.inputs)
    if len(names) == 1 and names[0] not in arrays and len(arrays) == 1:
        given = {names[0]: next(iter(arrays.values()))}
    else:
        missing = [n for n in names if n not in arrays]
        if missing:
            raise runtime_error("E944", f"{path} has no array `{missing[0]}` (it holds "
                                        f"{', '.join(arrays) or 'nothing'})",
                                f"save one array per input of `{net.graph}`, named {', '.join(names)}")
        given = {n: arrays[n] for n in names}
    for name, array in given.items():
        # token ids must come as integers: a float array is a mistake (pixels, embeddings), not
        # ids to round
        if name in net.tokens and not np.issubdtype(array.dtype, np.integer):
            raise runtime_error("E944", f"{path}: input `{name}` takes token ids (integers), the array holds "
                                        f"{array.dtype} values",
                                f"save the token ids of `{name}` as an integer array (int64), 0 where padded")
    return given


def _load_run(folder, checkpoint: str) -> dict:
    """A run folder's graph, config, executor (with the checkpoint's weights), policy, data."""
    from .check import load
    from .runs import Run

    run = Run.open(folder)
    path = run.folder / f"{checkpoint}.pt" if checkpoint in ("last", "best") else Path(checkpoint)
    other = {"last": "best", "best": "last"}.get(checkpoint)
    intact = other is not None and (run.folder / f"{other}.pt").is_file()
    help = f"try the run's other checkpoint: `--checkpoint {other}`" if intact else None
    return _restore(load(run.source), run.config, run.config.data_folder(run.source), path, help=help)


def _restore(graph, config, root: Path, path: Path, help: str | None = None) -> dict:
    from .executor import compile
    from .runs import check_fingerprint, describe_best, load_checkpoint, load_data
    from .policies import load_policy

    state = load_checkpoint(path, help=help or "`--checkpoint` takes last, best (of a run folder) or a .pt file "
                                               "that `d2graph train` wrote")
    check_fingerprint(state, graph, path, help="evaluate it with the .d2 file it was trained from (a run folder "
                                               "keeps a copy)")
    note = describe_best(state, config)
    if note:  # best.pt is not the final model of a run whose last stages do not validate: say which it is
        print(f"note: {note}", file=sys.stderr)
    executor = compile(graph)
    try:
        executor.load_state_dict(state["weights"])
        policy = load_policy(graph, state["policy"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise D2GraphError([Diagnostic("E922", f"{path} does not fit graph `{graph.name}` ({str(e)[:200]})",
                                       None, "", help="evaluate it with the .d2 file it was trained from")]) from None
    return {"graph": graph, "config": config, "executor": executor, "policy": policy,
            "splits": load_data(config, graph, root)}


def _run_stats(folder: str, graphs) -> dict:
    """The test report of a run folder, for `render --stats`."""
    from .runs import Run, sweep_folder

    owner = sweep_folder(folder)
    if owner is not None:  # many policies, no one routing to draw
        what = "a sweep folder" if Path(folder) == owner else f"a seed's folder of the sweep {owner}"
        name = graphs[0].name
        raise _usage(f"{folder} is {what}: it holds the accuracy–cost curves of many policies, not the execution "
                     "rates of one run",
                     "--stats takes the folder of a finished `d2graph train` run: train the sweep point you want "
                     f"drawn into one, e.g. `d2graph train {name}.d2 --set STAGE.budget=0.5 --out RUN` (the "
                     f"setting of that point), then `d2graph render {name}.d2 -o {name}.svg --stats RUN`")
    run = Run.open(folder)
    path = run.folder / "report.json"
    if not path.is_file():
        raise _usage(f"{folder} has no report.json (the run did not finish)",
                     f"finish it with `d2graph train --resume {folder}`")
    if any(g.name != run.config.graph for g in graphs):
        raise _usage(f"{folder} is a run of graph `{run.config.graph}`", "draw that graph with these statistics")
    return json.loads(path.read_text())["test"]


def _under_torchrun() -> bool:
    if "WORLD_SIZE" not in os.environ:  # the common case decided without importing torch
        return False
    from .distributed import under_torchrun

    return under_torchrun()


def _usage(message: str, help: str) -> D2GraphError:
    return D2GraphError([Diagnostic("E920", message, None, "", help=help)])


_COMMANDS = {"check": cmd_check, "fmt": cmd_fmt, "render": cmd_render, "bench": cmd_bench, "train": cmd_train,
             "eval": cmd_eval, "sweep": cmd_sweep, "policy": cmd_policy, "export": cmd_export,
             "predict": cmd_predict, "lsp": cmd_lsp}


# --- helpers ---------------------------------------------------------------------------------


def _print_diagnostics(diags) -> None:
    for d in diags:
        print(d.render() + "\n", file=sys.stderr)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("d2graph")
    except Exception:
        return "dev"

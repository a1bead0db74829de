"""argv → library calls → exit code. The only module that prints.

Commands: `check`, `fmt`, `render`, `bench` (more arrive with the trainers).
Exit codes: 0 success · 1 `check` found errors, or `fmt --check` found a file to
reformat · 2 usage errors and malformed input to any other command · 3 a required
external tool is missing (Graphviz's `dot`) · 130 interrupted · 70 internal error.
Guarantees: a user's mistake never shows a Python traceback (`--debug` shows one);
files are written atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Sequence

from .diagnostics import D2GraphError, Diagnostic
from .files import write_atomic

EXIT_OK, EXIT_FOUND, EXIT_USAGE, EXIT_TOOL, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 70, 130


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
    r.add_argument("--format", choices=("svg", "png", "dot"), default="svg",
                   help="the drawing format when OUT is a folder (default svg)")
    r.add_argument("--allow-imports", action="store_true", help="allow module(\"pkg.mod:Class\") layers")

    b = sub.add_parser("bench", help="cost and latency of the dynamic executor and of each static path")
    b.add_argument("file", metavar="FILE")
    b.add_argument("--batch", type=_positive_int, default=256, help="examples per batch (default 256)")
    b.add_argument("--rounds", type=_positive_int, default=20, help="timed rounds per row (default 20)")
    b.add_argument("--allow-imports", action="store_true", help="allow module(\"pkg.mod:Class\") layers")
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
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

    everything: list[Diagnostic] = []
    failed = unreadable = False
    for path in args.files:
        try:
            graph = load(path, allow_imports=args.allow_imports)
        except D2GraphError as e:
            everything += e.diagnostics
            failed = True
            unreadable |= any(d.code == "E010" for d in e.diagnostics)
            if args.format == "text":
                _print_diagnostics(e.diagnostics)
            continue
        everything += graph.warnings
        if args.format == "text":
            _print_diagnostics(graph.warnings)
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
    from .render import render

    out = Path(args.output)
    to_folder = len(args.files) > 1 or out.is_dir() or args.output.endswith(("/", "\\"))
    if to_folder:
        out.mkdir(parents=True, exist_ok=True)
    graphs = [load(f, allow_imports=args.allow_imports) for f in args.files]  # all checked before drawing
    for path, graph in zip(args.files, graphs):
        _print_diagnostics(graph.warnings)
        target = out / f"{Path(path).stem}.{args.format}" if to_folder else out
        print(f"wrote {render(graph, target)}")
    return EXIT_OK


def cmd_bench(args) -> int:
    from .bench import bench, bench_table
    from .check import load

    graph = load(args.file, allow_imports=args.allow_imports)
    print(bench_table(bench(graph, batch=args.batch, rounds=args.rounds)))
    return EXIT_OK


_COMMANDS = {"check": cmd_check, "fmt": cmd_fmt, "render": cmd_render, "bench": cmd_bench}


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

r"""d2graph: dynamic neural networks from a small graph language.

The pipeline, one module per stage (no stage imports a later one):

    .d2 text --syntax--> AST --check--> IR (Graph) --compile--> Executor --> Result
                                              \--render--> DOT/SVG
                           \--fmt--> canonical text

Public API:
    load(path)            read, parse and check a .d2 file → Graph (raises D2GraphError)
    parse(text)           text → AST (ast.File)
    check(text)           text → (Graph | None, diagnostics), never raises on a user's mistake
    format(text)          text → canonical text
    compile(graph)        Graph → Executor (nn.Module); executor(x, mode=...) → Result
    render(graph, out)    Graph → .svg / .png / .dot
    train(graph, ...)     run the graph's train block → Trained (executor, policy, reports)
    evaluate(executor, dataset, policy, classes=...) → Report (accuracy, cost, paths, exits)

Deployment (docs/deploy.md): `d2graph.export.export_run(run, out)` writes a trained run as one
exported program per node and a manifest; `d2graph.runtime.load(out)` runs it with torch alone.

Example:
    >>> import d2graph
    >>> g = d2graph.load("examples/high_low.d2")        # doctest: +SKIP
    >>> print(g)                                         # doctest: +SKIP
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING

from .diagnostics import D2GraphError, Diagnostic, Span
from .schema import DATASETS, TRAINERS

if TYPE_CHECKING:  # for the annotations only; at run time these load on first use (below)
    from .executor import Executor
    from .ir import Graph

__version__ = "0.1.0"

# Nothing here imports torch: `import d2graph` (and so every `d2graph` command, `fmt` and
# `--version` included) stays quick, and each function below imports its stage when called
# (the imports inside functions are there for that). The stages that register data sets and
# trainers are imported at the checker's first lookup of one.
DATASETS.provided_by(f"{__name__}.data")
DATASETS.provided_by(f"{__name__}.image_data")
TRAINERS.provided_by(f"{__name__}.trainers")

# Names the package re-exports from its stages, imported at first use (PEP 562).
_LAZY = {"Executor": "executor", "Result": "executor", "Graph": "ir", "Node": "ir", "parse": "syntax"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib  # (only for a name not yet looked up)

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def load(path, *, allow_imports: bool = False) -> Graph:
    """Read, parse and check a .d2 file; raise D2GraphError carrying every error."""
    from .check import load

    return load(path, allow_imports=allow_imports)


def check(text: str, filename: str = "<input>", *, allow_imports: bool = False):
    """Check .d2 source text: (Graph or None, list of diagnostics, errors and warnings)."""
    from .check import check
    from .syntax import parse

    try:
        return check(parse(text, filename), allow_imports=allow_imports)
    except D2GraphError as e:
        return None, list(e.diagnostics)


def format(text: str, filename: str = "<input>") -> str:  # noqa: A001 - the verb users expect
    """Canonical layout of .d2 source text (comments kept); raises D2GraphError if malformed."""
    from .fmt import format_source

    return format_source(text, filename)


def compile(graph: Graph) -> Executor:  # noqa: A001 - the verb users expect
    """Compile a checked graph into an nn.Module that routes each example (see executor.py)."""
    from .executor import compile

    return compile(graph)


def render(graph: Graph, out, stats=None):
    """Draw a checked graph to .svg, .png or .dot (the DOT is always written)."""
    from .render import render

    return render(graph, out, stats)


def train(graph: Graph, overrides=(), *, out=None, quiet: bool = True, source=None):
    """Run the train block of `graph` (with `--set`-style `overrides`); with `out`, in a
    run folder there (the source copied from `source`, a path). Returns `runs.Trained`."""
    from pathlib import Path

    from .runs import Run, resolve, train
    from .syntax import read_source

    config = resolve(graph, list(overrides))
    run = None
    if out is not None:
        text = read_source(source) if source is not None else ""
        run = Run.create(graph, text, config, out)
    root = Path(source).resolve().parent if source is not None else None
    return train(graph, config, run, root=root, quiet=quiet, echo=None if quiet else print)


def evaluate(executor, dataset, policy=None, *, classes: int, batch: int = 256, generator=None):
    """Accuracy, mean cost, node rates, paths and exits of `executor` on a TensorDataset."""
    from .evaluate import evaluate

    return evaluate(executor, dataset, policy, classes=classes, batch=batch, generator=generator)


class _Package(types.ModuleType):
    """This package, keeping its verbs `check`, `render` and `evaluate` when the stages of the
    same names are imported: the import system sets a submodule on its package as an attribute,
    which would replace the function (`d2graph.check(text)` would then call a module)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and callable(self.__dict__.get(name)):
            return  # the submodule stays reachable as sys.modules["d2graph.<name>"]
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = ["D2GraphError", "Diagnostic", "Executor", "Graph", "Node", "Result", "Span", "check", "compile",
           "evaluate", "format", "load", "parse", "render", "train"]

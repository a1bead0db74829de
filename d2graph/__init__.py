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

Example:
    >>> import d2graph
    >>> g = d2graph.load("examples/high_low.d2")        # doctest: +SKIP
    >>> print(g)                                         # doctest: +SKIP
"""

from __future__ import annotations

# The stage modules are imported first on purpose: the functions below share their
# names (`check`, `render`), and defining them last makes `d2graph.check` the function.
from . import check as _check_module, executor as _executor_module, render as _render_module  # noqa: F401
from . import data as _data  # noqa: F401  (registers the built-in data sets the checker accepts)
from . import trainers as _trainers  # noqa: F401  (registers the trainers, plugins included)
from . import evaluate as _evaluate_module, runs as _runs_module
from .diagnostics import D2GraphError, Diagnostic, Span
from .executor import Executor, Result
from .ir import Graph, Node
from .syntax import parse

__version__ = "0.1.0"


def load(path, *, allow_imports: bool = False) -> Graph:
    """Read, parse and check a .d2 file; raise D2GraphError carrying every error."""
    return _check_module.load(path, allow_imports=allow_imports)


def check(text: str, filename: str = "<input>", *, allow_imports: bool = False):
    """Check .d2 source text: (Graph or None, list of diagnostics, errors and warnings)."""
    try:
        return _check_module.check(parse(text, filename), allow_imports=allow_imports)
    except D2GraphError as e:
        return None, list(e.diagnostics)


def format(text: str, filename: str = "<input>") -> str:  # noqa: A001 - the verb users expect
    """Canonical layout of .d2 source text (comments kept); raises D2GraphError if malformed."""
    from .fmt import format_source

    return format_source(text, filename)


def compile(graph: Graph) -> "Executor":  # noqa: A001 - the verb users expect
    """Compile a checked graph into an nn.Module that routes each example (see executor.py)."""
    return _executor_module.compile(graph)


def render(graph: Graph, out, stats=None):
    """Draw a checked graph to .svg, .png or .dot (the DOT is always written)."""
    return _render_module.render(graph, out, stats)


def train(graph: Graph, overrides=(), *, out=None, quiet: bool = True, source=None):
    """Run the train block of `graph` (with `--set`-style `overrides`); with `out`, in a
    run folder there (the source copied from `source`, a path). Returns `runs.Trained`."""
    from pathlib import Path

    config = _runs_module.resolve(graph, list(overrides))
    run = None
    if out is not None:
        text = Path(source).read_text() if source is not None else ""
        run = _runs_module.Run.create(graph, text, config, out)
    root = Path(source).resolve().parent if source is not None else None
    return _runs_module.train(graph, config, run, root=root, quiet=quiet, echo=None if quiet else print)


def evaluate(executor, dataset, policy=None, *, classes: int, batch: int = 256, generator=None):
    """Accuracy, mean cost, node rates, paths and exits of `executor` on a TensorDataset."""
    return _evaluate_module.evaluate(executor, dataset, policy, classes=classes, batch=batch, generator=generator)


__all__ = ["D2GraphError", "Diagnostic", "Executor", "Graph", "Node", "Result", "Span", "check", "compile",
           "evaluate", "format", "load", "parse", "render", "train"]

"""Argument schemas: what a layer, data set or trainer accepts, and binding calls to them.

In:  a `Schema` (declared next to each layer / data set / trainer) and the arguments of
     a call as written in a .d2 file (already resolved to Python values).
Out: the bound arguments as a dict in schema order, defaults filled in, or diagnostics
     (E804 unknown keyword, E805 wrong type or value, E806 missing, E807 too many
     positional, E813 given twice), each pointing at the offending argument with a
     "did you mean" hint.
Guarantees: one schema drives validation, the hints and the generated docs, so they
cannot disagree.

Example:
    >>> s = Schema("fc", (Param("features", "posint"), Param("bias", "bool", True)))
    >>> s.bind([(10, None)], [])[0]
    {'features': 10, 'bias': True}
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from .diagnostics import D2GraphError, Diagnostic, Span, did_you_mean


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


class Symbol(str):
    """A bare word used as a value (`concat`, `same`, `max`), as opposed to a "string"."""


# kind → (description for messages, predicate on the value)
_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "posint": ("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0),
    "nonneg": ("a non-negative integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "number": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "fraction": ("a number between 0 and 1", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1),
    "bool": ("`true` or `false`", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str) and not isinstance(v, Symbol)),
    "shape": ("a list of positive integers like [3, 32, 32]",
              lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)),
    "ints": ("a list of integers", lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)),
    "numbers": ("a list of numbers", lambda v: isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)),
    "any": ("any value", lambda v: True),
}


@dataclass(frozen=True)
class Param:
    """One parameter. `kind` is a key of the table above or "choice" (then `choices`).
    `also` lets a parameter accept a few symbols besides its kind (e.g. padding=same)."""

    name: str
    kind: str
    default: Any = REQUIRED
    doc: str = ""
    choices: tuple[str, ...] = ()
    also: tuple[str, ...] = ()
    shown: str = ""  # how a computed default reads in signatures, e.g. "kernel"

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def describe(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(f"`{c}`" for c in self.choices)
        text = _KINDS[self.kind][0]
        if self.also:
            text += " or " + " or ".join(f"`{a}`" for a in self.also)
        return text

    def accepts(self, value: Any) -> bool:
        if isinstance(value, str) and value in self.also:
            return True
        if self.kind == "choice":
            return isinstance(value, str) and value in self.choices
        return _KINDS[self.kind][1](value)

    def coerce(self, value: Any) -> Any:
        # An integer is a fine number; keep floats as floats for the IR's sake.
        if self.kind == "choice" or (isinstance(value, str) and value in self.also):
            return Symbol(value)  # a word of the language: printed bare, compared as a str
        return value


@dataclass(frozen=True)
class Schema:
    """The parameters of one callable thing, in positional order."""

    name: str
    params: tuple[Param, ...] = ()
    doc: str = ""
    # Extra positional/keyword arguments are passed through (module("pkg:Class", ...)).
    open: bool = False

    def signature(self) -> str:
        parts = []
        for p in self.params:
            symbol = isinstance(p.default, str) and (p.kind == "choice" or p.default in p.also)
            default = Symbol(p.default) if symbol else p.default
            parts.append(p.name if p.required else f"{p.name}={p.shown or format_value(default)}")
        if self.open:
            parts.append("...")
        return f"{self.name}({', '.join(parts)})" if parts else self.name

    def bind(
        self,
        positional: list[tuple[Any, Span | None]],
        keywords: list[tuple[str, Any, Span | None, Span | None]],
        call_span: Span | None = None,
        what: str = "layer",
    ) -> tuple[dict[str, Any], list[Diagnostic]]:
        """Bind arguments; `keywords` holds (name, value, name_span, value_span).

        Returns the arguments in schema order (with defaults) and any diagnostics.
        For an open schema, unmatched arguments go under "args" and "kwargs".
        """
        diags: list[Diagnostic] = []
        bound: dict[str, Any] = {}
        spans: dict[str, Span | None] = {}
        extra_args: list[Any] = []
        extra_kwargs: dict[str, Any] = {}
        names = [p.name for p in self.params]
        for i, (value, span) in enumerate(positional):
            if i < len(self.params):
                bound[self.params[i].name] = value
                spans[self.params[i].name] = span
            elif self.open:
                extra_args.append(value)
            else:
                diags.append(Diagnostic(
                    "E807", f"too many arguments for {what} `{self.name}`", span,
                    f"{what} `{self.name}` takes at most {len(self.params)} positional argument"
                    + ("s" if len(self.params) != 1 else ""),
                    help=f"its signature is `{self.signature()}`",
                ))
        for key, value, key_span, value_span in keywords:
            if key in bound:
                diags.append(Diagnostic(
                    "E813", f"argument `{key}` of {what} `{self.name}` is given twice", key_span,
                    "given again here", help="remove one of the two",
                ))
            elif key in names:
                bound[key] = value
                spans[key] = value_span
            elif self.open:
                extra_kwargs[key] = value
            else:
                hint = did_you_mean(key, names)
                known = ", ".join(f"`{n}`" for n in names) or "none"
                diags.append(Diagnostic(
                    "E804", f"{what} `{self.name}` has no parameter `{key}`{hint}", key_span,
                    "unknown parameter", help=f"its parameters are {known}: `{self.signature()}`",
                ))
        out: dict[str, Any] = {}
        for p in self.params:
            if p.name in bound:
                value = bound[p.name]
                if not p.accepts(value):
                    hint = did_you_mean(value, p.choices + p.also) if isinstance(value, str) else ""
                    diags.append(Diagnostic(
                        "E805", f"argument `{p.name}` of {what} `{self.name}` must be {p.describe()}{hint}",
                        spans.get(p.name), f"this is {describe_value(value)}",
                        help=(f"`{p.name}` is the {p.doc}; " if p.doc else "") + f"the signature is `{self.signature()}`",
                    ))
                    continue
                out[p.name] = p.coerce(value)
            elif p.required:
                diags.append(Diagnostic(
                    "E806", f"{what} `{self.name}` needs the argument `{p.name}`", call_span,
                    f"`{p.name}` is missing", help=f"write it as `{self.signature()}`"
                    + (f"; {p.name}: {p.doc}" if p.doc else ""),
                ))
            else:
                out[p.name] = p.coerce(p.default)  # a word default (`auto`) is a Symbol, as if written
        if self.open:
            out["args"] = extra_args
            out["kwargs"] = extra_kwargs
        return out, diags


def describe_value(value: Any) -> str:
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Symbol):
        return f"the name `{value}`"
    if isinstance(value, str):
        return f'the string "{value}"'
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value:g}"
    if isinstance(value, list):
        return f"the list {format_value(value)}"
    return repr(value)


def format_value(value: Any) -> str:
    """A value as it would be written in a .d2 file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Symbol):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if value is None:
        return "none"
    return str(value)


@dataclass
class Registry:
    """Named things with a schema each (layers, data sets, trainers)."""

    what: str
    entries: dict[str, Any] = field(default_factory=dict)
    providers: list[str] = field(default_factory=list)  # modules whose import registers entries

    def register(self, name: str, entry: Any) -> None:
        self.entries[name] = entry

    def provided_by(self, module: str) -> None:
        """Name a module (dotted path) that registers entries here when imported. It is imported
        at the first lookup, not now: the data sets and trainers import torch, which a command
        that never looks one up (`d2graph fmt`, `--version`) should not wait for."""
        self.providers.append(module)

    def get(self, name: str):
        self._fill()
        return self.entries.get(name)

    def names(self) -> list[str]:
        self._fill()
        return sorted(self.entries)

    def __contains__(self, name: str) -> bool:
        self._fill()
        return name in self.entries

    def _fill(self) -> None:
        while self.providers:  # taken off first: a provider's own lookups while it loads see what it has
            importlib.import_module(self.providers.pop(0))


# Registries filled by the stages that own them: data sets (d2graph.data) and trainers
# (d2graph.trainers, plus the entry-point group "d2graph.trainers"). The checker only
# reads them, so the language stage never imports a later stage; the package's
# __init__ names those stages as providers, imported at the first lookup.
DATASETS = Registry("data set")
TRAINERS = Registry("trainer")


def trainer_error(trainer: str, message: str, help: str) -> D2GraphError:
    """The error a trainer raises when the graph, the data or its own parameters do not suit
    it (E921). Here, below the trainers, because the analyses they share (multi-exit chains
    in d2graph.predictions) refuse a graph in the trainer's name too.

    Example:
        >>> trainer_error("eenet", "the graph has no exit", help="add one").diagnostics[0].code
        'E921'
    """
    return D2GraphError([Diagnostic("E921", f"trainer `{trainer}`: {message}", None, "", help=help)])

# The settings of a `train { }` block other than `data` and `stage`.
TRAIN_SETTINGS = Schema("train", (
    Param("seed", "int", 0, doc="seed for data splits, initialisation and exploration"),
    Param("batch", "posint", 64, doc="examples per optimisation step"),
    Param("optimizer", "choice", "adam", choices=("adam", "adamw", "sgd")),
    Param("lr", "number", 1e-3, doc="learning rate"),
    Param("weight_decay", "number", 0.0),
    Param("init", "choice", "kaiming", choices=("kaiming", "torch"),
          doc="initial conv/fc weights: He-normal for ReLU networks, or PyTorch's defaults"),
    Param("device", "choice", "auto", choices=("auto", "cpu", "cuda")),
    Param("compile", "bool", False,
          doc="compile each node's layers with torch.compile (dynamic batch sizes); seconds per node to start"),
    Param("precision", "choice", "fp32", choices=("fp32", "bf16"),
          doc="`bf16`: convolutions and matrix products compute in bfloat16 (torch.autocast; weights stay float32), "
              "in training and in the run's evaluation"),
    Param("holdout", "fraction", "auto", also=("auto",),
          doc="share of the training examples kept from the function nodes' training, for the policy stages "
              "to learn on; `auto`: what the policy trainers ask for (0.2 for `qlearning`), else 0"),
    Param("checkpoint_every", "nonneg", 0,
          doc="also save last.pt every this many steps of an epoch, to resume from after a crash; 0: off"),
    Param("checkpoint_seconds", "nonneg", 300,
          doc="also save last.pt when this many seconds passed since the last save (at a step's end); 0: off"),
    Param("threads", "posint", "auto", also=("auto",),
          doc="torch's CPU threads for the run; `auto`: OMP_NUM_THREADS if set, else the CPUs less one, "
              "at least 1 and at most 8 (1 on a 2-CPU machine)"),
))

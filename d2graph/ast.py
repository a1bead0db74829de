"""The abstract syntax tree of a .d2 file: one frozen dataclass per grammar rule.

In:  built by `d2graph.syntax.parse` from source text.
Out: consumed by the checker (`d2graph.check`) and the formatter (`d2graph.fmt`).
Guarantees: every node has a `span` pointing into its source; spans and the literal
spelling of numbers never take part in equality, so `parse(fmt(t)) == parse(t)`
is the test that formatting kept the meaning. Comments are kept on the `File`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from .diagnostics import Span, span_field


@dataclass(frozen=True)
class Name:
    """An identifier as written, with its position (carets point at these)."""

    text: str
    span: Span = span_field()


# --- values -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Number:
    value: int | float
    literal: str = field(default="", compare=False)  # the spelling, kept by fmt
    span: Span = span_field()


@dataclass(frozen=True)
class String:
    value: str
    literal: str = field(default="", compare=False)
    span: Span = span_field()


@dataclass(frozen=True)
class Bool:
    value: bool
    span: Span = span_field()


@dataclass(frozen=True)
class List:
    items: tuple["Value", ...]
    span: Span = span_field()


@dataclass(frozen=True)
class Ref:
    """A bare name in a value position: a `let`, a block parameter, or a symbol (`concat`)."""

    name: Name
    span: Span = span_field()


@dataclass(frozen=True)
class Arg:
    """One argument of a call; `key` is None for a positional argument."""

    key: Name | None
    value: "Value"
    span: Span = span_field()


@dataclass(frozen=True)
class Call:
    """`conv(8, 3, stride=2)`, or a bare `relu` (then `parens` is False)."""

    name: Name
    args: tuple[Arg, ...] = ()
    parens: bool = field(default=False, compare=False)
    span: Span = span_field()


Value = Union[Number, String, Bool, List, Ref, Call]


@dataclass(frozen=True)
class Attr:
    key: Name
    value: Value
    span: Span = span_field()


# --- statements ------------------------------------------------------------------------


@dataclass(frozen=True)
class Let:
    name: Name
    value: Value
    span: Span = span_field()


@dataclass(frozen=True)
class BlockDef:
    name: Name
    params: tuple[Name, ...]
    pipeline: tuple[Call, ...]
    span: Span = span_field()


@dataclass(frozen=True)
class InputDecl:
    """`input NAME [kind] [shape]`; `kind` is None for real-valued data, else the word
    written before the shape (`tokens`: integer token ids), which the checker validates."""

    name: Name
    shape: List
    span: Span = span_field()
    kind: Name | None = None


@dataclass(frozen=True)
class OutputDecl:
    name: Name
    attrs: tuple[Attr, ...] = ()
    span: Span = span_field()


@dataclass(frozen=True)
class NodeDecl:
    """`node`, `control` or `dummy` NAME [attrs] = pipeline."""

    kind: str
    name: Name
    attrs: tuple[Attr, ...]
    pipeline: tuple[Call, ...]
    span: Span = span_field()


@dataclass(frozen=True)
class EdgeChain:
    """`a, b -> c -> d, e [attrs]`: each hop connects every left name to every right name."""

    hops: tuple[tuple[Name, ...], ...]
    attrs: tuple[Attr, ...] = ()
    span: Span = span_field()


@dataclass(frozen=True)
class ControlEdges:
    """`Q => A | B | skip`: action i activates the i-th target; a `skip` target is None."""

    source: Name
    actions: tuple[Name | None, ...]
    action_spans: tuple[Span, ...] = field(default=(), compare=False, repr=False)
    attrs: tuple[Attr, ...] = ()
    span: Span = span_field()


@dataclass(frozen=True)
class Setting:
    """`key = value` inside a train block."""

    key: Name
    value: Value
    span: Span = span_field()


@dataclass(frozen=True)
class Stage:
    """`stage NAME = trainer(args)` inside a train block."""

    name: Name
    trainer: Call
    span: Span = span_field()


@dataclass(frozen=True)
class TrainBlock:
    items: tuple[Setting | Stage, ...]
    span: Span = span_field()


Statement = Union[Let, BlockDef, InputDecl, OutputDecl, NodeDecl, EdgeChain, ControlEdges, TrainBlock]


@dataclass(frozen=True)
class GraphDecl:
    name: Name
    body: tuple[Statement, ...]
    span: Span = span_field()


@dataclass(frozen=True)
class Comment:
    text: str  # including the leading '#'
    span: Span = span_field()


@dataclass(frozen=True)
class File:
    """A whole file: file-level lets and blocks and (normally exactly one) graph."""

    items: tuple[Let | BlockDef | GraphDecl, ...]
    comments: tuple[Comment, ...] = field(default=(), compare=False)
    span: Span = span_field()

    @property
    def graphs(self) -> tuple[GraphDecl, ...]:
        return tuple(i for i in self.items if isinstance(i, GraphDecl))

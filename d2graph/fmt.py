"""AST → canonical .d2 text: the formatter behind `d2graph fmt`.

In:  source text (`format_source`), or a parsed `ast.File` and the text it was parsed
     from (`format_file`).
Out: the same file in one canonical layout: one statement per line, single spaces,
     two-space indentation per `{`, statements and file items in the order written,
     blank-line runs collapsed to one, numbers and strings spelled as written, every
     comment kept verbatim, pipelines longer than `LINE_WIDTH` wrapped after commas.
     Comments between the layers of a pipeline (`conv(8, 3),  # [8,16,16]`) stay there;
     other comments inside a statement move to the line before it.
Guarantees: `format_source` re-parses its result and raises `D2GraphError` (E020)
instead of returning text that parses to a different AST or lost a comment;
formatting is idempotent; the result ends with exactly one newline (an empty file
stays empty). Syntax errors in the input are the `D2GraphError` from `parse`.

Example:
    >>> print(format_source("graph g{input x[4] output y x->y # done\\n}"), end="")
    graph g {
      input x [4]
      output y
      x -> y  # done
    }
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass, field

from . import ast
from .diagnostics import D2GraphError, Diagnostic, Span
from .syntax import MAX_SOURCE_CHARS, parse

LINE_WIDTH = 100
INDENT = "  "

_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")

_Container = ast.File | ast.GraphDecl | ast.TrainBlock


def format_source(text: str, filename: str = "<input>") -> str:
    """Parse .d2 text and return it in canonical layout, checked to mean the same.

    >>> format_source("graph g { node A [cost=2]=conv(8,3) , relu() }")
    'graph g {\\n  node A [cost=2] = conv(8, 3), relu\\n}\\n'
    """
    file = parse(text, filename)
    result = format_file(file, text)
    _check_same(file, result, filename)
    return result


def format_file(file: ast.File, source_text: str | None = None) -> str:
    """Render a parsed file in canonical layout, placing its comments and blank lines
    by their positions in `source_text` (default: the text its spans point into).

    A hand-built AST without spans formats too, with no comments and no blank lines.
    Unlike `format_source`, this does not re-parse the result to check it.

    >>> f = parse("let n=1  graph g { input x [n] }")
    >>> print(format_file(f), end="")
    let n = 1
    graph g {
      input x [n]
    }
    """
    if source_text is None:
        source_text = file.span.source.text if file.span is not None else ""
    lines = _Printer(file, source_text).lines()
    return "\n".join(lines) + "\n" if lines else ""


# --- where each comment goes ----------------------------------------------------------------


@dataclass
class _Placement:
    """The comments of one file, keyed by the id() of the AST node they attach to.

    Keyed by identity because equal statements can occur twice in one file.
    """

    before: dict[int, list[ast.Comment]] = field(default_factory=dict)  # moved out of a statement
    after: dict[int, ast.Comment] = field(default_factory=dict)  # end of the statement's last line
    opener: dict[int, ast.Comment] = field(default_factory=dict)  # end of a `... {` line
    own_line: dict[int, list[ast.Comment]] = field(default_factory=dict)  # between a container's items
    # Between a pipeline layer and the next: the comment ending the layer's line, then own lines.
    between: dict[int, tuple[ast.Comment | None, list[ast.Comment]]] = field(default_factory=dict)


def _children(node) -> tuple | None:
    if isinstance(node, ast.File):
        return node.items
    if isinstance(node, ast.GraphDecl):
        return node.body
    if isinstance(node, ast.TrainBlock):
        return node.items
    return None


class _Printer:
    def __init__(self, file: ast.File, text: str):
        self.file = file
        self.text = text
        self._line_starts = [0] + [m.end() for m in re.finditer(r"\n", text)]
        self.place = _Placement()
        self._inside: dict[int, tuple[ast.Statement, list[ast.Comment]]] = {}
        # id(container) → its items with spans and their start offsets, for binary search:
        # a linear scan per comment made a file of many comments quadratic.
        self._items: dict[int, tuple[list, list[int]]] = {}
        for comment in file.comments:
            if comment.span is not None:
                self._place(comment, file)
        for stmt, comments in self._inside.values():
            gaps = self._pipeline_gaps(stmt, comments)
            if gaps is None:
                # Inside a statement there is no line of its own to keep a comment on.
                self.place.before[id(stmt)] = comments
            else:
                self.place.between.update(gaps)

    # Positions ---------------------------------------------------------------------------

    def _line(self, offset: int) -> int:
        return bisect_right(self._line_starts, offset) - 1

    def _brace(self, container: _Container) -> int:
        """Offset of the `{` that opens a graph or train block (0 for the file).

        Found by skipping whitespace and comments after the header, because a comment
        between `graph g` and `{` may itself contain a brace.
        """
        if isinstance(container, ast.File):
            return 0
        pos = container.name.span.end if isinstance(container, ast.GraphDecl) else container.span.start + len("train")
        while pos < len(self.text) and self.text[pos] != "{":
            if self.text[pos] == "#":
                pos = self.text.find("\n", pos)
                if pos < 0:
                    return len(self.text)
            pos += 1
        return pos

    # Placement ---------------------------------------------------------------------------

    def _place(self, comment: ast.Comment, container: _Container) -> None:
        pos = comment.span.start
        if id(container) not in self._items:
            items = [i for i in _children(container) if i.span is not None]  # in source order
            self._items[id(container)] = (items, [i.span.start for i in items])
        items, starts = self._items[id(container)]
        k = bisect_right(starts, pos) - 1  # the last item that starts at or before the comment
        if k >= 0 and pos < items[k].span.end:
            item = items[k]
            if _children(item) is not None and pos > self._brace(item):
                self._place(comment, item)
            else:
                self._inside.setdefault(id(item), (item, []))[1].append(comment)
            return
        previous = items[k] if k >= 0 else None  # items do not overlap: it ends before the comment
        line = self._line(pos)
        if previous is not None and self._line(previous.span.end) == line:
            self.place.after[id(previous)] = comment
        elif not isinstance(container, ast.File) and self._line(self._brace(container)) == line:
            self.place.opener[id(container)] = comment
        else:
            self.place.own_line.setdefault(id(container), []).append(comment)

    def _pipeline_gaps(self, stmt, comments: list[ast.Comment]) -> dict | None:
        """`between` entries keeping a pipeline's comments where they are, or None.

        Comments between layers (`conv(8, 3),  # [8,16,16]`) annotate the layers around
        them, so the pipeline breaks there to keep them in place. Only when all of a
        statement's inner comments sit between layers, because one moved before the
        statement would otherwise jump ahead of the ones kept in place.
        """
        if not isinstance(stmt, (ast.NodeDecl, ast.BlockDef)):
            return None
        gaps: dict[int, tuple[ast.Comment | None, list[ast.Comment]]] = {}
        ends = [call.span.end for call in stmt.pipeline]
        for comment in comments:
            pos = comment.span.start
            k = bisect_right(ends, pos) - 1  # the last layer that ends before the comment
            if not 0 <= k < len(stmt.pipeline) - 1 or pos >= stmt.pipeline[k + 1].span.start:
                return None
            layer = stmt.pipeline[k]
            end_of_line, own_lines = gaps.get(id(layer), (None, []))
            code_before = self.text[self._line_starts[self._line(pos)] : pos].strip()
            if end_of_line is None and not own_lines and code_before:
                end_of_line = comment
            else:
                own_lines = own_lines + [comment]
            gaps[id(layer)] = (end_of_line, own_lines)
        return gaps

    # Printing ----------------------------------------------------------------------------

    def lines(self) -> list[str]:
        out: list[str] = []
        self._body(self.file, 0, out)
        return out

    def _blank_between(self, end: int | None, start: int | None) -> bool:
        if end is None or start is None:
            return False
        return _BLANK_LINE.search(self.text, end, start) is not None

    def _body(self, container: _Container, depth: int, out: list[str]) -> None:
        """The items of a container and its own-line comments, in source order."""
        indent = INDENT * depth
        elements: list[ast.Comment | ast.Statement] = list(self.place.own_line.get(id(container), []))
        elements += _children(container)
        if all(e.span is not None for e in elements):
            elements.sort(key=lambda e: e.span.start)
        previous_end = None  # None before the first element: no blank line after `{`
        for element in elements:
            start = element.span.start if element.span is not None else None
            blank = self._blank_between(previous_end, start)
            if isinstance(element, ast.Comment):
                if blank:
                    out.append("")
                out.append(indent + element.text)
                previous_end = element.span.end
                continue
            for comment in self.place.before.get(id(element), []):
                if blank:
                    out.append("")
                    blank = False
                out.append(indent + comment.text)
            if blank:
                out.append("")
            self._statement(element, depth, out)
            trailing = self.place.after.get(id(element))
            if trailing is not None:
                out[-1] += "  " + trailing.text
                previous_end = trailing.span.end
            else:
                previous_end = element.span.end if element.span is not None else None

    def _statement(self, stmt, depth: int, out: list[str]) -> None:
        indent = INDENT * depth
        if isinstance(stmt, ast.GraphDecl):
            self._block(f"{indent}graph {stmt.name.text} {{", stmt, depth, out)
        elif isinstance(stmt, ast.TrainBlock):
            self._block(f"{indent}train {{", stmt, depth, out)
        elif isinstance(stmt, ast.NodeDecl):
            head = f"{indent}{stmt.kind} {stmt.name.text}{_attrs(stmt.attrs)} = "
            out += self._pipeline(head, stmt.pipeline)
        elif isinstance(stmt, ast.BlockDef):
            params = ", ".join(p.text for p in stmt.params)
            head = f"{indent}block {stmt.name.text}({params}) = "
            out += self._pipeline(head, stmt.pipeline)
        else:
            out.append(indent + _simple_statement(stmt))

    def _pipeline(self, head: str, pipeline: tuple[ast.Call, ...]) -> list[str]:
        gaps = []
        for call in pipeline:
            end_of_line, own_lines = self.place.between.get(id(call), (None, []))
            gaps.append((end_of_line.text if end_of_line else None, [c.text for c in own_lines]))
        return _wrap(head, [_layer(c) for c in pipeline], gaps)

    def _block(self, header: str, container: _Container, depth: int, out: list[str]) -> None:
        opener = self.place.opener.get(id(container))
        inner: list[str] = []
        self._body(container, depth + 1, inner)
        if opener is None and not inner:
            out.append(header + "}")
            return
        out.append(header + (f"  {opener.text}" if opener is not None else ""))
        out += inner
        out.append(INDENT * depth + "}")


# --- statements and values ------------------------------------------------------------------


def _wrap(head: str, layers: list[str], gaps: list[tuple[str | None, list[str]]]) -> list[str]:
    """`head` + the layers joined by commas, wrapped after commas when too long.

    Continuation lines start under the first layer; a break goes where the next layer
    (and the comma after it, unless it is the last) would pass LINE_WIDTH, and after
    every layer followed by comments: `gaps[i]` is the comment that ends layer i's line
    and the comment lines that follow it. A layer longer than the width gets a line of
    its own and is never split.
    """
    one_line = head + ", ".join(layers)
    if len(one_line) <= LINE_WIDTH and not any(eol or own for eol, own in gaps):
        return [one_line]
    pad = " " * len(head)
    lines: list[str] = []
    current = head + layers[0]
    for i in range(1, len(layers)):
        end_of_line, own_lines = gaps[i - 1]
        if end_of_line or own_lines:
            lines.append(current + "," + (f"  {end_of_line}" if end_of_line else ""))
            lines += [pad + text for text in own_lines]
            current = pad + layers[i]
            continue
        comma = 0 if i == len(layers) - 1 else 1
        if len(current) + 2 + len(layers[i]) + comma <= LINE_WIDTH:
            current += ", " + layers[i]
        else:
            lines.append(current + ",")
            current = pad + layers[i]
    lines.append(current)
    return lines


def _simple_statement(stmt) -> str:
    if isinstance(stmt, ast.Let):
        return f"let {stmt.name.text} = {_value(stmt.value)}"
    if isinstance(stmt, ast.InputDecl):
        kind = f"{stmt.kind.text} " if stmt.kind is not None else ""
        return f"input {stmt.name.text} {kind}{_value(stmt.shape)}"
    if isinstance(stmt, ast.OutputDecl):
        return f"output {stmt.name.text}{_attrs(stmt.attrs)}"
    if isinstance(stmt, ast.EdgeChain):
        hops = " -> ".join(", ".join(n.text for n in hop) for hop in stmt.hops)
        return hops + _attrs(stmt.attrs)
    if isinstance(stmt, ast.ControlEdges):
        actions = " | ".join("skip" if a is None else a.text for a in stmt.actions)
        return f"{stmt.source.text} => {actions}{_attrs(stmt.attrs)}"
    if isinstance(stmt, ast.Setting):
        return f"{stmt.key.text} = {_value(stmt.value)}"
    if isinstance(stmt, ast.Stage):
        return f"stage {stmt.name.text} = {_layer(stmt.trainer)}"
    raise TypeError(f"fmt cannot print {type(stmt).__name__}")


def _attrs(attrs: tuple[ast.Attr, ...]) -> str:
    # `[]` means the same as no attributes, so an empty list is dropped.
    if not attrs:
        return ""
    return " [" + ", ".join(f"{a.key.text}={_value(a.value)}" for a in attrs) + "]"


def _args(args: tuple[ast.Arg, ...]) -> str:
    return "(" + ", ".join(_value(a.value) if a.key is None else f"{a.key.text}={_value(a.value)}" for a in args) + ")"


def _layer(call: ast.Call) -> str:
    """A call in a pipeline or a stage: `relu()` and `relu` are the same layer; bare is canonical."""
    return call.name.text + (_args(call.args) if call.args else "")


def _value(v) -> str:
    if isinstance(v, ast.Number):
        return v.literal or repr(v.value)
    if isinstance(v, ast.String):
        if v.literal:
            return v.literal
        return '"' + v.value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, ast.Bool):
        return "true" if v.value else "false"
    if isinstance(v, ast.List):
        return "[" + ", ".join(_value(i) for i in v.items) + "]"
    if isinstance(v, ast.Ref):
        return v.name.text
    if isinstance(v, ast.Call):
        # In a value position a bare name is a Ref, so a call keeps its parentheses.
        return v.name.text + _args(v.args)
    raise TypeError(f"fmt cannot print value {type(v).__name__}")


# --- the guarantee ------------------------------------------------------------------------------


def _check_same(file: ast.File, result: str, filename: str) -> None:
    """Raise E020 unless `result` parses to `file`'s AST with the same comments in order."""
    if len(result) > MAX_SOURCE_CHARS:  # indentation can push a file near the limit over it
        raise D2GraphError([Diagnostic(
            "E011", f"formatted, this file would be larger than the {MAX_SOURCE_CHARS:,} characters d2graph reads; "
                    "nothing was written", help="split the graph, or keep this file as it is",
        )])
    help = "this is a bug in d2graph fmt; please report it with this file"
    try:
        again = parse(result, filename)
    except D2GraphError as e:
        raise D2GraphError([Diagnostic(
            "E020", "fmt would change the meaning of this file; nothing was written",
            help=f"{help} (the formatted text does not parse: {e.diagnostics[0].message})",
        )]) from None
    if again != file:
        raise D2GraphError([Diagnostic(
            "E020", "fmt would change the meaning of this file; nothing was written",
            _first_difference(file, again), "formatting changes this statement", help=help,
        )])
    if [c.text for c in again.comments] != [c.text for c in file.comments]:
        raise D2GraphError([Diagnostic(
            "E020", "fmt would lose or reorder a comment; nothing was written", help=help,
        )])


def _first_difference(old: ast.File, new: ast.File) -> Span | None:
    for a, b in zip(old.items, new.items):
        if a == b:
            continue
        if isinstance(a, ast.GraphDecl) and isinstance(b, ast.GraphDecl) and a.name == b.name:
            for s, t in zip(a.body, b.body):
                if s != t:
                    return s.span
        return a.span
    return old.span

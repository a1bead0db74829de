"""Spans, diagnostics and the one exception every d2graph error derives from.

In:  positions from the parser and messages from the checker.
Out: `Diagnostic` values (data, never printed here) and their rendering in the
     rustc/Elm style — position, source excerpt, caret, help — or as JSON.
Guarantees: a `Span` always knows its `Source`, so any diagnostic can be rendered
without re-reading files; spans never take part in equality, so two ASTs or IRs
that differ only in positions compare equal. Rendered text never carries a control
character from the user's file to the terminal: excerpts, messages, labels and help
show them escaped (`\\x1b`, `\\r`, `\\u202e`), with the caret still under the span.

Example:
    >>> src = Source("g.d2", "graph g {\\n  input x\\n}\\n")
    >>> d = Diagnostic("E002", "unexpected `}`", Span(src, 20, 21), "expected a shape")
    >>> print(d.render().splitlines()[1])
     --> g.d2:3:1
"""

from __future__ import annotations

import bisect
import difflib
import re
import unicodedata
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Sequence


@dataclass(frozen=True, eq=False)
class Source:
    """A file's name and text; shared by every span that points into it."""

    name: str
    text: str

    @cached_property
    def line_starts(self) -> list[int]:
        """Offsets at which lines start, computed once: a position is then a binary search,
        not a scan of the text (a file with many diagnostics would be quadratic)."""
        starts, at = [0], self.text.find("\n")
        while at >= 0:
            starts.append(at + 1)
            at = self.text.find("\n", at + 1)
        return starts

    def position(self, offset: int) -> tuple[int, int]:
        """1-based (line, column) of a character offset."""
        offset = max(0, min(offset, len(self.text)))
        line = bisect.bisect_right(self.line_starts, offset)
        return line, offset - self.line_starts[line - 1] + 1

    def line_text(self, line: int) -> str:
        starts = self.line_starts
        if not 0 < line <= len(starts):
            return ""
        end = starts[line] - 1 if line < len(starts) else len(self.text)
        return self.text[starts[line - 1] : end]


@dataclass(frozen=True)
class Span:
    """A half-open range of characters [start, end) in a source file."""

    source: Source = field(compare=False, repr=False)
    start: int
    end: int

    @property
    def line(self) -> int:
        return self.source.position(self.start)[0]

    @property
    def column(self) -> int:
        return self.source.position(self.start)[1]

    @property
    def end_line(self) -> int:
        return self.source.position(self.end)[0]

    @property
    def text(self) -> str:
        return self.source.text[self.start : self.end]

    def to(self, other: "Span") -> "Span":
        """The span from the start of self to the end of other."""
        return Span(self.source, min(self.start, other.start), max(self.end, other.end))

    def location(self) -> str:
        return f"{self.source.name}:{self.line}:{self.column}"


def span_field():
    """A dataclass field for a span that never takes part in equality."""
    return field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Note:
    """A secondary location shown under the main excerpt."""

    span: Span
    label: str


@dataclass(frozen=True)
class Diagnostic:
    """One problem in a user's file: a stable code, a message, where, and what to do.

    `label` is printed next to the caret; `help` is one sentence saying what to change.
    """

    code: str
    message: str
    span: Span | None = None
    label: str = ""
    help: str = ""
    notes: tuple[Note, ...] = ()
    severity: str = "error"  # "error" or "warning"

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def render(self) -> str:
        head = f"{self.severity}[{self.code}]: {printable(self.message)}"
        if self.span is None:
            lines = [head]
        else:
            lines = [head] + _excerpt(self.span, self.label)
            for note in self.notes:
                lines += _excerpt(note.span, note.label, arrow="::")
        if self.help:
            pad = " " * (len(str(self.span.end_line)) if self.span else 0)
            lines.append(f"{pad} = help: {printable(self.help)}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        out = {"code": self.code, "severity": self.severity, "message": self.message}
        if self.span is not None:
            end_line, end_col = self.span.source.position(self.span.end)
            out.update(
                file=self.span.source.name,
                line=self.span.line,
                column=self.span.column,
                end_line=end_line,
                end_column=end_col,
            )
        out["label"] = self.label
        out["help"] = self.help
        out["notes"] = [
            {"file": n.span.source.name, "line": n.span.line, "column": n.span.column, "label": n.label}
            for n in self.notes
        ]
        return out


def _shown(ch: str) -> str:
    """How one character of a source line is printed: control characters (escape
    sequences, a lone carriage return, bidi overrides, line separators) as escapes, so
    that the user's file cannot move the cursor or recolour the terminal; tabs as they are."""
    if ch != "\t" and unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
        return ch.encode("unicode_escape").decode("ascii")
    return ch


def printable(text: str) -> str:
    """`text` with its control characters escaped (see `_shown`); newlines are kept."""
    return "\n".join("".join(_shown(ch) for ch in part) for part in text.split("\n"))


def _excerpt(span: Span, label: str, arrow: str = "-->") -> list[str]:
    """Location line, the source line and a caret line under the span's first line."""
    line, col = span.line, span.column
    text = span.source.line_text(line)
    # A multi-line span is underlined to the end of its first line only.
    end = span.end if span.end_line == line else span.start + max(1, len(text) - col + 1)
    width = max(1, min(end - span.start, len(text) - col + 1))
    gutter = " " * len(str(line))
    shown = [_shown(ch) for ch in text]
    # Tabs are kept under the caret so that it lines up with the source line; an escaped
    # character is as wide as its escape.
    lead = "".join(s if s == "\t" else " " * len(s) for s in shown[: col - 1])
    carets = sum(len(s) for s in shown[col - 1 : col - 1 + width]) or 1
    caret = lead + "^" * carets + (f" {printable(label)}" if label else "")
    return [
        f"{gutter}{arrow} {printable(span.location())}",
        f"{gutter} |",
        f"{line} | {''.join(shown)}",
        f"{gutter} | {caret}",
    ]


class D2GraphError(Exception):
    """The root of every error d2graph raises about a user's input.

    Carries the diagnostics (errors and warnings); `str()` renders them all.
    """

    def __init__(self, diagnostics: Sequence[Diagnostic] | str):
        if isinstance(diagnostics, str):
            diagnostics = [Diagnostic("E000", diagnostics)]
        self.diagnostics = tuple(diagnostics)
        super().__init__(self.render())

    @property
    def errors(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.is_error)

    def render(self) -> str:
        return "\n\n".join(d.render() for d in self.diagnostics)


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """' (did you mean `x`?)' for the closest candidate, or ''."""
    pool = sorted(set(candidates) - {word})
    lowered = {c.lower(): c for c in pool}
    if word.lower() in lowered and lowered[word.lower()] != word:
        return f" (did you mean `{lowered[word.lower()]}`?)"
    close = difflib.get_close_matches(word, pool, n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""



# The hint `did_you_mean` writes, read back by `suggestion`: one format, kept in one place.
_HINT = re.compile(r" \(did you mean `([^`]+)`\?\)")


def suggestion(diagnostic: Diagnostic) -> str | None:
    """The name a diagnostic's did-you-mean hint proposes, or None: what an editor offers
    as a quick fix in place of the diagnostic's span.

    >>> suggestion(Diagnostic("E803", "unknown layer `rleu` (did you mean `relu`?)"))
    'relu'
    """
    found = _HINT.search(diagnostic.message)
    return found.group(1) if found else None

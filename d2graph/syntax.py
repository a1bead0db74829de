"""Text → AST: the lark LALR parser for .d2 files and its syntax errors in plain words.

In:  source text (and a file name for messages).
Out: a frozen `d2graph.ast.File` with a span on every node and the comments kept.
Guarantees: a syntax error raises `D2GraphError` with one diagnostic (E001–E005) that
names what was found and what was expected in the language's own words — never a
lark terminal name — with a caret under the offending text. A file written in
Terrastruct's D2 diagram language (the other `.d2`) is recognised and said to be so.
Limits are checked before anything recursive runs: a text longer than `MAX_SOURCE_CHARS`
(E011) or with brackets nested deeper than `MAX_NESTING` (E007) is refused, so every
later stage (the AST builder, AST equality, fmt, the checker) recurses at most that deep;
a number literal longer than `MAX_NUMBER_CHARS` is E008.
Line breaks are LF, CRLF or a lone CR, read the same way from a file and from a string:
all become LF before parsing (spans point into that text).

Example:
    >>> f = parse("graph g { input x [4]  output y  x -> y }", "g.d2")
    >>> f.graphs[0].name.text
    'g'
"""

from __future__ import annotations

import re
import threading
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path

import lark
from lark import Lark, Token, Transformer, v_args

from . import ast
from .diagnostics import D2GraphError, Diagnostic, Note, Source, Span

# Plain words for the terminals that are patterns rather than fixed strings.
_TERMINAL_WORDS = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": "a string",
    "$END": "the end of the file",
}

# What can start a statement, in the order a reader would list them.
_STATEMENT_STARTS = ("node", "control", "dummy", "input", "output", "let", "block", "train")

# Escapes inside strings; any other escaped character stands for itself (\" and \\).
_ESCAPES = {"n": "\n", "t": "\t"}

# How deep `(`, `[` and `{` may nest. The AST and every pass over it (equality, fmt, the
# checker's values) recurse once or a few times per level; 64 keeps them far from
# Python's recursion limit while leaving room for any real shape or argument list.
MAX_NESTING = 64

# The longest number literal: far beyond any real constant, and short of Python's limit on
# converting digits to an integer (4,300), which would otherwise raise from the parser.
MAX_NUMBER_CHARS = 100

# The largest source accepted, in characters of text (bytes of a file): a .d2 file is a
# few kilobytes; a megabyte is a generated network of thousands of nodes.
MAX_SOURCE_CHARS = 1 << 20

# Brackets outside strings and comments (an unclosed string runs to the end of its line,
# as the lexer reads it).
_BRACKETS = re.compile(r'"(?:[^"\\\n]|\\.)*"?|#[^\n]*|[\[\](){}]')

_KEYWORDS = {"graph", "let", "block", "input", "output", "node", "control", "dummy",
             "train", "stage", "skip", "true", "false"}


def grammar_text() -> str:
    """The grammar shipped inside the package (a development checkout falls back to
    the top-level grammars/ folder, where the file lives in the repository)."""
    packaged = resources.files("d2graph").joinpath("grammars").joinpath("d2.lark")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parent.parent / "grammars" / "d2.lark").read_text(encoding="utf-8")


class _Parser:
    """One lark parser, built once; comments are collected through a lexer callback."""

    def __init__(self, strict: bool = False):
        self._local = threading.local()
        self.lark = Lark(
            grammar_text(),
            parser="lalr",
            lexer="basic",
            propagate_positions=True,
            maybe_placeholders=True,
            lexer_callbacks={"COMMENT": self._comment},
            strict=strict,
        )
        self.words = {}
        for t in self.lark.terminals:
            if t.pattern.type == "str":
                self.words[t.name] = f"`{t.pattern.value}`"
        self.words.update(_TERMINAL_WORDS)

    def _comment(self, token: Token) -> None:
        # Only parse() collects (error messages lex with `lexer`, which has no callback).
        comments = getattr(self._local, "comments", None)
        if comments is not None:
            comments.append(token)

    @cached_property
    def lexer(self) -> Lark:
        """A lexer-only twin of the parser, built at the first syntax error: `Lark.lex` on a
        parser builds (and checks for collisions) a new lexer on every call, tens of
        milliseconds each; this one keeps its lexer."""
        return Lark(grammar_text(), parser=None, lexer="basic")

    def parse(self, text: str):
        self._local.comments = []
        tree = self.lark.parse(text)
        return tree, self._local.comments


@lru_cache(maxsize=2)
def _parser(strict: bool = False) -> _Parser:
    return _Parser(strict)


def normalise_newlines(text: str) -> str:
    r"""`\r\n` and a lone `\r` become `\n`: the line breaks the language accepts, read as
    Python reads a text file, so `parse(text)` and `parse(read_source(path))` agree."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def parse(text: str, filename: str = "<input>") -> ast.File:
    """Parse .d2 source text into an AST; raise `D2GraphError` on a syntax error."""
    if len(text) > MAX_SOURCE_CHARS:
        raise D2GraphError([_too_large(Source(filename, text[:MAX_SOURCE_CHARS + 1]), f"{len(text):,} characters")])
    source = Source(filename, normalise_newlines(text))
    text = source.text
    too_deep = _nesting_diagnostic(source)
    if too_deep is not None:
        raise D2GraphError([too_deep])
    p = _parser()
    try:
        tree, comment_tokens = p.parse(text)
    except lark.exceptions.UnexpectedInput as e:
        raise D2GraphError([_syntax_diagnostic(e, source, p)]) from None
    builder = _Builder(source)
    try:
        file = builder.transform(tree)
    except lark.exceptions.VisitError as e:  # a limit found while building (E008), raised bare
        if isinstance(e.orig_exc, D2GraphError):
            raise e.orig_exc from None
        raise
    comments = tuple(ast.Comment(t.value.rstrip(), _tok_span(source, t)) for t in comment_tokens)
    return ast.File(file.items, comments, file.span)


def tokens(text: str) -> list[Token]:
    """The tokens of `text` as the parser reads them — keywords, names, numbers, strings,
    punctuation; whitespace and comments left out — up to the first character that starts
    no token. Positions are offsets into `normalise_newlines(text)`, as spans are. For
    editors: the language server colours a file with them.

    >>> [t.value for t in tokens("x -> y  # done")]
    ['x', '->', 'y']
    """
    found = []
    try:
        for token in _parser().lexer.lex(normalise_newlines(text)):
            found.append(token)
    except lark.exceptions.UnexpectedInput:
        pass  # the tokens before the stray character still colour
    return found


def read_source(path: str | Path) -> str:
    """Read a .d2 file (at most `MAX_SOURCE_CHARS` bytes), turning OS problems into a
    diagnostic; line breaks come back as LF (see `normalise_newlines`)."""
    path = Path(path)
    try:
        with path.open("rb") as f:  # bounded: /dev/zero or a huge file must not fill memory
            data = f.read(MAX_SOURCE_CHARS + 1)
        if len(data) > MAX_SOURCE_CHARS:
            raise D2GraphError([_too_large(None, f"more than {MAX_SOURCE_CHARS:,} bytes", path)])
        return normalise_newlines(data.decode("utf-8"))
    except FileNotFoundError:
        raise D2GraphError([Diagnostic("E010", f"no such file: {path}",
                                       help="check the path; d2graph reads .d2 files")]) from None
    except IsADirectoryError:
        raise D2GraphError([Diagnostic("E010", f"{path} is a folder, not a .d2 file")]) from None
    except UnicodeDecodeError as e:
        raise D2GraphError([Diagnostic("E010", f"{path} is not UTF-8 text ({e.reason} at byte {e.start})",
                                       help="save the file as UTF-8")]) from None
    except OSError as e:
        raise D2GraphError([Diagnostic("E010", f"cannot read {path}: {e.strerror}")]) from None


def _too_large(source: Source | None, size: str, path: Path | None = None) -> Diagnostic:
    what = str(path) if path is not None else "this text"
    span = Span(source, MAX_SOURCE_CHARS, MAX_SOURCE_CHARS + 1) if source is not None else None
    return Diagnostic("E011", f"{what} is too large for a .d2 file ({size})", span,
                      f"the limit is {MAX_SOURCE_CHARS:,}",
                      help=f"a .d2 file may hold at most {MAX_SOURCE_CHARS:,} characters; "
                           "is this the file you meant?")


def _nesting_diagnostic(source: Source) -> Diagnostic | None:
    """E007 at the first bracket that opens level MAX_NESTING + 1, or None.

    A flat scan of the text (strings and comments skipped), so that it runs before the
    parser and the recursive passes that follow it."""
    depth = 0
    for m in _BRACKETS.finditer(source.text):
        ch = m.group()
        if ch in ("(", "[", "{"):
            depth += 1
            if depth > MAX_NESTING:
                return Diagnostic("E007", f"brackets are nested more than {MAX_NESTING} deep",
                                  Span(source, m.start(), m.end()), f"level {depth}",
                                  help=f"d2graph reads at most {MAX_NESTING} levels of `(`, `[` and `{{`; "
                                       "flatten this value")
        elif ch in (")", "]", "}"):
            depth = max(0, depth - 1)
    return None


# --- AST building ------------------------------------------------------------------------


def _tok_span(source: Source, tok: Token) -> Span:
    return Span(source, tok.start_pos, tok.end_pos)


@v_args(meta=True)
class _Builder(Transformer):
    """lark tree → frozen AST. One method per grammar rule."""

    def __init__(self, source: Source):
        super().__init__()
        self.source = source

    def _span(self, meta) -> Span:
        if getattr(meta, "empty", True):
            return Span(self.source, 0, 0)
        return Span(self.source, meta.start_pos, meta.end_pos)

    def _name(self, tok: Token) -> ast.Name:
        return ast.Name(str(tok), _tok_span(self.source, tok))

    def start(self, meta, items):
        return ast.File(tuple(items), (), Span(self.source, 0, len(self.source.text)))

    def graph(self, meta, ch):
        return ast.GraphDecl(self._name(ch[0]), tuple(ch[1:]), self._span(meta))

    def let_stmt(self, meta, ch):
        return ast.Let(self._name(ch[0]), ch[1], self._span(meta))

    def block_def(self, meta, ch):
        name, params, pipeline = ch
        return ast.BlockDef(self._name(name), params or (), pipeline, self._span(meta))

    def params(self, meta, ch):
        return tuple(self._name(t) for t in ch if t is not None)

    def input_decl(self, meta, ch):
        name, kind, shape = ch
        return ast.InputDecl(self._name(name), shape, self._span(meta),
                             self._name(kind) if kind is not None else None)

    def output_decl(self, meta, ch):
        return ast.OutputDecl(self._name(ch[0]), ch[1] or (), self._span(meta))

    def node_decl(self, meta, ch):
        kind, name, attrs, pipeline = ch
        return ast.NodeDecl(kind, self._name(name), attrs or (), pipeline, self._span(meta))

    def kind(self, meta, ch):
        return str(ch[0])

    def edge_chain(self, meta, ch):
        *hops, attrs = ch
        return ast.EdgeChain(tuple(hops), attrs or (), self._span(meta))

    def endpoints(self, meta, ch):
        return tuple(self._name(t) for t in ch)

    def control_edges(self, meta, ch):
        source, *actions, attrs = ch
        targets = tuple(None if str(t) == "skip" else self._name(t) for t in actions)
        spans = tuple(_tok_span(self.source, t) for t in actions)
        return ast.ControlEdges(self._name(source), targets, spans, attrs or (), self._span(meta))

    def action(self, meta, ch):
        return ch[0]

    def train_block(self, meta, ch):
        return ast.TrainBlock(tuple(ch), self._span(meta))

    def setting(self, meta, ch):
        return ast.Setting(self._name(ch[0]), ch[1], self._span(meta))

    def stage(self, meta, ch):
        return ast.Stage(self._name(ch[0]), ch[1], self._span(meta))

    def pipeline(self, meta, ch):
        return tuple(ch)

    def call(self, meta, ch):
        name, args = ch
        return ast.Call(self._name(name), args if args is not None else (), args is not None, self._span(meta))

    call_value = call

    def call_args(self, meta, ch):
        return tuple(a for a in ch if a is not None)

    def positional(self, meta, ch):
        return ast.Arg(None, ch[0], self._span(meta))

    def keyword(self, meta, ch):
        return ast.Arg(self._name(ch[0]), ch[1], self._span(meta))

    def attrs(self, meta, ch):
        return tuple(a for a in ch if a is not None)

    def attr(self, meta, ch):
        return ast.Attr(self._name(ch[0]), ch[1], self._span(meta))

    def number(self, meta, ch):
        text = str(ch[0])
        if len(text) > MAX_NUMBER_CHARS:
            raise D2GraphError([Diagnostic("E008", f"a number of {len(text):,} characters", self._span(meta),
                                           f"at most {MAX_NUMBER_CHARS} characters",
                                           help="write a large or small number with an exponent, e.g. `1e9`")])
        value = float(text) if re.search(r"[.eE]", text) else int(text)
        return ast.Number(value, text, self._span(meta))

    def string(self, meta, ch):
        text = str(ch[0])
        value = re.sub(r"\\(.)", lambda m: _ESCAPES.get(m[1], m[1]), text[1:-1])
        return ast.String(value, text, self._span(meta))

    def true(self, meta, ch):
        return ast.Bool(True, self._span(meta))

    def false(self, meta, ch):
        return ast.Bool(False, self._span(meta))

    def list(self, meta, ch):
        return ast.List(tuple(v for v in ch if v is not None), self._span(meta))

    def ref(self, meta, ch):
        name = self._name(ch[0])
        return ast.Ref(name, name.span)


# --- syntax errors in the language's words -------------------------------------------------

_TERRASTRUCT_LINE = re.compile(
    r"""^\s*(direction\s*:|vars\s*:|classes\s*:|[\w."' ]+\.(shape|style|label|icon)\s*:|"""
    r"""[\w."' ]+\s*(<->|<-|--|->)\s*[\w."' ]+\s*(:|$)|[\w."' ]+\s*:\s*\{?)"""
)


def looks_like_terrastruct(text: str) -> bool:
    """True for a file in Terrastruct's D2 diagram language rather than ours."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if not lines or re.match(r"\s*(graph|block|let)\b", lines[0]):
        return False
    # `a -> b: label`, `x.shape: circle`, `direction: right`, `a <-> b`, `a -- b`
    hits = sum(1 for ln in lines
               if (_TERRASTRUCT_LINE.match(ln) and ":" in ln) or "<->" in ln or " -- " in ln)
    return hits > 0 and not re.search(r"^\s*graph\s+\w+\s*\{", text, re.M)


def _describe_token(tok: Token) -> str:
    if tok.type == "$END":
        return "the end of the file"
    if tok.type == "NAME":
        return f"name `{tok}`"
    if tok.type == "NUMBER":
        return f"number `{tok}`"
    if tok.type == "STRING":
        return f"string {tok}"
    if str(tok) in _KEYWORDS:
        return f"keyword `{tok}`"
    return f"`{tok}`"


def _describe_expected(expected: set[str], words: dict) -> str:
    # Every terminal has a word (fixed strings are quoted as written); lark's own names
    # for anonymous terminals never reach the user.
    described = sorted({words[t] for t in expected if t in words})
    statement_kw = {f"`{k}`" for k in _STATEMENT_STARTS}
    if statement_kw <= set(described):
        described = [d for d in described if d not in statement_kw] + ["a statement"]
    if len(described) > 6:
        described = described[:5] + ["…"]
    if not described:
        return "something else"
    if len(described) == 1:
        return described[0]
    return ", ".join(described[:-1]) + " or " + described[-1]


def _open_brackets(tokens: list[Token]) -> list[Token]:
    """Brackets still open after the given tokens, innermost last."""
    pairs = {"}": "{", ")": "(", "]": "["}
    stack: list[Token] = []
    for t in tokens:
        if t in ("{", "(", "["):
            stack.append(t)
        elif t in pairs and stack and stack[-1] == pairs[t]:
            stack.pop()
    return stack


def _tokens_before(text: str, pos: int, p: _Parser) -> list[Token]:
    out = []
    try:
        for t in p.lexer.lex(text):
            if t.start_pos >= pos:
                break
            out.append(t)
    except lark.exceptions.UnexpectedInput:
        pass
    return out


def _syntax_diagnostic(e: lark.exceptions.UnexpectedInput, source: Source, p: _Parser) -> Diagnostic:
    text = source.text
    if looks_like_terrastruct(text):
        pos = getattr(e, "pos_in_stream", None) or 0
        return Diagnostic(
            "E005",
            "this looks like a Terrastruct D2 diagram, not a d2graph network",
            Span(source, pos, pos + 1),
            "d2graph cannot read this",
            help="both languages use the .d2 extension; render diagrams with Terrastruct's `d2` tool, "
            "and write d2graph networks as `graph NAME { input x [...] ... }` (see docs/language.md)",
        )
    if isinstance(e, lark.exceptions.UnexpectedCharacters):
        pos = e.pos_in_stream
        ch = text[pos]
        if ch == '"':
            end = text.find("\n", pos)
            end = len(text) if end < 0 else end
            return Diagnostic("E004", "this string is never closed", Span(source, pos, end),
                              "the string starts here", help='end the string with `"` on the same line')
        shown = repr(ch)[1:-1] if not ch.isprintable() or ch.isspace() else ch
        help = "d2graph files use names, numbers, strings, `->`, `=>`, `|`, `,`, `=`, brackets and `#` comments"
        if ch == ":":
            help = "write `key=value` inside `[...]` for attributes; `:` is not part of the language"
        elif ch == ";":
            help = "statements need no `;`: put each on its own line"
        return Diagnostic("E001", f"unexpected character `{shown}`", Span(source, pos, pos + 1),
                          "not allowed here", help=help)

    assert isinstance(e, lark.exceptions.UnexpectedToken)
    tok: Token = e.token
    expected = set(e.expected)
    if tok.type == "$END":
        before = _tokens_before(text, len(text), p)
        still_open = _open_brackets(before)
        end = len(text.rstrip()) or len(text)
        span = Span(source, max(0, end - 1), max(1, end))
        if still_open:
            opener = still_open[-1]
            closer = {"{": "}", "(": ")", "[": "]"}[str(opener)]
            return Diagnostic(
                "E003", f"the file ends before `{opener}` is closed", span, f"expected `{closer}` by here",
                notes=(Note(_tok_span(source, opener), "opened here"),),
                help=f"add the missing `{closer}`",
            )
        return Diagnostic("E003", "the file ends in the middle of a statement", span,
                          f"expected {_describe_expected(expected, p.words)} after this",
                          help="finish the statement or remove it")

    span = _tok_span(source, tok)
    found = _describe_token(tok)
    wanted = _describe_expected(expected, p.words)
    help = ""
    label = f"expected {wanted}"
    before = _tokens_before(text, tok.start_pos, p)
    prev = before[-1] if before else None
    if "NAME" in expected and str(tok) in _KEYWORDS:
        message = f"`{tok}` is a keyword and cannot be used as a name here"
        help = f"rename it, e.g. `{tok}_1`; keywords are: " + ", ".join(sorted(_KEYWORDS))
    elif prev is not None and prev.type == "NAME" and tok.type == "NAME" and _in_pipeline(before):
        # `conv(8, 3) relu` parses `relu` as the start of an edge: the comma is missing.
        message = f"unexpected {found} after `{prev}`"
        span = _tok_span(source, prev)
        label = "this looks like a layer, but it is not joined to the pipeline"
        help = f"separate the layers of a pipeline with commas: `, {prev}`"
    elif prev is not None and prev.line < tok.line and str(prev) in ("->", "=>", ",", "=", "|"):
        # The statement stopped short: point at where it stopped, not at the next line.
        message = f"`{prev}` is not followed by {wanted}"
        span = _tok_span(source, prev)
        label = f"expected {wanted} after this"
        help = "finish the statement, or remove the dangling operator"
    else:
        message = f"unexpected {found}"
        if tok.type == "NAME" and prev is not None and prev.type == "NAME" and "_ARROW" in expected:
            help = "an edge reads `A -> B`, a control list `Q => A | B`"
        elif str(tok) == "=" and prev is not None and prev.type == "NAME":
            help = "to declare a node write `node NAME = layers`; settings with `=` live in a `train { }` block"
        elif str(tok) in ("->", "=>") and prev is not None and str(prev) in ("node", "control", "dummy"):
            help = "name the node first: `node NAME = layers`"
        elif str(tok) == "}" and prev is not None and str(prev) in (",", "=", "->", "=>", "|"):
            help = f"something is missing after `{prev}`"
        elif prev is not None and prev.type == "NAME" and "EQUAL" in expected and "LSQB" in expected:
            help = "a declaration reads `node NAME = layer, layer, ...` (attributes go in `[...]` before `=`)"
        elif str(tok) == "{":
            help = "only `graph NAME {` and `train {` open braces"
    return Diagnostic("E002", message, span, label, help=help)


def _in_pipeline(tokens: list[Token]) -> bool:
    """True when the statement that precedes the last token is a node declaration whose
    pipeline ended on the same line (so the last token was meant as one more layer)."""
    if len(tokens) < 2:
        return False
    last = tokens[-1]
    depth, assigned = 0, False
    for t in reversed(tokens[:-1]):
        if t.line != last.line:
            return False
        if t in (")", "]"):
            depth += 1
        elif t in ("(", "["):
            depth -= 1
        elif depth == 0 and t == "=":
            assigned = True
        elif depth == 0 and str(t) in ("node", "control", "dummy", "block"):
            return assigned
        elif depth == 0 and str(t) in ("->", "=>", "{", "}"):
            return False
    return False

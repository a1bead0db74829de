"""Fuzzing the front end: thousands of damaged versions of the shipped examples.

Each input is an example with a few seeded edits: tokens deleted, duplicated, swapped or
replaced, random characters inserted (control characters, a lone carriage return,
non-ASCII letters), brackets nested deep, numbers made huge, names made long. For every
input, `d2graph.check` and the formatter must:

- raise nothing but `D2GraphError` (the formatter) and nothing at all (`check`);
- give every diagnostic a position (line:col) inside the text, and render it without a
  raw control character;
- finish within a bound per input (a hang or runaway work is a bug, as a crash is);
- and a graph that checks must draw: its DOT text has no string Graphviz would refuse.
A few of the inputs also go through the command line, which must never exit 70.

The seed is fixed, so a failure names an input that reproduces it: the assertion message
carries its example, index and text.
"""

from __future__ import annotations

import random
import re
import time

import pytest

import d2graph
from d2graph.cli import main
from d2graph.diagnostics import D2GraphError
from d2graph.render import to_dot

from .conftest import EXAMPLES

INPUTS_PER_EXAMPLE = 300
SECONDS_PER_INPUT = 5.0  # generous for a busy machine; a typical input takes milliseconds

_TOKEN = re.compile(r"\s+|[A-Za-z_]\w*|-?\d+\.?\d*(?:[eE][-+]?\d+)?|\"(?:[^\"\\\n]|\\.)*\"|->|=>|#[^\n]*|.", re.S)
_POOL = ["->", "=>", "|", ",", "=", "(", ")", "[", "]", "{", "}", "node", "control", "dummy", "input", "output",
         "skip", "let", "block", "train", "stage", "graph", "0", "-1", "7", "1e9", "0.5", "x", "y", '"', '""', ":",
         "#", "\n", "merge=select", "[default=0]", "cost=", "relu", "fc(3)", "conv(2, 3)", "resnet_stage(4, 3)"]
_CHARS = "\x00\x07\x1b\r\t\x0b\x0c\u00a0\u200b\u202e\u2028é中🙂\\\"'`@$%^&*;:?!~"


def _mutate(tokens: list[str], rng: random.Random) -> str:
    t = list(tokens)
    for _ in range(rng.randint(1, 4)):
        if not t:
            t = ["graph"]
        i = rng.randrange(len(t))
        op = rng.random()
        if op < 0.2:
            del t[i]
        elif op < 0.3:
            t.insert(i, t[rng.randrange(len(t))])  # duplicate a token elsewhere
        elif op < 0.4:
            j = rng.randrange(len(t))
            t[i], t[j] = t[j], t[i]
        elif op < 0.6:
            t.insert(i, rng.choice(_POOL))
        elif op < 0.72:
            t.insert(i, "".join(rng.choice(_CHARS) for _ in range(rng.randint(1, 3))))
        elif op < 0.78:
            depth = rng.choice([10, 63, 64, 65, 300, 2000])
            t.insert(i, "[" * depth + "1" + "]" * depth * rng.randint(0, 1))
        elif op < 0.84:
            t.insert(i, str(rng.choice([10**6, 10**9, 2**31, 10**18, 10**40])))
        elif op < 0.88:
            t.insert(i, "9" * rng.choice([400, 5000]))  # longer than Python's int-parsing limit
        elif op < 0.92:
            t.insert(i, "n" * rng.choice([100, 20000]))
        elif op < 0.96:
            j = rng.randrange(len(t))
            t[i:i] = t[min(i, j):max(i, j)][:200]  # duplicate a run of tokens
        else:
            t.insert(i, rng.choice(["(", "[", "{"]) * rng.randint(1, 80))
    return "".join(t)


def _inputs(path):
    text = path.read_text(encoding="utf-8")
    tokens = _TOKEN.findall(text)
    assert "".join(tokens) == text
    rng = random.Random(f"fuzz:{path.stem}")
    return [_mutate(tokens, rng) for _ in range(INPUTS_PER_EXAMPLE)]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_damaged_examples_get_positioned_diagnostics_never_exceptions(path):
    d2graph.check(path.read_text(encoding="utf-8"))  # imports and caches outside the timed loop
    for n, text in enumerate(_inputs(path)):
        where = f"{path.stem} input {n}: {text[:300]!r}"
        started = time.perf_counter()
        graph, diags = d2graph.check(text, path.name)
        try:
            formatted = d2graph.format(text, path.name)
        except D2GraphError as e:
            assert e.diagnostics and all(d.code.startswith("E") for d in e.diagnostics), where
        else:
            assert d2graph.format(formatted, path.name) == formatted, where  # idempotent
        elapsed = time.perf_counter() - started
        assert elapsed < SECONDS_PER_INPUT, f"{elapsed:.1f} s for {where}"
        assert graph is not None or any(d.is_error for d in diags), where
        if graph is not None:
            assert max(map(len, to_dot(graph).splitlines())) < 16_384, where
        for d in diags:
            assert d.span is not None, f"{d.code} without a position: {where}"
            assert 0 <= d.span.start <= d.span.end <= len(d.span.source.text), where
            assert d.span.line >= 1 and d.span.column >= 1, where
            shown = d.render()
            assert f":{d.span.line}:{d.span.column}" in shown, where
            assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", shown), f"raw control character: {where}"


def test_damaged_examples_through_the_command_line(tmp_path, capsys):
    path = EXAMPLES[0]
    for n, text in enumerate(_inputs(path)[:30]):
        f = tmp_path / f"{n}.d2"
        f.write_bytes(text.encode("utf-8", "surrogatepass"))
        for argv in (["check", str(f)], ["fmt", "--check", str(f)], ["render", str(f), "-o", str(tmp_path / "g.dot")]):
            assert main(argv) in (0, 1, 2), f"{argv[0]} on input {n}: {text[:300]!r}"
        assert "internal error" not in capsys.readouterr().err

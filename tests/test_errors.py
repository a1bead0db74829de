"""The error corpus: every file in testdata/errors/ states the diagnostics it must produce.

Each `# expect: CODE line N "text"` comment names one diagnostic (code, line, and a
fragment of its message or help). The file must produce exactly those — no more, no
fewer — and the CLI must report them without a Python traceback.
"""

import re
from pathlib import Path

import pytest

from d2graph import check
from d2graph.cli import main

from .conftest import TESTDATA

CASES = sorted((TESTDATA / "errors").glob("*.d2"))
EXPECT = re.compile(r'#\s*expect:\s*([EW]\d{3})\s+line\s+(\d+)(?:\s+"(.*)")?')


def expectations(path: Path):
    return [(m[1], int(m[2]), m[3]) for m in EXPECT.finditer(path.read_text(encoding="utf-8"))]


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_error_case(path):
    expected = expectations(path)
    assert expected, f"{path.name} has no `# expect:` line"
    graph, diags = check(path.read_text(encoding="utf-8"), path.name)
    got = sorted((d.code, d.span.line if d.span else 0) for d in diags)
    assert got == sorted((code, line) for code, line, _ in expected), "\n\n".join(d.render() for d in diags)
    for code, line, fragment in expected:
        if fragment:
            text = [d.render() for d in diags if d.code == code and (d.span.line if d.span else 0) == line]
            assert any(fragment in t for t in text), f"{fragment!r} not in:\n" + "\n".join(text)
    if any(code.startswith("E") for code, _, _ in expected):
        assert graph is None
    else:
        assert graph is not None


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_cli_reports_without_traceback(path, capsys):
    has_error = any(code.startswith("E") for code, _, _ in expectations(path))
    assert main(["check", str(path)]) == (1 if has_error else 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for code, line, _ in expectations(path):
        assert f"[{code}]" in err and f"{path.name}:{line}:" in err


def test_json_output(capsys):
    path = TESTDATA / "errors" / "R8_E802_undefined_node.d2"
    import json

    assert main(["check", "--format", "json", str(path)]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["errors"] == 1
    (d,) = out["diagnostics"]
    assert (d["code"], d["line"], d["column"]) == ("E802", 6, 8)
    assert "Node1" in d["message"]


def test_caret_points_at_the_mistake():
    path = TESTDATA / "errors" / "R8_E804_unknown_parameter.d2"
    _, (d,) = check(path.read_text(), path.name)
    lines = d.render().splitlines()
    source_line = next(i for i, ln in enumerate(lines) if ln.startswith("5 |"))
    caret = lines[source_line + 1]
    col = caret.index("^") - caret.index("|") - 2
    assert lines[source_line][len("5 | "):][col:].startswith("strides")
    assert "^^^^^^^" in caret

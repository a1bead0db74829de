"""The command line: exit codes, what it prints, and that it writes files atomically."""

import subprocess
import sys

import pytest

from d2graph.cli import main

from .conftest import EXAMPLES, ROOT, TESTDATA

BAD = TESTDATA / "errors" / "R8_E802_undefined_node.d2"
SYNTAX = TESTDATA / "errors" / "syntax_E002_missing_equals.d2"


def test_check_clean_files_exit_0(capsys):
    assert main(["check", *map(str, EXAMPLES)]) == 0
    out = capsys.readouterr().out
    assert out.count(": ok") == len(EXAMPLES)


def test_benchmark_graphs_check(capsys):
    # The graphs the benchmarks train (benchmarks/*.d2, benchmarks/synthetic/*.d2), trainers included.
    graphs = sorted((ROOT / "benchmarks").glob("**/*.d2"))
    assert len(graphs) >= 7
    assert main(["check", *map(str, graphs)]) == 0
    assert capsys.readouterr().out.count(": ok") == len(graphs)


def test_check_ir_prints_one_line_per_node(capsys):
    path = ROOT / "examples" / "high_low.d2"
    assert main(["check", "--ir", str(path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    nodes = [ln for ln in lines[1:] if not ln.lstrip().startswith(("train ", "stage "))]
    assert lines[0].startswith("graph high_low") and len(nodes) == 6
    assert any(ln.split()[:2] == ["control", "Q1"] and "actions: N2 | N3" in ln for ln in lines)


def test_check_reports_all_files_and_exits_1(capsys):
    assert main(["check", str(BAD), str(EXAMPLES[0]), str(SYNTAX)]) == 1
    captured = capsys.readouterr()
    assert "[E802]" in captured.err and "[E002]" in captured.err and ": ok" in captured.out


def test_check_and_train_refuse_a_trainer_that_cannot_train_the_graph(tmp_path, capsys):
    # high_low's Q1 decides before any classifier runs: a threshold has nothing to read.
    text = (ROOT / "examples" / "high_low.d2").read_text()
    bad = tmp_path / "hl.d2"
    bad.write_text(text.replace("stage policy = qlearning(lambda=0.75)", "stage policy = threshold(budget=0.5)"))
    assert "threshold(budget=0.5)" in bad.read_text()
    assert main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "[E921]" in err and "stage policy = threshold(budget=0.5)\n" in err  # the caret's line
    assert main(["train", str(bad), "--out", str(tmp_path / "run")]) != 0
    assert "[E921]" in capsys.readouterr().err and not (tmp_path / "run").exists()  # no run folder made


@pytest.mark.parametrize("argv", [[], ["bogus"], ["check"], ["render", "x.d2"], ["check", "--format", "xml", "a.d2"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_missing_file_is_a_usage_error(capsys, tmp_path):
    assert main(["check", str(tmp_path / "nope.d2")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["render", str(tmp_path / "nope.d2"), "-o", str(tmp_path / "o.svg")]) == 2


def test_malformed_input_to_render_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "g.svg"
    assert main(["render", str(BAD), "-o", str(out)]) == 2
    assert "[E802]" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_render_several_files_into_a_folder(tmp_path):
    assert main(["render", *map(str, EXAMPLES[:2]), "-o", str(tmp_path / "drawings")]) == 0
    for path in EXAMPLES[:2]:
        svg = (tmp_path / "drawings" / f"{path.stem}.svg").read_text()
        assert "<svg" in svg


@pytest.mark.parametrize("output", ["x.svg", "x.png", "existing-file"])
def test_render_several_files_to_a_file_name_is_refused(output, tmp_path, capsys):
    """Several files need a folder: `-o x.svg` used to become a folder named x.svg."""
    (tmp_path / "existing-file").write_text("keep me")
    out = tmp_path / output
    assert main(["render", *map(str, EXAMPLES[:2]), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "[E920]" in err and "-o must be a folder" in err and "Traceback" not in err
    assert not out.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["existing-file"]


def test_render_format_picks_the_folder_drawings_and_must_agree_with_a_file(tmp_path, capsys):
    assert main(["render", *map(str, EXAMPLES[:2]), "-o", str(tmp_path / "x.dot") + "/", "--format", "dot"]) == 0
    assert sorted(p.name for p in (tmp_path / "x.dot").iterdir()) == sorted(f"{p.stem}.dot" for p in EXAMPLES[:2])
    assert main(["render", str(EXAMPLES[0]), "-o", str(tmp_path / "g.svg"), "--format", "dot"]) == 2
    err = capsys.readouterr().err
    assert "[E920]" in err and "--format dot does not match" in err and "g.dot" in err
    assert main(["render", str(EXAMPLES[0]), "-o", str(tmp_path / "g.dot"), "--format", "dot"]) == 0


def test_fmt_check_and_rewrite(tmp_path, capsys):
    f = tmp_path / "g.d2"
    messy = "graph g {input x [4]\n\n\n   output y\nx->y # done\n}"
    f.write_text(messy)
    assert main(["fmt", "--check", str(f)]) == 1
    assert f.read_text() == messy  # --check writes nothing
    assert main(["fmt", str(f)]) == 0
    assert f.read_text() == "graph g {\n  input x [4]\n\n  output y\n  x -> y  # done\n}\n"
    assert main(["fmt", "--check", str(f)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["g.d2"]  # no temporary files left


def test_fmt_refuses_malformed_files(tmp_path, capsys):
    f = tmp_path / "bad.d2"
    f.write_text(SYNTAX.read_text())
    assert main(["fmt", str(f)]) == 2
    assert f.read_text() == SYNTAX.read_text()


@pytest.mark.parametrize("argv", [["--version"], ["fmt", "--check", "FILE"], ["fmt", "FILE"]])
def test_commands_that_need_no_torch_do_not_import_it(argv, tmp_path):
    """`--version` and `fmt` answer at once: neither they nor `import d2graph` load torch
    (seconds on a busy machine). `check` does need it: costs are measured with torch."""
    path = tmp_path / "g.d2"
    path.write_text((ROOT / "examples" / "high_low.d2").read_text())
    argv = [str(path) if a == "FILE" else a for a in argv]
    code = ("import sys\nfrom d2graph import cli\ntry:\n    code = cli.main(sys.argv[1:])\n"
            "except SystemExit as e:\n    code = e.code\n"
            "assert code == 0, code\nassert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_the_package_api_without_eager_imports():
    """The top-level names load their stages on first use; `d2graph.check` stays the function
    even after the stage `d2graph.check` is imported."""
    code = ("import sys, d2graph\nassert 'torch' not in sys.modules\n"
            "import d2graph.check, d2graph.render, d2graph.evaluate\n"
            "assert callable(d2graph.check) and callable(d2graph.render) and callable(d2graph.evaluate)\n"
            "g = d2graph.load(sys.argv[1])\nassert isinstance(g, d2graph.Graph), g\n"
            "graph, diags = d2graph.check(open(sys.argv[1]).read())\nassert graph is not None, diags\n"
            "from d2graph import *\nassert Executor and Result and Node and parse and Span\n"
            "assert sorted(d2graph.__all__) == sorted(set(d2graph.__all__) & set(dir(d2graph)))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "examples" / "early_exit.d2")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_python_dash_m_and_no_traceback_for_user_errors():
    proc = subprocess.run([sys.executable, "-m", "d2graph", "check", str(BAD)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "error[E802]" in proc.stderr and "Traceback" not in proc.stderr


def test_internal_errors_are_reported_without_traceback(monkeypatch, capsys):
    import importlib

    def boom(*a, **k):
        raise RuntimeError("bug")

    monkeypatch.setattr(importlib.import_module("d2graph.check"), "load", boom)
    assert main(["check", str(EXAMPLES[0])]) == 70
    err = capsys.readouterr().err
    assert "internal error" in err and "Traceback" not in err
    assert main(["--debug", "check", str(EXAMPLES[0])]) == 70
    assert "Traceback" in capsys.readouterr().err


def test_bench_prints_a_row_per_static_path(capsys):
    assert main(["bench", str(ROOT / "examples" / "high_low.d2"), "--batch", "4", "--rounds", "1"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert len(rows) == 1 + 3  # header, dynamic, two static paths


@pytest.mark.parametrize("argv, usage, hint", [
    (["check", "--irr", "x.d2"], "usage: d2graph check", "(did you mean `--ir`?)"),
    (["train", "--epochs", "3", "x.d2"], "usage: d2graph train", "`--set STAGE.epochs=VALUE`"),
    (["train", "--seed", "3", "x.d2"], "usage: d2graph train", "`--set seed=VALUE`"),
    (["sweep", "--lr=0.1", "x.d2"], "usage: d2graph sweep", "`--set lr=VALUE`"),
    (["policy", "fit", "--predictions", "p", "--budget", "0.5", "--sed", "1"], "usage: d2graph policy fit",
     "(did you mean `--seed`?)"),
])
def test_a_wrong_flag_is_reported_by_its_command_with_a_hint(argv, usage, hint, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage) and hint in err and "Traceback" not in err


# --- issue 15: files, sizes and terminals ----------------------------------------------------


def test_fmt_keeps_permissions_and_writes_through_symlinks(tmp_path, capsys):
    import os
    import stat

    messy = "graph g {input x [4] output y x->y}"
    private = tmp_path / "private.d2"
    private.write_text(messy)
    private.chmod(0o600)
    target = tmp_path / "real.d2"
    target.write_text(messy)
    link = tmp_path / "link.d2"
    link.symlink_to(target.name)
    assert main(["fmt", str(private), str(link)]) == 0
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert link.is_symlink() and os.readlink(link) == target.name
    assert target.read_text() == private.read_text() == "graph g {\n  input x [4]\n  output y\n  x -> y\n}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.d2", "private.d2", "real.d2"]


@pytest.mark.parametrize("command", ["check", "fmt", "render"])
def test_an_endless_file_is_refused_with_the_limit(command, tmp_path, capsys):
    argv = [command, "/dev/zero"] + (["-o", str(tmp_path / "g.svg")] if command == "render" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "[E011]" in err and "1,048,576" in err and "internal error" not in err


def test_terminal_escapes_in_a_file_do_not_reach_the_terminal(tmp_path, capsys):
    f = tmp_path / "esc.d2"
    f.write_text('graph g {\n  input x [4]\n  output y\n  node A = module("\x1b]0;title\x07\x1b[2J") \x1b[31m\n}\n')
    assert main(["check", str(f)]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "\\x1b" in err


@pytest.mark.parametrize("command", ["bench", "train", "sweep"])
def test_run_commands_refuse_a_graph_too_large_to_build(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "huge.d2"
    f.write_text("graph huge {\n  input x [64]\n  output y\n  node A = fc(1000000000)\n  x -> A -> y\n"
                 "  train {\n    data = digits\n    stage all = supervised(epochs=1)\n  }\n}\n")
    assert main([command, str(f)]) == 2
    err = capsys.readouterr().err
    assert "[E926]" in err and "65,000,000,000 parameters (242 GiB in float32)" in err
    assert "internal error" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["huge.d2"]  # no run or sweep folder

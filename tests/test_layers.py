"""The layering of the code (README, "How the code is laid out"), guarded.

- No module imports a module of a later layer (no back-edge in the import graph), counting
  imports inside functions too.
- No module imports another module's private (`_name`) helper: code two modules share is
  public, in a module below both.
- The facts that `d2graph.paths` reads from the IR are what the executor does: on every
  example graph and every checked test graph, the nodes each combination of constant
  actions runs and its cost equal `executor.route`'s, and the parameter counts equal the
  compiled modules'.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest
import torch

import d2graph
from d2graph import paths
from d2graph.executor import compile, route
from d2graph.ir import MAX_PARAMS

from .conftest import ROOT

PACKAGE = ROOT / "d2graph"

# README's layers, lowest first: a module may import modules of its own layer or below.
LAYERS = [
    {"diagnostics", "distributed", "files", "threads"},
    {"runtime"},
    {"schema"},
    {"ast", "layers"},
    {"syntax", "cost"},
    {"ir"},
    {"check", "fmt", "render", "data", "image_data"},
    {"executor"},
    {"paths", "policies"},
    {"bench", "evaluate", "predictions", "plots"},
    {"trainers"},
    {"runs"},
    {"sweep", "export"},
    {"lsp"},
    {"cli"},
    {"__init__", "__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _stage(path: Path) -> str:
    """The layer name of a module file: its top-level module under d2graph/ (a package counts as one)."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imports(path: Path, text: str | None = None) -> list[tuple[int, str, list[str]]]:
    """(line, imported d2graph module as a dotted path under d2graph, names) of every import
    in the module at `path` (its `text`, if given)."""
    package = list(path.relative_to(ROOT).with_suffix("").parts[:-1])  # e.g. ["d2graph", "trainers"]
    found = []
    text = path.read_text(encoding="utf-8") if text is None else text
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
            elif (node.module or "").split(".")[0] == "d2graph":
                target = node.module.split(".")
            else:
                continue
            names = [a.name for a in node.names]
            if not node.module:  # `from . import x`: the names are modules
                for name in names:
                    found.append((node.lineno, ".".join(target[1:] + [name]), []))
            else:
                found.append((node.lineno, ".".join(target[1:]), names))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "d2graph":
                    found.append((node.lineno, ".".join(a.name.split(".")[1:]), []))
    return found


def test_every_module_has_a_layer():
    missing = {_stage(p) for p in _modules()} - set(RANK)
    assert not missing, f"add {sorted(missing)} to LAYERS here and to README's layout"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_later_layer(path):
    mine = RANK[_stage(path)]
    for line, module, _ in _imports(path):
        if not module:
            continue
        theirs = RANK[module.split(".")[0]]
        assert theirs <= mine, (f"{path.relative_to(ROOT)}:{line} imports d2graph.{module}, a later layer "
                                f"({sorted(LAYERS[theirs])} above {sorted(LAYERS[mine])})")


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_private_name(path):
    for line, module, names in _imports(path):
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{path.relative_to(ROOT)}:{line} imports {private} from d2graph.{module}"
        assert not any(part.startswith("_") and not part.startswith("__") for part in module.split(".")), \
            f"{path.relative_to(ROOT)}:{line} imports the private module d2graph.{module}"


def test_the_import_reader_sees_what_the_checks_need():
    """Relative, absolute and in-function imports, of modules and of private names."""
    text = "from ..runs import derive_seed\nfrom .baselines import _seed\ndef f():\n    import d2graph.cli\n"
    found = [(module, names) for _, module, names in _imports(PACKAGE / "trainers" / "x.py", text)]
    assert found == [("runs", ["derive_seed"]), ("trainers.baselines", ["_seed"]), ("cli", [])]


def _graphs() -> list[Path]:
    files = sorted((ROOT / "examples").glob("*.d2")) + sorted((ROOT / "tests" / "testdata").rglob("*.d2"))
    out = []
    for f in files:
        graph, diags = d2graph.check(f.read_text(encoding="utf-8"), str(f))
        if graph is not None and graph.params <= MAX_PARAMS:  # larger ones check (W604) but never build
            out.append(f)
    return out


@pytest.mark.parametrize("path", _graphs(), ids=lambda p: p.stem)
def test_paths_from_the_ir_are_what_the_executor_routes(path):
    graph = d2graph.load(path)
    with torch.random.fork_rng(devices=[]):  # the test's executor, not the library's
        executor = compile(graph)
    controls = graph.control_nodes
    for combination in itertools.islice(itertools.product(*(range(len(q.actions)) for q in controls)),
                                        paths.MAX_COMBINATIONS):
        actions = dict(zip((q.name for q in controls), combination))
        routed = route(executor, actions, 1)
        ran = tuple(n.name for n in graph.nodes if routed.rows[n.name].n and n.kind not in ("input", "output"))
        assert paths.nodes_run(graph, actions) == ran, actions
    for actions, nodes, cost in paths.path_costs(graph):
        assert route(executor, actions | {q.name: actions.get(q.name, 0) for q in controls}, 1).cost[0] == cost
        assert paths.nodes_run(graph, actions) == nodes
    for node in graph.nodes:
        compiled = executor.nodes[node.name].parameters() if node.name in executor.nodes else []
        assert paths.parameter_count(graph, node.name) == sum(w.numel() for w in compiled), node.name


def test_graph_facts_draw_no_random_number():
    graph = d2graph.load(ROOT / "examples" / "hierarchy.d2")
    before = torch.random.get_rng_state()
    paths.path_costs(graph), paths.action_order(graph), paths.parameter_count(graph, graph.control_nodes[0].name)
    paths.current_head(graph, graph.control_nodes[0].name)
    assert torch.equal(before, torch.random.get_rng_state())


def test_only_the_cli_imports_the_language_server():
    """pygls is an optional extra: any other module importing d2graph.lsp would need it."""
    importers = {str(p.relative_to(PACKAGE)) for p in _modules() for _, module, _ in _imports(p)
                 if module.split(".")[0] == "lsp"}
    assert importers == {"cli.py"}

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.d2"))
TESTDATA = ROOT / "tests" / "testdata"
ACCEPT = os.environ.get("D2GRAPH_ACCEPT") == "1"


def golden(path: Path, actual: str) -> None:
    """Compare with a golden file; D2GRAPH_ACCEPT=1 (re)writes it instead."""
    if ACCEPT:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual, encoding="utf-8")
        return
    if not path.exists():
        pytest.fail(f"missing golden file {path}; run the tests with D2GRAPH_ACCEPT=1 to create it")
    assert actual == path.read_text(encoding="utf-8"), f"{path} differs; D2GRAPH_ACCEPT=1 re-accepts it"

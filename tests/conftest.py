import os
from pathlib import Path

import pytest
import torch

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


def ctrl_c_after(monkeypatch, stage: int, epoch: int, step: int) -> None:
    """Make training stop as Ctrl-C would, right after step `step` (counted from 1) of
    epoch `epoch` of the stage at index `stage`; `monkeypatch.undo()` lets it run freely again."""
    from d2graph.runs import Stage

    real_step = Stage.step

    def step_then_stop(self, loss, n):
        real_step(self, loss, n)
        if (self.index, self.epoch, self.steps_done) == (stage, epoch, step):
            self.session.stop.set = True

    monkeypatch.setattr(Stage, "step", step_then_stop)


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a module of tiny networks and small tensors: a second
    thread only adds synchronisation, and on a busy 2-core machine its spinning made such
    files 3–30× slower. The previous count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


"""Every shipped example learns as shipped: its backbone stage, run briefly on the built-in
data with the example's own settings, brings the training loss clearly below chance.

The D²NN chain and hierarchy once sat at ln(10) for all their epochs (PyTorch's default
initialisation shrinks the signal through their many narrow ReLU layers); `init=kaiming`,
the default, is what lets them start. `init=torch` on the chain shows the plateau again.
"""

import math

import pytest

import d2graph
from d2graph import runs

from .conftest import EXAMPLES

# Examples whose branches are summed train on random routes and need more steps (on all the
# data) to leave chance than the early-exit families; early_exit's six-layer trunk needs a
# few more epochs of its 3,000 examples, and the ViT (a transformer on 2,100 training
# images) leaves chance only after several. The epochs stay within a few seconds each. The D²NN
# files' `qlearning` holds a fifth of the training examples out of the backbone's training.
EPOCHS = {"chain": 5, "hierarchy": 4, "high_low": 3, "early_exit": 4, "vit_early_exit": 8}
ALL_DATA = ("chain", "hierarchy", "high_low")
MARGIN = 0.05  # nats below ln(classes): well outside the first epoch's noise


def _losses(path, *overrides):
    graph = d2graph.load(path)
    lines = []
    name = path.stem
    config = runs.resolve(graph, [f"stage.backbone.epochs={EPOCHS.get(name, 2)}", *overrides])
    runs.train(graph, config, None, evaluate=False, stages=slice(0, 1), echo=lines.append)
    losses = [float(line.split("train_loss ")[1].split(",")[0]) for line in lines if "train_loss" in line]
    return losses, math.log(graph.outputs[0].out_shape[0])


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_learns_as_shipped(path, one_thread):
    overrides = [] if path.stem in ALL_DATA else ["data.n=3000"]
    losses, chance = _losses(path, *overrides)
    assert losses[-1] < losses[0] and losses[-1] < chance - MARGIN, (losses, chance)


def test_the_chain_does_not_learn_with_torch_default_initialisation(one_thread):
    path = next(p for p in EXAMPLES if p.stem == "chain")
    losses, chance = _losses(path, "init=torch")
    assert losses[-1] > chance - 0.01, losses  # the plateau that init=kaiming removes

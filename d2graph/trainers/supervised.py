"""The `supervised` trainer: the function nodes learn to classify, every head at once.

In:  an executor, the data, a stage context (d2graph.runs.Stage).
Out: the function nodes' weights trained in place; the policy is left as it was.
Guarantees: with `routing=all` (the default) every node runs on every example (executor
mode `all`) and each head — a function node feeding an output (`paths.heads`) — gets its
own cross-entropy; the loss is their weighted mean, as in BranchyNet and SDN, so every exit
of a cascade or an early-exit chain is a usable classifier before any policy is learned.
With `routing=random` each example takes uniformly random actions (mode `explore`, ε = 1)
and the loss is on the graph's output: for graphs whose branches are summed (`high_low`,
`chain`, `hierarchy`), where training every branch on the sum of all of them in `all`
mode would teach branches to lean on each other. Control nodes are not trained here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..paths import heads
from ..policies import evaluating
from ..schema import Param, Schema
from .base import Trainer, register, trainer_error

__all__ = ["SupervisedTrainer", "function_parameters", "head_accuracies", "learning_rate_at"]


def function_parameters(executor) -> list[torch.nn.Parameter]:
    """The parameters of the function nodes (not of the control nodes)."""
    graph = executor.graph
    return [p for name, module in executor.nodes.items() if graph[name].kind == "node" for p in module.parameters()]


def head_accuracies(executor, dataset, names: list[str], batch: int, device) -> dict[str, float]:
    """Accuracy of each named head on `dataset`, every node running on every example."""
    correct = dict.fromkeys(names, 0)
    x_all, y_all = dataset.tensors
    with evaluating(executor):
        for i in range(0, len(y_all), batch):
            x, y = x_all[i:i + batch].to(device), y_all[i:i + batch].to(device)
            r = executor(x, mode="all", keep=names)
            for h in names:
                correct[h] += int((r.values[h][1].argmax(dim=1) == y).sum())
    return {h: correct[h] / max(len(y_all), 1) for h in names}


def learning_rate_at(step: int, total: int, base: float, schedule: str) -> float:
    """The learning rate at global step `step` of `total`: `base` (constant), or cosine
    decay from `base` to 0 over the stage (`cosine`). A function of the step alone, so a
    resumed run takes the same rates.

    Example:
        >>> learning_rate_at(0, 100, 0.01, "cosine"), learning_rate_at(50, 100, 0.01, "cosine")
        (0.01, 0.005)
    """
    if schedule == "constant" or total <= 0:
        return base
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


@register
class SupervisedTrainer(Trainer):
    name = "supervised"
    role = "backbone"
    schema = Schema("supervised", (
        Param("epochs", "posint", 10, doc="passes over the training split"),
        Param("routing", "choice", "all", choices=("all", "random"),
              doc="`all`: every head learns on every example; `random`: random routes, loss on the output"),
        Param("weights", "numbers", [], doc="loss weight per head in `heads` order; [] = equal weights"),
        Param("schedule", "choice", "constant", choices=("constant", "cosine"),
              doc="learning rate over the stage: the block's `lr` throughout, or cosine decay from it to 0"),
    ), doc="trains the function nodes with cross-entropy on every head (BranchyNet/SDN)")

    def check_graph(self, graph) -> None:
        weights = self.params["weights"]
        names = heads(graph)
        if weights and len(weights) != len(names):
            raise trainer_error(self.name, f"`weights` has {len(weights)} numbers but the graph has "
                                f"{len(names)} heads ({', '.join(names)})",
                                help="give one weight per head, in that order, or leave `weights` out")
        if weights and (min(weights) < 0 or sum(weights) <= 0):
            raise trainer_error(self.name, "`weights` must be non-negative with a positive sum",
                                help="e.g. `weights=[1, 1, 2]`")

    def fit(self, executor, data, stage):
        graph = executor.graph
        names = heads(graph) or [o.name for o in graph.outputs]
        weights = torch.tensor(self.params["weights"] or [1.0] * len(names), dtype=torch.float32)
        weights = (weights / weights.sum()).tolist()
        routing = self.params["routing"]
        optimizer = stage.optimizer(function_parameters(executor))
        base_lr = optimizer.defaults["lr"]
        steps = math.ceil(len(data.train) / stage.batch)
        for epoch in stage.epochs(self.params["epochs"]):
            executor.train()
            for x, y in stage.batches(data.train, epoch):
                lr = learning_rate_at(epoch * steps + stage.steps_done, self.params["epochs"] * steps, base_lr,
                                      self.params["schedule"])
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if routing == "all":
                    r = executor(x, mode="all", keep=names)
                    # In `all` mode every head ran on every example: values are full batches.
                    loss = sum(w * F.cross_entropy(_scores(r, h), y) for w, h in zip(weights, names))
                else:
                    r = executor(x, mode="explore", epsilon=1.0, generator=stage.generator("routes"))
                    loss = F.cross_entropy(r.output, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                stage.step(loss=float(loss.detach()), n=len(y))
            accuracy = head_accuracies(executor, data.val, names, max(stage.batch, 256), stage.device)
            stage.end_epoch(score=max(accuracy.values()),
                            **{f"val_accuracy_{h}": round(a, 6) for h, a in accuracy.items()})
        return None


def _scores(result, name: str) -> torch.Tensor:
    if name in result.values:
        return result.values[name][1]
    return result.outputs[name]

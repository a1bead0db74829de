"""The `reinforce` trainer: stop policies and classifiers learned together with REINFORCE (Guan et al., IJCAI 2018).

In:  an executor (usually after a `supervised` stage, the warm start), the data and a stage
     context (d2graph.runs.Stage).
Out: the control nodes' weights (and, unless `freeze=true`, the function nodes' weights)
     trained in place, and the policy that routes from then on: `LearnedPolicy()` (the control
     nodes' argmax) with a fixed `alpha`, or an `OffsetPolicy` calibrated to the validation
     budget with a `budget`.

Each step routes a batch with executor mode "sample": every control node that runs draws its
action from softmax(scores). An example's reward is

    R = −CE(output, y) − α · cost_fraction

where CE is the cross-entropy of the graph's (first) output for that example, i.e. of the head
where it stopped, and cost_fraction is `Result.cost_fraction`: the cost of the nodes that ran
for it, as a fraction of the full graph's cost (every node running), so α = 1 prices running
the whole graph like one nat of loss. Guan et al. charge the classifiers run before the one
that answers; charging all of them (the answering one too) only adds α·F_k to the path that
stops at C_k, the same trade-off with the unit fixed for every graph.

The policy gradient is the paper's: ∇ log Π(path | x) · (R − b), where log Π is the sum of
`Result.log_probs` over the control nodes that acted (0 where a node did not run), so any graph
works, cascades, early exits, k-way choices and trees alike. Baselines b (`baseline=`):
  moving   one moving average of the batch's mean reward (b ← decay·b + (1 − decay)·mean R,
           updated after the step that used it); kept in `stage.extra`, so a resumed run is exact.
  learned  one learned scalar per control node, b_q, fitted by the stage's optimiser to the
           squared error against the rewards of the examples q acted on, and subtracted from
           q's own term: Σ_q ∇ log π_q(a_q) · (R − b_q). Whether q runs is settled before q
           acts, so b_q adds no bias; it is the expected reward of the examples that reach q
           (the hard ones, for a late stop node). Started at the first batch's mean reward.
  none     b = 0.
With `gradient=exact` (`auto` on graphs of at most EXACT_PATHS static paths) the control
nodes follow instead the exact gradient of the expected reward over every static path,
Σ_P Π_q π_q(a_q | x) · R_P(x), each path's reward and scores from one forced pass
(`expected_reward`, `objective=reward`): no sampling noise, and no baseline is needed.
With every path's reward at hand, `objective=best_path` (the default there, `auto`) trains
the control nodes instead by the cross-entropy from each example's soft best path,
softmax_P(R_P(x) / entropy), to the policy's path distribution (`best_path_loss`): the same
optimum as the expected reward plus `entropy` times the path's entropy, without the flat
gradient that let the expected reward settle on one path for every example.
The classifiers learn at the same time from the cross-entropy of the routed output (each
example trains the head that answered it), the paper's joint training; `freeze=true` trains
only the control nodes (the ANN setting Guan et al. compare against): the function nodes are
left out of the optimiser and kept in eval mode, so neither their weights nor their batch-norm
statistics change. `entropy` adds a bonus for the entropy of the control nodes' softmax
(with `best_path`: the temperature of the soft best path).

α or a budget: without a budget (`budget=none`, the default) α is `alpha`, fixed. With `budget = b`, α
starts at `alpha` and follows dual ascent after every step, α ← max(0, α + alpha_step·(mean
batch cost − b)), so training aims at the budget; then, as with the calibrated baselines, the
budget is made a cap on the validation split: the returned `OffsetPolicy` adds δ·(k − 1 − r)
to the score of the action of rank r in each control node's action order (2 actions: δ on
"stop"), and δ is bisected (`toolkit.calibrate`) to the dearest routing whose mean validation cost
is at most b; then one δ per control node is searched from it (`toolkit.search_under_budget`)
for the most right validation answers within b. Deciding needs the control nodes' scores on
every example: one mode "all" pass
gives them (as for `ThresholdPolicy`, the reported cost is that of the forced pass that follows).

Guarantees:
  - With held-out examples (`data.holdout`: the train block's `holdout`, a fifth of the
    training examples by default with this trainer), the policy's
    rewards and gradient come from as many held-out examples as each training batch holds,
    and the classifiers' cross-entropy from the training batch; with `freeze=true` an epoch
    is a pass over the held-out examples.
  - Deterministic: the examples' order, the sampled actions (`stage.generator("sample")`) and
    every update depend only on (seed, stage, epoch, step); α and the baselines live in
    `stage.extra`, so an interrupted run resumes to the same weights.
  - Each epoch ends with `stage.end_epoch(score = val_accuracy − α·val_cost_fraction,
    val_accuracy, val_cost_fraction, alpha, ...)`, validated in argmax mode (d2graph.evaluate).
  - With `freeze=true` the function nodes' state (weights and buffers) is unchanged.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..evaluate import evaluate
from ..executor import Executor
from ..ir import Graph
from ..paths import action_order, heads, parameter_count, static_paths
from ..policies import LearnedPolicy, Policy, register_policy
from ..schema import Param, Schema
from .base import Trainer, register, trainer_error
# The table of what every static path costs and predicts on validation, so that bisecting δ
# needs no forward pass.
from .toolkit import (
    batches, budget_param, calibrate, check_budget, evaluating, every_control, held_out, held_out_batch, path_table,
    search_under_budget,
)

__all__ = ["BASELINES", "CLASSIFIERS", "EXACT_PATHS", "OBJECTIVES", "OffsetPolicy", "ReinforceTrainer", "best_path_loss",
           "expected_reward", "path_rewards"]

OBJECTIVES = ("auto", "reward", "best_path")
CLASSIFIERS = ("auto", "routed", "all")
EXACT_PATHS = 16  # `gradient=auto` takes the exact expected reward on graphs of at most this many paths

BASELINES = ("moving", "learned", "none")


# --- the calibrated policy ------------------------------------------------------------------


def path_rewards(executor: Executor, x: Tensor, y: Tensor, paths: list[dict[str, int]], controls: list[str],
                 output: str, alpha: float) -> tuple[Tensor, Tensor]:
    """Every static path's reward for every example, R_P = −CE − α·cost (float [B, P], no
    gradient), and the log-probability of the path under the control nodes' softmax policy,
    log Π_P = Σ_{q on P} log π_q(a_q | x) (float [B, P], differentiable in their scores): one
    forced pass per path P gives R_P and the scores each control node on P sees there."""
    rewards, log_p = [], []
    for actions in paths:
        r = executor(x, mode="force", actions=every_control(executor.graph, actions, len(y)))
        with torch.no_grad():
            ce = F.cross_entropy(r.outputs[output].float(), y, reduction="none")
            rewards.append(-ce - alpha * r.cost_fraction.float())
        lp = x.new_zeros(len(y), dtype=torch.float32)
        for q in controls:
            if q in actions:
                lp = lp + F.log_softmax(r.scores[q].float(), 1)[:, actions[q]]
        log_p.append(lp)
    return torch.stack(rewards, 1), torch.stack(log_p, 1)


def expected_reward(executor: Executor, x: Tensor, y: Tensor, paths: list[dict[str, int]], controls: list[str],
                    output: str, alpha: float) -> Tensor:
    """Each example's expected reward under the control nodes' softmax policy, E[−CE − α·cost]
    = Σ_P Π_{q on P} π_q(a_q | x) · R_P(x), float [B], differentiable in the control nodes'
    scores (the rewards R_P are constants; `path_rewards`).

    Why: REINFORCE estimates this gradient from one sampled route per example, and its noise
    let the policy collapse onto one path (every α of the Guan cascade sweep gave one path for
    every example); with a handful of paths the expectation itself is cheap.
    """
    rewards, log_p = path_rewards(executor, x, y, paths, controls, output, alpha)
    return (log_p.exp() * rewards).sum(1)


def best_path_loss(executor: Executor, x: Tensor, y: Tensor, paths: list[dict[str, int]], controls: list[str],
                   output: str, alpha: float, temperature: float) -> Tensor:
    """Each example's cross-entropy from its soft best path, softmax_P(R_P(x) / temperature)
    (the best path itself at temperature 0), to the policy's path distribution
    Π_P = Π_{q on P} π_q(a_q | x), float [B], differentiable in the control nodes' scores.

    Why: that softmax is the policy that maximises E[R] + temperature · H(path) for the
    example, so this loss has the optimum of the entropy-regularised expected reward. But the
    expected reward is flat for an example whose policy is already sure, right or wrong
    (its gradient carries π(1 − π)): once the bulk of the examples pushed a node's bias to one
    action, the examples that should take the other were stuck, and every α between the
    extremes gave one path. The cross-entropy is convex in the scores of a linear control node
    and pulls hardest on the examples it routes worst.
    """
    rewards, log_p = path_rewards(executor, x, y, paths, controls, output, alpha)
    if temperature > 0:
        target = (rewards / temperature).softmax(1)
    else:
        target = F.one_hot(rewards.argmax(1), len(paths)).to(rewards.dtype)
    return -(target * log_p).sum(1)


@register_policy
class OffsetPolicy(Policy):
    """The control nodes' own scores, with cheaper actions favoured by `offset`: the action of
    rank r in a node's action order (`orders[q]`, cheapest first, k actions) gets
    offset·(k − 1 − r) added to its score, and the argmax is taken. offset = 0 is the nodes'
    own argmax; a larger offset stops more examples, so the cost never grows with it.

    Example:
        >>> p = OffsetPolicy(1.0, {"Q": [1, 0]})          # action 1 is Q's "stop"
        >>> p.actions_at(1.0, {"Q": torch.tensor([[0.5, 0.0], [2.0, 0.0]])})["Q"].tolist()
        [1, 0]
    """

    kind = "reinforce"

    def __init__(self, offset: float, orders: Mapping[str, list[int]], offsets: Mapping[str, float] | None = None):
        self.offset = float(offset)
        self.orders = {q: [int(a) for a in o] for q, o in orders.items()}
        # Per control node, searched under the budget after `offset` (absent: `offset` for all).
        self.offsets = {q: float(v) for q, v in offsets.items()} if offsets else None

    def actions_at(self, offset: float | Mapping[str, float], scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """int64 CPU [B] per control node, from its scores [B, k] (from a mode "all" pass);
        `offset` is one number for every node or one per node."""
        out = {}
        for q, s in scores.items():
            order = self.orders[q]
            k = len(order)
            bonus = torch.empty(k, dtype=torch.float64)
            bonus[torch.tensor(order)] = torch.arange(k - 1, -1, -1, dtype=torch.float64)
            o = offset[q] if isinstance(offset, Mapping) else offset
            out[q] = (s.detach().double().cpu() + o * bonus).argmax(1)
        return out

    def decide(self, executor, x, y=None, generator=None):
        with torch.no_grad():
            scores = executor(x, mode="all").scores
        return self.actions_at(self.offsets or self.offset, scores)

    def state(self) -> dict[str, Any]:
        state = {"offset": self.offset, "orders": {q: list(o) for q, o in self.orders.items()}}
        return state | ({"offsets": dict(self.offsets)} if self.offsets else {})

    def describe(self) -> str:
        if self.offsets:
            return "reinforce: the control nodes' scores, cheaper actions favoured per rank by " + \
                ", ".join(f"{v:+.4g} at {q}" for q, v in self.offsets.items())
        return f"reinforce: the control nodes' scores, cheaper actions favoured by {self.offset:+.6g} per rank"


# --- the trainer ----------------------------------------------------------------------------


@register
class ReinforceTrainer(Trainer):
    """Guan et al.'s joint REINFORCE training of the routing and the classifiers."""

    name, role = "reinforce", "policy"
    holdout = 0.2  # `holdout = auto` keeps a fifth of the training examples for the rewards
    schema = Schema("reinforce", (
        Param("epochs", "posint", 5, doc="passes over the training split"),
        Param("alpha", "number", 0.5,
              doc="α, the price of computation: reward = −loss − α·cost, the cost as a fraction of the "
                  "full graph's (with a budget: α's starting value)"),
        budget_param(None),
        Param("alpha_step", "number", 0.1,
              doc="step of α's dual ascent with a budget: α ← max(0, α + alpha_step·(batch cost − budget))"),
        Param("baseline", "choice", "moving", choices=BASELINES,
              doc="b in (R − b): a moving average of the reward, a learned value per control node, or none"),
        Param("decay", "fraction", 0.9, doc="weight of the old value in the moving-average baseline"),
        Param("freeze", "bool", False,
              doc="train the control nodes only, keeping the classifiers (function nodes) as they are"),
        Param("entropy", "number", 0.05,
              doc="weight of a bonus for the entropy of the control nodes' choices (keeps the policy from "
                  "settling on one path before it tells examples apart); with objective=best_path, the "
                  "temperature of the soft best path"),
        Param("gradient", "choice", "auto", choices=("auto", "exact", "sampled"),
              doc="the policy gradient: `sampled` (REINFORCE on the sampled route, the paper), `exact` (the "
                  "expected reward over every static path, one forced pass each), `auto`: exact on graphs of "
                  f"at most {EXACT_PATHS} paths"),
        Param("classifiers", "choice", "auto", choices=CLASSIFIERS,
              doc="what the classifiers learn from while the routing does (unless `freeze`): `routed`, the "
                  "output of the route each example took (the paper's); `all`, every head on every example "
                  "(as `supervised`); `auto`: all with objective=best_path on a graph whose output selects "
                  "one head (merge=select), else routed"),
        Param("objective", "choice", "auto", choices=OBJECTIVES,
              doc="what the control nodes learn with every path's reward at hand: `reward`, the expected reward "
                  "(the paper's); `best_path`, the cross-entropy to each example's soft best path "
                  "softmax(R / entropy); `auto`: best_path where the gradient is exact"),
    ), doc="stop policies and classifiers trained jointly with REINFORCE on −loss − α·cost (Guan et al.)")

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.budget = check_budget(self)  # None: a fixed `alpha`
        for key in ("alpha", "alpha_step", "entropy"):
            if self.params[key] < 0:
                raise trainer_error(self.name, f"{key}={self.params[key]} is negative",
                                    help=f"`{key}` is a weight: give 0 or more")

    def check_graph(self, graph: Graph) -> None:
        if not graph.control_nodes:
            raise trainer_error(self.name, "the graph has no control node whose routing could be learned",
                                help="use `supervised` alone (or `static`) for a graph without control nodes")
        if not any(parameter_count(graph, q.name) for q in graph.control_nodes):
            raise trainer_error(self.name, "no control node has weights to learn",
                                help="give a control node a layer with weights, e.g. `control Q = fc(2)`")
        p = self.params
        if p["objective"] == "best_path" and p["gradient"] != "exact":
            count = len(static_paths(graph, max_paths=EXACT_PATHS + 1))
            if p["gradient"] == "sampled" or count > EXACT_PATHS:
                raise trainer_error(self.name, f"objective=best_path needs every static path's reward, and "
                                               f"`gradient={p['gradient']}` samples them"
                                               + (f" (the graph has more than {EXACT_PATHS} paths)"
                                                  if p["gradient"] == "auto" else ""),
                                    help="use `gradient=exact` (one forced pass per path in each step) or "
                                         "`objective=reward`")

    def fit(self, executor: Executor, data, stage) -> Policy:
        graph = executor.graph
        self.check_graph(graph)
        p = self.params
        controls = [q.name for q in graph.control_nodes]
        output = graph.outputs[0].name
        freeze, budget, mode = bool(p["freeze"]), self.budget, str(p["baseline"])
        executor.to(stage.device)
        control_params = [w for name, m in executor.nodes.items() if graph[name].kind == "control"
                          for w in m.parameters()]
        function_modules = [m for name, m in executor.nodes.items() if graph[name].kind != "control"]
        function_params = [w for m in function_modules for w in m.parameters()]

        # Trainer state that a resumed run must find again, in stage.extra.
        extra = stage.extra
        extra.setdefault("alpha", float(p["alpha"]))
        extra.setdefault("baseline", None)  # moving: None until the first batch
        values = None
        if mode == "learned":
            start = extra.get("values")
            values = torch.nn.Parameter(torch.zeros(len(controls), device=stage.device) if start is None
                                        else start.detach().clone().to(stage.device))
            extra["values"] = values.detach()  # shares storage: a checkpoint sees the current values
            extra.setdefault("values_started", start is not None)
        groups = [{"params": control_params + ([] if freeze else function_params)}]
        if values is not None:
            groups.append({"params": [values]})
        optimizer = stage.optimizer(groups)

        paths = static_paths(graph, max_paths=1 << 30)
        exact = p["gradient"] == "exact" or (p["gradient"] == "auto" and len(paths) <= EXACT_PATHS)
        self.paths = [actions for actions, _ in paths] if exact else None
        self.best_path = exact and p["objective"] != "reward"
        self.heads = heads(graph)
        # Every head on every example where the routing is learned from every path's reward
        # and the output answers with one head: each classifier keeps improving on all the
        # examples, not only on those its current route sends it (docs/trainers.md).
        self.every_head = not freeze and (p["classifiers"] == "all" or (
            p["classifiers"] == "auto" and self.best_path and graph.outputs[0].merge == "select"))
        frozen = [w for w in function_params if w.requires_grad] if freeze else []
        for w in frozen:  # no gradient is needed through the classifiers' weights
            w.requires_grad_(False)
        # With held-out examples (`data.holdout`) the policy learns its rewards on them and the
        # classifiers their cross-entropy on the others; frozen classifiers need only the former.
        held = held_out(data)
        epoch_data = held if held is not None and freeze else data.train
        pair = held is not None and epoch_data is data.train
        try:
            for epoch in stage.epochs(p["epochs"]):
                executor.train()
                if freeze:
                    for m in function_modules:
                        m.eval()
                # The epoch's sums of rewards, costs and examples, in extra: an epoch resumed
                # half-way logs what the uninterrupted epoch would have.
                if extra.get("totals", {}).get("epoch") != epoch:
                    extra["totals"] = {"epoch": epoch, "sums": [0.0, 0.0, 0]}
                totals = extra["totals"]["sums"]
                for x, y in stage.batches(epoch_data, epoch):
                    xq, yq = held_out_batch(held, stage) if pair else (x, y)
                    reward, cost = self._step(executor, x, y, xq, yq, stage, optimizer, controls, output, values)
                    totals[0] += float(reward.sum())
                    totals[1] += float(cost.sum())
                    totals[2] += len(y)
                alpha = extra["alpha"]
                report = evaluate(executor, data.val, LearnedPolicy(), classes=data.classes,
                                  batch=max(stage.batch, 256), split="val")
                n = max(totals[2], 1)
                stage.end_epoch(score=report.accuracy - alpha * report.cost_fraction,
                                val_accuracy=round(report.accuracy, 6),
                                val_cost_fraction=round(report.cost_fraction, 6), alpha=round(alpha, 6),
                                train_reward=round(totals[0] / n, 6), train_cost_fraction=round(totals[1] / n, 6))
        finally:
            for w in frozen:
                w.requires_grad_(True)
        if budget is not None:
            return self._calibrate(executor, data, stage)
        return LearnedPolicy()

    def _step(self, executor: Executor, x: Tensor, y: Tensor, xq: Tensor, yq: Tensor, stage, optimizer,
              controls: list[str], output: str, values: torch.nn.Parameter | None) -> tuple[Tensor, Tensor]:
        """One REINFORCE step: the classifiers learn on (x, y), the policy on (xq, yq) — the same
        batch, or held-out examples; returns the policy batch's rewards and cost fractions (detached)."""
        p, extra = self.params, stage.extra
        alpha = extra["alpha"]
        held = xq is not x
        generator = stage.generator("sample", "holdout") if held else stage.generator("sample")
        r = executor(xq, mode="sample", generator=generator)
        # Read everything the loss needs before backward (Result builds these lazily).
        ce = F.cross_entropy(r.outputs[output].float(), yq, reduction="none")
        cost = r.cost_fraction.to(ce.dtype)
        reward = (-ce - alpha * cost).detach()
        log_probs = torch.stack([r.log_probs[q] for q in controls], 1)  # [B, Q], 0 where q did not act
        acted = torch.stack([r.actions[q] >= 0 for q in controls], 1).to(ce.dtype)
        loss = ce.new_zeros(())
        if self.paths is not None:
            if self.best_path:
                loss = loss + best_path_loss(executor, xq, yq, self.paths, controls, output, alpha,
                                             float(p["entropy"])).mean()
            else:  # the exact gradient of the expected reward: no sampling noise, no baseline needed
                loss = loss - expected_reward(executor, xq, yq, self.paths, controls, output, alpha).mean()
        elif values is not None:
            if not extra["values_started"]:  # start each b_q at its examples' mean reward
                with torch.no_grad():
                    k = acted.shape[1]  # the sums over every process's examples (Stage.sums)
                    sums = torch.tensor(stage.sums([*acted.sum(0).tolist(), *(reward[:, None] * acted).sum(0).tolist(),
                                                    float(reward.sum()), len(reward)]), dtype=values.dtype)
                    seen, total = sums[:k], sums[k:2 * k]
                    values.copy_(torch.where(seen > 0, total / seen.clamp(min=1), sums[-2] / sums[-1]))
                extra["values_started"] = True
            advantage = reward[:, None] - values.detach()[None, :]
            loss = loss - (advantage * log_probs).sum(1).mean()
            loss = loss + ((reward[:, None] - values[None, :]) ** 2 * acted).sum() / acted.sum().clamp(min=1)
        else:
            b = 0.0
            if p["baseline"] == "moving":
                if extra["baseline"] is not None:
                    b = extra["baseline"]
                else:  # the first batch's mean, over every process's examples
                    total, n = stage.sums([float(reward.sum()), len(reward)])
                    b = total / n
            loss = loss - ((reward - b) * log_probs.sum(1)).mean()
        if p["entropy"] > 0 and not self.best_path:  # the best path's softmax has the entropy in it
            scores = r.scores
            entropy = sum((-(F.softmax(scores[q].float(), 1) * F.log_softmax(scores[q].float(), 1)).sum(1)
                           * acted[:, i]) for i, q in enumerate(controls))
            loss = loss - p["entropy"] * entropy.mean()
        if self.every_head:  # every head on every example, as `supervised`
            every = executor(x, mode="all", keep=self.heads)
            loss = loss + sum(F.cross_entropy(every.values[h][1].float(), y) for h in self.heads) / len(self.heads)
        elif not p["freeze"]:  # the classifiers learn from the routed output (joint training)
            learn = executor(x, mode="sample", generator=stage.generator("sample")) if held else r
            loss = loss + F.cross_entropy(learn.outputs[output].float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        total_reward, total_cost, n = stage.sums([float(reward.sum()), float(cost.sum()), len(reward)])
        mean_reward, mean_cost = total_reward / n, total_cost / n  # of the global batch, under torchrun too
        if p["baseline"] == "moving":  # after the step, so a batch's baseline never saw its own rewards
            old = extra["baseline"]
            extra["baseline"] = mean_reward if old is None else p["decay"] * old + (1 - p["decay"]) * mean_reward
        if self.budget is not None:  # dual ascent on the cost constraint
            extra["alpha"] = max(0.0, alpha + p["alpha_step"] * (mean_cost - self.budget))
        stage.step(loss=-mean_reward, n=len(y))  # train_loss: the mean of CE + α·cost
        return reward, cost

    def _calibrate(self, executor: Executor, data, stage) -> OffsetPolicy:
        """δ bisected so that the mean validation cost is at most the budget (a cap)."""
        graph = executor.graph
        order = action_order(graph)
        policy = OffsetPolicy(0.0, order)
        with evaluating(executor):
            parts = [executor(x.to(stage.device), mode="all").scores for x, _ in batches(data.val, stage.batch)]
            scores = {q: torch.cat([s[q].double().cpu() for s in parts]) for q in order}
            table = path_table(executor, data.val, stage)
        # Past this offset every node takes its cheapest (or, negated, its dearest) action.
        spread = max(float((s.max(1).values - s.min(1).values).max()) for s in scores.values())
        bound = spread + 1.0
        # calibrate wants a cost that grows with its parameter: t = −δ.
        t, cost = calibrate(lambda t: table.mean_cost(policy.actions_at(-t, scores)), self.budget, -bound, bound)
        policy.offset = -t
        examples = np.arange(len(data.val))
        # Then one offset per node (t_q = −δ_q), from the shared one, for the most right
        # answers within the budget: one δ can only trade the cheapest routes against the
        # dearest. A node's grid: 64 quantiles of the offsets where an example changes action.
        nodes = list(order)

        def outcome(knobs: list[float]) -> tuple[float, float]:
            cost_rows, right = table.outcome(policy.actions_at(dict(zip(nodes, (-v for v in knobs))), scores),
                                             examples)
            return float(right.sum()), float(cost_rows.mean())

        grids = []
        for q in nodes:
            s = scores[q]
            gaps = (s[:, :, None] - s[:, None, :]).flatten().numpy()  # where argmax flips, within ±spread
            grids.append(np.unique(np.quantile(gaps, np.linspace(0.0, 1.0, 64))))
        found = search_under_budget(outcome, grids, [(-bound, bound)] * len(nodes), self.budget, [[t] * len(nodes)])
        if found != [t] * len(nodes):
            policy.offsets = {q: -v for q, v in zip(nodes, found)}
        cost_rows, right = table.outcome(policy.actions_at(policy.offsets or policy.offset, scores), examples)
        stage.log(offset=policy.offset, offsets=" ".join(f"{q}={v:.6g}" for q, v in (policy.offsets or {}).items()),
                  val_cost_fraction=float(cost_rows.mean()), val_accuracy=float(right.mean()),
                  alpha=stage.extra["alpha"])
        return policy


"""The `qlearning` trainer: D²NN (Liu & Deng, AAAI 2018) — control nodes learn by Q-learning on mini-bags.

In:  an executor (ideally warm-started by a `supervised` stage before this one), the data
     (`d2graph.data.Splits`), a stage context (d2graph.runs.Stage).
Out: the control nodes' weights (and, with `mix > 0`, the function nodes') trained in place;
     returns `LearnedPolicy()` (from then on each control node takes the argmax of its
     scores), or `HeadTermPolicy` when some control node has a head term (below).
Guarantees:
  - Each control node's scores are the Q-values of its actions. Training routes with
    ε-greedy exploration (executor mode `explore`); ε falls linearly, step by step, from
    `epsilon_start` to `epsilon_end` over `epsilon_decay` epochs and then stays there:
        ε(t) = epsilon_end + (epsilon_start − epsilon_end) · max(0, 1 − t / (epsilon_decay · S))
    with t = epoch · S + step the stage's global step and S the steps of one epoch. t is
    derived from (epoch, step) alone, so an interrupted run resumes with the same ε, and
    the exploration draws come from `stage.generator`, so reruns are identical.
  - The reward is observed on a **mini-bag** of m = `minibag` consecutive examples of a
    (shuffled) batch, not on the batch: r = λ·A + (1 − λ)·E, with A the accuracy of the
    graph's output over the bag — or F1 of class 1 for a binary task (`metric=auto` picks
    it when data.classes == 2; a bag without positives predicted or present, hence without
    errors, scores 1) — and E = 1 − the bag's mean executed cost fraction
    (`Result.cost_fraction`). A batch holding B examples gives ⌊B/m⌋ bags; the few left
    over (B mod m) still count for the cross-entropy but give no reward (a shorter bag
    would have to predict the same r with fewer summands). `minibag` above the train
    block's `batch` is refused (E921). A graph with several outputs is judged on its first.
  - `minibag=auto` (the default) takes m = 1. Accuracy is a mean over examples, so a bag
    of one has the same expected reward and gives every example its own outcome to fit. On
    the D²NN cascade this is the difference between one path for everybody with cost not
    monotone in λ (m = 32) and a per-example routing whose cost rises with λ
    (docs/results.md). F1 is a set metric, which is why the paper introduces mini-bags; with
    a bag of one its reward is F1's first-order change per example (`f1_weights`): a right
    answer counts 2/F − 1 times as much on a positive example as on a negative one, F the
    graph's validation F1 so far (before the first epoch, then after each; in
    `stage.extra`), the weights scaled so their mean over the training labels is 1. On an
    unseen binary task the bags of 32 (the default until 2026-12-01) routed to F1 0.62 /
    0.68 at λ = 0.5 / 0.8 where the best static path has 0.72 (docs/trainers.md).
  - Our reading of the paper (notes: "Mini-Bags for Set-Based Metrics", "Joint Training"):
      * the joint action value of a bag is the plain, **unnormalised** sum of the per-example
        values, Q(s, a) = Σᵢ Q(sᵢ, aᵢ), and the loss is L = (r − Σᵢ Q(sᵢ, aᵢ))², so
        ∂L/∂xᵢ = 2(r − Q(s, a)) ∂Q(sᵢ, aᵢ)/∂xᵢ: each example's value is about r/m, and the
        argmax of the bag's Q is the argmax of each summand (actions are per example);
      * several control nodes observe **one** reward for the whole network and each gets
        its own loss (r − Σ_{i: it ran} Q_j(sᵢ, aᵢ))², summed over the control nodes; a
        control node's sum only has the examples it ran on (actions != −1), and a bag in
        which it ran on none gives it no loss;
      * the loss of a batch is the mean over its bags ("a mini-batch of mini-bags").
    The paper's E is "the inverse of the number of multiplications"; we use 1 − the cost
    fraction, which lies in [0, 1] like A, so λ weighs two quantities of one scale.
    A consequence of the plain sum: a control node's scores settle at about r/m (0.02 for
    m = 32) and its actions' values differ by less, so the control nodes' learning rate
    (`lr_scale`) and the number of steps matter more than the loss's size suggests.
    `bag=mean` divides the sum by m, so each value estimates r itself: on high_low with a
    weak backbone it found the best routing within 6 epochs where the sum had not.
  - `backup=full` (`auto` with bags of one on graphs of at most FULL_BACKUP_PATHS static paths):
    one forced pass per static path (no gradient) gives every path's reward for every
    example, and each control node regresses the value of every action towards the best
    reward of a path that takes it and agrees with the example's choices above the node
    (`full_targets`): Q-learning's max backup with full information, so no action's value
    waits for exploration. `greedy` continues each example by the choices the nodes below
    make instead of its best path: r + max_a' Q(s', a') measured, where the best path is
    E[max] rather than max E and overrates going on. On the D²NN cascade it lowers the
    cost each λ reaches but leaves the accuracy–cost curve where it was (docs/trainers.md),
    so it is not the default. `sampled`: the paper's update above.
  - **Head term** (`heads=true`): a control node with a current head h (`paths.current_head`,
    the classifier that answers if it stops) that is not one of its own inputs has the
    Q-values s_a(input) + W_a · f(h) + b_a, f = h's max probability, 1 − normalised entropy
    and margin, W and b zero at the start and learned with the node (`costsensitive`'s
    term); a node that reads its head itself already has its scores. Exploring then needs
    the heads before the node decides: one pass of every node (eval mode, no gradient)
    gives scores and heads, the ε-greedy actions on scores + term are forced in the
    training pass. `decay` adds decay · ‖weights‖² of the node's own weight matrices to the
    loss (`baselines.weight_penalty`); `auto` puts HEAD_DECAY on the nodes with a head term
    that read at least WIDE numbers (`baselines.head_decay`) and nothing on the others.
    Why: a linear Q-value on a stage's hundreds of features fitted the ~1,100 held-out
    examples it learns from and ranked unseen ones no better than chance
    (docs/trainers.md); the penalty leaves the features only what the head's confidence
    does not already say.
  - Function nodes learn jointly on the executed paths: cross-entropy of the graph's
    output on the same explored run. loss = q_loss + mix · ce_loss. With `mix = 0` the
    function nodes are frozen (left out of the optimiser; no gradient is computed for
    them during the stage). The Q-loss's gradient also
    reaches the function nodes that a control node reads (high_low's N1), as in the paper,
    when they are being trained. `lr_scale` multiplies the learning rate of the control
    nodes only. `random_routes` > 0 adds random_routes · the cross-entropy of the graph's
    output on a route every control node draws uniformly (a second pass of the batch), so
    that a block the routing sends few examples to still learns from all of them: the
    blocks otherwise learn only where they are routed, and the dearer routes a higher λ buys
    are trained on fewer examples (docs/results.md, the synthetic D²NN chain). With the
    searched offsets (`offsets=epochs`) it is what keeps the routing per example: without it
    the routing settles on the path best on average and the branches then train on that
    path alone (the shipped chain at λ = 0.9: one path for 88–99.8% of the examples).
  - **Held-out rewards.** When the run holds training examples out of the function nodes'
    training (`data.holdout`; the train block's `holdout`, 0.2 by default with this
    trainer), the rewards and Q-targets are measured on held-out examples and the
    cross-entropy (`mix`) on the others: each step pairs a batch of the training examples
    with as many held-out ones drawn at random. On examples the branches trained on, their
    accuracy is what they memorised (high_low: the dear branch right on 66% of its training
    examples, 54% of unseen ones), so every control node learns to overrate the dear paths,
    and joint training feeds on it — the branch chosen keeps learning on the examples it
    wins. On high_low that made the switch from all-cheap to all-dear happen between two
    neighbouring λ; with held-out rewards the share routed to the dear branch rises with λ
    over a band (docs/trainers.md). With `mix = 0` an epoch is a pass over the held-out
    examples.
  - After each epoch the graph is evaluated on validation in argmax mode (the policy it
    will be used with) and the epoch's score is the validation reward, computed on the
    whole split: λ·A_val + (1 − λ)·(1 − cost fraction) with A_val the accuracy (F1 when
    the metric is F1); `best.pt` keeps the best epoch. `keep=best` (the default) ends the
    stage with the best epoch's weights and head terms (a copy in `stage.extra`, so a resumed
    run knows it; logged as `kept_epoch`), `keep=last` with the last epoch's. Why: the
    branches learn on the routes they are given, so the routing keeps moving after ε settles
    and the last epoch is one draw of it (the hierarchy's validation accuracy went 61.4 →
    59.6 → 55.2% over its last three epochs; docs/trainers.md).
    The epoch's mean training reward is kept in `stage.extra` (checkpointed), so a resumed
    epoch logs what the uninterrupted one would have.
  - **Offsets** (`auto`: `offsets=end` when `mix = 0`, `epochs` otherwise): after the kept epoch, each
    control node's values get one constant per action, searched on validation for the best
    validation reward (`search_offsets`, from one forced pass per static path on graphs of
    at most OFFSET_PATHS paths) and folded into the node's head-term bias or final `fc`'s
    bias, so the policy is still the argmax of the nodes' values; never a lower validation
    reward than the values as learnt. `offsets=epochs` searches after every epoch once ε
    has stopped falling and keeps the constants beside the values (`stage.extra`): the
    exploring routes, validation and the kept epoch use values + constants, the Q-loss the
    values alone; the kept epoch's constants are folded in at the end. Why: with frozen branches a node's argmax among
    actions whose values differ by less than their estimation error routes on noise (the
    synthetic D²NN chain at λ = 0.9: 56.9% at 0.48 of the cost where one static path
    answers 60.0% at 0.24; with the offsets 59.9% at 0.23). With joint training one search
    at the end moved points along the accuracy–cost curve, not above it; searched after every
    epoch, the routes the branches learn on follow the constants, and with the search's
    margin (`search_offsets`) and `random_routes` that put, at equal cost, the shipped chain
    0.4–2.1 points above its old curve and the hierarchy at its λ 3.6 above, the cascade
    −0.3 to +1.4 and high-low −0.8 to +0.2 (docs/trainers.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..evaluate import evaluate, f1_score
from ..paths import current_head, static_paths
from ..policies import LearnedPolicy, evaluating
from ..schema import Param, Schema
from .base import Trainer, register, trainer_error
from .baselines import (MEASURES, HeadTermPolicy, decay_param, decide_on_route, head_confidences, head_decay,
                        weight_penalty)
from .supervised import function_parameters
from .toolkit import batches, every_control, final_bias, held_out, held_out_batch

__all__ = ["FULL_BACKUP_PATHS", "OFFSET_PATHS", "QLearningTrainer", "bag_reward", "control_parameters", "epsilon_at",
           "f1_weights", "full_targets", "minibag_size", "offset_route", "search_offsets"]

FULL_BACKUP_PATHS = 16  # `backup=auto` computes every action's value when the graph has at most this many paths
OFFSET_PATHS = 64  # the offsets are searched only when the graph has at most this many paths (a validation pass each)
OFFSET_MARGIN = 1.0  # standard errors by which a searched move must raise the mean validation reward (`search_offsets`)


def control_parameters(executor) -> list[torch.nn.Parameter]:
    """The parameters of the control nodes."""
    graph = executor.graph
    return [p for name, module in executor.nodes.items() if graph[name].kind == "control" for p in module.parameters()]


def epsilon_at(step: int, steps_per_epoch: int, start: float, end: float, decay_epochs: float) -> float:
    """ε at global step `step`: linear from `start` to `end` over `decay_epochs` epochs, then `end`.

    Example:
        >>> epsilon_at(5, 10, 1.0, 0.0, 1)   # half-way through the first of one decay epoch
        0.5
    """
    span = decay_epochs * steps_per_epoch
    if span <= 0:
        return end
    return end + (start - end) * max(0.0, 1.0 - step / span)


def bag_reward(prediction: Tensor, label: Tensor, cost_fraction: Tensor, m: int, lam: float,
               metric: str, weight: Tensor | None = None) -> Tensor:
    """The reward r = λ·A + (1 − λ)·E of each complete mini-bag of m consecutive examples:
    float32 [⌊B/m⌋]. `metric` is "accuracy" or "f1" (of class 1; a bag without errors and
    without positives scores 1). `weight` [B] (`f1_weights`, with m = 1: F1's per-example
    stand-in) makes A the bag's weighted accuracy, the mean of weight · [right].

    Example:
        >>> bag_reward(torch.tensor([1, 0, 1, 1]), torch.tensor([1, 0, 0, 1]),
        ...            torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=torch.float64), 2, 0.5, "accuracy")
        tensor([0.7500, 0.2500])
    """
    bags = len(label) // m
    n = bags * m
    correct = (prediction[:n] == label[:n]).view(bags, m)
    if weight is not None:
        a = (correct.float() * weight[:n].float().view(bags, m)).mean(1)
    elif metric == "f1":
        pred, true = (prediction[:n] == 1).view(bags, m), (label[:n] == 1).view(bags, m)
        tp = (pred & true).sum(1).float()
        wrong = (~correct).sum(1).float()  # false positives + false negatives
        denominator = 2 * tp + wrong
        a = torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), torch.ones_like(tp))
    else:
        a = correct.float().mean(1)
    e = 1.0 - cost_fraction[:n].view(bags, m).float().mean(1)
    return lam * a + (1.0 - lam) * e


def minibag_size(minibag: int | str) -> int:
    """The mini-bag size m: as given, or 1 for `auto`, whatever the metric.

    Accuracy is a mean of per-example terms, so a bag's reward is the mean of its examples'
    rewards and a bag of one has the same expectation with far less noise: each example's
    Q-value is fitted to its own outcome instead of the outcome of 31 others. F1 is not a
    mean, but its change when one answer flips is (`f1_weights`), and that noise-free
    per-example reward routed better than F1 measured on bags of 32 (docs/trainers.md).

    Example:
        >>> minibag_size("auto"), minibag_size(8)
        (1, 8)
    """
    return 1 if minibag == "auto" else int(minibag)


def f1_weights(label: Tensor, f1: float, positives: float) -> Tensor:
    """Each example's weight in the per-example reward that stands for F1 of class 1 (a bag
    of one): F1 = 2TP / (2TP + FP + FN) rises by 2(TP + FP + FN)/D² when a positive example
    turns right (FN → TP) and by 2TP/D² when a negative one does (FP → TN), D = 2TP + FP + FN;
    their ratio is 2/F1 − 1. So a positive weighs 2/F1 − 1 (F1 floored at 0.05), a negative
    1, scaled so that the mean weight over labels with this share of `positives` is 1 (λ
    then weighs A and E on one scale, as with accuracy). float32 [B].

    Example:
        >>> f1_weights(torch.tensor([1, 0]), 0.5, 0.25).tolist()  # 3 : 1, mean 0.25·3 + 0.75·1 = 1.5
        [2.0, 0.6666666865348816]
    """
    positive = 2.0 / max(float(f1), 0.05) - 1.0
    return torch.where(label == 1, positive, 1.0).float() / (positives * positive + 1.0 - positives)


def full_targets(rewards: Tensor, paths: list[dict[str, int]], taken: dict[str, Tensor], controls: list[str],
                 widths: list[int], greedy: list[dict[str, Tensor]] | None = None) -> dict[str, Tensor]:
    """Every action's target value for every example: the reward of a path that takes that
    action at the node, agrees with what the example did above it and, below it, follows
    the control nodes' own greedy choices (`greedy`) — or, without `greedy`, the best such
    path whatever the nodes below would choose. float [N, k] per control node (−inf where
    no path takes the action from there).

    rewards  [P, N] each static path's reward for each example (forced passes)
    paths    the paths' actions (control nodes that run on them)
    taken    control node → the action each example took in the explored run, −1 if it did not run
    greedy   per path, control node → the argmax of its scores in that path's forced pass
             (−1 where it did not run there)

    This is Q-learning's backup with full information: a value for every action, not only
    the one the explored run took, so no action's value waits for exploration to visit it.
    With `greedy` the continuation is the one the policy below will take, so the target is
    Q-learning's r + max_a' Q(s', a') measured rather than estimated. The best continuation
    per example (no `greedy`) is E[max] instead of max E: it credits a node above with
    every lucky continuation, which no policy below can pick out, so it overrates going on.

    Example:
        >>> full_targets(torch.tensor([[0.25, 0.75], [0.5, 0.125]]), [{"Q": 0}, {"Q": 1}],
        ...              {"Q": torch.tensor([0, 1])}, ["Q"], [2])["Q"].tolist()
        [[0.25, 0.5], [0.75, 0.125]]
    """
    n = rewards.shape[1]
    out = {}
    for i, q in enumerate(controls):
        target = torch.full((n, widths[i]), -math.inf, dtype=rewards.dtype)
        for path, actions in enumerate(paths):
            if q not in actions:
                continue
            # the example's own choices at the nodes above q, where it made one
            agrees = torch.ones(n, dtype=torch.bool)
            for above in controls[:i]:
                if above in actions:
                    agrees &= (taken[above] == actions[above]) | (taken[above] < 0)
            if greedy is not None:  # below q the path must be the one its control nodes choose
                for below in controls[i + 1:]:
                    if below in actions:
                        agrees &= greedy[path][below] == actions[below]
            a = actions[q]
            target[:, a] = torch.where(agrees, torch.maximum(target[:, a], rewards[path]), target[:, a])
        out[q] = target
    return out


def offset_route(paths: list[dict[str, int]], values: list[dict[str, Tensor]], offsets: dict[str, Tensor]) -> Tensor:
    """The static path each example takes when every control node picks the argmax of its
    values plus its offsets: int64 [N], an index into `paths`.

    paths    each static path's actions (the control nodes that run on it)
    values   per path, each of its control nodes' values on every example in a pass forced
             along that path, float64 [N, k]
    offsets  control node → a constant per action, float64 [k] (nodes left out: none)

    An example follows path p when each node on p, fed what p feeds it, chooses p's action:
    a node's input depends only on the choices above it, which p shares with the example's
    own route, so exactly one path is consistent with every example; ValueError when some
    example has none (the paths listed are not all of the graph's).

    Example:
        >>> offset_route([{"Q": 0}, {"Q": 1}], [{"Q": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}] * 2,
        ...              {"Q": torch.tensor([0.0, 2.0])}).tolist()
        [1, 1]
    """
    n = next(v for vs in values for v in vs.values()).shape[0]
    route = torch.full((n,), -1, dtype=torch.long)
    for p, actions in enumerate(paths):
        agrees = route < 0
        for q, a in actions.items():
            shift = offsets.get(q)
            chosen = (values[p][q] if shift is None else values[p][q] + shift).argmax(1)
            agrees &= chosen == a
        route[agrees] = p
    if bool((route < 0).any()):
        raise ValueError(f"{int((route < 0).sum())} examples follow none of the {len(paths)} paths given")
    return route


def search_offsets(rewards, paths: list[dict[str, int]], values: list[dict[str, Tensor]], widths: dict[str, int],
                   score=None, margin: float = OFFSET_MARGIN, rounds: int = 4,
                   grid: int = 64) -> tuple[dict[str, Tensor], float]:
    """Per-action constants added to control nodes' values, searched coordinate by coordinate
    for the highest `score(route)` (`offset_route`; default: the mean of `rewards(route)`, each
    example's reward [N]): (offsets, their score). Each node in `widths` (name → number of
    actions) has one knob per action but its first; a knob tries `grid` values that change
    some example's choice (midpoints between the sorted points at which an example would
    switch), and a move is kept only when it scores strictly more and the mean of the
    examples' reward changes exceeds `margin` standard errors of that mean (paired: the same
    examples on both routes). Starting from no offsets, the result never scores less than the
    values as they are.

    Why: a control node's argmax among actions whose values differ by less than their
    estimation error routes on noise. On the synthetic D²NN chain with frozen branches,
    Q-values fitted on 2,800 held-out examples spread the examples over all eight paths at
    λ = 0.9 and answered 56.9% right at 0.48 of the cost, where one static path answers 60.0%
    at 0.24 (docs/trainers.md); a constant per action is what moves such a node to the
    action that is better on average, and only as far as validation says it helps. The margin
    is there because the search tries hundreds of moves on one validation set: kept whenever
    it scored more, a move also followed that set's noise (on the shipped cascade, searched
    after every epoch, 1.8 points below the values as they were at equal cost; with a margin
    of one standard error 0.3 below, while the synthetic chain at λ = 0.9 kept 65.2% against
    63.6% and the hierarchy +0.9 to +2.3 points — docs/trainers.md).

    Example:
        >>> values = [{"Q": torch.tensor([[0.5, 0.4], [0.5, 0.6]], dtype=torch.float64)}] * 2
        >>> offsets, best = search_offsets(lambda r: (r == 0).double(), [{"Q": 0}, {"Q": 1}], values, {"Q": 2},
        ...                                margin=0.0)
        >>> best, offset_route([{"Q": 0}, {"Q": 1}], values, offsets).tolist()
        (1.0, [0, 0])
    """
    if score is None:
        def score(route: Tensor) -> float:
            return float(rewards(route).mean())
    offsets = {q: torch.zeros(k, dtype=torch.float64) for q, k in widths.items()}
    route = offset_route(paths, values, offsets)
    best, current = score(route), rewards(route)
    for _ in range(rounds):
        moved = False
        for q, k in widths.items():
            rows = torch.cat([vs[q] for vs in values if q in vs])
            for a in range(1, k):
                others = torch.cat([rows[:, :a] + offsets[q][:a], rows[:, a + 1:] + offsets[q][a + 1:]], dim=1)
                # the offset above which each example's argmax turns to a
                switch = torch.unique(others.max(1).values - rows[:, a])
                middles = (switch[1:] + switch[:-1]) / 2
                picks = torch.linspace(0, len(middles) - 1, min(grid, len(middles))).round().long()
                tries = torch.cat([middles[picks] if len(middles) else middles,
                                   switch[:1] - 1.0, switch[-1:] + 1.0])
                for v in tries.tolist():
                    trial = {**offsets, q: offsets[q].clone()}
                    trial[q][a] = v
                    route = offset_route(paths, values, trial)
                    s = score(route)
                    if s <= best + 1e-12:
                        continue
                    gained = rewards(route) - current
                    if float(gained.mean()) <= margin * float(gained.std()) / math.sqrt(len(gained)):
                        continue
                    offsets, best, current, moved = trial, s, current + gained, True
        if not moved:
            break
    return offsets, best


@register
class QLearningTrainer(Trainer):
    name = "qlearning"
    role = "policy"
    holdout = 0.2  # `holdout = auto` keeps a fifth of the training examples for the rewards
    schema = Schema("qlearning", (
        Param("epochs", "posint", 10, doc="passes over the training split"),
        Param("lambda", "fraction", 0.5, doc="reward weight λ: r = λ·accuracy + (1 − λ)·efficiency"),
        Param("minibag", "posint", "auto", also=("auto",),
              doc="examples per mini-bag, the set the reward is measured on; `auto`: 1 (each example its own "
                  "reward; with F1, F1's change per example)"),
        Param("epsilon_start", "fraction", 1.0, doc="exploration rate ε at the first step"),
        Param("epsilon_end", "fraction", 0.05, doc="ε once the decay is over"),
        Param("epsilon_decay", "number", 5, doc="epochs over which ε falls linearly, step by step"),
        Param("metric", "choice", "auto", choices=("auto", "accuracy", "f1"),
              doc="the set metric A of the reward; `auto`: F1 for two classes, else accuracy"),
        Param("mix", "number", 1.0, doc="weight of the function nodes' cross-entropy: "
                                        "loss = q_loss + mix·ce_loss; 0 freezes them"),
        Param("random_routes", "number", 0.3,
              doc="weight of a second cross-entropy of the function nodes, on a route every control node draws at "
                  "random (uniformly): blocks that few examples are routed to keep learning from all of them"),
        Param("lr_scale", "number", 1.0, doc="the control nodes' learning rate, times the block's `lr`"),
        Param("bag", "choice", "sum", choices=("sum", "mean"),
              doc="the bag's action value: `sum` of the examples' Q (the paper) or their `mean`"),
        Param("backup", "choice", "auto", choices=("auto", "full", "greedy", "sampled"),
              doc="`sampled`: each control node learns the value of the action it took (the paper); `full`: "
                  "of every action, from one forced pass per static path and each example's best "
                  "continuation; `greedy`: the same, continued by the choices of the nodes below; "
                  f"`auto`: full with bags of one on graphs of at most {FULL_BACKUP_PATHS} paths"),
        Param("heads", "bool", True,
              doc="add to the Q-values of each control node that does not read its current head itself a learned "
                  "linear term on that head's confidence (max probability, entropy, margin), as `costsensitive` does"),
        decay_param(),
        Param("keep", "choice", "best", choices=("best", "last"),
              doc="the weights the stage ends with: those of the epoch with the best validation reward, or the "
                  "last epoch's"),
        Param("offsets", "choice", "auto", choices=("auto", "end", "epochs", "none"),
              doc="`end`: at the end, add to each control node's values one constant per action, searched for the "
                  f"best validation reward (graphs of at most {OFFSET_PATHS} paths); `epochs`: searched after every "
                  "epoch once ε has stopped falling, and the training routes follow them; `none`: the learned values "
                  "as they are; `auto`: `end` when the function nodes are frozen (`mix=0`), else `epochs`"),
    ), doc="D²NN: control nodes learn Q-values of their actions from a mini-bag reward λ·A + (1 − λ)·E")

    def check_graph(self, graph) -> None:
        if not graph.control_nodes:
            raise trainer_error(self.name, f"graph `{graph.name}` has no control node, so there is no routing to learn",
                                help="add a `control` node, or use `supervised` alone")
        for key in ("epsilon_decay", "mix", "random_routes") + (("decay",) if self.params["decay"] != "auto" else ()):
            if self.params[key] < 0:
                example = dict(epsilon_decay="5", mix="1", decay="auto", random_routes="0.3")[key]
                raise trainer_error(self.name, f"`{key}` must not be negative, not {self.params[key]}",
                                    help=f"e.g. `{key}={example}`")
        if self.params["lr_scale"] <= 0:
            raise trainer_error(self.name, f"`lr_scale` must be positive, not {self.params['lr_scale']}",
                                help="e.g. `lr_scale=1` (the block's learning rate) or `lr_scale=10`")

    def fit(self, executor, data, stage):
        p = self.params
        mix = float(p["mix"])
        metric = p["metric"]
        if metric == "auto":
            metric = "f1" if data.classes == 2 else "accuracy"
        if metric == "f1" and data.classes != 2:
            raise trainer_error(self.name, f"`metric=f1` needs a binary task, but the data has {data.classes} classes",
                                help="use `metric=accuracy` (or `auto`)")
        m = minibag_size(p["minibag"])
        if m > stage.batch:
            raise trainer_error(self.name, f"a mini-bag of {m} examples does not fit in a batch of {stage.batch}",
                                help=f"lower `minibag` to at most {stage.batch}, or raise the block's `batch`")

        graph = executor.graph
        self.heads = {}
        if p["heads"]:
            # Only where the node does not read its head itself: one that reads the
            # classifier's scores (early_exit's `confidence, fc(2)`) already has them.
            self.heads = {q.name: h for q in graph.control_nodes
                          if (h := current_head(graph, q.name, data.classes)) is not None
                          and h not in {e.source for e in q.inputs}}
        self.term = self._head_term(graph, stage)
        self.decay = head_decay(graph, self.heads, p["decay"])
        groups = [{"params": control_parameters(executor) + [w for pair in self.term.values() for w in pair]}]
        if mix > 0:
            groups.append({"params": function_parameters(executor)})
        optimizer = stage.optimizer(groups)
        # Assigned, not multiplied: on resume the optimiser's saved groups come back already scaled.
        optimizer.param_groups[0]["lr"] = optimizer.defaults["lr"] * float(p["lr_scale"])
        # Frozen function nodes need no gradient: the Q-loss's backward then stops at the
        # control nodes instead of filling .grad of weights no optimiser will step.
        frozen = [w for w in function_parameters(executor) if w.requires_grad] if mix == 0 else []
        for w in frozen:
            w.requires_grad_(False)
        paths = static_paths(executor.graph, max_paths=1 << 30)
        backup = p["backup"]
        if backup == "auto":
            backup = "full" if m == 1 and len(paths) <= FULL_BACKUP_PATHS else "sampled"
        if backup in ("full", "greedy") and m != 1:
            raise trainer_error(self.name, f"`backup={backup}` values each example on its own, but the mini-bag has {m}",
                                help="use `minibag=1` (or `auto`), or `backup=sampled`")
        self.static = [actions for actions, _ in paths]
        self.paths = self.static if backup in ("full", "greedy") else None
        self.greedy = backup == "greedy"
        # Frozen function nodes: one search at the end finds the same constants the epochs' would.
        self.offsets = ("end" if mix == 0 else "epochs") if p["offsets"] == "auto" else p["offsets"]
        # `offsets=epochs`: the constants the training routes and validation add to the values,
        # kept apart from them (the Q-loss would pull folded ones back); in the checkpoint state.
        self.shift = stage.extra.setdefault("shift", {})
        try:
            self._train(executor, data, stage, optimizer, metric, m)
            if p["keep"] == "best":
                self._restore_best(executor, stage)
            if self.offsets == "end":
                self._fold(executor, self._fit_offsets(executor, data, stage, metric))
            elif self.offsets == "epochs" and p["keep"] == "last":
                self._fold(executor, self.shift)  # with keep=best the kept weights hold their epoch's
        finally:
            for w in frozen:
                w.requires_grad_(True)
        return self._policy()

    def _head_term(self, graph, stage) -> dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        """Each control node with a current head: (W [k, 3], b [k]) of its head term, zero at
        the start so that training begins from the node alone. Kept in `stage.extra` (sharing
        storage), so a checkpoint holds their current values and a resumed run starts from them."""
        saved = stage.extra.setdefault("head_term", {})
        term = {}
        for q in self.heads:
            k = len(graph[q].actions)
            w, b = saved.get(q, (torch.zeros(k, len(MEASURES)), torch.zeros(k)))
            pair = (torch.nn.Parameter(w.detach().clone().float().to(stage.device)),
                    torch.nn.Parameter(b.detach().clone().float().to(stage.device)))
            saved[q] = (pair[0].detach(), pair[1].detach())
            term[q] = pair
        return term

    def _policy(self):
        """The policy the control nodes are: argmax of their scores, plus the head term where there is one."""
        if not self.term:
            return LearnedPolicy()
        return HeadTermPolicy(self.heads, {q: w.detach().double().cpu().tolist() for q, (w, _) in self.term.items()},
                              {q: b.detach().double().cpu().tolist() for q, (_, b) in self.term.items()})

    def _explore(self, executor, x: Tensor, epsilon: float, generator: torch.Generator):
        """An ε-greedy run on x: (Result, each head's confidences or None). With head terms the
        greedy action is the argmax of scores + term, which the executor cannot add itself: one
        pass of every node (eval mode, no gradient) gives the scores and the heads, and the
        chosen actions are then forced in a training-mode pass whose scores carry the gradient."""
        if not self.term and not self.shift:
            return executor(x, mode="explore", epsilon=epsilon, generator=generator), None
        # The exploring draws are made once, at the first choice: the greedy choice may take
        # several passes (`decide_on_route`) and must not draw again in each.
        draws: dict[str, tuple[Tensor, Tensor]] = {}

        def choose(result, found):
            if not draws:
                n, device = result.batch_size, generator.device
                for q in executor.graph.control_nodes:
                    explore = torch.rand(n, generator=generator, device=device) < epsilon
                    anything = torch.randint(len(q.actions), (n,), generator=generator, device=device)
                    draws[q.name] = (explore.cpu(), anything.cpu())
            chosen = {}
            for q, scores in result.scores.items():
                scores = scores.float()
                if q in self.term:
                    w, b = self.term[q]
                    scores = scores + found[self.heads[q]].to(scores) @ w.detach().T + b.detach()
                if q in self.shift:
                    scores = scores + self.shift[q].to(scores)
                explore, anything = draws[q]
                chosen[q] = torch.where(explore, anything, scores.argmax(1).cpu())
            return chosen

        with evaluating(executor, inference=False), torch.no_grad():
            chosen, found = decide_on_route(executor, x, self.heads.values(), choose)
        return executor(x, mode="force", actions=chosen), found

    def _values(self, r, found) -> dict[str, Tensor]:
        """Each control node's Q-values on the run: its scores, plus its head term on the rows it ran on."""
        values = {}
        for q, scores in r.scores.items():
            if q in self.term and found is not None:
                w, b = self.term[q]
                ran = (r.actions[q] >= 0).to(scores.device).unsqueeze(1)
                scores = scores + torch.where(ran, found[self.heads[q]].to(scores) @ w.T + b, 0.0)
            values[q] = scores
        return values

    def _train(self, executor, data, stage, optimizer, metric: str, m: int) -> None:
        p = self.params
        lam, mix = float(p["lambda"]), float(p["mix"])
        anywhere = float(p["random_routes"])
        output = executor.graph.outputs[0].name
        controls = [q.name for q in executor.graph.control_nodes]
        held = held_out(data)
        # With held-out examples the rewards come from them and the cross-entropy from the
        # rest; an epoch is a pass over the examples the function nodes learn from (over the
        # held-out ones when nothing else learns).
        epoch_data = held if held is not None and mix == 0 else data.train
        steps_per_epoch = math.ceil(len(epoch_data) / stage.batch)
        epsilon = p["epsilon_start"]
        weighted = metric == "f1" and m == 1  # F1's per-example stand-in (`f1_weights`)
        if weighted:
            positives = float((data.train.tensors[1] == 1).float().mean())
            if "f1" not in stage.extra:  # the graph's F1 before any update; a resumed run has it
                stage.extra["f1"] = self._validate(executor, data, stage).f1
        for epoch in stage.epochs(p["epochs"]):
            executor.train()
            for x, y in stage.batches(epoch_data, epoch):
                if stage.steps_done == 0:  # a fresh epoch (a resumed one keeps its running sums)
                    stage.extra["reward"] = [0.0, 0]
                epsilon = epsilon_at(epoch * steps_per_epoch + stage.steps_done, steps_per_epoch,
                                     p["epsilon_start"], p["epsilon_end"], p["epsilon_decay"])
                if held is not None and epoch_data is data.train:
                    xq, yq = held_out_batch(held, stage)
                else:
                    xq, yq = x, y
                r, found = self._explore(executor, xq, epsilon, stage.generator("explore"))
                values = self._values(r, found)
                weight = f1_weights(yq, stage.extra["f1"], positives) if weighted else None
                with torch.no_grad():
                    reward = bag_reward(r.outputs[output].argmax(dim=1), yq, r.cost_fraction, m, lam, metric, weight)
                if self.paths is not None:
                    loss = self._full_loss(executor, xq, yq, r, values, found, controls, lam, weight)
                else:
                    loss = self._q_loss(r, values, controls, reward, m, self.params["bag"] == "mean")
                loss = loss + sum(weight_penalty(executor.nodes[name], decay)
                                  for name, decay in self.decay.items() if name in executor.nodes)
                if mix > 0:
                    learn = r if xq is x else self._explore(executor, x, epsilon, stage.generator("explore", "learn"))[0]
                    loss = loss + mix * F.cross_entropy(learn.outputs[output], y)
                    if anywhere > 0:  # every block on a share of everyone, whatever the routing
                        drawn = executor(x, mode="explore", epsilon=1.0, generator=stage.generator("explore", "random"))
                        loss = loss + anywhere * F.cross_entropy(drawn.outputs[output], y)
                optimizer.zero_grad(set_to_none=True)
                if loss.requires_grad:  # not when a short last batch holds no bag and mix = 0
                    loss.backward()
                optimizer.step()  # on every step: under torchrun the processes sum their gradients here
                stage.step(loss=float(loss.detach()), n=len(y))
                total, bags = stage.sums([float(reward.sum()), len(reward)])
                stage.extra["reward"] = [stage.extra["reward"][0] + total, stage.extra["reward"][1] + int(bags)]
            if self.offsets == "epochs" and epoch + 1 > p["epsilon_decay"]:  # once ε has stopped falling
                self.shift.clear()
                self.shift.update(self._fit_offsets(executor, data, stage, metric))
            self._fold(executor, self.shift)  # validated (and kept) as the policy will be used
            try:
                report = self._validate(executor, data, stage)
                accuracy = report.f1 if metric == "f1" else report.accuracy
                val_reward = lam * accuracy + (1 - lam) * (1 - report.cost_fraction)
                if p["keep"] == "best":
                    self._remember_if_best(executor, stage, val_reward)
            finally:  # the checkpoint holds the values as learnt, the constants beside them
                self._fold(executor, self.shift, -1.0)
            if weighted:
                stage.extra["f1"] = report.f1
            total, bags = stage.extra.get("reward", [0.0, 0])
            stage.end_epoch(score=val_reward, val_reward=round(val_reward, 6),
                            val_accuracy=round(report.accuracy, 6),
                            **({"val_f1": round(report.f1, 6)} if report.f1 is not None else {}),
                            val_cost_fraction=round(report.cost_fraction, 6),
                            train_reward=round(total / bags, 6) if bags else None,
                            epsilon=round(epsilon, 6))

    def _validate(self, executor, data, stage):
        """The graph on the validation split, routed by the policy as it stands (argmax)."""
        return evaluate(executor, data.val, self._policy(), classes=data.classes, batch=max(stage.batch, 256),
                        split="val")

    def _remember_if_best(self, executor, stage, val_reward: float) -> None:
        """Keep a copy of the weights (and head terms) when this epoch's validation reward is the
        best of the stage so far. In `stage.extra`, so an interrupted run resumes knowing it."""
        best = stage.extra.get("best")
        if best is not None and val_reward <= best["reward"]:
            return
        stage.extra["best"] = {
            "reward": float(val_reward), "epoch": stage.epoch + 1,
            "weights": {k: v.detach().cpu().clone() for k, v in executor.state_dict().items()},
            "head_term": {q: (w.detach().cpu().clone(), b.detach().cpu().clone()) for q, (w, b) in self.term.items()}}

    def _restore_best(self, executor, stage) -> None:
        """End the stage with the best epoch's weights (`keep=best`) and say which epoch that was."""
        best = stage.extra.get("best")
        if best is None:
            return
        executor.load_state_dict(best["weights"])
        with torch.no_grad():
            for q, (w, b) in self.term.items():
                w.copy_(best["head_term"][q][0])
                b.copy_(best["head_term"][q][1])
        stage.log(kept_epoch=best["epoch"], kept_val_reward=round(best["reward"], 6))

    def _biases(self, executor) -> dict[str, Tensor]:
        """What shifts each control node's values by a constant per action: its head term's bias,
        else its final `fc`'s (nodes with neither are left out)."""
        biases = {q.name: self.term[q.name][1] if q.name in self.term else final_bias(executor.nodes[q.name],
                                                                                        len(q.actions))
                  for q in executor.graph.control_nodes}
        return {q: b for q, b in biases.items() if b is not None}

    def _fold(self, executor, offsets: dict[str, Tensor], sign: float = 1.0) -> None:
        """Add (sign = −1: take back) per-action constants to the control nodes' biases."""
        biases = self._biases(executor)
        with torch.no_grad():
            for q, o in offsets.items():
                biases[q].add_(sign * o.to(biases[q].device, biases[q].dtype))

    def _fit_offsets(self, executor, data, stage, metric: str) -> dict[str, Tensor]:
        """The per-action constants (`offsets`) that `search_offsets` finds for the best
        validation reward (the stage's own score) on the values as they stand, for the nodes
        that have a bias to carry them ({} where nothing was searched; the log says why). One
        forced pass per static path over validation gives what each node computes on each
        route; graphs with more than OFFSET_PATHS paths are left as they are."""
        graph, paths = executor.graph, self.static
        if len(paths) > OFFSET_PATHS:
            stage.log(offsets=f"none: {len(paths)} static paths (searched up to {OFFSET_PATHS})")
            return {}
        biases = self._biases(executor)
        if not biases:
            stage.log(offsets="none: no control node ends with a biased `fc` or has a head term")
            return {}
        lam = float(self.params["lambda"])
        output = graph.outputs[0].name
        y = data.val.tensors[1]
        predictions, costs, values = [], [], []
        with evaluating(executor):
            for actions in paths:
                predicted_p, cost_p, values_p = [], [], {q: [] for q in actions}
                for x, _ in batches(data.val, max(stage.batch, 256)):
                    forced = every_control(graph, actions, len(x))
                    x = x.to(stage.device)
                    if self.heads:
                        r, found = head_confidences(executor, x, self.heads.values(), actions=forced)
                    else:
                        r, found = executor(x, mode="force", actions=forced), None
                    predicted_p.append(r.outputs[output].argmax(1).cpu())
                    cost_p.append(r.cost_fraction.double().cpu())
                    for q, v in self._values(r, found).items():
                        if q in values_p:
                            values_p[q].append(v.detach().double().cpu())
                predictions.append(torch.cat(predicted_p))
                costs.append(torch.cat(cost_p))
                values.append({q: torch.cat(v) for q, v in values_p.items()})
        predictions, costs = torch.stack(predictions), torch.stack(costs)
        examples = torch.arange(len(y))

        try:
            start = offset_route(paths, values, {})  # the values' own routes
        except ValueError as e:  # static_paths tries at most MAX_COMBINATIONS combinations of actions
            stage.log(offsets=f"none: {e}")
            return {}
        # F1 is not a mean over examples; its per-example stand-in (`f1_weights`, at the F1 the
        # values give as they are) is what the margin is measured on, F1 itself what is scored.
        weight = (f1_weights(y, f1_score(predictions[start, examples], y), float((y == 1).double().mean())).double()
                  if metric == "f1" else torch.ones(len(y), dtype=torch.float64))

        def rewards(route: Tensor) -> Tensor:
            right = (predictions[route, examples] == y).double()
            return lam * weight * right + (1 - lam) * (1 - costs[route, examples])

        def score(route: Tensor) -> float:
            predicted = predictions[route, examples]
            a = f1_score(predicted, y) if metric == "f1" else float((predicted == y).double().mean())
            return lam * a + (1 - lam) * (1 - float(costs[route, examples].mean()))

        before = score(start)
        offsets, after = search_offsets(rewards, paths, values, {q: len(graph[q].actions) for q in biases}, score)
        route = offset_route(paths, values, offsets)
        shares = torch.bincount(route, minlength=len(paths)).double() / len(route)
        # Said in the log, not hidden: offsets may leave one path for (nearly) everyone.
        stage.log(offsets=" ".join(f"{q}=" + ",".join(f"{v:.6g}" for v in o.tolist()) for q, o in offsets.items()),
                  val_reward_before_offsets=round(before, 6), val_reward_after_offsets=round(after, 6),
                  val_paths_used=int((shares > 0).sum()), val_top_path_share=round(float(shares.max()), 6))
        return offsets

    def _full_loss(self, executor, x, y, r, values: dict[str, Tensor], found, controls: list[str],
                   lam: float, weight: Tensor | None = None) -> Tensor:
        """Σ over control nodes of the mean squared error between every action's Q-value and
        its full-backup target (`full_targets`), on the examples where the node ran; `weight`
        scales each example's right answer (`f1_weights`)."""
        graph = executor.graph
        output = graph.outputs[0].name
        rewards, greedy = [], []
        # Eval mode, as the policy will be used: dropout off, and batch-norm statistics are
        # neither used from these passes nor updated by them.
        with evaluating(executor):
            for actions in self.paths:
                run = executor(x, mode="force", actions=every_control(graph, actions, len(y)))
                right = (run.outputs[output].argmax(1) == y).float()
                if weight is not None:
                    right = right * weight.to(right.device)
                rewards.append(lam * right + (1.0 - lam) * (1.0 - run.cost_fraction.float()))
                if self.greedy:  # what each control node would choose on this path
                    chose = self._values(run, found)
                    greedy.append({q: torch.where(run.actions[q].cpu() >= 0, chose[q].argmax(1).cpu(), -1)
                                   for q in actions})
        taken = {q: r.actions[q].cpu() for q in controls}
        targets = full_targets(torch.stack(rewards).cpu(), self.paths, taken, controls,
                               [len(graph[q].actions) for q in controls], greedy or None)
        loss = r.output.new_zeros(())
        for q in controls:
            ran = taken[q] >= 0
            if bool(ran.any()):
                target = targets[q][ran].to(values[q].device, values[q].dtype)
                known = torch.isfinite(target)  # an action no listed path takes from there has no target
                scores = values[q][ran.to(values[q].device)]
                error = torch.where(known, scores - target.nan_to_num(0.0, 0.0, 0.0), 0.0)
                loss = loss + (error ** 2).sum() / known.sum().clamp(min=1)
        return loss

    @staticmethod
    def _q_loss(r, values: dict[str, Tensor], controls: list[str], reward: Tensor, m: int, mean: bool = False) -> Tensor:
        """Σ over control nodes of the mean over bags of (r − Σᵢ Q(sᵢ, aᵢ))² (with `mean`,
        Σᵢ / m), examples where the node ran only; bags where it never ran are left out."""
        bags = len(reward)
        n = bags * m
        loss = reward.new_zeros(())
        if bags == 0:
            return loss
        for q in controls:
            actions = r.actions[q][:n]
            ran = actions >= 0
            # Scores are zero rows where the node did not run; the mask makes that explicit.
            chosen = values[q][:n].gather(1, actions.clamp(min=0).unsqueeze(1)).squeeze(1) * ran
            value = chosen.view(bags, m).sum(1)
            if mean:  # each example's value then estimates r itself, not r / m
                value = value / m
            active = ran.view(bags, m).any(1)
            if bool(active.any()):
                loss = loss + ((reward - value.to(reward.dtype))[active] ** 2).mean()
        return loss

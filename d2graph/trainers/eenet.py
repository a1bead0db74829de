"""The `eenet` trainer: EENet (Ilhan et al., 2023) — learned exit scores for a multi-exit chain at a budget.

In:  an executor whose backbone is trained (the `supervised` stage) and is a multi-exit
     chain (`d2graph.predictions.exits_of`), the data (`d2graph.data.Splits`; only the
     validation split is read) and a stage context. Or, without any executor, a
     `d2graph.predictions.Predictions` (`fit_on_predictions`).
Out: an `EENetPolicy`: for each example, one mode="all" pass over the heads, the learned
     exit utility score of each exit, and the first exit whose score reaches its
     threshold; returned as forced actions (`predictions.actions_for_exits`).
Guarantees:
  - The backbone is never changed: the scorers learn from the cached predictions of the
    validation split, as in the paper (K small MLPs, Adam, seconds on a CPU).
  - Budgets are caps: the policy's mean cost on validation, as a fraction of the full
    cost, is at most `budget` and, wherever the exit costs allow, within 0.02 of it (the
    closest to it that one example more or less at an exit can reach). A budget below the
    first exit's cost sends every example out at the first exit.
  - Deterministic: the same predictions, budget and seed give the same policy. No NaN:
    probabilities at exactly 0, scores that saturate to 0 or 1, examples that every exit
    gets wrong and exits that no example reaches all give finite losses and thresholds.
  - The policy's `state()` is plain data: the scorers' weights and the thresholds as lists
    of floats, so checkpoints load with `weights_only=True`.

Our reading of the paper (notes in /work/shared/papers/002_*, checked against the authors'
public code, `utils/predict_helpers.py`, where the notes are silent):
  * Inputs of exit k (1-based): its softmax ŷ_k (C values; see `sorted_probs` below), the
    3-factor confidence
    a_k = (max_c ŷ_k,c;  1 + Σ_c ŷ_k,c log ŷ_k,c / log C;  (1/k) max_c Σ_{k'≤k} 1[argmax ŷ_k' = c]),
    and the utility scores q̂_1 … q̂_{k−1} of the earlier exits (detached), as in the code.
  * Exit utility score q̂_k = σ(g_k(x_k)) and exit assignment score r̂_{n,·} =
    softmax_k(h_k(x_k)), g_k and h_k one-hidden-layer MLPs. (The code clamps a linear q̂
    to [0, 1] and softmaxes sigmoid outputs for r̂; the sigmoid keeps q̂ in (0, 1) with
    gradients everywhere and the unbounded h lets r̂ reach any split of the examples.)
    The last exit answers whatever is left, so it has an h but no g.
  * Targets q_k = 1[ŷ_k = y]; r_k = q_k / Σ_k' q_k', or 1/K when no exit is right.
  * L_CE = −1/(NK) Σ r log r̂;  L_budget = |B − 1/N Σ_n Σ_k r̂_{n,k} c_k| / B, c_k and B as
    fractions of the full cost;  L_g = 1/(K−1) Σ_k Σ_n w_{n,k} BCE(q̂_{n,k}, q_{n,k}) with
    w_{n,k} = (1 − Σ_{k'<k} r̂_{n,k'}) / Σ_n' (1 − Σ_{k'<k} r̂_{n',k'}), r̂ detached: the
    notes' weight (the probability of reaching exit k), where the code used r̂_{n,k} itself.
    The loss is L_g + ce_weight · L_CE + budget_weight · L_budget, by default 0.1 and 1: the
    ratio of the authors' config (α_ce = 1e-3, α_cost = 1e-2). Only that ratio matters: L_g
    trains g, the other two train h, and Adam does not see a loss's scale.
  * Thresholds (the notes' "exit score thresholds" figure, the code's `compute_threshold`):
    the exit shares p_k are the mean of r̂ over validation; exit 1 takes the ⌊p_1 N⌉
    examples of highest q̂_1, exit 2 the best p_2 N of the rest by q̂_2, and so on; the
    threshold lies halfway between the last score taken and the next one. At test time an
    example leaves at the first exit whose score reaches its threshold.
  * The budget loss only pulls the learned mean cost towards B. To make the budget a cap
    like every other policy's, the shares are tilted, p_k(u) ∝ p_k · exp(u · c̃_k) with c̃
    the costs rescaled to [0, 1] (u = 0: the learned shares), and u is bisected until the
    validation cost is the largest at most B. With two exits that fixes the shares
    entirely; with more, their ratios keep what was learned.
  * Ours, not the paper's (the paper's with `utility=right, sorted_probs=false`):
    - the utility score learns `utility_targets(·, "no_loss")`: leaving at exit k loses no
      right answer (k is right, or no later exit is). The paper's "k is right" ranks an
      example that every exit gets wrong with those a later exit fixes, and the budget is
      spent sending it on; on eenet_resnet.d2 at B = 0.2 (one cut on exit 1's scores) that
      was 34.7% against the threshold's 36.1% (docs/trainers.md);
    - each scorer also reads its exit's probabilities sorted in decreasing order: how sure
      the exit is, whatever class it names (a small MLP does not learn a max over C inputs
      from a thousand examples), next to the raw ones, which tell which classes it knows.
  * Ours, not the paper's: a tilt can only trade the cheapest exit against the dearest, so
    the thresholds are then searched per exit (`search_thresholds`, from the tilted ones and
    from one threshold shared by every exit) for the most right validation answers within
    the budget. On eenet_resnet.d2 this is the difference between 59.7% and 79.4% at B = 0.5
    (docs/trainers.md).

`threshold_on_predictions` is the baseline on the same `Predictions` (BranchyNet / MSDNet:
leave at the first exit whose max probability reaches one τ), so a command can compare them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..executor import Executor
from ..ir import Graph
from ..policies import Policy, register_policy
from ..predictions import Exit, Predictions, actions_for_exits, exits_of, from_executor, head_probs
from ..schema import Param, Schema
from ..threads import using_threads
from .base import Trainer, register, trainer_error
from .baselines import MEASURES, NEVER_STOP, agreeing_streaks
from .toolkit import budget_param, calibrate, check_budget, search_under_budget, validate_budget

__all__ = ["EENetPolicy", "EENetRule", "EENetTrainer", "ThresholdRule", "UTILITIES", "compare_on_predictions",
           "confidence_features", "eenet_losses", "exit_of", "fit_on_predictions", "scorer_inputs",
           "search_thresholds", "threshold_on_predictions", "thresholds_for", "utility_targets"]

# Bounds of the tilt u: at |u| = 60 an exit 1 cost-unit dearer gets e^60 times less share,
# i.e. none of any validation split (the bisection needs a cost reachable at both ends).
_TILT = 60.0
_MIN_SHARE = 1e-6  # a learned share of 0 could never be tilted back up
_BATCH = 512  # examples per Adam step (the authors' code uses 512 too)
UTILITIES = ("no_loss", "right")  # what the utility scores learn (`utility_targets`)


# --- features, scorers, losses ---------------------------------------------------------------


def confidence_features(probs: Tensor) -> Tensor:
    """EENet's 3-factor confidence of each exit, float32 [K, N, 3]: the max probability,
    1 + Σ p log p / log C (1 − normalised entropy), and the vote (the share of exits
    1..k that predict the same class as the most common prediction among them).

    Example:
        >>> confidence_features(torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]]))[:, 0].tolist()
        [[1.0, 1.0, 1.0], [0.5, 0.0, 1.0]]
    """
    probs = probs.float()
    k, n, c = probs.shape
    top = probs.max(2).values
    # entr(0) = 0: an exact 0 probability gives no NaN (log 0 · 0 would).
    certainty = 1.0 - torch.special.entr(probs).sum(2) / math.log(c)
    votes = F.one_hot(probs.argmax(2), c).cumsum(0).max(2).values.float()  # [K, N]
    vote = votes / torch.arange(1, k + 1, dtype=torch.float32)[:, None]
    return torch.stack([top, certainty, vote], 2)


def scorer_inputs(probs: Tensor, sorted_probs: bool) -> list[Tensor]:
    """Each exit's input to its scorers before the earlier scores are appended: ŷ_k ‖ a_k
    ([N, C + 3] per exit, the paper's), or with `sorted_probs` ŷ_k ‖ sort(ŷ_k) ‖ a_k
    ([N, 2C + 3]: the same probabilities in decreasing order, which show how sure the exit
    is whatever class it names), from the exits' probabilities [K, N, C] (what `export`
    traces too).

    Example:
        >>> [x.shape[1] for x in scorer_inputs(torch.full((2, 5, 4), 0.25), sorted_probs=True)]
        [11, 11]
    """
    probs = probs.float()
    feats = confidence_features(probs)
    out = []
    for k in range(probs.shape[0]):
        ranked = [probs[k].sort(1, descending=True).values] if sorted_probs else []
        out.append(torch.cat([probs[k], *ranked, feats[k]], 1))
    return out


def _mlp(width: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class _Scorers(nn.Module):
    """g_k (exit utility, exits 1..K−1) and h_k (exit assignment, exits 1..K). Exit k's
    input is `scorer_inputs`' ‖ σ(g_1..g_{k−1}) (the earlier utility scores, detached)."""

    def __init__(self, exits: int, classes: int, hidden: int, sorted_probs: bool):
        super().__init__()
        self.exits, self.classes, self.hidden, self.sorted_probs = exits, classes, hidden, sorted_probs
        width = (2 if sorted_probs else 1) * classes + 3  # `scorer_inputs`' width
        self.g = nn.ModuleList(_mlp(width + k, hidden) for k in range(exits - 1))
        self.h = nn.ModuleList(_mlp(width + k, hidden) for k in range(exits))

    def forward(self, inputs: list[Tensor], assign: bool = True) -> tuple[Tensor, Tensor | None]:
        """(utility logits s [N, K−1], assignment logits [N, K] or None)."""
        past: list[Tensor] = []
        s, a = [], []
        for k in range(self.exits):
            x = torch.cat([inputs[k], *past], 1) if past else inputs[k]
            if k < self.exits - 1:
                s.append(self.g[k](x)[:, 0])
                past.append(torch.sigmoid(s[-1]).detach()[:, None])
            if assign:
                a.append(self.h[k](x)[:, 0])
        n = inputs[0].shape[0]
        utility = torch.stack(s, 1) if s else torch.zeros((n, 0))
        return utility, torch.stack(a, 1) if assign else None


def utility_targets(correct: Tensor, utility: str = "no_loss") -> Tensor:
    """What the utility score q̂_k of each exit but the last learns to predict, float32 [N, K−1],
    from `correct` [N, K] (1 where exit k is right): `right`, the paper's q_k = 1[exit k is
    right]; `no_loss`, 1 where leaving at exit k loses no right answer: exit k is right, or
    no later exit is (an example that every exit gets wrong costs nothing to stop early).

    Example:
        >>> utility_targets(torch.tensor([[0, 1, 1], [0, 0, 0], [1, 0, 1]])).tolist()
        [[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]
    """
    correct = correct.float()
    if utility == "right":
        return correct[:, :-1]
    if utility != "no_loss":
        raise ValueError(f"unknown utility {utility!r}; the utilities are {', '.join(UTILITIES)}")
    later = correct.flip(1).cummax(1).values.flip(1)[:, 1:]  # [N, K−1]: some exit after k is right
    return torch.maximum(correct[:, :-1], 1.0 - later)


def eenet_losses(utility: Tensor, assignment: Tensor, correct: Tensor, fractions: Tensor, budget: float,
                 ce_weight: float = 0.1, budget_weight: float = 1.0, targets: Tensor | None = None
                 ) -> dict[str, Tensor]:
    """EENet's three losses on a batch (see the module docstring), and their weighted sum.

    utility     [N, K−1] logits of q̂ (q̂ = σ(utility))
    assignment  [N, K]   logits of r̂ (r̂ = softmax over exits)
    correct     [N, K]   q: 1 where exit k is right
    fractions   [K]      cost of exiting at exit k, as a fraction of the full cost
    targets     [N, K−1] what q̂ learns (`utility_targets`); by default the paper's, correct[:, :K−1]

    Example:
        >>> out = eenet_losses(torch.zeros(4, 1), torch.zeros(4, 2), torch.ones(4, 2),
        ...                    torch.tensor([0.5, 1.0]), budget=0.75)
        >>> round(float(out["budget"]), 6), round(float(out["g"]), 4)
        (0.0, 0.6931)
    """
    n, k = assignment.shape
    correct = correct.float()
    log_r_hat = assignment.log_softmax(1)
    r_hat = log_r_hat.exp()
    right = correct.sum(1, keepdim=True)
    # r: shared among the exits that are right; uniform when none is (never 0/0).
    r = torch.where(right > 0, correct / right.clamp_min(1.0), torch.full_like(correct, 1.0 / k))
    ce = -(r * log_r_hat).sum() / (n * k)
    expected = (r_hat * fractions).sum(1).mean()
    budget_loss = (expected - budget).abs() / budget
    # w_{n,k}: the probability of reaching exit k, normalised over the batch per exit; an
    # exit that nobody reaches (all weights 0) gets no loss rather than 0/0.
    reach = (1.0 - torch.cumsum(r_hat.detach(), 1) + r_hat.detach()).clamp_min(0.0)[:, :k - 1]
    w = reach / reach.sum(0, keepdim=True).clamp_min(1e-12)
    targets = correct[:, :k - 1] if targets is None else targets.float()
    bce = F.binary_cross_entropy_with_logits(utility, targets, reduction="none")
    g = (w * bce).sum() / max(k - 1, 1)
    total = g + ce_weight * ce + budget_weight * budget_loss
    return {"total": total, "g": g, "ce": ce, "budget": budget_loss, "expected_cost": expected}


# --- thresholds -----------------------------------------------------------------------------


def thresholds_for(scores: np.ndarray, shares: Sequence[float]) -> list[float]:
    """One threshold per exit but the last, so that exit k takes round(N · Σ_{j≤k} p_j) −
    (those before) examples: the best remaining ones by its score [K−1, N]. A threshold is
    halfway between the last score taken and the next; +inf when an exit takes nobody,
    −inf when it takes everyone left.

    Example:
        >>> thresholds_for(np.array([[0.9, 0.1, 0.5, 0.7]]), [0.5, 0.5])
        [0.6]
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.shape[1]
    shares = np.clip(np.asarray(shares, dtype=np.float64), 0.0, None)
    shares = shares / shares.sum() if shares.sum() > 0 else np.full(len(shares), 1.0 / len(shares))
    wanted = np.diff(np.concatenate([[0], np.round(np.cumsum(shares) * n)])).astype(np.int64)
    left = np.arange(n)
    out = []
    for k in range(scores.shape[0]):
        s = np.sort(np.nan_to_num(scores[k, left], nan=-np.inf))[::-1]  # NaN: never exits
        take = int(min(wanted[k], len(s)))
        if take == 0:
            t = math.inf
        elif take == len(s):
            t = -math.inf
        else:
            a, b = float(s[take - 1]), float(s[take])
            t = a if a == b or not math.isfinite(a + b) else (a + b) / 2
        out.append(t)
        left = left[~(scores[k, left] >= t)]
    return out


def exit_of(scores: np.ndarray | Tensor, thresholds: Sequence[float]) -> np.ndarray:
    """The exit of each example (int64 [N], 0-based): the first exit k whose score
    `scores[k]` reaches `thresholds[k]`, else the last one (K = len(thresholds) + 1)."""
    scores = scores.double().numpy() if isinstance(scores, Tensor) else np.asarray(scores, dtype=np.float64)
    n = scores.shape[1]
    out = np.full(n, len(thresholds), dtype=np.int64)
    for k in reversed(range(len(thresholds))):
        out[scores[k] >= thresholds[k]] = k  # NaN >= t is False: the example goes on
    return out


def search_thresholds(scores: np.ndarray, correct: np.ndarray, costs: Sequence[float], budget: float,
                      starts: Sequence[Sequence[float]]) -> list[float]:
    """Per-exit thresholds on `scores` [K−1, N] (as `exit_of` applies them) that answer the
    most examples right with a mean cost at most `budget` (`toolkit.search_under_budget`,
    from the best of `starts`). `correct` [N, K]: exit k is right on example n; `costs` [K]:
    the cost of leaving at each exit, as a fraction of the full cost. Each threshold's grid
    is 64 quantiles of its scores.

    Example:
        >>> scores = np.array([[0.9, 0.8, 0.2, 0.1], [0.9, 0.1, 0.9, 0.1]])
        >>> right = np.array([[1, 1, 1], [1, 1, 1], [0, 1, 1], [0, 0, 1]], bool)
        >>> t = search_thresholds(scores, right, [0.1, 0.4, 1.0], 0.5, [[0.5, 0.5]])
        >>> exit_of(scores, t).tolist()
        [0, 0, 1, 2]
    """
    scores = np.asarray(scores, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    costs = np.asarray(costs, dtype=np.float64)
    rows = np.arange(scores.shape[1])

    def outcome(t: list[float]) -> tuple[float, float]:
        index = exit_of(scores, t)
        return float(correct[rows, index].sum()), float(costs[index].mean())

    finite = [row[np.isfinite(row)] for row in scores]
    grids = [np.unique(np.quantile(f, np.linspace(0.0, 1.0, 64))) if len(f) else np.array([math.inf]) for f in finite]
    bounds = [(float(f.min()) - 1.0, float(f.max()) + 1.0) if len(f) else (0.0, 1.0) for f in finite]
    return search_under_budget(outcome, grids, bounds, budget, [list(map(float, t)) for t in starts])


def _tilted(shares: np.ndarray, scaled_costs: np.ndarray, u: float) -> np.ndarray:
    logits = np.log(np.maximum(shares, _MIN_SHARE)) + u * scaled_costs
    p = np.exp(logits - logits.max())
    return p / p.sum()


def _scaled(fractions: np.ndarray) -> np.ndarray:
    span = fractions[-1] - fractions[0]
    return (fractions - fractions[0]) / span if span > 0 else np.zeros_like(fractions)


# --- rules on predictions -------------------------------------------------------------------


def _one_thread():
    """The scorers' matrices are a few hundred numbers wide: intra-op threads only add
    synchronisation (on a busy 2-core machine, 50× slower steps), so they run on one,
    whatever the run's `threads`."""
    return using_threads(1)


def _tensor(probs) -> Tensor:
    return probs.float() if isinstance(probs, Tensor) else torch.from_numpy(np.asarray(probs, dtype=np.float32))


@dataclass
class EENetRule:
    """A fitted EENet exit rule: the utility scorers g_1..g_{K−1} and their thresholds.
    `exit_index(probs [K, N, C])` → int64 [N]. The assignment scorers h only serve to
    fit the shares and are not kept."""

    exits: int
    classes: int
    hidden: int
    weights: list[dict[str, list]]  # per exit k < K: {"w1", "b1", "w2", "b2"} of g_k, lists of floats
    thresholds: list[float]
    shares: list[float]  # the shares the thresholds were set for, on validation
    # The scorers also read each exit's probabilities sorted (`scorer_inputs`); rules saved
    # before that option existed did not, and load as False.
    sorted_probs: bool = False
    _model: _Scorers | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_scorers(cls, model: _Scorers, thresholds: Sequence[float], shares: Sequence[float]) -> EENetRule:
        weights = [{"w1": g[0].weight.tolist(), "b1": g[0].bias.tolist(),
                    "w2": g[2].weight.tolist(), "b2": g[2].bias.tolist()} for g in model.g]
        return cls(model.exits, model.classes, model.hidden, weights, [float(t) for t in thresholds],
                   [float(p) for p in shares], model.sorted_probs)

    def scorers(self) -> _Scorers:
        model = _Scorers(self.exits, self.classes, self.hidden, self.sorted_probs)
        with torch.no_grad():
            for g, w in zip(model.g, self.weights):
                g[0].weight.copy_(torch.tensor(w["w1"])), g[0].bias.copy_(torch.tensor(w["b1"]))
                g[2].weight.copy_(torch.tensor(w["w2"])), g[2].bias.copy_(torch.tensor(w["b2"]))
        return model.eval()

    def scores(self, probs) -> Tensor:
        """The utility logits, float32 [K−1, N] (q̂ = σ of them)."""
        if self._model is None:
            self._model = self.scorers()
        with torch.no_grad(), _one_thread():
            return self._model(scorer_inputs(_tensor(probs), self.sorted_probs), assign=False)[0].T.contiguous()

    def exit_index(self, probs) -> np.ndarray:
        return exit_of(self.scores(probs), self.thresholds)

    def state(self) -> dict[str, Any]:
        return {"exits": self.exits, "classes": self.classes, "hidden": self.hidden,
                "weights": [dict(w) for w in self.weights], "thresholds": list(self.thresholds),
                "shares": list(self.shares), "sorted_probs": self.sorted_probs}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> EENetRule:
        return cls(int(state["exits"]), int(state["classes"]), int(state["hidden"]),
                   [dict(w) for w in state["weights"]], [float(t) for t in state["thresholds"]],
                   [float(p) for p in state["shares"]], bool(state.get("sorted_probs", False)))


@dataclass
class ThresholdRule:
    """Leave at the first exit (but the last) whose confidence reaches τ (one τ for all)."""

    measure: str
    tau: float

    def confidences(self, probs) -> Tensor:
        """float64 [K−1, N] (the last exit's is not needed: it always answers)."""
        p = _tensor(probs)[:-1].double()
        if self.measure == "maxprob":
            return p.max(2).values
        if self.measure == "entropy":
            return 1.0 - torch.special.entr(p).sum(2) / math.log(p.shape[2])
        if self.measure == "margin":
            top = p.topk(2, dim=2).values
            return top[..., 0] - top[..., 1]
        raise ValueError(f"unknown confidence measure {self.measure!r}; the measures are {', '.join(MEASURES)}")

    def exit_index(self, probs) -> np.ndarray:
        conf = self.confidences(probs)
        return exit_of(conf, [self.tau] * conf.shape[0])

    def state(self) -> dict[str, Any]:
        return {"measure": self.measure, "tau": self.tau}


@dataclass
class PatienceRule:
    """PABEE's rule on a chain of exits: leave at the first exit (but the last) where the
    last `patience` exits passed, that one included, predict the same class."""

    patience: int

    def exit_index(self, probs) -> np.ndarray:
        predictions = _tensor(probs).argmax(2)  # [K, N]
        k = predictions.shape[0]
        chains = {e: list(range(e + 1)) for e in range(k - 1)}
        streaks = agreeing_streaks(dict(enumerate(predictions)), chains)
        return exit_of(torch.stack([streaks[e] for e in range(k - 1)]).double(), [self.patience] * (k - 1))

    def state(self) -> dict[str, Any]:
        return {"patience": self.patience}


def patience_on_predictions(pred: Predictions, budget: float) -> tuple[PatienceRule, dict[str, Any]]:
    """The patience rule on `pred` (PABEE): the largest patience whose validation cost is at
    most `budget` (1, everyone at the first exit, when none is). Same report as
    `fit_on_predictions` (with "patience").

    Example:
        >>> rule, report = patience_on_predictions(pred, 0.4)                   # doctest: +SKIP
    """
    _check_budget(pred, budget, "patience")
    # A longer patience never stops an example earlier; K never stops one before the last exit.
    within = [k for k in range(1, pred.exits + 1)
              if pred.outcome("val", PatienceRule(k).exit_index(pred.val_probs))[1] <= budget + 1e-12]
    rule = PatienceRule(max(within) if within else 1)
    return rule, _report("patience", pred, budget, rule, patience=rule.patience)


def _report(method: str, pred: Predictions, budget: float, rule, **extra) -> dict[str, Any]:
    out: dict[str, Any] = {"method": method, "budget": float(budget)}
    for split in ("val", "test"):
        probs, targets = pred.split(split)
        if len(targets) == 0:
            out[split] = None
            continue
        index = rule.exit_index(probs)
        accuracy, cost = pred.outcome(split, index)
        shares = np.bincount(index, minlength=pred.exits) / len(index)
        out[split] = {"accuracy": accuracy, "cost_fraction": cost, "exit_shares": shares.tolist()}
    return out | extra


def _check_budget(pred: Predictions, budget: float, rule: str) -> None:
    # `rule` names the trainer in the message: the user asked for it, not for `eenet`.
    if pred.exits < 2:
        raise trainer_error(rule, f"the predictions have {pred.exits} exit: there is no exit to choose",
                            help="give the predictions of a network with two exits or more")
    validate_budget(rule, budget)


def fit_on_predictions(pred: Predictions, budget: float, seed: int = 0, *, epochs: int = 200, lr: float = 0.01,
                       hidden: int = 16, ce_weight: float = 0.1, budget_weight: float = 1.0,
                       utility: str = "no_loss", sorted_probs: bool = True) -> tuple[EENetRule, dict[str, Any]]:
    """Fit EENet on the validation predictions of `pred` at `budget` (a fraction of the
    full cost) and report it on validation and test. Deterministic in `seed`.

    Returns (rule, report): report = {"method": "eenet", "budget", "val": {"accuracy",
    "cost_fraction", "exit_shares"}, "test": the same (None without a test split),
    "learned_shares", "learned_cost_fraction", "tilt", "losses", "seconds"}.

    Example:
        >>> rule, report = fit_on_predictions(load("preds/early_exit"), 0.4)   # doctest: +SKIP
        >>> report["val"]["cost_fraction"] <= 0.4                             # doctest: +SKIP
        True
    """
    _check_budget(pred, budget, "eenet")
    with _one_thread():
        return _fit(pred, budget, seed, epochs, lr, hidden, ce_weight, budget_weight, utility, sorted_probs)


def _fit(pred: Predictions, budget: float, seed: int, epochs: int, lr: float, hidden: int, ce_weight: float,
         budget_weight: float, utility: str, sorted_probs: bool) -> tuple[EENetRule, dict[str, Any]]:
    start = time.perf_counter()
    k, n = pred.exits, pred.val_probs.shape[1]
    probs = torch.from_numpy(pred.val_probs)
    labels = torch.from_numpy(pred.val_targets)
    correct = (probs.argmax(2) == labels[None]).T.float()  # [N, K]
    targets = utility_targets(correct, utility)
    fractions = torch.from_numpy(pred.fractions).float()
    inputs = scorer_inputs(probs, sorted_probs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _Scorers(k, pred.classes, hidden, sorted_probs)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for begin in range(0, n, _BATCH):
            idx = order[begin:begin + _BATCH]
            logits, assignment = model([x[idx] for x in inputs])
            losses = eenet_losses(logits, assignment, correct[idx], fractions, budget, ce_weight, budget_weight,
                                  targets[idx])
            optimizer.zero_grad()
            losses["total"].backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        logits, assignment = model(inputs)
        losses = eenet_losses(logits, assignment, correct, fractions, budget, ce_weight, budget_weight, targets)
    learned = assignment.softmax(1).mean(0).double().numpy()
    scores = logits.T.double().numpy()
    scaled = _scaled(pred.fractions)
    cost_of = pred.fractions

    def cost_at(u: float) -> float:
        return float(cost_of[exit_of(scores, thresholds_for(scores, _tilted(learned, scaled, u)))].mean())

    tilt, _ = calibrate(cost_at, budget, -_TILT, _TILT)
    tilted = thresholds_for(scores, _tilted(learned, scaled, tilt))
    # The tilt can only move mass between the cheapest and the dearest exits; a search of
    # the thresholds themselves, from the tilt and from one shared threshold, spends the
    # budget where it buys the most right answers (search_thresholds).
    shared, _ = calibrate(lambda t: float(cost_of[exit_of(scores, [t] * (k - 1))].mean()), budget,
                          float(np.nanmin(scores)) - 1.0, float(np.nanmax(scores)) + 1.0)
    thresholds = search_thresholds(scores, correct.numpy().astype(bool), cost_of, budget,
                                   [tilted, [shared] * (k - 1)])
    shares = np.bincount(exit_of(scores, thresholds), minlength=k) / n
    rule = EENetRule.from_scorers(model, thresholds, shares)
    report = _report("eenet", pred, budget, rule, learned_shares=learned.tolist(),
                     learned_cost_fraction=float(losses["expected_cost"]), tilt=float(tilt),
                     losses={key: float(losses[key]) for key in ("g", "ce", "budget")},
                     seconds=time.perf_counter() - start)
    return rule, report


def threshold_on_predictions(pred: Predictions, budget: float, measure: str = "maxprob"
                             ) -> tuple[ThresholdRule, dict[str, Any]]:
    """The max-probability (or entropy, margin) threshold on `pred`: one τ for every exit,
    bisected on validation to the largest cost at most `budget`. Same report as
    `fit_on_predictions` (with "tau").

    Example:
        >>> rule, report = threshold_on_predictions(pred, 0.4)                  # doctest: +SKIP
    """
    _check_budget(pred, budget, "threshold")
    rule = ThresholdRule(str(measure), NEVER_STOP)
    conf = rule.confidences(pred.val_probs)

    def cost_at(tau: float) -> float:
        return float(pred.fractions[exit_of(conf, [tau] * conf.shape[0])].mean())

    rule.tau, _ = calibrate(cost_at, budget, 0.0, NEVER_STOP)
    return rule, _report("threshold", pred, budget, rule, tau=float(rule.tau))


def compare_on_predictions(pred: Predictions, budgets: Sequence[float], seed: int = 0,
                           measure: str = "maxprob", **params: Any) -> list[dict[str, Any]]:
    """EENet and the threshold rule at every budget: one flat row per (budget, method) with
    val/test accuracy and cost fraction (test None without a test split).

    Example:
        >>> for row in compare_on_predictions(pred, [0.3, 0.5]): print(row)    # doctest: +SKIP
    """
    rows = []
    for budget in budgets:
        for _, report in (threshold_on_predictions(pred, budget, measure),
                          fit_on_predictions(pred, budget, seed, **params)):
            row = {"budget": float(budget), "method": report["method"]}
            for split in ("val", "test"):
                r = report[split]
                row[f"{split}_accuracy"] = None if r is None else r["accuracy"]
                row[f"{split}_cost_fraction"] = None if r is None else r["cost_fraction"]
            rows.append(row)
    return rows


# --- the policy and the trainer -------------------------------------------------------------


@register_policy
class EENetPolicy(Policy):
    """Leave at the first exit whose learned utility score reaches its threshold.

    Like `ThresholdPolicy`, it decides from one mode="all" pass over the heads (so deciding
    costs a full forward pass; the cost reported is that of the forced pass that follows)."""

    kind = "eenet"

    def __init__(self, exits: Sequence[Sequence], rule: EENetRule | Mapping[str, Any]):
        self.exits = [Exit(*e) for e in exits]
        self.rule = rule if isinstance(rule, EENetRule) else EENetRule.from_state(rule)

    def decide(self, executor, x, y=None, generator=None):
        heads = [e.head for e in self.exits]
        with torch.no_grad():
            probs = head_probs(executor(x, mode="all", keep=heads), heads)
        return actions_for_exits(self.exits, self.rule.exit_index(probs))

    def state(self) -> dict[str, Any]:
        return {"exits": [list(e) for e in self.exits], "rule": self.rule.state()}

    def describe(self) -> str:
        shares = " / ".join(f"{e.head} {p:.0%}" for e, p in zip(self.exits, self.rule.shares))
        return f"eenet: learned exit scores, validation shares {shares}"


@register
class EENetTrainer(Trainer):
    """EENet's exit scorers, fitted on the validation predictions at a budget."""

    name, role = "eenet", "policy"
    schema = Schema("eenet", (
        budget_param(0.5),
        Param("epochs", "posint", 200, doc="passes of Adam over the validation predictions"),
        Param("lr", "number", 0.01, doc="Adam's learning rate for the scoring MLPs (not the block's `lr`)"),
        Param("hidden", "posint", 16, doc="hidden units of each scoring MLP"),
        Param("ce_weight", "number", 0.1, doc="weight of the exit-assignment cross-entropy L_CE"),
        Param("budget_weight", "number", 1.0, doc="weight of the budget loss L_budget"),
        Param("utility", "choice", "no_loss", choices=UTILITIES,
              doc="target of each exit's utility score: `no_loss`, that leaving there loses no right answer "
                  "(the exit is right, or no later exit is); `right`, that the exit is right (the paper's)"),
        Param("sorted_probs", "bool", True,
              doc="switch that also feeds each scorer its exit's probabilities in decreasing order (false: the "
                  "paper's inputs)"),
    ), doc="learned exit utility scores and exit shares at a budget, for multi-exit chains (EENet)")

    def __init__(self, **params: Any):
        super().__init__(**params)
        check_budget(self)
        for key in ("lr",):
            if not self.params[key] > 0:
                raise trainer_error(self.name, f"{key}={self.params[key]} must be above 0", help="e.g. lr=0.01")
        for key in ("ce_weight", "budget_weight"):
            if not self.params[key] >= 0:
                raise trainer_error(self.name, f"{key}={self.params[key]} must be 0 or more",
                                    help="loss weights are non-negative; 0 drops the loss")

    def check_graph(self, graph: Graph) -> None:
        exits_of(graph, self.name)

    def fit(self, executor: Executor, data, stage) -> EENetPolicy:
        exits = exits_of(executor.graph, self.name)
        executor.to(stage.device)
        pred = from_executor(executor, data, batch=max(int(stage.batch), 256), which=("val",))
        params = {k: v for k, v in self.params.items() if k != "budget"}
        rule, report = fit_on_predictions(pred, float(self.params["budget"]), int(stage.seed), **params)
        val = report["val"]
        stage.log(val_cost_fraction=val["cost_fraction"], val_accuracy=val["accuracy"], tilt=report["tilt"],
                  learned_cost_fraction=report["learned_cost_fraction"],
                  **{f"loss_{k}": v for k, v in report["losses"].items()},
                  **{f"share_{e.head}": p for e, p in zip(exits, val["exit_shares"])})
        return EENetPolicy(exits, rule)

"""The `costsensitive` trainer: the ANN paper's learned policies (Bolukbasi et al., ICML 2017).

In:  a compiled `Executor` whose function nodes are trained (a `supervised` stage came first),
     the data (`d2graph.data.Splits`: `train` to learn the policies, `val` to meet the budget)
     and a stage context (`batch`, `device`, `generator(*key)`, `log(**metrics)`).
Out: the control nodes' own weights, trained in place, and the policy: `HeadTermPolicy`
     (each control node's scores plus its learned head term, argmax) when some control node
     has a current head and `heads=true`, else `LearnedPolicy()` (every control node routes by
     the argmax of its own scores). Function nodes are not touched.
Guarantees:
  - Algorithm 1 of the paper on any graph the language can express: control nodes are
    trained one at a time, deepest first (reverse topological order, so every control node
    below the one being trained already has its policy). For the node j being trained, the
    cost of action a for example i is
        c[i, a] = λ · (L[i, a] − min_b L[i, b])₊ + F[i, a]
    where L[i, a] is the loss of the graph's prediction when j takes a, the control nodes
    below j decide with their trained argmax and the control nodes above j (not trained
    yet) take the actions of the cheapest static path through j, so that every example
    reaches j; F[i, a] is the cost fraction of that whole route (Result.cost_fraction).
    The loss is the 0/1 error (`loss=error`, the paper's) or the cross-entropy of the
    output's scores (`loss=cross_entropy`). Min over j's own actions is "the best prediction
    reachable from j" (Eqs. 5, 7, 9 use the full network's loss; with that reference an
    example that only a middle network gets right would be sent to the cheapest one).
  - The head term (`heads=true`): a control node j with a current head h (`paths.current_head`,
    the classifier that answers if j stops; the one `threshold` reads) scores action a as
    s_a(j's input) + W_a · f(h) + b_a, where f is h's max probability, 1 − normalised entropy
    and margin (`baselines.head_confidences`) and W, b start at zero and learn with j's pipeline. It lets
    the policy express a per-node confidence threshold even where j reads only features (the
    D²NN cascade). Deciding then needs the heads, so the policy runs the graph once in mode
    "all" and routes with a forced pass; the cost reported is the forced pass's.
  - `decay`: an L2 penalty on a control node's own weight matrices in its objective; `auto`
    (`baselines.head_decay`) puts it on nodes with a head term that read many features and
    not their head (the cascade's), where the features alone overfit.
  - Two actions: importance-weighted binary classification (Eqs. 4, 5, 7): label the
    cheaper action, weight |c[i,0] − c[i,1]|, a weighted cross-entropy on the node's two
    scores. k actions (Eq. 9, cost-sensitive multiclass), `multiclass=`:
        expected     the softmax's expected cost Σ_a p_a · c[i, a] (default)
        argmin       cross-entropy to argmin_a c[i, a], weighted by the gap to the second best
        filter_tree  the filter tree of the paper's reduction on the node's own scores: the
                     binary classifier between actions a and b is s_a − s_b; each internal
                     node of a tree over the action order (cheapest first) is trained on the
                     winners of its subtrees, label the cheaper of the two, weight their cost
                     difference. The tree's winner is the argmax of the scores.
  - Learned from caches, computed once per split (train, val) with one forced pass per static
    path: every path's loss and correctness for every example, its cost fraction, and each
    control node's inputs (every distinct one its routes feed it). Routing a combination of
    actions is then a table lookup (`route` prices an unseen combination without calling a
    layer), and training a policy is Adam (`lr`) on its node's pipeline over the cached
    inputs, `epochs` passes in steps of an eighth of the split (256 to 4096 examples):
    thousands of examples take well under a second per control node on a CPU. `lr=auto`
    trains with each of LEARNING_RATES and keeps the weights whose scores rank the
    validation examples best (`_ranking_area`; at a fixed λ, whose argmax costs least there).
  - Budgets: `lambda=λ` (≥ 0) trains once at that trade-off. Otherwise (`lambda` < 0, the
    default) λ is bisected on a log scale in [0, 1000] (10^(6t−3) − 10^−3, t ∈ [0, 1]), each
    candidate retraining every policy, so that the mean validation cost is the dearest
    within `budget`; then one offset t is added to every control node's final bias, t times
    the action's rank in the action order over (k − 1), and bisected on validation so the
    mean cost meets the budget closely (a cap, as for the baselines). Control nodes whose
    pipeline does not end in an `fc` with a bias get no offset.
  - Deterministic: every candidate λ restarts from the control nodes' initial weights; the
    order of examples and any dropout draw from generators seeded by the stage; the caller's
    global torch random state is left as it was.
  - A control node whose input depends on the route above it (a merge or a `select` of
    branches that other control nodes choose; logged as `route_dependent`) is trained on
    every input a route can feed it, and the simulation routes top down, each node reading
    what the actions above it feed it, as the executor does. The reported validation cost is
    always the real executor's; where it is over the budget (a head term decides from a
    pass of every node, where a merge sees every branch) one more shift toward the cheaper
    actions, bisected on the real cost, brings it under (`real_shift`).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..executor import Executor
from ..paths import action_order, current_head, parameter_count, static_paths
from ..policies import LearnedPolicy, Policy, evaluating, run_policy
from ..schema import Param, Schema
from .base import Trainer, register, trainer_error
from .baselines import MEASURES, HeadTermPolicy, decay_param, head_confidences, head_decay, weight_penalty
from .toolkit import PathTable, budget_param, calibrate, check_budget, final_bias, search_under_budget

__all__ = ["CostSensitiveTrainer", "LOSSES", "MULTICLASS", "lambda_at"]

LOSSES = ("error", "cross_entropy")
MULTICLASS = ("expected", "argmin", "filter_tree")

LAMBDA_STEPS = 6  # bisection steps on λ (each one retrains every policy; the offset then meets the budget)
OFFSET_STEPS = 40  # bisection steps on the final offset (a table lookup each)
REAL_STEPS = 16  # bisection steps on the shift that makes the real cost meet the budget (a validation pass each)
# `lr=auto`: every control node is trained with each rate from the same start, and the weights
# whose scores rank the validation examples best are kept (`_ranking_area`). One rate does not
# suit every pipeline: 0.05 suits a linear node, and killed the ReLUs of high_low's
# conv-and-fc Q1 (its scores became one constant, so no budget could split the examples).
# Judged by the objective on the training cache, 0.01 won there and left 17% of the
# validation examples with no live feature (one tied score: the budget could not be spent).
LEARNING_RATES = (0.05, 0.01, 0.002)
# Examples per policy step: an eighth of the training split, within these bounds, so that
# every epoch takes about eight Adam steps whatever the split's size.
_BATCH = (256, 4096)


def lambda_at(t: float) -> float:
    """The λ bisected for a budget: 0 at t = 0, 10^(6t − 3) − 10^−3 up to ≈ 1000 at t = 1.

    Example:
        >>> lambda_at(0.0), round(lambda_at(0.5), 3)
        (0.0, 0.999)
    """
    return 10.0 ** (6.0 * t - 3.0) - 1e-3


# --- the caches -----------------------------------------------------------------------------


class _SplitCache(PathTable):
    """What every route does on one split, computed once: the toolkit's path
    table (`correct[p]`, `fraction[p]`, `paths(matrix)`; a combination not seen yet is
    priced with `route` and, if it runs a set of nodes no known path runs, that path is
    run and added) with two more records per path.

    `loss[p]`: float64 [N], path p's loss per example. `variants[q]`: the distinct inputs
    control node q is fed, each for every example, captured (a forward pre-hook on its
    pipeline) in the forced passes of the paths through q; `variant_of[q][p]` is the variant path
    p feeds it (−1: p does not run q) and `variant_route[q][v]` the actions of the first,
    cheapest, path that feeds it variant v (the paths are added cheapest first). A node
    reads one variant unless a branch above it changes what it reads (a merge of the
    branches, a `select`): D²NN's chain feeds its Q3 four. `inputs[q]` is the first."""

    def __init__(self, executor: Executor, dataset, batch: int, device: torch.device, loss: str,
                 paths: list[tuple[dict[str, int], tuple[str, ...]]]):
        self.kind = loss
        self.x, self.n = dataset.tensors[0], len(dataset.tensors[1])
        self.output = executor.graph.outputs[0].name
        self.loss: list[np.ndarray] = []
        self.variants: dict[str, list[Tensor]] = {}
        self.variant_of: dict[str, list[int]] = {q.name: [] for q in executor.graph.control_nodes}
        self.variant_route: dict[str, list[dict[str, int]]] = {}
        self.heads: dict[str, Tensor] = {}  # control node → its head's features [N, 3] (`_head_table`)
        self._tables: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        cost = {n.name: n.cost for n in executor.graph.nodes}
        priced = sorted(((a, nodes, float(sum(cost[n] for n in nodes))) for a, nodes in paths),
                        key=lambda p: p[2])  # cheapest first
        super().__init__(executor, dataset, batch, device, priced)

    def record(self, forced: Mapping[str, Tensor], nodes: frozenset[str]) -> None:
        executor = self.executor
        forced = {q: int(a) for q, a in forced.items()}
        modules = executor.nodes
        watched = [q for q in self.controls if q in nodes and q in modules]
        parts: dict[str, list[Tensor]] = {q: [] for q in watched}
        hooks = [modules[q].register_forward_pre_hook(lambda m, args, q=q: parts[q].append(args[0].detach().clone()))
                 for q in watched]
        losses, rights = [], []
        try:
            # Not inference mode: the cached inputs train a policy later.
            with evaluating(executor, inference=False):
                for start in range(0, self.n, self.batch):
                    x = self.x[start:start + self.batch].to(self.device)
                    y = self.y[start:start + self.batch].to(self.device)
                    scores = executor(x, mode="force", actions=forced).outputs[self.output].float()
                    right = scores.argmax(1) == y
                    rights.append(right.cpu().numpy())
                    if self.kind == "cross_entropy":
                        losses.append(F.cross_entropy(scores, y, reduction="none").double().cpu().numpy())
                    else:
                        losses.append((~right).double().cpu().numpy())
        finally:
            for h in hooks:
                h.remove()
        for q in self.controls:
            if q not in watched:
                self.variant_of[q].append(-1)
                continue
            seen = torch.cat(parts[q])
            if len(seen) != self.n:  # a forced static path runs q on every example or none
                raise AssertionError(f"control node {q!r} ran on {len(seen)} of {self.n} examples of a static path")
            known = self.variants.setdefault(q, [])
            v = next((i for i, old in enumerate(known) if seen.shape == old.shape
                      and torch.allclose(seen, old, rtol=1e-5, atol=1e-6)), len(known))
            if v == len(known):
                known.append(seen)
                self.variant_route.setdefault(q, []).append(forced)
            self.variant_of[q].append(v)
        self.loss.append(np.concatenate(losses))
        self.correct = np.vstack([self.correct, np.concatenate(rights)[None]])

    @property
    def inputs(self) -> dict[str, Tensor]:
        return {q: v[0] for q, v in self.variants.items()}

    @property
    def route_dependent(self) -> set[str]:
        """The control nodes fed more than one input, depending on the route above them."""
        return {q for q, v in self.variants.items() if len(v) > 1}

    def variant(self, q: str, matrix: np.ndarray) -> np.ndarray:
        """Which of q's inputs each example reads under a routing [N, controls] (−1: q does
        not run). Only the actions of the control nodes above q matter."""
        return np.asarray(self.variant_of[q], dtype=np.int64)[self.paths(matrix)]

    def routing_outcome(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cost fraction float64 [N], loss float64 [N], correct bool [N]) of a routing, one row
        of actions [N, controls] per example of the split."""
        path = self.paths(matrix)  # may add paths, so the tables are stacked after it
        if self._tables is None or len(self._tables[0]) != len(self.fraction):
            self._tables = (np.asarray(self.fraction), np.stack(self.loss), self.correct)
        fraction, loss, correct = self._tables
        rows = np.arange(self.n)
        return fraction[path], loss[path, rows], correct[path, rows]


# --- learning one policy --------------------------------------------------------------------


def _weighted_ce(scores: Tensor, costs: Tensor) -> Tensor:
    """Cross-entropy to the cheapest action, weighted by the gap to the second cheapest
    (for two actions: importance-weighted binary classification, weight |c0 − c1|)."""
    ordered = costs.sort(1).values
    weight = ordered[:, 1] - ordered[:, 0]
    return (weight * F.cross_entropy(scores, costs.argmin(1), reduction="none")).mean()


def _expected_cost(scores: Tensor, costs: Tensor) -> Tensor:
    return (scores.softmax(1) * (costs - costs.min(1, keepdim=True).values)).sum(1).mean()


def _filter_tree(scores: Tensor, costs: Tensor, order: list[int]) -> Tensor:
    """The filter tree's weighted binary losses, leaves to root, over `order` (cheapest first):
    at each internal node the winners a, b of its two subtrees (by the current scores) meet;
    the label is the cheaper, the weight |c_a − c_b|, the classifier s_a − s_b."""
    n = scores.shape[0]
    slots = [torch.full((n,), a, dtype=torch.long, device=scores.device) for a in order]
    total = scores.new_zeros(())
    while len(slots) > 1:
        winners = []
        for i in range(0, len(slots) - 1, 2):
            a, b = slots[i][:, None], slots[i + 1][:, None]
            margin = (scores.gather(1, a) - scores.gather(1, b))[:, 0]
            ca, cb = costs.gather(1, a)[:, 0], costs.gather(1, b)[:, 0]
            total = total + ((ca - cb).abs() * F.binary_cross_entropy_with_logits(
                margin, (ca <= cb).to(margin.dtype), reduction="none")).mean()
            winners.append(torch.where(margin.detach() >= 0, slots[i], slots[i + 1]))
        if len(slots) % 2:
            winners.append(slots[-1])
        slots = winners
    return total


def _objective(method: str, scores: Tensor, costs: Tensor, order: list[int]) -> Tensor:
    """The loss a control node's scores are trained on, for its costs [n, k]."""
    if method == "expected":
        return _expected_cost(scores, costs)
    if method == "filter_tree":
        return _filter_tree(scores, costs, order)
    return _weighted_ce(scores, costs)  # binary, argmin


def _rank(order: list[int]) -> Tensor:
    """Each action's place in `order` (cheapest first) over k − 1: 0 for the cheapest, 1 for the dearest."""
    k = len(order)
    rank = torch.zeros(k)
    rank[torch.tensor(order)] = torch.arange(k, dtype=torch.float32) / max(k - 1, 1)
    return rank


def _ranking_area(scores: Tensor, fraction: Tensor, extra: Tensor, order: list[int]) -> float:
    """How well a control node's scores rank the examples, whatever the budget: the area
    under the curve of (mean cost fraction, mean extra loss) that its routing traces as an
    offset t · rank (rank: an action's place in `order` over k − 1) sweeps from everyone on
    the cheapest action to everyone on the dearest (257 offsets), over the cost it spans.
    Lower is better. A budget between two of the points buys the cheaper one's loss, so
    the curve is a step between them: scores tied on many examples, which switch together,
    leave a long step (a constant policy is one step from the cheapest end to the dearest)."""
    k = scores.shape[1]
    rank = _rank(order).to(scores.device, scores.dtype)
    reach = float(scores.max() - scores.min()) * max(k - 1, 1) + 1.0
    points = []
    with torch.no_grad():
        for t in np.linspace(-reach - 1.0, reach + 1.0, 257):
            chosen = (scores + t * rank).argmax(1, keepdim=True)
            points.append((float(fraction.gather(1, chosen).mean()), float(extra.gather(1, chosen).mean())))
    f, e = np.array(sorted(points)).T
    span = f[-1] - f[0]
    # A step between the points: a budget between two of them buys the cheaper one's loss
    # (examples tied in score switch together, so their jump cannot be split).
    return float((e[:-1] * np.diff(f)).sum() / span) if span > 0 else float(e.mean())


class _Scorer(nn.Module):
    """What `costsensitive` trains for one control node: the node's own pipeline on its input,
    plus, where the node has a current head, `term` — a linear map of the head's features
    (its `confidence` by every measure, `baselines.head_confidences`), zero at the start, so
    that training begins from the node alone."""

    def __init__(self, node: nn.Module, k: int, with_term: bool):
        super().__init__()
        self.node = node
        # skip_init: no draw from the caller's random stream for weights that start at zero.
        self.term = nn.utils.skip_init(nn.Linear, len(MEASURES), k) if with_term else None
        if self.term is not None:
            nn.init.zeros_(self.term.weight)
            nn.init.zeros_(self.term.bias)

    def forward(self, x: Tensor, head: Tensor | None) -> Tensor:
        scores = self.node(x).float()
        return scores if self.term is None else scores + self.term(head)

    def offset_bias(self, k: int) -> Tensor | None:
        """The bias that the budget's offset moves: the term's, else the node's final `fc`'s."""
        return self.term.bias if self.term is not None else final_bias(self.node, k)


@register
class CostSensitiveTrainer(Trainer):
    """Bolukbasi et al.'s policies: cost-sensitive classification per control node, deepest first."""

    name, role = "costsensitive", "policy"
    schema = Schema("costsensitive", (
        budget_param(0.5, alternative="lambda"),
        Param("lambda", "number", -1,
              doc="trade-off λ between loss and cost; < 0: bisect λ so the validation cost meets `budget`"),
        Param("loss", "choice", "error", choices=LOSSES,
              doc="the loss priced by λ: 0/1 error (the paper's) or the output's cross-entropy"),
        Param("multiclass", "choice", "expected", choices=MULTICLASS,
              doc="k > 2 actions: softmax expected cost, weighted cross-entropy to the cheapest, or a filter tree"),
        Param("epochs", "posint", 30, doc="passes over the cached training inputs per policy and λ"),
        Param("lr", "number", "auto", also=("auto",),
              doc="Adam's learning rate for the control nodes; `auto` trains each node with each of "
                  f"{', '.join(map(str, LEARNING_RATES))} and keeps the one whose scores rank the validation "
                  "examples best"),
        Param("heads", "bool", True,
              doc="add to each control node's scores a learned linear term on its current head's confidence "
                  "(max probability, entropy, margin), so that it can express a confidence threshold"),
        decay_param(),
    ), doc="learned policies, deepest first, by cost-sensitive classification (Bolukbasi et al., ANN)")

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.decay: dict[str, float] = {}  # control node → its L2 weight, set by `fit`
        bound = self.params
        check_budget(self, "lambda")
        if bound["lr"] != "auto" and not bound["lr"] > 0:
            raise trainer_error(self.name, f"lr={bound['lr']} cannot learn", help="give a learning rate above 0, e.g. lr=0.01")
        if bound["decay"] != "auto" and bound["decay"] < 0:
            raise trainer_error(self.name, f"`decay` must not be negative, not {bound['decay']}",
                                help="e.g. `decay=auto` or `decay=0` (none)")

    def check_graph(self, graph) -> None:
        if not graph.control_nodes:
            raise trainer_error(self.name, "the graph has no control node to learn a policy for",
                                help="use `static` (or no policy stage) for a graph without control nodes")
        for q in graph.control_nodes:
            if not parameter_count(graph, q.name):
                raise trainer_error(self.name, f"control node `{q.name}` has no parameters to learn",
                                    help=f"end `{q.name}`'s pipeline with a learnable layer, e.g. "
                                         f"`control {q.name} = confidence, fc({len(q.actions)})`, or use "
                                         "`threshold` / `uniform`, which need no weights")

    # --- fit ---

    def fit(self, executor: Executor, data, stage):
        started = time.perf_counter()
        graph = executor.graph
        self.check_graph(graph)
        self.controls = [q.name for q in graph.control_nodes]  # topological order
        self.widths = [len(q.actions) for q in graph.control_nodes]
        executor.to(stage.device)
        batch = max(int(stage.batch), 256)  # for the cached forward passes
        order = action_order(graph)
        paths = static_paths(graph, max_paths=1 << 30)
        self.order = order
        kind = str(self.params["loss"])
        train = _SplitCache(executor, data.train, batch, stage.device, kind, paths)
        val = _SplitCache(executor, data.val, batch, stage.device, kind, paths)
        missing = [q for q in self.controls if q not in train.inputs]
        if missing:
            raise trainer_error(self.name, f"no static path found runs control node `{missing[0]}`",
                                help="the graph has too many combinations of actions to list its paths")
        cost = {n.name: n.cost for n in graph.nodes}
        cheapest = {}
        for actions, nodes in sorted(paths, key=lambda p: sum(cost[n] for n in p[1])):
            for q in self.controls:
                if q in nodes and q not in cheapest:
                    cheapest[q] = actions
        # Control nodes above j take the actions of the cheapest path through j, so that every
        # example reaches j; those below decide with their trained policies.
        self.prefix = {j: {q: int(cheapest[j].get(q, 0)) for q in self.controls[:i]}
                       for i, j in enumerate(self.controls)}
        heads = {}
        if self.params["heads"]:
            heads = {q: h for q in self.controls if (h := current_head(graph, q, data.classes)) is not None}
        for cache in (train, val):
            cache.heads = _head_table(executor, cache, heads)
        self.decay = head_decay(graph, heads, self.params["decay"])
        modules = {q: _Scorer(executor.nodes[q], k, q in heads).to(stage.device)
                   for q, k in zip(self.controls, self.widths)}
        initial = {q: copy.deepcopy(m.state_dict()) for q, m in modules.items()}
        was_training = executor.training
        g = stage.generator("costsensitive")
        self.seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g, device=g.device))
        fits: dict[float, tuple[dict[str, Any], float]] = {}

        def fit_at(lam: float) -> float:
            """Train every policy at λ (deepest first); the simulated mean validation cost."""
            if lam not in fits:
                for q, m in modules.items():
                    m.load_state_dict(initial[q])
                self._fit_all(modules, train, val, lam)
                states = {q: copy.deepcopy(m.state_dict()) for q, m in modules.items()}
                fits[lam] = (states, float(val.routing_outcome(self._decisions(modules, val))[0].mean()))
            return fits[lam][1]

        try:
            offset = [0.0] * len(self.controls)
            if self.params["lambda"] >= 0:
                lam = float(self.params["lambda"])
                fit_at(lam)
            else:
                t, _ = calibrate(lambda t: fit_at(lambda_at(t)), self.params["budget"], 0.0, 1.0, steps=LAMBDA_STEPS)
                lam = lambda_at(t)
            for q, m in modules.items():
                m.load_state_dict(fits[lam][0][q])
            if self.params["lambda"] < 0:
                offset = self._calibrate_offset(modules, val, self.params["budget"])
            simulated = val.routing_outcome(self._decisions(modules, val))
        finally:
            executor.train(was_training)
        def policy_now() -> Policy:
            return LearnedPolicy() if not heads else HeadTermPolicy(
                heads, {q: modules[q].term.weight.double().tolist() for q in heads},
                {q: modules[q].term.bias.double().tolist() for q in heads})

        policy = policy_now()
        cost_fraction, accuracy = _policy_outcome(executor, policy, data.val, batch, stage.device)
        dependent = train.route_dependent | val.route_dependent
        shift = 0.0
        if self.params["lambda"] < 0 and cost_fraction > self.params["budget"]:
            # The simulation is exact but for a head term's inputs (a pass of every node,
            # where a merge sees every branch) and rounding; the real executor spent more
            # than the budget. Budgets are caps:
            # one more offset, toward the cheaper actions on every node, bisected on the
            # real validation cost.
            moved = [0.0]  # the shift the biases carry now

            def real_cost(t: float) -> float:
                self._shift(modules, t - moved[0])
                moved[0] = t
                return _policy_outcome(executor, policy_now(), data.val, batch, stage.device)[0]

            low = -1.0
            while real_cost(low) > self.params["budget"] and low > -1e6:
                low *= 4
            shift, _ = calibrate(real_cost, self.params["budget"], low, 0.0, steps=REAL_STEPS)
            self._shift(modules, shift - moved[0])  # the biases at the chosen shift (priced below)
            offset = [o + shift for o in offset]
            policy = policy_now()
            cost_fraction, accuracy = _policy_outcome(executor, policy, data.val, batch, stage.device)
        stage.log(**{"lambda": lam, "offset": " ".join(f"{o:.6g}" for o in offset), "real_shift": shift,
                     "val_cost_fraction": cost_fraction, "val_accuracy": accuracy,
                     "simulated_val_cost_fraction": float(simulated[0].mean()),
                     "lambdas_tried": len(fits), "route_dependent": " ".join(sorted(dependent)),
                     "heads": " ".join(f"{q}:{h}" for q, h in heads.items()),
                     "seconds": round(time.perf_counter() - started, 3)})
        return policy

    # --- the pieces ---

    def _decisions(self, modules: Mapping[str, _Scorer], cache: _SplitCache) -> np.ndarray:
        """Every control node's argmax, top down, on the input its route feeds it: actions [N, controls]."""
        return _ScoreBook(modules, cache).route()

    def _fit_all(self, modules: Mapping[str, nn.Module], train: _SplitCache, val: _SplitCache, lam: float) -> None:
        """Algorithm 1: each control node in reverse topological order, on its action costs on
        `train` (with `lr=auto`, the rate whose scores rank the `val` examples best)."""
        choosing = self.params["lr"] == "auto"  # the validation examples only judge the rates
        for i in reversed(range(len(self.controls))):
            j = self.controls[i]
            self._train(modules[j], j, self._examples(modules, train, i),
                        self._examples(modules, val, i) if choosing else None, lam, self.order[j], i)

    def _examples(self, modules: Mapping[str, nn.Module], cache: _SplitCache,
                  i: int) -> tuple[Tensor, Tensor | None, np.ndarray, np.ndarray]:
        """What the i-th control node j learns from on one split: its inputs, its head's
        features, and for each of its actions the cost fraction of the route and the extra
        loss (loss − the best reachable)₊, with the nodes below j deciding by their
        policies. A node fed several inputs (by the routes above it) gets each, with the
        costs of the cheapest route that feeds it that one."""
        j, k, n = self.controls[i], self.widths[i], cache.n
        book = _ScoreBook(modules, cache)  # every node below j has its policy now
        fractions, extras = [], []
        for v in range(len(cache.variants[j])):
            above = self.prefix[j] if v == 0 else {q: cache.variant_route[j][v][q] for q in self.controls[:i]}
            fraction, loss = np.empty((n, k)), np.empty((n, k))
            for a in range(k):
                fixed = {q: np.full(n, b) for q, b in {**above, j: a}.items()}
                fraction[:, a], loss[:, a], _ = cache.routing_outcome(book.route(fixed))
            fractions.append(fraction)
            extras.append(np.maximum(loss - loss.min(1, keepdims=True), 0.0))  # (·)₊ over the best reachable
        variants, head = cache.variants[j], cache.heads.get(j)
        return (torch.cat(variants), None if head is None else head.repeat(len(variants), 1),
                np.concatenate(fractions), np.concatenate(extras))

    def _train(self, module: _Scorer, q: str, train: tuple[Tensor, Tensor | None, np.ndarray, np.ndarray],
               val: tuple[Tensor, Tensor | None, np.ndarray, np.ndarray] | None, lam: float, order: list[int],
               index: int) -> None:
        """Train control node q (the index-th) on `train` (`_examples`) to the action costs
        c = λ · extra loss + cost fraction. With several rates (`lr=auto`) keep the weights
        whose scores rank the `val` examples best (`_ranking_area`) when a budget sets the
        offset later (what a rate must show then is the ranking, not where its bias ends),
        else those whose argmax costs least on `val` (None with one rate: nothing to choose)."""
        x, head, fraction, extra = train
        costs = lam * extra + fraction
        gap = costs.max(1) - costs.min(1)
        if not gap.max() > 0:
            return  # every action costs the same for every example: nothing to prefer
        device = next(module.parameters()).device
        c = torch.from_numpy(costs / gap.mean()).float().to(device)  # unit mean gap: one lr for every λ
        method = "binary" if c.shape[1] == 2 else str(self.params["multiclass"])
        rates = LEARNING_RATES if self.params["lr"] == "auto" else (float(self.params["lr"]),)
        start = copy.deepcopy(module.state_dict())
        best: tuple[float, dict[str, Tensor]] | None = None
        for lr in rates:
            module.load_state_dict(start)
            self._descend(module, x, head, c, order, method, lr, index, self.decay.get(q, 0.0))
            if len(rates) == 1:
                return
            scores = _scores(module, val[0], val[1])
            fraction_val, extra_val = torch.from_numpy(val[2]), torch.from_numpy(val[3])
            if self.params["lambda"] < 0:  # a budget: an offset is calibrated afterwards
                value = _ranking_area(scores, fraction_val, extra_val, order)
            else:  # λ as given, and the argmax as it is: the cost the policy gets
                value = float((lam * extra_val + fraction_val).gather(1, scores.argmax(1, keepdim=True)).mean())
            if best is None or value < best[0]:
                best = (value, copy.deepcopy(module.state_dict()))
        module.load_state_dict(best[1])

    def _descend(self, module: _Scorer, x: Tensor, head: Tensor | None, c: Tensor, order: list[int], method: str,
                 lr: float, index: int, decay: float = 0.0) -> None:
        """`epochs` passes of Adam at `lr` on the cached inputs, in steps of an eighth of them, on
        the objective plus decay · ‖weights‖² of the node's own weight matrices."""
        n = len(c)
        step = min(max(math.ceil(n / 8), _BATCH[0]), _BATCH[1])
        optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
        g = torch.Generator().manual_seed(self.seed + 7919 * (index + 1))
        device = c.device
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(self.seed + index)  # dropout in a control node's pipeline, if any
            module.train()
            for _ in range(int(self.params["epochs"])):
                perm = torch.randperm(n, generator=g).to(device)
                for start in range(0, n, step):
                    idx = perm[start:start + step]
                    scores = module(x[idx], None if head is None else head[idx])
                    objective = _objective(method, scores, c[idx], order)
                    objective = objective + weight_penalty(module.node, decay)
                    optimizer.zero_grad(set_to_none=True)
                    objective.backward()
                    optimizer.step()
            module.eval()

    def _calibrate_offset(self, modules: Mapping[str, _Scorer], cache: _SplitCache, budget: float) -> list[float]:
        """One offset t for all control nodes, bias += t · rank / (k − 1), bisected on validation
        so that the mean cost meets the budget; then one offset per node searched from it
        (`_search_offsets`); folded into each scorer's `offset_bias`. Returns the offsets."""
        book = _ScoreBook(modules, cache)
        ranks = self._ranks(modules)
        if not any(bool(r.any()) for r in ranks.values()):
            return [0.0] * len(self.controls)
        spread = max(float(max(s.max() for s in book.all(q)) - min(s.min() for s in book.all(q))) * max(k - 1, 1)
                     for q, k in zip(self.controls, self.widths))
        reach = spread + 1.0

        def actions(t: float) -> np.ndarray:
            return book.route(shift={q: t * ranks[q] for q in self.controls})

        # A higher t moves every node's argmax toward dearer actions (never cheaper ones).
        t, _ = calibrate(lambda t: float(cache.routing_outcome(actions(t))[0].mean()), budget, -reach, reach,
                         steps=OFFSET_STEPS)
        # The bisection stops next to the offset where some example changes its route; the
        # middle of the interval of offsets that route every example the same is as cheap
        # and safe from rounding (the executor computes the scores in other batches).
        low, high = -reach, reach
        chosen = actions(t)
        for c, q in enumerate(self.controls):
            s, r = book.on_route(q, chosen).double(), ranks[q].double()
            a = torch.from_numpy(chosen[:, c])
            dr = r[None, :] - r[a][:, None]  # r_b − r_a
            bound = (s.gather(1, a[:, None]) - s) / torch.where(dr == 0, torch.ones_like(dr), dr)
            if bool((dr > 0).any()):
                high = min(high, float(bound[dr > 0].min()))
            if bool((dr < 0).any()):
                low = max(low, float(bound[dr < 0].max()))
        if low < high and np.array_equal(actions((low + high) / 2), chosen):
            t = (low + high) / 2
        offsets = self._search_offsets(book, ranks, cache, budget, t, reach)
        with torch.no_grad():
            for q, k, o in zip(self.controls, self.widths, offsets):
                bias = modules[q].offset_bias(k)
                if bias is not None:
                    bias.add_((o * ranks[q]).to(bias.device, bias.dtype))
        return offsets

    def _ranks(self, modules: Mapping[str, _Scorer]) -> dict[str, Tensor]:
        """Each control node's actions' ranks in its action order, over (k − 1): what one unit
        of offset adds to their scores (zeros where the node has no bias to move)."""
        return {q: _rank(self.order[q]) if modules[q].offset_bias(k) is not None else torch.zeros(k)
                for q, k in zip(self.controls, self.widths)}

    def _shift(self, modules: Mapping[str, _Scorer], t: float) -> None:
        """Add t · rank to every control node's offset bias (t < 0: toward cheaper actions)."""
        with torch.no_grad():
            for (q, r), k in zip(self._ranks(modules).items(), self.widths):
                bias = modules[q].offset_bias(k)
                if bias is not None:
                    bias.add_((t * r).to(bias.device, bias.dtype))

    def _search_offsets(self, book: _ScoreBook, ranks: Mapping[str, Tensor], cache: _SplitCache,
                        budget: float, shared: float, reach: float) -> list[float]:
        """One offset per control node, searched from the shared one (`search_under_budget`)
        for the most right answers on validation within the budget: one offset on every node
        can only trade the cheapest routes against the dearest. A node's grid is 64 quantiles
        of the offsets at which some example's argmax changes."""
        def outcome(offsets: list[float]) -> tuple[float, float]:
            matrix = book.route(shift={q: o * ranks[q] for q, o in zip(self.controls, offsets)})
            fraction, _, correct = cache.routing_outcome(matrix)
            return float(correct.sum()), float(fraction.mean())

        grids = []
        for q in self.controls:
            s, r = torch.cat(book.all(q)).double(), ranks[q].double()
            dr = r[None, :] - r[:, None]  # [a, b]: r_b − r_a
            if not bool((dr > 0).any()):
                grids.append(np.array([shared]))  # no bias to move: the knob does nothing
                continue
            # a → b (dearer) once s_a − s_b < o · (r_b − r_a)
            flips = ((s[:, :, None] - s[:, None, :]) / torch.where(dr > 0, dr, torch.ones_like(dr)))[:, dr > 0]
            grids.append(np.unique(np.quantile(flips.flatten().numpy(), np.linspace(0.0, 1.0, 64))))
        bounds = [(-reach, reach)] * len(self.controls)
        return search_under_budget(outcome, grids, bounds, budget, [[shared] * len(self.controls)])


def _scores(module: _Scorer, x: Tensor, head: Tensor | None) -> Tensor:
    """A control node's scores on cached inputs, float32 CPU [N, k]."""
    module.eval()
    with torch.no_grad():
        return torch.cat([module(x[i:i + 4096], None if head is None else head[i:i + 4096]).cpu()
                          for i in range(0, len(x), 4096)])


class _ScoreBook:
    """Every control node's scores on each of its inputs in a split's cache, computed once
    (the policies are not trained while one is in use), and the routing they make."""

    def __init__(self, modules: Mapping[str, _Scorer], cache: _SplitCache):
        self.modules, self.cache = modules, cache
        self.controls = cache.controls
        self._scores: dict[tuple[str, int], Tensor] = {}

    def get(self, q: str, v: int = 0) -> Tensor:
        """q's scores [N, k] on its input variant v."""
        if (q, v) not in self._scores:
            self._scores[q, v] = _scores(self.modules[q], self.cache.variants[q][v], self.cache.heads.get(q))
        return self._scores[q, v]

    def all(self, q: str) -> list[Tensor]:
        """q's scores on every input variant."""
        return [self.get(q, v) for v in range(len(self.cache.variants[q]))]

    def on_route(self, q: str, matrix: np.ndarray) -> Tensor:
        """q's scores on the input each example reads under a routing [N, controls]."""
        if len(self.cache.variants[q]) == 1:
            return self.get(q)
        v = np.maximum(self.cache.variant(q, matrix), 0)  # where q does not run its action does not matter
        table = torch.stack(self.all(q))
        return table[torch.from_numpy(v), torch.arange(self.cache.n)]

    def route(self, fixed: Mapping[str, np.ndarray] | None = None,
              shift: Mapping[str, Tensor] | None = None) -> np.ndarray:
        """The actions [N, controls] the policies take, top down: a node in `fixed` takes the
        actions given there, every other one the argmax of its scores (plus `shift[q]`, a
        bias [k]) on the input the actions above it feed it."""
        fixed, shift = fixed or {}, shift or {}
        matrix = np.zeros((self.cache.n, len(self.controls)), dtype=np.int64)
        for c, q in enumerate(self.controls):
            if q in fixed:
                matrix[:, c] = fixed[q]
            else:
                s = self.on_route(q, matrix)
                matrix[:, c] = (s + shift[q] if q in shift else s).argmax(1).numpy()
        return matrix


def _head_table(executor: Executor, cache: _SplitCache, heads: Mapping[str, str]) -> dict[str, Tensor]:
    """Each control node's head features on every example of a split, float32 [N, 3], on the
    device of the cached inputs (nothing when no control node has a head)."""
    if not heads:
        return {}
    parts: dict[str, list[Tensor]] = {h: [] for h in set(heads.values())}
    with evaluating(executor):
        for start in range(0, cache.n, cache.batch):
            _, found = head_confidences(executor, cache.x[start:start + cache.batch].to(cache.device), heads.values())
            for h, feats in found.items():
                parts[h].append(feats)
    return {q: torch.cat(parts[h]).float().to(cache.inputs[q].device) for q, h in heads.items()}


def _policy_outcome(executor: Executor, policy: Policy, dataset, batch: int, device: torch.device) -> tuple[float, float]:
    """The real mean cost fraction and accuracy of the policy on a split."""
    x_all, y_all = dataset.tensors
    cost, right = 0.0, 0
    output = executor.graph.outputs[0].name
    with evaluating(executor, inference=False):
        for start in range(0, len(y_all), batch):
            x, y = x_all[start:start + batch].to(device), y_all[start:start + batch].to(device)
            r = run_policy(executor, policy, x)
            cost += float(r.cost_fraction.double().sum())
            right += int((r.outputs[output].argmax(1) == y).sum())
    n = max(len(y_all), 1)
    return cost / n, right / n

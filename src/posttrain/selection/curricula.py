"""Curricula that choose which prompts to sample (``chooses = True``; the contract is in base.py).

Each is bound to the train split once and then hands the loop ``choose(k)`` prompts a step. None
filters or refills: every chosen group is trained on (``cures`` with ``replay_fraction`` > 0 hands
over fewer and the loop fills the batch from its replay buffer). Randomness comes from a
``random.Random`` seeded with ``trainer.seed`` and checkpointed with the rest of the state, so a
resume is exact.

The learning signal of ``sec`` and ``dump`` is |A| for GRPO's group-normalised advantage of the
rewards, computed by posttrain's ``grpo`` estimator (unbiased group std, eps 1e-6, 0 for a group
whose rewards all agree), whatever advantage estimator the run itself trains with.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from typing import Any, Callable, Optional

import torch

from posttrain.algorithms.advantages import grpo
from posttrain.algorithms.base import AdvantageConfig, AdvantageInput
from posttrain.selection.base import SELECTORS, ScoredGroups, SelectionConfig, Selector
from posttrain.selection.replay import ReplayBuffer
from posttrain.tasks.base import Problem


def abs_advantages(batch: ScoredGroups) -> torch.Tensor:
    """[N] float64 |A_i|, A_i = (r_i - mean_g r) / (std_g r + 1e-6), from posttrain's grpo estimator."""
    mask = torch.ones(len(batch.rewards), 1, dtype=torch.float64)
    return grpo(AdvantageInput(batch.rewards, batch.group_ids, mask), AdvantageConfig())[:, 0].abs()


def softmax(values: list[float], temperature: float) -> list[float]:
    top = max(values)
    e = [math.exp((v - top) / temperature) for v in values]
    return [x / sum(e) for x in e]


def sec_arm(p: Problem) -> str:
    return p.category or p.source or "all"


def dump_arm(p: Problem) -> str:
    return p.source or p.category or "all"


class ArmQueues:
    """Per arm, a seeded shuffled walk over its prompts, one epoch after another.

    Arm a's epoch e visits every prompt of a once, in the order of
    ``random.Random(f"{seed}/{a}/{e}")``; the state is one position per arm. ``bind`` keeps
    positions already loaded, so a checkpoint may be restored before or after it.
    """

    def __init__(self, key: Callable[[Problem], str]):
        self.key, self.seed = key, 0
        self.prompts: dict[str, list[Problem]] = {}
        self.positions: dict[str, int] = {}
        self._orders: dict[str, tuple[int, list[int]]] = {}  # arm -> (epoch, its order)

    def bind(self, problems: list[Problem], seed: int) -> None:
        self.seed, self.prompts, self._orders = seed, {}, {}
        for p in problems:
            self.prompts.setdefault(self.key(p), []).append(p)
        for arm in self.prompts:
            self.positions.setdefault(arm, 0)

    def arms(self) -> list[str]:
        return sorted(self.prompts)

    def next(self, arm: str) -> Problem:
        items = self.prompts[arm]
        epoch, i = divmod(self.positions[arm], len(items))
        if self._orders.get(arm, (None,))[0] != epoch:
            order = list(range(len(items)))
            random.Random(f"{self.seed}/{arm}/{epoch}").shuffle(order)
            self._orders[arm] = (epoch, order)
        self.positions[arm] += 1
        return items[self._orders[arm][1][i]]


class ChoosingSelector(Selector):
    """Shared by the curricula: the bound train split and the selector's own generator."""

    chooses = True

    def __init__(self, cfg: SelectionConfig, num_completions: int):
        super().__init__(cfg, num_completions)
        self.problems: list[Problem] = []
        self.rng: Optional[random.Random] = None  # seeded in bind unless a checkpoint restored it first

    @property
    def bound(self) -> bool:
        return bool(self.problems)

    def bind(self, problems: list[Problem], seed: int) -> None:
        if not problems:
            raise ValueError(f"selection {self.name!r}: the train split is empty")
        self.problems = list(problems)
        if self.rng is None:
            self.rng = random.Random(seed)

    def _require_bound(self) -> random.Random:
        if not self.bound or self.rng is None:
            raise RuntimeError(f"selection {self.name!r}: choose() before bind()")
        return self.rng

    def state_dict(self) -> dict[str, Any]:
        return {"rng": None if self.rng is None else self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["rng"] is not None:
            version, internal, gauss = state["rng"]
            self.rng = random.Random()
            self.rng.setstate((version, tuple(internal), gauss))


class ArmBandit(ChoosingSelector):
    """A ChoosingSelector that draws an arm per prompt from ``probabilities()``, then its next prompt."""

    arm_of: Callable[[Problem], str]  # a subclass sets it (a staticmethod)

    def __init__(self, cfg: SelectionConfig, num_completions: int):
        super().__init__(cfg, num_completions)
        self.queues = ArmQueues(self.arm_of)

    def bind(self, problems: list[Problem], seed: int) -> None:
        super().bind(problems, seed)
        self.queues.bind(self.problems, seed)

    def probabilities(self) -> dict[str, float]:
        raise NotImplementedError

    def choose(self, k: int) -> list[Problem]:
        rng = self._require_bound()
        probs = self.probabilities()
        arms = list(probs)
        return [self.queues.next(rng.choices(arms, weights=[probs[a] for a in arms])[0]) for _ in range(k)]

    def arm_groups(self, batch: ScoredGroups) -> dict[str, list[torch.Tensor]]:
        """Per arm in the batch, the |A| of each of its groups' rollouts."""
        adv, out = abs_advantages(batch), {}
        for problem, rows in zip(batch.problems, batch.rows_of):
            out.setdefault(self.arm_of(problem), []).append(adv[rows])
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "positions": dict(self.queues.positions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.queues.positions.update({a: int(v) for a, v in state["positions"].items()})


@SELECTORS.register("sec", paper="Self-Evolving Curriculum for LLM Reasoning (arXiv:2505.14970)")
class SEC(ArmBandit):
    """Self-evolving curriculum: a non-stationary bandit over categories, trained by TD(0).

    r_a = mean over arm a's groups g in the batch of mean_i |A_gi|;   Q_a <- Q_a + alpha (r_a - Q_a)
    p_a = softmax(Q / temperature)_a;   each of the k prompts: arm a ~ p, then a's next prompt

    An arm is ``problem.category`` (else ``problem.source``, else "all"); Q starts at 0 and only
    arms seen in a batch are updated. The defaults ``selection.alpha`` = 0.5 and
    ``selection.temperature`` = 1.0 are those of the paper's released Countdown command (its math
    runs set temperature 0.4, its 2-D runs 0.2). Logs ``selection/q/<arm>``, ``selection/p/<arm>``.
    """

    arm_of = staticmethod(sec_arm)

    def __init__(self, cfg: SelectionConfig, num_completions: int):
        super().__init__(cfg, num_completions)
        self.q: dict[str, float] = {}

    def bind(self, problems: list[Problem], seed: int) -> None:
        super().bind(problems, seed)
        for arm in self.queues.arms():
            self.q.setdefault(arm, 0.0)

    def observe(self, batch: ScoredGroups, epoch: int) -> None:
        for arm, groups in self.arm_groups(batch).items():
            r = sum(float(a.mean()) for a in groups) / len(groups)
            q = self.q.get(arm, 0.0)
            self.q[arm] = q + self.cfg.alpha * (r - q)

    def probabilities(self) -> dict[str, float]:
        arms = sorted(self.q)
        return dict(zip(arms, softmax([self.q[a] for a in arms], self.cfg.temperature)))

    def metrics(self) -> dict[str, float]:
        return {**{f"selection/q/{a}": q for a, q in sorted(self.q.items())},
                **{f"selection/p/{a}": p for a, p in self.probabilities().items()}}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "q": dict(self.q)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.q.update({a: float(v) for a, v in state["q"].items()})


@SELECTORS.register("dump", paper="DUMP: Automated Distribution-Level Curriculum Learning for RL-based LLM "
                                  "Post-training (arXiv:2504.09710)")
class DUMP(ArmBandit):
    """Distribution-level curriculum: UCB over sources on the recent mean |advantage|.

    UCB_j = mean(W_j) + c sqrt(2 ln N / n_j),   p = softmax(UCB / temperature)

    W_j holds arm j's last ``selection.window`` per-rollout |A| (default 300, as in the paper's
    code), n_j counts the rollouts observed from arm j, N = sum_j n_j, c = ``selection.ucb_c``
    (default 1.0). The bonus is the paper code's sqrt(2 ln N / n_j), without its +1 smoothing of
    N and n_j: an arm never sampled has UCB = +inf, and while some are, the k prompts come from
    those arms uniformly. An arm is ``problem.source`` (else ``problem.category``, else "all").
    The paper's code uses temperature 0.1; posttrain's default is 1.0. Logs
    ``selection/ucb/<arm>`` and ``selection/adv/<arm>`` (tried arms only) and ``selection/p/<arm>``.
    """

    arm_of = staticmethod(dump_arm)

    def __init__(self, cfg: SelectionConfig, num_completions: int):
        super().__init__(cfg, num_completions)
        self.windows: dict[str, deque] = {}
        self.counts: dict[str, int] = {}

    def _arm(self, arm: str) -> None:
        self.windows.setdefault(arm, deque(maxlen=self.cfg.window))
        self.counts.setdefault(arm, 0)

    def bind(self, problems: list[Problem], seed: int) -> None:
        super().bind(problems, seed)
        for arm in self.queues.arms():
            self._arm(arm)

    def observe(self, batch: ScoredGroups, epoch: int) -> None:
        for arm, groups in self.arm_groups(batch).items():
            self._arm(arm)
            for adv in groups:
                self.windows[arm].extend(adv.tolist())
                self.counts[arm] += len(adv)

    def ucb(self) -> dict[str, float]:
        total = sum(self.counts.values())
        return {a: math.inf if n == 0 else
                sum(self.windows[a]) / len(self.windows[a]) + self.cfg.ucb_c * math.sqrt(2 * math.log(total) / n)
                for a, n in sorted(self.counts.items())}

    def probabilities(self) -> dict[str, float]:
        ucb = self.ucb()
        untried = [a for a, u in ucb.items() if u == math.inf]
        if untried:
            return {a: (1 / len(untried) if a in untried else 0.0) for a in ucb}
        return dict(zip(ucb, softmax(list(ucb.values()), self.cfg.temperature)))

    def metrics(self) -> dict[str, float]:
        tried = {a: u for a, u in self.ucb().items() if u != math.inf}
        return {**{f"selection/ucb/{a}": u for a, u in tried.items()},
                **{f"selection/adv/{a}": sum(self.windows[a]) / len(self.windows[a]) for a in tried},
                **{f"selection/p/{a}": p for a, p in self.probabilities().items()}}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "windows": {a: list(w) for a, w in self.windows.items()},
                "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for arm, values in state["windows"].items():
            self.windows[arm] = deque((float(v) for v in values), maxlen=self.cfg.window)
        self.counts.update({a: int(n) for a, n in state["counts"].items()})


@SELECTORS.register("cures", paper="CurES: From Gradient Analysis to Efficient Curriculum Learning for Reasoning "
                                   "LLMs (arXiv:2510.01037); rollout replay from DOTS (arXiv:2506.05316)")
class CurES(ChoosingSelector):
    """Prompt sampling by a Beta-Bernoulli posterior of each prompt's pass rate, with rollout replay.

    p_x = (1 + s_x) / (2 + s_x + f_x)   (posterior mean of Beta(1 + s_x, 1 + f_x))
    w_x = sqrt(p_x (1 - p_x));   the fresh prompts are drawn without replacement, P ~ w_x

    s_x / f_x count the correct / incorrect fresh rollouts of prompt x so far (replayed groups are
    not counted twice); an unseen prompt has p = 0.5, the largest weight. w_x is the Bernoulli
    reward's std, to which the expected GRPO gradient norm of a prompt is proportional: this is
    posttrain's reading of CurES's gradient analysis (catalog 004-31: "the abstract gives no
    closed-form rule"), not a closed form taken from the paper. The draw is Efraimidis-Spirakis
    (the largest log(u_x) / w_x), i.e. successive sampling; when more prompts are wanted than the
    train split holds, every round of len(split) prompts is distinct.

    Rollout replay (``selection.replay_fraction`` rho > 0), as in "Improving Data Efficiency for
    LLM Reinforcement Fine-tuning Through Difficulty-targeted Online Data Selection and Rollout
    Replay" (DOTS, arXiv:2506.05316, catalog 003-17), at step t with k = rollout.num_prompts:

        B_t = buffered groups sampled at step t_g with t - t_g <= selection.max_replay_age
        m_t = min(floor(rho k), |B_t|) groups drawn uniformly without replacement from B_t
        k - m_t fresh prompts by w_x above; only those are generated (k - m_t) x num_completions

    so the batch keeps k groups. After the step, the fresh groups whose rewards differ enter a
    FIFO buffer of ``selection.replay_size`` groups (the newest group of a prompt replaces its
    older ones, as the DOTS code's de-duplication does); a replayed group stays in it and may be
    replayed again until it is too old or evicted. The bound on age is posttrain's (DOTS bounds
    the buffer's size only). A replayed sample keeps its ``policy_version``, so ``staleness/*``
    count it, and the configured train-inference correction (``algorithm.correction``, required
    when rho > 0) reweights it by pi_theta / pi_behaviour, as for the ``replay`` selector.
    While the buffer is short (the first step, rho k > |B_t|) more prompts are generated fresh.

    Not implemented: CurES's other half, allocating rollouts per prompt (every prompt gets
    rollout.num_completions), and DOTS's difficulty predictor (an attention-based similarity to a
    small reference set whose pass rates are measured); this posterior replaces it, so every
    prompt's difficulty comes from its own earlier rollouts. Logs ``selection/posterior_pass_rate``
    (mean p_x of the fresh prompts), ``selection/prompts_seen``, ``selection/replayed_groups``,
    ``selection/rollouts_generated``, ``selection/buffer_groups`` and the steps since the replayed
    groups were sampled, ``selection/replay_staleness_mean`` and ``_max`` (0 with none).
    """

    def __init__(self, cfg: SelectionConfig, num_completions: int):
        super().__init__(cfg, num_completions)
        self.outcomes: dict[str, list[int]] = {}  # prompt id -> [correct, incorrect] rollouts so far
        self.chosen_pass_rate = 0.5
        self.buffer = ReplayBuffer(cfg.replay_size, cfg.max_replay_age, one_per_prompt=True)
        # choose() gets no step: it serves the step after the last remember() (None before one;
        # the buffer is empty then). replay() checks that the loop agrees.
        self.next_step: Optional[int] = None
        self.set_aside: list[tuple[Problem, Any]] = []  # choose() -> replay() within one step
        self.staleness: list[int] = []  # of this step's replayed groups
        self.generated = 0  # rollouts generated this step

    def pass_rate(self, problem: Problem) -> float:
        s, f = self.outcomes.get(problem.id, (0, 0))
        return (1 + s) / (2 + s + f)

    def weight(self, problem: Problem) -> float:
        p = self.pass_rate(problem)
        return math.sqrt(p * (1 - p))

    def choose(self, k: int) -> list[Problem]:
        rng, out = self._require_bound(), []
        drawn = [] if self.next_step is None else \
            self.buffer.sample(self.cfg.replayed_groups(k), self.next_step, rng)
        self.set_aside = [(p, g) for p, g, _ in drawn]
        self.staleness = [age for _, _, age in drawn]
        fresh = k - len(drawn)
        while len(out) < fresh:
            keys = [math.log(1.0 - rng.random()) / self.weight(p) for p in self.problems]  # log u, u in (0, 1]
            take = heapq.nlargest(min(fresh - len(out), len(keys)), range(len(keys)), key=keys.__getitem__)
            out += [self.problems[i] for i in take]
        self.chosen_pass_rate = sum(self.pass_rate(p) for p in out) / len(out)
        self.generated = len(out) * self.num_completions
        return out

    def observe(self, batch: ScoredGroups, epoch: int) -> None:
        for problem, rows in zip(batch.problems, batch.rows_of):
            s = int(batch.correct[rows].sum())
            counts = self.outcomes.setdefault(problem.id, [0, 0])
            counts[0] += s
            counts[1] += len(rows) - s

    def replay(self, k: int, step: int) -> list[tuple[Problem, Any]]:
        if k != len(self.set_aside) or (self.set_aside and step != self.next_step):
            raise RuntimeError(f"selection 'cures': asked for {k} replayed groups at step {step}, but choose() set "
                               f"aside {len(self.set_aside)} for step {self.next_step}; the loop must call choose, "
                               f"replay and remember once per step, in that order")
        out, self.set_aside = self.set_aside, []
        return out

    def remember(self, groups: list[tuple[Problem, Any]], step: int) -> None:
        if self.cfg.replay_fraction > 0:  # without replay, keep no rollouts (nor checkpoint them)
            for problem, group in groups:
                self.buffer.add(problem, group, step)
        self.next_step = step + 1

    def metrics(self) -> dict[str, float]:
        stale = self.staleness
        return {"selection/posterior_pass_rate": self.chosen_pass_rate,
                "selection/prompts_seen": float(len(self.outcomes)),
                "selection/replayed_groups": float(len(stale)),
                "selection/rollouts_generated": float(self.generated),
                "selection/buffer_groups": float(len(self.buffer)),
                "selection/replay_staleness_mean": sum(stale) / len(stale) if stale else 0.0,
                "selection/replay_staleness_max": float(max(stale, default=0))}

    def state_dict(self) -> dict[str, Any]:
        if self.set_aside:  # they would be lost: the trainer checkpoints between steps only
            raise RuntimeError("selection 'cures': state_dict() between choose() and replay() would drop "
                               f"{len(self.set_aside)} set-aside groups")
        return {**super().state_dict(), "outcomes": {x: list(c) for x, c in self.outcomes.items()},
                "chosen_pass_rate": self.chosen_pass_rate, "entries": list(self.buffer.entries),
                "next_step": self.next_step, "staleness": list(self.staleness), "generated": self.generated}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.outcomes = {x: [int(s), int(f)] for x, (s, f) in state["outcomes"].items()}
        self.chosen_pass_rate = float(state["chosen_pass_rate"])
        # checkpoints from before rollout replay have no buffer: an empty one, as at step 0
        self.buffer.entries = list(state.get("entries", []))
        self.next_step = None if state.get("next_step") is None else int(state["next_step"])
        self.staleness = [int(a) for a in state.get("staleness", [])]
        self.generated = int(state.get("generated", 0))

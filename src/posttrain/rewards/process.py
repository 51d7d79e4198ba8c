"""Process (step-level) rewards: per-step scores that reach the trainer as token rewards.

The step-reward contract
------------------------
A completion's **steps** are its lines: the text is split on ``"\\n"`` and every line holding a
non-whitespace character is one step (blank lines are not steps). A step **ends** at the
character after its last non-whitespace character (``split_steps``). A step-level reward is a
Reward (``rewards.base``) that, besides its scalar ``rewards`` (the *outcome*, or success,
reward), puts in each completion's ``info`` under ``STEP_REWARDS_KEY`` the list of
``[end, score]`` pairs of its steps, ``end`` a character offset into the completion text, and
has ``step_level = True``. The trainer (``trainers/rl.py``) maps each step to the token whose
decoded prefix first reaches the step's end (``step_token_rewards``) and fills
``Rollouts.token_rewards`` [N, T]: the step's score on that token, NaN on every other one.

Who reads them (``algorithm.advantage_estimator``): ``pure`` takes the min of the future step
scores (``algorithms.advantages_token.pure``, catalog 001-10); ``gae`` and
``reinforce_plus_plus`` add them to the outcome reward on the last token (NaN counts as 0),
which is 003-14's "success reward + shaped process reward". Config refuses ``pure`` without a
step-level reward, a step-level reward with an estimator that would ignore its steps, a step
reward inside a wrapper (composite, noisy, darling: the steps would not reach the trainer) and
one with an environment (``step_reward_issue``).

Rewards here
------------
* ``step_verifier``: a verifier PRM for line-by-line arithmetic (``tasks.stepwise_arithmetic``):
  step k scores 1 when it is a true equation ``<expr> = <integer>`` whose result is the
  generator's k-th intermediate value (``problem.metadata["values"]``; without it any true
  equation), else 0. Outcome: 1 when the last integer of the completion equals the answer.
* ``prefix_prm``: any reward used as a PRM over prefixes: step k's score is the inner reward of
  the completion cut after step k (e.g. a learned ``reward_model``), the outcome is an optional
  ``outcome`` reward (0 without one).

The two step-level rewards take ``shaping`` (``shape_step_rewards``): ``none``, or 003-14's
``clip`` / ``delta`` / ``clip_delta``, which bound the sum of a trajectory's step rewards so that
repeating correct but unnecessary steps stops paying ("On Designing Effective RL Reward at
Training Time for LLM Reasoning", arXiv:2410.15115).

Also here, not step-level: ``reasoning_pattern``, 003-22's Reasoning Pattern Reward, an outcome
reward that pays for key reasoning phrases without checking the answer (it rewards the process,
not the result).
"""

from __future__ import annotations

import ast
import re
from typing import Any, Optional, Sequence

from posttrain.rewards.base import Reward, RewardOutput, problem_issue
from posttrain.rewards.registry import build_reward, register_reward
from posttrain.tasks.base import Problem

__all__ = ["REASONING_PATTERNS", "SHAPINGS", "STEP_ESTIMATORS", "STEP_REWARDS_KEY", "STEP_REWARD_TYPES",
           "PrefixPRMReward", "ReasoningPatternReward", "StepVerifierReward", "repeated_ngram_ratio",
           "shape_step_rewards", "split_steps", "step_reward_issue", "step_token_rewards"]

# info[i][key] = [[end offset, score], ...] of completion i (environments' per-turn "step_rewards" are another thing)
STEP_REWARDS_KEY = "step_scores"
STEP_REWARD_TYPES = ("step_verifier", "prefix_prm")
# Advantage estimators that read AdvantageInput.token_rewards (algorithms/advantages_token.py)
STEP_ESTIMATORS = ("gae", "reinforce_plus_plus", "pure", "optimal_token_baseline")
SHAPINGS = ("none", "clip", "delta", "clip_delta")
WRAPPERS = ("composite", "noisy", "darling")  # reward types that hold inner reward specs


def split_steps(text: str) -> list[tuple[str, int]]:
    """The steps of ``text`` as ``(step text, end offset)``: one per line with a non-whitespace
    character, stripped; ``end`` is the offset just after its last non-whitespace character.

    >>> split_steps("12+7=19\\n\\n 19*3=57 \\n")
    [('12+7=19', 7), ('19*3=57', 17)]
    """
    steps, start = [], 0
    for line in text.split("\n"):
        stripped = line.rstrip()
        if stripped.strip():
            steps.append((stripped.strip(), start + len(stripped)))
        start += len(line) + 1
    return steps


def shape_step_rewards(scores: Sequence[float], shaping: str = "none", eta: float = 1.0) -> list[float]:
    """003-14's refinements of PRM step scores s_1..s_K (arXiv:2410.15115, Gao et al.):

    * ``clip``:  r_k = min(s_k - eta, 0). Every step reward is <= 0, so the sum over a
      trajectory is bounded above by 0: extra steps can only cost. With 0/1 verifier scores and
      eta = 1, a correct step gets 0 and a wrong one -1.
    * ``delta``: r_k = s_k - s_{k+1} for k < K and r_K = 0. The sum from step t telescopes to
      s_t - s_K, bounded whatever the number of steps.
    * ``clip_delta``: ``clip`` then ``delta`` (our composition order: the paper evaluates the
      two also together; the card does not fix the order).
    * ``none``: r_k = s_k.

    The success (outcome) reward is added on the last token by the estimator, not here. The
    card's formulas are the figure's reading of the paper (catalog 003-14 says so); the last
    Delta step dropping to 0 is the figure's crossed-out final bar.
    """
    if shaping not in SHAPINGS:
        raise ValueError(f"step reward shaping must be one of {list(SHAPINGS)}, got {shaping!r}")
    out = [float(s) for s in scores]
    if shaping in ("clip", "clip_delta"):
        out = [min(s - eta, 0.0) for s in out]
    if shaping in ("delta", "clip_delta"):
        out = [out[k] - out[k + 1] for k in range(len(out) - 1)] + ([0.0] if out else [])
    return out


def _check_shaping(kind: str, shaping: Any, clip_eta: Any) -> None:
    if shaping not in SHAPINGS:
        raise ValueError(f"reward {kind}: shaping must be one of {list(SHAPINGS)} (003-14's clip / delta, or none), "
                         f"got {shaping!r}")
    if isinstance(clip_eta, bool) or not isinstance(clip_eta, (int, float)) or clip_eta != clip_eta:
        raise ValueError(f"reward {kind}: clip_eta must be a number (the Clip threshold eta), got {clip_eta!r}")


def _step_output(rewards: list[float], step_scores: list[list[tuple[int, float]]], shaping: str, eta: float,
                 components: dict[str, list[float]]) -> RewardOutput:
    """RewardOutput of a step-level reward: shaped [end, score] pairs in each info, and the
    components every step reward logs (steps, step_return = sum of shaped step rewards, step_min)."""
    infos, n_steps, returns, minima = [], [], [], []
    for pairs in step_scores:
        shaped = shape_step_rewards([s for _, s in pairs], shaping, eta)
        infos.append({STEP_REWARDS_KEY: [[end, r] for (end, _), r in zip(pairs, shaped)]})
        n_steps.append(float(len(pairs)))
        returns.append(float(sum(shaped)))
        minima.append(min(shaped) if shaped else 0.0)
    components = {**components, "steps": n_steps, "step_return": returns, "step_min": minima}
    return RewardOutput(rewards=rewards, components=components, info=infos)


# ---------------------------------------------------------------------------- verifier PRM
_EQUATION = re.compile(r"^(?P<expr>[0-9+\-*()\s]+?)\s*=\s*(?P<value>[-+]?\d+)\s*\.?$")
_INTEGER = re.compile(r"[-+]?\d+")
_MAX_EXPR = 200  # characters: longer "steps" are not checked (no huge products from a runaway sample)


def _evaluate(expr: str) -> Optional[int]:
    """Integer value of ``expr`` (+, -, *, parentheses, integer literals), None if it is anything else."""
    if len(expr) > _MAX_EXPR:
        return None
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        return None
    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}

    def walk(node: ast.AST) -> Optional[int]:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = walk(node.operand)
            return None if v is None else (-v if isinstance(node.op, ast.USub) else v)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            a, b = walk(node.left), walk(node.right)
            return None if a is None or b is None else ops[type(node.op)](a, b)
        return None

    return walk(tree.body)


def verify_step(line: str, expected: Optional[int] = None) -> bool:
    """A step is right when it is ``<expr> = <integer>`` with expr == integer and, if the generator
    knows the step's value (``expected``), the integer is that value.

    >>> verify_step("19 * 3 = 57"), verify_step("19 * 3 = 56"), verify_step("1 + 1 = 2", expected=57)
    (True, False, False)
    """
    m = _EQUATION.match(line)
    if m is None:
        return False
    value = int(m.group("value"))
    return _evaluate(m.group("expr")) == value and (expected is None or value == expected)


@register_reward("step_verifier")
class StepVerifierReward:
    """Verifier PRM for line-by-line arithmetic: step k of a completion scores

        s_k = 1  if line k is "<expr> = <int>", expr evaluates to int, and int == values[k]
        s_k = 0  otherwise (a false equation, prose, or a step past the generator's last one)

    where ``values = problem.metadata["values"]`` are the intermediate results the generator
    knows (``tasks.stepwise_arithmetic``); a problem without them gets any true equation scored
    1. The outcome reward is 1 when the completion's last integer equals ``problem.answer``
    (component ``correct``, which held-out accuracy reads), else 0. ``shaping`` / ``clip_eta``:
    ``shape_step_rewards``. Components: correct, step_accuracy (right steps / steps, 0 with
    none), steps, step_return, step_min.
    """

    name = "step_verifier"
    step_level = True

    def __init__(self, shaping: str = "none", clip_eta: float = 1.0):
        _check_shaping(self.name, shaping, clip_eta)
        self.shaping, self.clip_eta = shaping, float(clip_eta)

    def check_problem(self, problem: Problem) -> Optional[str]:
        if problem.answer is None or not re.fullmatch(r"[-+]?\d+", str(problem.answer).strip()):
            return f"problem {problem.id!r} has answer {problem.answer!r}, not an integer: step_verifier checks integer " \
                   "arithmetic (use task stepwise_arithmetic)"
        values = problem.metadata.get("values")
        if values is not None and not all(type(v) is int for v in values):
            return f"problem {problem.id!r} has metadata values {values!r}: step_verifier needs a list of integers"
        return None

    def step_scores(self, problem: Problem, completion: str) -> list[tuple[int, float]]:
        """``(end offset, s_k)`` of each step, unshaped."""
        values = problem.metadata.get("values")
        out = []
        for k, (line, end) in enumerate(split_steps(completion)):
            if values is not None and k >= len(values):
                out.append((end, 0.0))  # a step the solution does not have: unnecessary, not progress
                continue
            out.append((end, 1.0 if verify_step(line, values[k] if values is not None else None) else 0.0))
        return out

    def __call__(self, problem: Problem, completions: Sequence[str]) -> RewardOutput:
        issue = self.check_problem(problem)
        if issue:
            raise ValueError(issue)
        answer = int(str(problem.answer).strip())
        correct, accuracy, scores = [], [], []
        for c in completions:
            integers = _INTEGER.findall(c)
            correct.append(1.0 if integers and int(integers[-1]) == answer else 0.0)
            steps = self.step_scores(problem, c)
            scores.append(steps)
            accuracy.append(sum(s for _, s in steps) / len(steps) if steps else 0.0)
        return _step_output(list(correct), scores, self.shaping, self.clip_eta,
                            {"correct": list(correct), "step_accuracy": accuracy})


# ---------------------------------------------------------------------------- any reward as a PRM
@register_reward("prefix_prm")
class PrefixPRMReward:
    """A reward used as a process reward model over prefixes:

        s_k = inner(problem, completion[: end_k])      (the completion cut after step k)

    so an outcome reward model (``{type: reward_model, ...}``) scores partial solutions, the usual
    way to get step scores from an ORM. The inner reward sees the K prefixes of one completion as
    its group, so use a per-sample reward (a verifier or a learned model), not a group reward.
    ``outcome`` (a reward spec, optional) gives the scalar success reward (0 without one; its
    components are logged as ``outcome/...``). ``shaping`` / ``clip_eta``: ``shape_step_rewards``.
    Cost: one inner call per completion, on all of its prefixes.
    """

    name = "prefix_prm"
    step_level = True

    def __init__(self, reward: Any, outcome: Optional[Any] = None, shaping: str = "none", clip_eta: float = 1.0,
                 tokenizer: Optional[Any] = None):
        _check_shaping(self.name, shaping, clip_eta)
        self.inner = self._build(reward, "reward", tokenizer)
        self.outcome = self._build(outcome, "outcome", tokenizer) if outcome is not None else None
        self.shaping, self.clip_eta = shaping, float(clip_eta)

    @staticmethod
    def _build(spec: Any, what: str, tokenizer: Optional[Any]) -> Reward:
        if isinstance(spec, dict):
            if spec.get("type") in STEP_REWARD_TYPES + ("majority_vote",):
                raise ValueError(f"reward prefix_prm: its {what} {spec.get('type')!r} cannot score prefixes one by one; "
                                 "use a per-sample reward such as {type: reward_model, ...} or {type: numeric}")
            return build_reward(spec, tokenizer=tokenizer)
        if callable(spec) and hasattr(spec, "name"):
            return spec
        raise ValueError(f"reward prefix_prm: {what!r} must be a reward spec such as {{type: numeric}}, got {spec!r}")

    def check_problem(self, problem: Problem) -> Optional[str]:
        return problem_issue(self.inner, problem) or (problem_issue(self.outcome, problem) if self.outcome else None)

    def __call__(self, problem: Problem, completions: Sequence[str]) -> RewardOutput:
        scores = []
        for c in completions:
            ends = [end for _, end in split_steps(c)]
            values = self.inner(problem, [c[:end] for end in ends]).rewards if ends else []
            scores.append([(end, float(v)) for end, v in zip(ends, values)])
        components: dict[str, list[float]] = {}
        rewards = [0.0] * len(completions)
        if self.outcome is not None:
            out = self.outcome(problem, completions)
            rewards = [float(r) for r in out.rewards]
            components = {f"outcome/{k}": list(v) for k, v in out.components.items()}
            if "correct" in out.components:  # held-out accuracy reads it
                components["correct"] = list(out.components["correct"])
        return _step_output(rewards, scores, self.shaping, self.clip_eta, components)


# ---------------------------------------------------------------------------- reasoning-pattern reward (003-22)
# Phrases that mark a reasoning move (planning, checking, backtracking, concluding); lower case, matched as
# substrings of the lower-cased completion. Each counts once however often it occurs.
REASONING_PATTERNS = (
    "first, ", "firstly, ", "next, ", "then, ", "finally, ", "i need to", "we need to", "let me first", "let's first",
    "let me check", "let me verify", "let me see", "let me try", "let's try", "try again", "wait", "alternatively",
    "on the other hand", "does not work", "doesn't work", "not correct", "we know that", "we can see ", "since we ",
    "because ", "therefore", "thus", "hence", "as a result", "consequently", "if we ", "for example",
)


def repeated_ngram_ratio(text: str, n: int) -> float:
    """(distinct word n-grams occurring more than once) / (word n-grams in ``text``); 0 with none.

    >>> repeated_ngram_ratio("a b a b a", 2)   # a b, b a, a b, b a: both distinct bigrams repeat
    0.5
    """
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    counts: dict[tuple, int] = {}
    for g in grams:
        counts[g] = counts.get(g, 0) + 1
    return sum(1 for c in counts.values() if c > 1) / len(grams)


@register_reward("reasoning_pattern")
class ReasoningPatternReward:
    """Reasoning Pattern Reward (RPR) of "The Climb Carves Wisdom Deeper Than the Summit: On the
    Noisy Rewards in Learning to Reason" (arXiv:2505.22653, catalog 003-22): reward the appearance
    of key reasoning phrases, without checking the answer.

        r = max(0, min(1, |{p in patterns : p in lower(text)}| / norm) - rep_n(text))

    with rep_n the share of repeated word n-grams (``repeated_ngram_ratio``, n = ``ngram``), which
    stops a completion from earning its phrases by looping. With ``require_answer`` a completion
    with no extractable answer (``rewards.extract.extract_answer``) gets 0. norm = 20, n = 20 and
    the answer gate follow the authors' released scorer; its phrase list (40 phrases) is not
    copied: ``REASONING_PATTERNS`` is ours, in the same spirit, and ``patterns`` replaces it. The
    authors' extra penalty for a completion that writes a new "user:" turn belongs to their prompt
    template and is left out. Components: ``patterns`` (distinct phrases found), ``repetition``.
    No ``correct`` component: evaluate with a verifier (``eval_reward``).
    """

    name = "reasoning_pattern"

    def __init__(self, patterns: Optional[list[str]] = None, norm: float = 20.0, ngram: int = 20,
                 require_answer: bool = True):
        chosen = list(REASONING_PATTERNS if patterns is None else patterns)
        if not chosen or not all(isinstance(p, str) and p.strip() for p in chosen):
            raise ValueError(f"reward reasoning_pattern: patterns must be a non-empty list of phrases, got {patterns!r}")
        if isinstance(norm, bool) or not isinstance(norm, (int, float)) or not norm > 0:
            raise ValueError(f"reward reasoning_pattern: norm must be > 0 (phrases for the full reward), got {norm!r}")
        if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 1:
            raise ValueError(f"reward reasoning_pattern: ngram must be an integer >= 1, got {ngram!r}")
        self.patterns = [p.lower() for p in chosen]
        self.norm, self.ngram, self.require_answer = float(norm), ngram, bool(require_answer)

    def __call__(self, problem: Problem, completions: Sequence[str]) -> RewardOutput:
        from posttrain.rewards.extract import extract_answer

        rewards, found, repetition = [], [], []
        for c in completions:
            low = c.lower()
            k = sum(1 for p in self.patterns if p in low)
            rep = repeated_ngram_ratio(low, self.ngram)
            gated = self.require_answer and extract_answer(c) is None
            rewards.append(0.0 if gated else max(0.0, min(1.0, k / self.norm) - rep))
            found.append(float(k))
            repetition.append(rep)
        return RewardOutput(rewards=rewards, components={"patterns": found, "repetition": repetition})


# ---------------------------------------------------------------------------- config and trainer side
def _nested_step_types(spec: Any, top: bool = True) -> list[str]:
    """Step-level reward types inside wrappers of ``spec`` (not the top level itself)."""
    if isinstance(spec, list):
        return [t for s in spec for t in _nested_step_types(s, False)]
    if not isinstance(spec, dict):
        return []
    found = [] if top or spec.get("type") not in STEP_REWARD_TYPES else [spec["type"]]
    if spec.get("type") in WRAPPERS:
        for key in ("parts", "reward"):
            found += _nested_step_types(spec.get(key), False)
    return found


def step_reward_issue(reward: dict, estimator: str, environment: Optional[dict] = None) -> Optional[tuple[str, str]]:
    """``(config key, message)`` when the reward spec and the advantage estimator do not fit the
    step-reward contract (module docstring), else None. Called by config before any work."""
    step_level = isinstance(reward, dict) and reward.get("type") in STEP_REWARD_TYPES
    if estimator == "pure" and not step_level:
        return ("algorithm.advantage_estimator",
                f"pure needs per-step process rewards (a PRM's step scores): set reward.type to one of "
                f"{list(STEP_REWARD_TYPES)} (e.g. reward={{type: step_verifier}} with task stepwise_arithmetic), "
                "or choose another estimator")
    nested = _nested_step_types(reward)
    if nested:
        return ("reward", f"holds the step-level reward {nested[0]!r} inside a wrapper ({'/'.join(WRAPPERS)}), where "
                          "its step scores would not reach the trainer; make it the top-level reward")
    if step_level and estimator not in STEP_ESTIMATORS:
        return ("reward", f"{reward['type']!r} is a step-level reward, but algorithm.advantage_estimator={estimator} "
                          f"reads only the outcome reward, so its step scores would be ignored; use one of "
                          f"{list(STEP_ESTIMATORS)}, or an outcome reward (e.g. numeric)")
    if step_level and environment is not None:
        return ("reward", f"{reward['type']!r} is a step-level reward; multi-turn environments score episodes "
                          "themselves and pass no step scores: remove the environment or use an outcome reward")
    return None


def _token_at(tokenizer: Any, ids: list[int], end: int) -> int:
    """Index of the first token whose decoded prefix (as the engine decodes: special tokens
    skipped) has at least ``end`` characters; the last token if none has (binary search: the
    prefix length grows with the number of tokens)."""
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[:mid], skip_special_tokens=True)) >= end:
            hi = mid
        else:
            lo = mid + 1
    return lo - 1


def step_token_rewards(rollouts: Any, tokenizer: Any):
    """[N, T] float32: each step's score on the token that ends it, NaN elsewhere (the contract
    of ``pure``; gae / reinforce_plus_plus count NaN as 0). ``rollouts`` is a
    ``rollout.batch.Rollouts`` read by attribute (completion_ids, completion_mask, metadata); a
    sample without step scores (no steps, or a reward error) has a row of NaN. Two steps ending
    on the same token (a multi-line token) add up there."""
    import torch

    n, t_len = rollouts.completion_ids.shape
    out = torch.full((n, t_len), float("nan"))
    lengths = rollouts.completion_mask.sum(-1).long().tolist()
    for i, meta in enumerate(rollouts.metadata):
        pairs = meta.get(STEP_REWARDS_KEY) or []
        if not pairs or lengths[i] == 0:
            continue
        ids = rollouts.completion_ids[i, : lengths[i]].tolist()
        for end, score in pairs:
            t = _token_at(tokenizer, ids, int(end))
            out[i, t] = (0.0 if torch.isnan(out[i, t]) else out[i, t]) + float(score)
    return out

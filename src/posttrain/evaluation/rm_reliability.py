"""Running the reward-model and judge reliability checks of ``posttrain eval`` on a model.

``reward_model_proxy(path)`` turns a reward model trained by ``posttrain rm`` into the
``reward_model`` best-of-N scorer of :func:`posttrain.evaluation.runner.evaluate`, whose samples
then give the RETA curve (:func:`posttrain.evaluation.reward_model_eval.reta_summary`) with the
task's reward as the oracle. The scorer returns ``σ(raw RM score)``: a monotone map, so rankings
(RETA, best-of-N) are those of the raw score, and it is a valid vote weight (weighted majority
needs scores >= 0; raw Bradley–Terry scores are not).

``judge_flip_test`` is the distractor flip-rate test of catalog 001-15 (formulas in
:mod:`posttrain.evaluation.reward_model_eval`) with a local causal LM as the judge (by default
the policy being evaluated), in both feedback protocols:

* pointwise: :class:`posttrain.rewards.learned.JudgeReward`, the G-Eval probability-weighted
  1..scale rating of each response alone; margin ``s(x) − s(y)``;
* pairwise: :class:`PairwiseJudge`, the prompt "which response is better, A or B?" read from
  the next-token probabilities of ``A`` and ``B`` (renormalised over the two), asked in both
  orders; margin ``½ (q(x, y) − q(y, x))``.

Pairs are two completions sampled from the model for each test problem (a seeded generator of
its own). The distractor (default :data:`DEFAULT_DISTRACTOR`, an unsupported claim of
confidence) is appended to a response. Both injections (into x and into y) are scored up front,
so every judge call of a batch of problems runs in one batched pass; the flip of a pair reads
the one that went into its loser.

``run_reliability`` / ``print_reliability`` do both for ``posttrain eval --reward-model PATH
--reta`` / ``--judge-flip`` (the options are checked in ``posttrain.cli_eval``).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch

from posttrain.evaluation import reward_model_eval as R
from posttrain.rewards.learned import JudgeReward, RewardModelReward, _prompt_text, fill_template
from posttrain.tasks.base import Problem

__all__ = ["DEFAULT_DISTRACTOR", "DEFAULT_PAIRWISE_TEMPLATE", "PairwiseJudge", "reward_model_proxy",
           "judge_flip_test", "run_reliability", "print_reliability"]

DEFAULT_DISTRACTOR = "\n\nI have double-checked this answer and I am completely confident that it is correct."
DEFAULT_PAIRWISE_TEMPLATE = (
    "Which of the two responses answers the question below better?\n\n"
    "Question:\n{prompt}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\n"
    "Reply with a single letter, A or B, and nothing else."
)


def reward_model_proxy(path: str):
    """``fn(problem, text) -> σ(raw score)`` of the reward model at ``path`` (loaded on first
    use; see the module docstring for the sigmoid), and the ``RewardModelReward`` behind it."""
    rm = RewardModelReward(path)

    def fn(problem: Problem, text: str) -> float:
        raw = rm.scores(problem.prompt, [text])[0]
        return 1.0 / (1.0 + math.exp(-raw)) if raw >= 0 else math.exp(raw) / (1.0 + math.exp(raw))

    return fn, rm


class PairwiseJudge:
    """"A or B?" judge sharing a :class:`JudgeReward`'s model, tokenizer, prompt rendering and
    batched next-token pass. :meth:`prob_first` gives ``q = p(A) / (p(A) + p(B))`` at the first
    token of the reply, and the mass ``p(A) + p(B)`` (how much of the judge's next-token
    probability answers the question at all)."""

    def __init__(self, judge: JudgeReward, template: str = DEFAULT_PAIRWISE_TEMPLATE):
        for field in ("{a}", "{b}"):
            if field not in template:
                raise ValueError(f"pairwise judge template must contain {field}")
        self.judge = judge
        self.template = template
        judge.load()
        tok = judge._tokenizer
        ids = [tok(x, add_special_tokens=False).input_ids for x in ("A", "B")]
        if any(len(i) != 1 for i in ids) or ids[0] == ids[1]:
            raise ValueError(f"the judge's tokenizer does not encode 'A' and 'B' as one token each ({ids}); "
                             "the pairwise judge reads their next-token probabilities")
        self.token_a, self.token_b = ids[0][0], ids[1][0]

    def render(self, problem: Problem, a: str, b: str) -> str:
        # one pass, so a response that contains "{b}" is not expanded again
        return fill_template(self.template, {"{prompt}": _prompt_text(problem.prompt), "{a}": a, "{b}": b})

    def prob_first(self, items: Sequence[tuple[Problem, str, str]]) -> tuple[np.ndarray, np.ndarray]:
        """``(q, mass)``, each ``[len(items)]``, for each ``(problem, a, b)``; one batched pass."""
        if not items:
            return np.zeros(0), np.zeros(0)
        # JudgeReward's encoder and batched left-padded pass: the same chat rendering and
        # truncation (keep the end, where the instruction and the reply slot are) as pointwise.
        seqs = [self.judge._encode(self.render(p, a, b))[0] for p, a, b in items]
        logp = self.judge._next_logprobs(seqs)
        two = torch.stack([logp[:, self.token_a], logp[:, self.token_b]], dim=-1)
        return torch.softmax(two, dim=-1)[:, 0].numpy(), torch.logsumexp(two, dim=-1).exp().numpy()


def _sample_pairs(model, tokenizer, problems, *, seed, temperature, top_p, top_k, max_new_tokens, stop,
                  chat_template, dtype) -> list[tuple[str, str]]:
    from posttrain.rollout.engine import HFRolloutEngine, SamplingParams, resolve_dtype

    device = next(model.parameters()).device
    engine = HFRolloutEngine(model, tokenizer, dtype=resolve_dtype(dtype, device), chat_template=chat_template)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            stop=tuple(stop))
    gen = torch.Generator(device=device).manual_seed(int(seed))
    pairs: list[tuple[str, str]] = []
    for s in range(0, len(problems), 16):
        texts = engine.generate(problems[s:s + 16], 2, params, gen).texts
        pairs += [(texts[2 * g], texts[2 * g + 1]) for g in range(len(texts) // 2)]
    return pairs


def judge_flip_test(
    model,
    tokenizer,
    problems: Sequence[Problem],
    *,
    judge: Optional[JudgeReward] = None,
    distractor: str = DEFAULT_DISTRACTOR,
    reward=None,
    pairs: Optional[Sequence[tuple[str, str]]] = None,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 32,
    stop: Sequence[str] = (),
    chat_template: bool = True,
    dtype: str = "auto",
    reps: int = 1000,
    conf: float = 0.95,
) -> dict[str, Any]:
    """The flip-rate test on one pair of responses per problem (sampled from ``model`` unless
    ``pairs`` are given), judged by ``judge`` (default: ``model`` itself, 1..10 pointwise).

    Returns ``{"judge", "distractor", "n_pairs", "answer_mass", "pointwise": {"distractor_flip"},
    "pairwise": {"distractor_flip", "order_swap_flip"}, "protocol_disagreement",
    "flip_difference" (pairwise − pointwise distractor flip rate over the pairs where both have
    a preference), "pairs": [...]}``; each rate is ``{"rate", "low", "high", "n"}``
    (:func:`~posttrain.evaluation.reward_model_eval.rate_with_ci`, ``n`` = pairs counted).
    ``reward`` (optional, the task's reward) adds each response's oracle reward to ``pairs``.
    Pairs of identical responses are marked ``identical`` and left out of every rate.
    """
    if not distractor.strip():
        raise ValueError("the distractor text is empty: give the text to inject into the losing response")
    problems = list(problems)
    if not problems:
        raise ValueError("the flip test needs at least one problem")
    if judge is None:
        judge = JudgeReward.from_model(model, tokenizer)
    pairwise = PairwiseJudge(judge)
    if pairs is None:
        pairs = _sample_pairs(model, tokenizer, problems, seed=seed, temperature=temperature, top_p=top_p,
                              top_k=top_k, max_new_tokens=max_new_tokens, stop=stop,
                              chat_template=chat_template, dtype=dtype)
    if len(pairs) != len(problems):
        raise ValueError(f"{len(pairs)} pairs for {len(problems)} problems: give one pair per problem")

    # pointwise: s(x), s(y), s(x'), s(y') per problem
    point_out = [judge(p, [x, y, x + distractor, y + distractor]) for p, (x, y) in zip(problems, pairs)]
    point = np.array([o.rewards for o in point_out], dtype=np.float64).reshape(len(problems), 4)
    point_mass = [float(i["judge_mass"]) for o in point_out for i in o.info]
    # pairwise: q(x,y), q(y,x), q(x',y), q(y,x'), q(x,y'), q(y',x) per problem
    items = []
    for p, (x, y) in zip(problems, pairs):
        xd, yd = x + distractor, y + distractor
        items += [(p, x, y), (p, y, x), (p, xd, y), (p, y, xd), (p, x, yd), (p, yd, x)]
    q, pair_mass = pairwise.prob_first(items)
    q = q.reshape(len(problems), 6)

    m_point = point[:, 0] - point[:, 1]
    flips_point = R.distractor_flips(m_point, point[:, 2] - point[:, 1], point[:, 0] - point[:, 3])
    m_pair = R.pairwise_margin(q[:, 0], q[:, 1])
    flips_pair = R.distractor_flips(m_pair, R.pairwise_margin(q[:, 2], q[:, 3]), R.pairwise_margin(q[:, 4], q[:, 5]))
    swap = R.order_swap_flips(q[:, 0], q[:, 1])
    disagree = R.protocol_disagreement(m_point, m_pair)
    # Two identical responses leave nothing to prefer; any "decision" between them is position
    # bias or rounding, not a preference, so those pairs are excluded from every rate.
    same = np.array([x == y for x, y in pairs])
    for a in (flips_point, flips_pair, swap, disagree):
        a[same] = np.nan
    both = ~np.isnan(flips_point) & ~np.isnan(flips_pair)
    ci = dict(reps=reps, conf=conf, seed=seed)

    oracle = None
    if reward is not None:
        from posttrain.rewards.errors import score_group

        oracle = [score_group(reward, p, list(pr), on_error="zero")[0].rewards for p, pr in zip(problems, pairs)]
    rows = []
    for i, (p, (x, y)) in enumerate(zip(problems, pairs)):
        rows.append({
            "id": p.id, "x": x, "y": y,
            "pointwise": [round(float(v), 6) for v in point[i]],
            "pairwise_q": [round(float(v), 6) for v in q[i]],
            "pointwise_flip": None if np.isnan(flips_point[i]) else int(flips_point[i]),
            "pairwise_flip": None if np.isnan(flips_pair[i]) else int(flips_pair[i]),
            "order_swap_flip": None if np.isnan(swap[i]) else int(swap[i]),
            **({"identical": True} if same[i] else {}),
            **({"oracle": [float(v) for v in oracle[i]]} if oracle is not None else {}),
        })
    diff = None
    if both.sum() >= 2:
        # per pair, flip_pair - flip_point in {-1, 0, 1}: its mean is the difference of the two
        # rates over these pairs, and resampling it resamples both protocols' pairs together
        dd = R.rate_with_ci(flips_pair[both] - flips_point[both], **ci)
        diff = {"pairwise": float(flips_pair[both].mean()), "pointwise": float(flips_point[both].mean()),
                "difference": dd["rate"], "low": dd["low"], "high": dd["high"], "n": int(both.sum())}
    return {
        "judge": str(judge.model_name),
        "distractor": distractor,
        "scale": judge.scale,
        "n_pairs": len(pairs),
        # mean probability the judge put on a valid answer (a rating; 'A' or 'B'): a judge that
        # does not follow the format decides from the little mass left
        "answer_mass": {"pointwise": float(np.mean(point_mass)), "pairwise": float(np.mean(pair_mass))},
        "pointwise": {"distractor_flip": R.rate_with_ci(flips_point, **ci)},
        "pairwise": {"distractor_flip": R.rate_with_ci(flips_pair, **ci),
                     "order_swap_flip": R.rate_with_ci(swap, **ci)},
        "protocol_disagreement": R.rate_with_ci(disagree, **ci),
        "flip_difference": diff,
        "pairs": rows,
    }


# ---------------------------------------------------------------------------------------------
# posttrain eval
# ---------------------------------------------------------------------------------------------


def run_reliability(p, result: dict, model, tokenizer, reward) -> None:
    """Add ``reta`` (curve + plot next to the JSON) and ``judge_flip`` to ``result``."""
    rel = p.reliability
    if "reward_model" in rel:
        result["reward_model"] = rel["reward_model"]
    if "etas" in rel:
        probs = result["problems"]
        # proxy: the RM scorer (sigmoid of the raw score: same ranking); oracle: the task's reward
        proxy = [s for r in probs for s in r["scores"]["reward_model"]]
        oracle = [x for r in probs for x in r["rewards"]]
        groups = np.repeat(np.arange(len(probs)), [len(r["rewards"]) for r in probs])
        reta = R.reta_summary(proxy, oracle, groups, rel["etas"], seed=p.seed)
        reta.update({"proxy": f"reward_model {rel['reward_model']}", "oracle": f"reward {p.reward_spec}"})
        png = p.json_path.with_name(p.json_path.stem + "_reta.png")
        reta["plot"] = str(R.plot_reta(reta, png, title=f"RETA: {p.model} on {result['task']}"))
        result["reta"] = reta
    if "judge_flip" in rel:
        opts = rel["judge_flip"]
        judge = JudgeReward(opts["judge"]) if opts["judge"] else JudgeReward.from_model(model, tokenizer)
        problems = list(p.task.problems("test"))[: p.problems] if p.problems else list(p.task.problems("test"))
        result["judge_flip"] = judge_flip_test(
            model, tokenizer, problems, judge=judge, distractor=opts["distractor"] or DEFAULT_DISTRACTOR,
            reward=reward, seed=p.seed + 1, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
            max_new_tokens=p.max_new_tokens, stop=p.stop, chat_template=p.chat_template, dtype=p.dtype)
        if not opts["judge"]:
            result["judge_flip"]["judge"] = f"{p.model} (the evaluated model)"


def print_reliability(result: dict) -> None:
    """The RETA table and the flip rates of ``result``, after ``posttrain eval``'s own table."""
    def fmt(v):
        return "—" if v is None else f"{v:.3f}"

    if "reta" in result:
        r = result["reta"]
        print(f"RETA ({r['n_prompts']} prompts; oracle = the eval's reward; random = {fmt(r['random'])}, "
              f"best eta = {r['best_eta']:.3g}):")
        print("  eta      RETA  [95% CI]          oracle-ranked")
        for e, c, lo, hi, o in zip(r["etas"], r["curve"], r["low"], r["high"], r["oracle_curve"]):
            print(f"  {e:<6.3g} {fmt(c)}  [{fmt(lo)}, {fmt(hi)}]    {fmt(o)}")
        print(f"RETA curve plotted to {r['plot']}")
    if "judge_flip" in result:
        j = result["judge_flip"]

        def rate(d):
            return f"{fmt(d['rate'])} [{fmt(d['low'])}, {fmt(d['high'])}] over {d['n']} pairs"

        print(f"judge flip test ({j['judge']}, {j['n_pairs']} pairs, distractor appended to the losing response):")
        print(f"  pointwise distractor flip rate: {rate(j['pointwise']['distractor_flip'])}")
        print(f"  pairwise distractor flip rate:  {rate(j['pairwise']['distractor_flip'])}")
        print(f"  pairwise order-swap flip rate:  {rate(j['pairwise']['order_swap_flip'])}")
        print(f"  pointwise vs pairwise disagree: {rate(j['protocol_disagreement'])}")
        m = j["answer_mass"]
        print(f"  judge's probability on a valid answer: pointwise {fmt(m['pointwise'])}, "
              f"pairwise {fmt(m['pairwise'])}")

"""Learned rewards: a trained Bradley–Terry reward model, and an LLM judge.

``RewardModelReward(path)`` scores ``prompt + completion`` with a reward model trained by
``posttrain rm`` (the model and its on-disk format: ``posttrain.models.reward_model``); the
prompt is rendered with the tokenizer's chat template exactly as the rollout engine renders it
(``render_prompt``) and as the reward model saw its training pairs (``encode_text_pair``, defined
here and shared with the trainer). ``normalize=True`` standardises scores with the mean and std
measured on the training pairs after training (stored in ``reward_model.json``).
Component ``rm_score`` is always the raw score.

``JudgeReward(model)`` asks a local causal LM (a directory, .gguf, run directory, hub id or
alias such as ``smollm2-135m-instruct``) to rate each completion from 1 to ``scale`` and
returns the probability-weighted rating, G-Eval style (Liu et al. 2023, "G-Eval: NLG
Evaluation using GPT-4 with Better Human Alignment", arXiv:2303.16634, §2.3)::

    score = Σ_r r · p(r) / scale,    p(r) = P(r) / Σ_r' P(r')

where ``P(r)`` is the model's probability of emitting the rating's tokens as the first tokens
of its reply, i.e. the next-token distribution restricted to (and renormalised over) the
rating tokens. Ratings that tokenise to several tokens (``10`` is ``1``,``0`` for SmolLM2) are
handled exactly: ``P(10) = p(1)·p(0|1)`` and ``P(1) = p(1)·(1 − Σ_c p(c|1))`` over the digits
``c`` that would continue ``1`` into another rating. The score lies in ``[1/scale, 1]``.
Component ``judge_score``; info per completion: ``judge_rating`` (expected rating),
``judge_probs`` (p(1..scale)), ``judge_mass`` (Σ_r P(r) before renormalising: how much of the
judge's probability went to a valid rating at all).

Both load their model lazily on first use (``build_reward`` only checks the path or name), and
register themselves as reward types ``reward_model`` and ``judge`` when this module is imported.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from posttrain.rewards.base import RewardOutput
from posttrain.rewards.registry import REWARDS, register_reward
from posttrain.tasks.base import Problem

__all__ = ["RewardModelReward", "JudgeReward", "DEFAULT_JUDGE_TEMPLATE", "encode_text_pair"]


def _device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt)
    return str(prompt)


def encode_text_pair(tokenizer, prompt: Any, completion: str, *, chat_template: bool,
                     max_length: int) -> tuple[list[int], bool]:
    """Token ids of ``prompt`` (rendered as the rollout engine does) + ``completion`` + eos,
    keeping the last ``max_length``; returns ``(ids, truncated)``."""
    from posttrain.rollout.sampler import render_prompt

    ids = list(render_prompt(tokenizer, prompt, chat_template))
    ids += tokenizer(completion, add_special_tokens=False).input_ids
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if len(ids) > max_length:
        return ids[-max_length:], True
    return ids, False


class RewardModelReward:
    """Scores from a trained reward model (``posttrain rm``); ``path`` is the run directory or
    its ``model/`` directory. See the module docstring."""

    name = "reward_model"

    def __init__(self, path: str, batch_size: int = 8, normalize: bool = False, device: str = "auto"):
        from posttrain.models.reward_model import META_FILE, resolve_reward_model_dir

        if int(batch_size) < 1:
            raise ValueError(f"reward_model batch_size must be >= 1, got {batch_size}")
        self.path = resolve_reward_model_dir(path)
        self.meta = json.loads((self.path / META_FILE).read_text())
        self.batch_size = int(batch_size)
        self.normalize = bool(normalize)
        if self.normalize and not (self.meta.get("reward_std") or 0) > 0:
            raise ValueError(f"{self.path}: normalize=True needs reward_mean/reward_std in {META_FILE}")
        self.device = device
        self._rm = None
        self._tokenizer = None

    @classmethod
    def from_model(cls, rm, tokenizer, meta: Optional[dict] = None, batch_size: int = 8,
                   normalize: bool = False) -> "RewardModelReward":
        """Wrap an in-memory ``RewardModel`` (tests, or right after training)."""
        self = cls.__new__(cls)
        self.path, self.meta = None, dict(meta or {"chat_template": True, "max_length": 512})
        self.batch_size, self.normalize, self.device = int(batch_size), bool(normalize), "auto"
        self._rm, self._tokenizer = rm.eval(), tokenizer
        return self

    def load(self) -> None:
        if self._rm is None:
            from posttrain.models.reward_model import load_reward_model

            self._rm, self._tokenizer, self.meta = load_reward_model(self.path, device=str(_device(self.device)))

    def scores(self, prompt: Any, completions: Sequence[str]) -> list[float]:
        """Raw reward-model scores of ``prompt + completion`` for each completion."""
        self.load()
        tok = self._tokenizer
        seqs = [encode_text_pair(tok, prompt, c, chat_template=bool(self.meta.get("chat_template", True)),
                                 max_length=int(self.meta.get("max_length", 512)))[0] for c in completions]
        if not seqs:
            return []
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        # Similar lengths together: less padding per batch.
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        flat = self._rm.score_ids([seqs[i] for i in order], pad, self.batch_size)
        out = [0.0] * len(seqs)
        for i, s in zip(order, flat):
            out[i] = s
        return out

    def __call__(self, problem: Problem, completions: Sequence[str]) -> RewardOutput:
        raw = self.scores(problem.prompt, completions)
        if self.normalize:
            mean, std = float(self.meta["reward_mean"]), float(self.meta["reward_std"])
            rewards = [(r - mean) / std for r in raw]
        else:
            rewards = list(raw)
        return RewardOutput(rewards=rewards, components={"rm_score": list(raw)})


DEFAULT_JUDGE_TEMPLATE = (
    "Rate the response to the question below on a scale from 1 to {scale}, where 1 means wrong or "
    "useless and {scale} means correct and complete.\n\n"
    "Question:\n{prompt}\n\nResponse:\n{completion}\n\n"
    "Reply with a single number from 1 to {scale} and nothing else."
)


def fill_template(text: str, values: dict[str, str]) -> str:
    """``text`` with each ``{field}`` key of ``values`` replaced, in one left-to-right pass, so a
    value that itself contains "{prompt}" (a completion quoting it) is not expanded again."""
    out, i = [], 0
    while i < len(text):
        for field, value in values.items():
            if text.startswith(field, i):
                out.append(value)
                i += len(field)
                break
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


class JudgeReward:
    """LLM-as-judge with a local model, G-Eval probability-weighted rating; see the module
    docstring. ``template`` may use ``{prompt}``, ``{completion}`` (required), ``{scale}`` and
    ``{reference}`` (the problem's answer, empty when none); other braces are left alone."""

    name = "judge"

    def __init__(self, model: str, template: str = DEFAULT_JUDGE_TEMPLATE, scale: int = 10, batch_size: int = 8,
                 chat_template: bool = True, max_length: int = 2048, device: str = "auto"):
        from posttrain.models.loading import describe_source

        if not isinstance(scale, int) or isinstance(scale, bool) or not 2 <= scale <= 100:
            raise ValueError(f"judge scale must be an integer in [2, 100], got {scale!r}")
        if "{completion}" not in template:
            raise ValueError("judge template must contain {completion}")
        if int(batch_size) < 1 or int(max_length) < 8:
            raise ValueError("judge batch_size must be >= 1 and max_length >= 8")
        if isinstance(model, str):
            describe_source(model)  # clear error now; weights load on first use
        self.model_name = model
        self.template = template
        self.scale = scale
        self.batch_size = int(batch_size)
        self.chat_template = bool(chat_template)
        self.max_length = int(max_length)
        self.device = device
        self._model = None
        self._tokenizer = None
        self._ratings: list[list[int]] = []

    @classmethod
    def from_model(cls, model, tokenizer, **kwargs) -> "JudgeReward":
        """Judge with an in-memory model and tokenizer (tests, or a model already loaded)."""
        self = cls(model="tiny-random", **kwargs)
        self.model_name = getattr(getattr(model, "config", None), "name_or_path", "in-memory model")
        self._set_model(model.eval(), tokenizer)
        return self

    def load(self) -> None:
        if self._model is None:
            from posttrain.models.loading import load_model_and_tokenizer

            model, tok = load_model_and_tokenizer(self.model_name)
            self._set_model(model.to(_device(self.device)).eval(), tok)

    def _set_model(self, model, tokenizer) -> None:
        self._model, self._tokenizer = model, tokenizer
        ratings = [tokenizer(str(r), add_special_tokens=False).input_ids for r in range(1, self.scale + 1)]
        if any(not ids for ids in ratings) or len({tuple(ids) for ids in ratings}) != len(ratings):
            raise ValueError(f"judge model's tokenizer cannot encode the ratings 1..{self.scale} distinctly")
        self._ratings = ratings

    # ------------------------------------------------------------------ scoring
    def render(self, problem: Problem, completion: str) -> str:
        return fill_template(self.template, {
            "{prompt}": _prompt_text(problem.prompt), "{completion}": completion, "{scale}": str(self.scale),
            "{reference}": "" if problem.answer is None else str(problem.answer)})

    def _encode(self, text: str) -> tuple[list[int], bool]:
        from posttrain.rollout.engine import render_prompt

        ids = list(render_prompt(self._tokenizer, text, self.chat_template))
        if len(ids) > self.max_length:  # keep the end: the instruction and the reply slot
            return ids[-self.max_length:], True
        return ids, False

    def rating_distribution(self, prompts_ids: Sequence[Sequence[int]]):
        """``(probs [N, scale], mass [N])``: p(rating) renormalised over the ratings, and the
        unnormalised probability mass Σ_r P(r)."""
        import torch

        self.load()
        ratings = self._ratings
        # Every proper prefix of a rating's tokens needs the next-token distribution after it.
        prefixes: list[tuple[int, ...]] = sorted({tuple(r[:k]) for r in ratings for k in range(len(r))},
                                                 key=lambda p: (len(p), p))
        index = {p: i for i, p in enumerate(prefixes)}
        seqs = [list(ids) + list(p) for ids in prompts_ids for p in prefixes]
        logp = self._next_logprobs(seqs).view(len(prompts_ids), len(prefixes), -1)  # [N, P, V]
        rating_set = {tuple(r) for r in ratings}
        N = len(prompts_ids)
        log_p = torch.empty(N, len(ratings), dtype=torch.float64)
        for j, r in enumerate(ratings):
            total = torch.zeros(N, dtype=torch.float64)
            for k in range(len(r)):
                total += logp[:, index[tuple(r[:k])], r[k]]
            full = tuple(r)
            if full in index:  # another rating continues this one (e.g. 1 -> 10): stop here instead
                children = sorted({q[len(full)] for q in rating_set
                                   if len(q) > len(full) and q[: len(full)] == full})
                cont = logp[:, index[full], children].exp().sum(-1).clamp(max=1 - 1e-12)
                total += torch.log1p(-cont)
            log_p[:, j] = total
        mass = torch.logsumexp(log_p, dim=-1).exp()
        probs = torch.softmax(log_p, dim=-1)
        return probs, mass

    def _next_logprobs(self, seqs: list[list[int]]):
        import torch

        with torch.no_grad():
            return self._next_logprobs_nograd(seqs)

    def _next_logprobs_nograd(self, seqs: list[list[int]]):
        import torch

        model = self._model
        device = next(model.parameters()).device
        pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        out = []
        for s in range(0, len(seqs), self.batch_size):
            chunk = seqs[s:s + self.batch_size]
            T = max(len(x) for x in chunk)
            ids = torch.full((len(chunk), T), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), T), dtype=torch.long)
            for i, x in enumerate(chunk):  # left padding: the next token is read at the last column
                ids[i, T - len(x):] = torch.tensor(x)
                mask[i, T - len(x):] = 1
            position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=position_ids.to(device), use_cache=False, logits_to_keep=1).logits[:, -1]
            out.append(torch.log_softmax(logits.double(), dim=-1).cpu())
        return torch.cat(out)

    def __call__(self, problem: Problem, completions: Sequence[str]) -> RewardOutput:
        self.load()
        encoded = [self._encode(self.render(problem, c)) for c in completions]
        if not encoded:
            return RewardOutput(rewards=[], components={"judge_score": []})
        probs, mass = self.rating_distribution([ids for ids, _ in encoded])
        values = probs.new_tensor(range(1, self.scale + 1))
        expected = (probs * values).sum(-1)
        scores = (expected / self.scale).tolist()
        info = [{"judge_rating": float(e), "judge_probs": [round(float(p), 6) for p in row],
                 "judge_mass": float(m), **({"judge_truncated": True} if tr else {})}
                for e, row, m, (_, tr) in zip(expected, probs, mass, encoded)]
        return RewardOutput(rewards=scores, components={"judge_score": list(scores)}, info=info)


# Registered at import; posttrain.rewards.registry._builtin imports this module.
for _name, _cls in (("reward_model", RewardModelReward), ("judge", JudgeReward)):
    if _name not in REWARDS:
        register_reward(_name)(_cls)

"""Sampling evaluation of a model on a task's test split: pass@k, maj@k, best-of-N, weighted
majority, test-time scaling curves, diversity and cost, as one JSON-ready dict.

``evaluate(model, tokenizer, task, reward, n=16)`` samples ``n`` completions for every test
problem (one seeded ``torch.Generator``, so a fixed seed, batch size and model give the same
samples), scores each group of ``n`` with the reward (``score_group``, reward failures are
counted, never hidden), decides which samples are correct, scores every sample with the
best-of-N scorers (:mod:`posttrain.inference.scorers`) and computes the figures with
:mod:`posttrain.evaluation.metrics`.

Correctness of a sample, in order of precedence:

1. the reward's component ``"correct"`` if it has one (value > 0 means correct);
2. else the first component whose name ends in ``"/correct"`` (e.g. ``"numeric/correct"``
   inside a composite reward);
3. else the component ``"gt_reward"`` (or one ending in ``"/gt_reward"``) when none of its values
   is NaN: the ground-truth reward that the label-free TTRL majority-vote reward logs next to
   its pseudo-reward, which would otherwise be mistaken for correctness;
4. else ``reward > 0``.

The rule that was used is recorded under ``correct_from``.

Answers (for maj@k, weighted majority and diversity) are the canonical form of the answer the
reward extracted: its info entry ``"canonical"`` if present, else
``canonical_answer(info["answer"])`` (so ``0.5`` and ``1/2`` vote together). A sample without an
answer abstains. If no sample of the whole evaluation has an answer (e.g. code rewards), the
voting figures are left empty. maj@k judges a voted answer correct if any sample carrying it
was graded correct. Weighted majority votes with :func:`posttrain.inference.scorers.vote_weights`
of each scorer (self-certainty as is, ``exp`` of the mean log-prob, reward-model scores as is).

Estimators: pass@k is the unbiased estimator for every ``k <= n``; maj@k and weighted majority
average over k-subsets (exactly when ``C(n, k) <= num_resamples``, else ``num_resamples``
random subsets seeded with ``seed``); best-of-N is the exact expectation over k-subsets with
ties broken at random; mean@k is the accuracy of the first k samples. The k grid for maj@k / mean@k / best-of-N / weighted majority is the
powers of two up to ``n``, plus ``n``, plus any extra ``ks``; the scaling curves use the powers
of two. All k-keyed dicts use ``str(k)`` keys (as they read back from JSON).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from posttrain.evaluation import metrics as M
from posttrain.inference.scorers import SCORERS, RewardModelFn, score_rollouts, vote_weights
from posttrain.rewards.errors import score_group
from posttrain.rewards.math import canonical_answer
from posttrain.rollout.engine import HFRolloutEngine, SamplingParams, resolve_dtype
from posttrain.tasks.base import Problem

__all__ = ["evaluate", "k_grid", "powers_of_two", "correct_flags", "sample_answer"]


def powers_of_two(n: int) -> list[int]:
    """``[1, 2, 4, ...]`` up to ``n``."""
    return [1 << e for e in range(int(math.log2(n)) + 1)] if n >= 1 else []


def k_grid(n: int, extra: Sequence[int] = ()) -> list[int]:
    """Powers of two up to ``n``, ``n`` itself and ``extra`` (each must lie in [1, n])."""
    bad = [k for k in extra if not 1 <= int(k) <= n]
    if bad:
        raise ValueError(f"k values {bad} out of range: every k must lie in [1, n={n}]")
    return sorted(set(powers_of_two(n)) | {n} | {int(k) for k in extra})


def correct_flags(components: dict[str, Sequence[float]], rewards: Sequence[float]) -> tuple[list[bool], str]:
    """Per-sample correctness and the rule used (see the module docstring)."""
    if "correct" in components:
        return [float(v) > 0 for v in components["correct"]], "correct"
    for name, values in components.items():
        if name.endswith("/correct"):
            return [float(v) > 0 for v in values], name
    for name, values in components.items():
        if name == "gt_reward" or name.endswith("/gt_reward"):
            vals = [float(v) for v in values]
            if not any(math.isnan(v) for v in vals):
                return [v > 0 for v in vals], name
    return [float(r) > 0 for r in rewards], "reward > 0"


def sample_answer(info: Any) -> Optional[str]:
    """Canonical answer of one sample from its reward info (``None``: no answer)."""
    if not isinstance(info, dict):
        return None
    if info.get("canonical") is not None and not M.is_abstention(info["canonical"]):
        return str(info["canonical"])
    a = info.get("answer")
    if M.is_abstention(a):
        return None
    try:
        key = canonical_answer(str(a))
    except Exception:  # noqa: BLE001 - an odd answer string still votes, as itself
        key = str(a).strip()
    return key or None


def _difficulty_table(acc: Sequence[float], difficulty: Sequence[Any]) -> dict[str, dict[str, float]]:
    known = [(a, d) for a, d in zip(acc, difficulty) if d is not None]
    if not known:
        return {}
    accs = [a for a, _ in known]
    diffs = [d for _, d in known]
    numeric = all(isinstance(d, (int, float)) and not isinstance(d, bool) and math.isfinite(d) for d in diffs)
    if numeric and len(set(diffs)) > 12:
        lo, hi = float(min(diffs)), float(max(diffs))
        table = M.accuracy_by_difficulty(accs, diffs, bins=np.linspace(lo, hi, 6).tolist())
        table = {k: v for k, v in table.items() if v["n"] > 0}
    else:
        table = M.accuracy_by_difficulty(accs, [f"{d:g}" if numeric else d for d in diffs])
    unknown = [a for a, d in zip(acc, difficulty) if d is None]
    if unknown:
        table["unknown"] = {"accuracy": float(np.mean(unknown)), "n": len(unknown)}
    return table


def _progress(total: int, enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(
        TextColumn("[bold]eval[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("problems"),
        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        console=console, disable=not (enabled and console.is_terminal), transient=False,
    )


def _resolve_problems(task, problems) -> list[Problem]:
    if problems is None or isinstance(problems, int):
        if task is None:
            raise ValueError("evaluate needs a task (or an explicit list of problems)")
        test = list(task.problems("test"))
        if not test:
            raise ValueError(f"task {getattr(task, 'name', task)!r} has an empty test split")
        if problems is None:
            return test
        if isinstance(problems, bool) or problems < 1:
            raise ValueError(f"problems must be >= 1, got {problems}")
        if problems > len(test):
            raise ValueError(f"asked for {problems} problems but the task's test split has only {len(test)}")
        return test[:problems]
    out = list(problems)
    if not out:
        raise ValueError("the list of problems is empty")
    return out


def evaluate(
    model,
    tokenizer,
    task,
    reward,
    *,
    n: int,
    problems: int | Sequence[Problem] | None = None,
    seed: int = 0,
    temperature: float = 1.0,
    max_new_tokens: int = 32,
    top_p: float = 1.0,
    top_k: int = 0,
    stop: Sequence[str] = (),
    batch_prompts: int = 16,
    max_batch_samples: int = 512,
    scorers: Sequence[str] = ("mean_logprob", "self_certainty"),
    reward_model: Optional[RewardModelFn] = None,
    ks: Sequence[int] = (),
    chat_template: bool = True,
    dtype: str = "auto",
    on_reward_error: str = "zero",
    num_resamples: int = 256,
    scorer_chunk_tokens: int = 1024,
    scorer_batch_size: int = 16,
    progress: bool = True,
    model_name: Optional[str] = None,
    on_batch: Optional[Callable[[int, int], None]] = None,
) -> dict[str, Any]:
    """Sample ``n`` completions per test problem and return the evaluation dict.

    ``problems``: ``None`` (the whole test split), an int (the first that many test problems)
    or an explicit list of ``Problem``. Each generate call holds ``batch_prompts`` prompts
    (fewer when ``batch_prompts * n`` would exceed ``max_batch_samples``). ``scorers`` name
    the best-of-N / weighted-vote scorers (``"mean_logprob"``, ``"self_certainty"``,
    ``"reward_model"``, the last with ``reward_model=fn(problem, text) -> float``).
    ``on_reward_error`` is the ``score_group`` policy: ``"zero"`` counts failed groups as
    incorrect and reports them under ``reward_errors``, ``"abort"`` raises.

    Keys of the result: ``model``, ``task``, ``n``, ``n_problems``, ``seed``, ``sampling``,
    ``mean_accuracy``, ``pass_at_k`` (every k <= n), ``mean_at_k``, ``maj_at_k``,
    ``best_of_n`` ({scorer: {k: acc}}), ``weighted_majority`` ({scorer: {k: acc}}),
    ``scaling`` ({"majority", "best_of_n" (first scorer), "best_of_n/<scorer>" (others),
    "weighted_majority/<scorer>", "pass_at_k"}: {N: acc} for N in powers of two),
    ``accuracy_by_difficulty``, ``answer_diversity``, ``response_length``, ``tokens``
    ({"total", "mean", "prompt"}), ``cost_of_pass`` (generated tokens per correct sample,
    ``None`` when nothing is correct), ``correct_from``, ``reward_errors``, ``timing`` and
    ``problems`` ([{"id", "n", "correct", "difficulty", "flags", "answers", "lengths",
    "scores"}]), enough to recompute every figure.
    """
    # ---------------------------------------------------------------- validation
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (completions per problem) must be an integer >= 1, got {n!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_prompts < 1 or max_batch_samples < 1:
        raise ValueError("batch_prompts and max_batch_samples must be >= 1")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    scorers = list(dict.fromkeys(scorers))
    unknown = [s for s in scorers if s not in SCORERS]
    if unknown:
        raise ValueError(f"unknown scorer(s) {unknown}; available: {', '.join(SCORERS)}")
    if "reward_model" in scorers and reward_model is None:
        raise ValueError("the reward_model scorer needs reward_model=fn(problem, text) -> float")
    grid = k_grid(n, ks)
    pow2 = powers_of_two(n)
    problem_list = _resolve_problems(task, problems)

    device = next(model.parameters()).device
    engine = HFRolloutEngine(model, tokenizer, dtype=resolve_dtype(dtype, device), chat_template=chat_template)
    prompt_tokens = sum(len(ids) for ids in engine.encode(problem_list, max_new_tokens))  # checks the context
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            stop=tuple(stop))
    generator = torch.Generator(device=device).manual_seed(int(seed))
    per_call = max(1, min(batch_prompts, max_batch_samples // n))

    # ---------------------------------------------------------------- sampling and scoring
    t0 = time.perf_counter()
    timing = {"generate_s": 0.0, "reward_s": 0.0, "scorers_s": 0.0}
    records: list[dict[str, Any]] = []
    error_records: list[dict] = []
    sources: Counter = Counter()
    n_correct_so_far = n_samples_so_far = 0
    with _progress(len(problem_list), progress) as bar:
        task_id = bar.add_task("eval", total=len(problem_list), info="")
        for start in range(0, len(problem_list), per_call):
            batch = problem_list[start : start + per_call]
            t = time.perf_counter()
            rollouts = engine.generate(batch, n, params, generator)
            timing["generate_s"] += time.perf_counter() - t
            t = time.perf_counter()
            scores = {
                s: score_rollouts(rollouts, s, model=model, reward_model=reward_model,
                                  chunk_tokens=scorer_chunk_tokens, batch_size=scorer_batch_size).tolist()
                for s in scorers
            }
            timing["scorers_s"] += time.perf_counter() - t
            lengths = rollouts.completion_lengths.long().tolist()
            truncated = rollouts.truncated.tolist()
            t = time.perf_counter()
            for g, problem in enumerate(batch):
                idx = list(range(g * n, (g + 1) * n))
                out, errs = score_group(reward, problem, [rollouts.texts[i] for i in idx], on_error=on_reward_error)
                error_records += errs
                flags, source = correct_flags(out.components, out.rewards)
                if not errs:
                    sources[source] += 1
                infos = out.info if len(out.info) == n else [{}] * n
                answers = [sample_answer(info) for info in infos]
                records.append({
                    "id": problem.id,
                    "n": n,
                    "correct": int(sum(flags)),
                    "difficulty": problem.difficulty,
                    "flags": [int(f) for f in flags],
                    "answers": answers,
                    "rewards": [float(r) for r in out.rewards],
                    "lengths": [lengths[i] for i in idx],
                    "truncated": [bool(truncated[i]) for i in idx],
                    "scores": {s: [float(scores[s][i]) for i in idx] for s in scorers},
                })
                n_correct_so_far += int(sum(flags))
                n_samples_so_far += n
            timing["reward_s"] += time.perf_counter() - t
            bar.update(task_id, advance=len(batch), info=f"acc {n_correct_so_far / n_samples_so_far:.3f}")
            if on_batch is not None:
                on_batch(len(records), len(problem_list))
    timing["sampling_total_s"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- figures
    t = time.perf_counter()
    result = summarize(records, n=n, grid=grid, pow2=pow2, scorers=scorers, seed=seed, num_resamples=num_resamples)
    timing["metrics_s"] = time.perf_counter() - t
    total_tokens = sum(sum(r["lengths"]) for r in records)
    timing["tokens_per_s"] = total_tokens / max(timing["generate_s"], 1e-9)
    head = {
        "model": model_name or getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__,
        "task": getattr(task, "name", None) if task is not None else None,
        "reward": getattr(reward, "name", type(reward).__name__),
        "n": n,
        "n_problems": len(records),
        "seed": int(seed),
        "sampling": {"temperature": temperature, "top_p": top_p, "top_k": top_k, "max_new_tokens": max_new_tokens,
                     "stop": list(stop), "chat_template": chat_template, "dtype": str(engine.dtype).replace("torch.", ""),
                     "prompts_per_call": per_call},
        "scorers": scorers,
    }
    result["tokens"]["prompt"] = int(prompt_tokens)
    result["correct_from"] = [s for s, _ in sources.most_common()]
    result["reward_errors"] = len(error_records)
    if error_records:
        result["reward_error_examples"] = [
            {"problem_id": e["problem_id"], "index": e["index"], "error": e["error"]} for e in error_records[:5]
        ]
    result["timing"] = timing
    problems_out = result.pop("problems")
    return {**head, **result, "problems": problems_out}


def summarize(
    records: Sequence[dict[str, Any]],
    *,
    n: int,
    grid: Sequence[int],
    pow2: Sequence[int],
    scorers: Sequence[str],
    seed: int = 0,
    num_resamples: int = 256,
) -> dict[str, Any]:
    """The figures of :func:`evaluate` from its per-problem ``records`` (every record has ``n``
    samples with ``flags``, ``answers``, ``lengths``, ``truncated`` and ``scores``)."""
    if not records:
        raise ValueError("no problems were evaluated")
    flags = [[bool(f) for f in r["flags"]] for r in records]
    cs = [sum(f) for f in flags]
    answers = [list(r["answers"]) for r in records]
    has_answers = any(a is not None for ans in answers for a in ans)
    judge = M.correct_fn_from_flags(answers, flags) if has_answers else None
    all_lengths = [x for r in records for x in r["lengths"]]
    all_flags = [f for fl in flags for f in fl]

    pass_at_k = {str(k): v for k, v in M.pass_at_k_table(n, cs, range(1, n + 1)).items()}
    mean_at = {str(k): M.mean_at_k(flags, k) for k in grid}
    maj: dict[str, float] = {}
    weighted: dict[str, dict[str, float]] = {}
    if has_answers:
        maj = {str(k): M.maj_at_k(answers, judge, k, num_resamples=num_resamples, seed=seed) for k in grid}
        for s in scorers:
            weights = [vote_weights(s, r["scores"][s]) for r in records]
            weighted[s] = {
                str(k): M.maj_at_k(
                    answers, judge, k, num_resamples=num_resamples, seed=seed, weights_per_problem=weights
                )
                for k in grid
            }
    best = {
        s: {str(k): M.best_of_n([r["scores"][s] for r in records], flags, k) for k in grid} for s in scorers
    }
    scaling: dict[str, dict[str, float]] = {}
    if has_answers:
        scaling["majority"] = {str(N): maj[str(N)] for N in pow2}
    for i, s in enumerate(scorers):
        scaling["best_of_n" if i == 0 else f"best_of_n/{s}"] = {str(N): best[s][str(N)] for N in pow2}
    for s in weighted:
        scaling[f"weighted_majority/{s}"] = {str(N): weighted[s][str(N)] for N in pow2}
    scaling["pass_at_k"] = {str(N): pass_at_k[str(N)] for N in pow2}

    per_problem_acc = [c / len(f) for c, f in zip(cs, flags)]
    cop = M.cost_of_pass(all_lengths, all_flags)
    lengths_arr = np.asarray(all_lengths, dtype=np.float64)
    out: dict[str, Any] = {
        "mean_accuracy": float(np.mean(all_flags)),
        "pass_at_k": pass_at_k,
        "mean_at_k": mean_at,
        "maj_at_k": maj,
        "best_of_n": best,
        "best_of_n_scorer": scorers[0] if scorers else None,
        "weighted_majority": weighted,
        "scaling": scaling,
        "accuracy_by_difficulty": _difficulty_table(per_problem_acc, [r.get("difficulty") for r in records]),
        "answer_diversity": M.answer_diversity(answers) if has_answers else {},
        "response_length": {
            "mean": float(lengths_arr.mean()),
            "median": float(np.median(lengths_arr)),
            "min": int(lengths_arr.min()),
            "max": int(lengths_arr.max()),
            "truncated_frac": float(np.mean([t for r in records for t in r.get("truncated", [])] or [0.0])),
        },
        "tokens": {"total": int(lengths_arr.sum()), "mean": float(lengths_arr.mean())},
        "cost_of_pass": None if math.isinf(cop) else cop,
        "problems": list(records),
    }
    return out

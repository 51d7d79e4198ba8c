"""One step's batch under a selector (posttrain.selection): draw, sample, score, filter, refill.

    problems = draw(num_prompts)                      # prompts the selector accepts, in epoch order,
                                                      # or, when selector.chooses, selector.choose(num_prompts)
    loop:
        rollouts = sample and score(problems)
        selector.observe(groups); kept += groups selector.keep_groups
        stop when num_prompts groups are kept, the selector does not refill, or after
        selection.max_rounds extra rounds; else draw more (as many as the keep rate so far
        suggests, at most num_prompts) and go on
    still short: top up from selector.replay(missing, step) (earlier groups), then with
    rejected groups, in order (logged as selection/short_groups), so every step trains on the configured number of groups
    selector.remember(kept fresh groups, step)         # replay's buffer, for later steps
    rows = selector.keep_rows(groups)                  # rollout-level down-sampling

Only the synchronous loop uses this: with ``distributed.max_staleness`` >= 1 the next batches
are sampled before this one is scored, so a refill could not see its outcome (a config error).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from posttrain.evaluation.runner import correct_flags
from posttrain.rollout.batch import Rollouts
from posttrain.selection.base import ScoredGroups
from posttrain.tasks.base import Problem


class SelectionExhaustedError(RuntimeError):
    """The selector rejects every training prompt; there is nothing left to sample."""


def draw(trainer, k: int) -> list[Problem]:
    """The next ``k`` prompts of the epoch sampler that the selector accepts, or the ``k`` prompts a
    choosing selector picks (bound to the train split on first use). ``data.position`` counts the
    prompts handed out either way (the ``data/position`` metric)."""
    data, selector, out, refused = trainer.data, trainer.selector, [], 0
    if selector.chooses:
        if not getattr(selector, "bound", False):
            selector.bind(data.problems, trainer.cfg.trainer.seed)
        out = selector.choose(k)
        data.position += len(out)
        return out
    while len(out) < k:
        epoch = data.position // len(data.problems)
        (problem,) = data.next(1)
        if selector.accept(problem, epoch):
            out.append(problem)
            refused = 0
        else:
            refused += 1
            if refused >= len(data.problems):
                raise SelectionExhaustedError(
                    f"selection {selector.name!r} refused all {len(data.problems)} training prompts in a row at step "
                    f"{trainer.step + 1} (e.g. srpo_history once every prompt has been solved): lower trainer.steps "
                    f"or use a larger train split")
    return out


def scored_groups(problems: list[Problem], rollouts: Rollouts) -> ScoredGroups:
    flags, _ = correct_flags({k: v.tolist() for k, v in rollouts.reward_components.items()}, rollouts.rewards.tolist())
    return ScoredGroups(problems, rollouts.group_ids, rollouts.rewards.float(), torch.tensor(flags, dtype=torch.bool))


def take_groups(parts: list[tuple[Problem, Rollouts]]) -> tuple[list[Problem], Rollouts]:
    """Concatenate single-group rollouts; group ids become 0..G-1 in list order."""
    return [p for p, _ in parts], Rollouts.concat([replace(r, group_ids=torch.zeros_like(r.group_ids))
                                                   for _, r in parts])


def sample_selected(trainer) -> tuple[list[Problem], Rollouts, list[dict], dict[str, float]]:
    """This step's (problems, rollouts, reward errors, selection metrics)."""
    cfg, selector = trainer.cfg, trainer.selector
    want = cfg.rollout.num_prompts
    epoch = trainer.data.position // len(trainer.data.problems)
    kept, rejected, errors = [], [], []
    rounds = sampled = zero_std = 0
    pass_rates: list[float] = []
    problems = draw(trainer, want)
    while True:
        rollouts, errs = trainer.sample_and_score(problems)
        errors += errs
        groups = scored_groups(problems, rollouts)
        selector.observe(groups, epoch)
        keep = selector.keep_groups(groups)
        sampled += len(problems)
        zero_std += int(groups.constant_reward.sum())
        pass_rates += groups.pass_rates.tolist()
        for g, problem in enumerate(problems):
            (kept if keep[g] else rejected).append((problem, rollouts.select(groups.rows_of[g])))
        if not selector.refills or len(kept) >= want or rounds >= cfg.selection.max_rounds:
            break
        rounds += 1
        # As many prompts as the keep rate so far says will fill the gap (all of a batch when none passed).
        rate = len(kept) / sampled
        problems = draw(trainer, min(want, math.ceil((want - len(kept)) / rate)) if rate > 0 else want)
    fresh = kept[:want]
    replayed = selector.replay(want - len(fresh), trainer.step)  # asked every step, k = 0 included
    selector.remember(fresh, trainer.step)  # after replay: a group never appears twice in one batch
    short = max(0, want - len(fresh) - len(replayed))
    problems, rollouts = take_groups(fresh + replayed + rejected[:short])
    groups = scored_groups(problems, rollouts)
    rows = selector.keep_rows(groups)
    if not bool(rows.all()):
        rollouts = rollouts.select(torch.nonzero(rows).squeeze(-1))
    metrics = {
        "selection/groups_sampled": float(sampled), "selection/groups_kept": float(min(len(kept), want)),
        "selection/extra_rounds": float(rounds), "selection/short_groups": float(short),
        "selection/zero_std_frac_sampled": zero_std / sampled, "selection/pass_rate_mean": sum(pass_rates) / sampled,
        "selection/rows_kept_frac": float(rows.float().mean()),
        **selector.metrics(),
    }
    return problems, rollouts, errors, metrics

"""The RL loop: a Sampler makes rollouts, rewards score them, a Learner updates on them.

    for each step:
        problems   = data.next(num_prompts)                         # seeded, resumable
        rollouts   = engine.generate(problems, n)                   # tokens, behaviour log-probs (hf or vllm)
        rollouts.rewards, components = reward(group) for each group # group-aware rewards
        rollouts.ref_logprobs / old_logprobs  (only when needed)    # learner.logprobs(...)
        rollouts.advantages = ADVANTAGES[estimator](...)            # [N, T]
        for epoch, mini-batch:
            learner.forward_backward(mini, policy loss + kl + entropy)   # micro-batched
            learner.optim_step(lr schedule)
        engine.load_weights(learner.export_weights(), version)      # in place; free when shared
        log; evaluate; checkpoint

The Learner (trainers/learner.py) owns weights, precision, optimizer, reference and critic; the
Sampler (rollout/sampler.py) owns sampling. This file only orchestrates them.

Old log-probs: with one epoch and one mini-batch the policy has not moved when the loss is
computed, so old = current.detach() exactly and no extra forward pass is needed (TRL does the
same). Otherwise they are recomputed before the first update ("recompute"), or taken from the
rollout engine ("behaviour", the bypass mode of verl). Behaviour (engine) vs old (learner at the
same weights) is the train-inference mismatch the corrections act on: zero-ish with the
in-process engine, real with vLLM.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from posttrain.algorithms import (
    ADVANTAGES,
    CORRECTIONS,
    POLICY_LOSSES,
    AdvantageInput,
    CorrectionInput,
    PolicyLossInput,
    aggregate,
    kl_estimate,
)
from posttrain.algorithms.advantages_token import gae_returns, value_loss
from posttrain.algorithms.corrections import mismatch_metrics
from posttrain.algorithms.overlong import dapo_overlong_penalty, mask_truncated
from posttrain.algorithms.regularizers import AdaptiveEntropyController, AdaptiveKLController, kl_in_reward, \
    top_entropy_mask
from posttrain.config import RLConfig, to_dict
from posttrain.evaluation.runner import correct_flags
from posttrain.rewards.errors import score_rollouts
from posttrain.rollout.batch import Rollouts
from posttrain.rollout.engine import SamplingParams, resolve_dtype
from posttrain.rollout.sampler import build_engine, context_window, encode_prompts
from posttrain.runs import RunDir, load_trainer_state
from posttrain.tasks.base import Problem
from posttrain.trainers.learner import Learner, resolve_device


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps produced a non-finite loss or gradient."""


class EpochSampler:
    """Walks the train split in seeded shuffled epochs; its state is one integer."""

    def __init__(self, problems: list[Problem], seed: int):
        if not problems:
            raise ValueError("the task's train split is empty: nothing to train on")
        self.problems = problems
        self.seed = seed
        self.position = 0  # prompts handed out so far
        self._order: dict[int, list[int]] = {}

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._order:
            order = list(range(len(self.problems)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._order = {epoch: order}
        return self._order[epoch]

    def next(self, k: int) -> list[Problem]:
        out = []
        for _ in range(k):
            epoch, i = divmod(self.position, len(self.problems))
            out.append(self.problems[self._epoch_order(epoch)[i]])
            self.position += 1
        return out


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base LR before optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


@dataclass
class EvalResult:
    accuracy: float
    n_problems: int
    mean_reward: float
    mean_length: float

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "n_problems": self.n_problems, "mean_reward": self.mean_reward,
                "mean_length": self.mean_length}


class RLTrainer:
    def __init__(self, cfg: RLConfig, policy, tokenizer, task, reward, run: RunDir, eval_reward=None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.task = task
        self.reward = reward
        self.eval_reward = eval_reward or reward
        self.run = run
        tc, alg = cfg.trainer, cfg.algorithm
        self.device = resolve_device(tc.device)
        if tc.threads:
            torch.set_num_threads(tc.threads)
        torch.manual_seed(tc.seed)
        self.data = EpochSampler(list(task.problems("train")), tc.seed)
        self.eval_problems = list(task.problems("test"))[: tc.eval_problems]
        if not self.eval_problems:
            raise ValueError("the task's test split is empty: nothing to evaluate on")
        # Every prompt must fit the context, checked before any engine starts (vLLM's takes ~20 s).
        encode_prompts(tokenizer, self.data.problems + self.eval_problems, cfg.rollout.max_new_tokens,
                       cfg.rollout.chat_template, context_window(policy.config))
        sampler_dtype = resolve_dtype(cfg.rollout.dtype, self.device)
        self.learner = Learner(policy, tc, cfg.model, temperature=cfg.rollout.temperature, device=self.device,
                               sampler_dtype=sampler_dtype, reference=alg.uses_reference,
                               critic_lr=alg.critic.lr if alg.uses_critic else None)
        if cfg.distributed.rollout_workers:  # Ray actors, each with its own engine and reward
            from posttrain.distributed.ray_pool import RayRolloutPool

            self.engine = RayRolloutPool(cfg, tokenizer, self.learner.export_weights(), sampler_dtype)
        else:  # the hf engine shares the learner's compute weights when the dtypes agree (no sync)
            self.engine = build_engine(cfg.rollout, cfg.model, self.learner.model, tokenizer, sampler_dtype, tc.seed)
        self.in_flight: deque = deque()  # (problems, handle) submitted ahead, asynchronous training only
        self.kl_ctl = AdaptiveKLController(alg.kl)
        self.entropy_ctl = AdaptiveEntropyController(alg.entropy)
        self.generator = torch.Generator(device=self.device).manual_seed(tc.seed)
        self.step = 0
        self.nonfinite_streak = 0
        self.sampling = SamplingParams(
            max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, stop=tuple(cfg.rollout.stop),
        )

    @property
    def policy(self):
        """The policy module whose checkpoint is saved (bf16 between steps under split masters)."""
        return self.learner.policy

    # ------------------------------------------------------------------ rollouts and rewards
    def score(self, rollouts: Rollouts, reward=None) -> list[dict]:
        """Fill rewards and components group by group; returns reward-error records."""
        return score_rollouts(rollouts, reward or self.reward, self.cfg.trainer.on_reward_error)

    def _greedy_baseline(self, problems: list[Problem], rollouts: Rollouts) -> torch.Tensor:
        """ReMax: the reward of one greedy completion per prompt, broadcast to its group."""
        greedy = SamplingParams(max_new_tokens=self.sampling.max_new_tokens, top_k=1, stop=self.sampling.stop)
        base = self.engine.generate(problems, 1, greedy, self.generator)
        self.score(base)
        return base.rewards[rollouts.group_ids]

    def _old_logprobs_mode(self) -> str:
        mode = self.cfg.trainer.old_logprobs
        if mode == "auto":
            single = self.cfg.trainer.ppo_epochs == 1 and self.cfg.trainer.mini_batches == 1
            return "current" if single else "recompute"
        return mode

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        cfg, alg, learner = self.cfg, self.cfg.algorithm, self.learner
        t0 = time.perf_counter()
        problems, rollouts = self._next_batch()
        gen_stats = dict(self.engine.last_stats)
        t_gen = time.perf_counter()
        # Ray workers score where they sample; the in-process engine's rollouts are scored here.
        errors = self.score(rollouts) if rollouts.rewards is None else list(self.engine.last_reward_errors)
        for e in errors:
            self.run.append("reward_errors.jsonl", {"step": self.step + 1, **e})
        mode = self._old_logprobs_mode()
        if mode == "recompute":
            rollouts.old_logprobs = learner.logprobs(rollouts)
        elif mode == "behaviour":
            rollouts.old_logprobs = rollouts.behaviour_logprobs
        if learner.ref is not None:
            rollouts.ref_logprobs = learner.logprobs(rollouts, "ref")
        mask = rollouts.completion_mask
        if alg.overlong_buffer:
            penalty = dapo_overlong_penalty(rollouts.completion_lengths, cfg.rollout.max_new_tokens,
                                            alg.overlong_buffer, alg.overlong_penalty).float()
            rollouts.reward_components["overlong_penalty"] = penalty
            rollouts.rewards = rollouts.rewards + penalty
        baseline = self._greedy_baseline(problems, rollouts) if alg.advantage_estimator == "remax" else None
        logprobs = rollouts.old_logprobs if rollouts.old_logprobs is not None else rollouts.behaviour_logprobs
        token_rewards = None
        if alg.kl.in_reward:
            token_rewards = kl_in_reward(None, logprobs, rollouts.ref_logprobs, mask, self.kl_ctl.value,
                                         alg.kl.estimator)
        if learner.critic is not None:
            rollouts.values = learner.values(rollouts)
        adv_input = AdvantageInput(
            rewards=rollouts.rewards, group_ids=rollouts.group_ids, mask=mask,
            reward_components=rollouts.reward_components, token_rewards=token_rewards, logprobs=logprobs,
            ref_logprobs=rollouts.ref_logprobs, baseline_rewards=baseline, values=rollouts.values,
            answers=[str(m.get("canonical", m.get("answer"))) for m in rollouts.metadata],
        )
        rollouts.advantages = ADVANTAGES.get(alg.advantage_estimator)(adv_input, alg.advantage).float()
        if learner.critic is not None:
            rollouts.returns = gae_returns(adv_input, alg.advantage).float()
        # Which tokens get a loss: DAPO overlong filtering, 80/20 high-entropy tokens (on the
        # learner's entropies when the engine records none, as vLLM's does not).
        loss_mask = mask_truncated(mask, rollouts.truncated) if alg.mask_truncated else mask
        if alg.entropy.top_quantile < 1.0 and rollouts.entropies is None:
            rollouts.entropies = learner.entropies(rollouts)
        rollouts.loss_mask = top_entropy_mask(rollouts.entropies, loss_mask, alg.entropy.top_quantile) \
            if rollouts.entropies is not None else loss_mask
        metrics = self.update(rollouts)
        if "kl/mean" in metrics:
            metrics["kl/coef"] = self.kl_ctl.update(metrics["kl/mean"], len(rollouts))
        if "entropy/learner" in metrics and self.entropy_ctl.value > 0:
            metrics["entropy/coef"] = self.entropy_ctl.update(metrics["entropy/learner"])
        t_learn = time.perf_counter()
        self.step += 1
        self.engine.load_weights(learner.export_weights(), self.step)
        t_end = time.perf_counter()
        metrics.update(self._rollout_metrics(rollouts))
        metrics.update({
            "reward_errors": float(len(errors)),
            "time/gen_s": t_gen - t0, "time/learn_s": t_learn - t_gen, "time/sync_s": t_end - t_learn,
            "time/step_s": t_end - t0,
            "perf/gen_tok_per_s": gen_stats.get("gen_tok_per_s", 0.0),
            "perf/learn_tok_per_s": float((rollouts.prompt_mask.sum() + mask.sum()) / max(t_learn - t_gen, 1e-9)),
            "data/position": float(self.data.position),
            "tokens/completion": float(mask.sum()),
            "tokens/prompt": float(rollouts.prompt_mask.sum()),
            "tokens/prompt_unique": float(_unique_prompt_tokens(rollouts)),
        })
        if rollouts.policy_version is not None:  # steps the sampled weights lag the learner's (0: on-policy)
            lag = (self.step - 1 - rollouts.policy_version).float()
            metrics.update({"staleness/mean": float(lag.mean()), "staleness/max": float(lag.max())})
        if "wait_s" in gen_stats:  # Ray workers: sampling time the learner did not wait for
            metrics["perf/sampling_hidden_frac"] = max(0.0, 1.0 - gen_stats["wait_s"] / max(gen_stats["gen_wall_s"], 1e-9))
            metrics["workers/restarts"] = gen_stats["restarts"]
        return metrics

    def _next_batch(self) -> tuple[list[Problem], Rollouts]:
        """This step's problems and rollouts. With ``distributed.max_staleness`` k >= 1 the next k
        batches are already being sampled (from the weights of their submission time), so the
        workers sample while the learner trains; every rollout records its policy version."""
        cfg = self.cfg
        n, num_prompts = cfg.rollout.num_completions, cfg.rollout.num_prompts
        if not hasattr(self.engine, "submit"):  # in-process: sample now
            problems = self.data.next(num_prompts)
            return problems, self.engine.generate(problems, n, self.sampling, self.generator,
                                                  share_prefill=cfg.rollout.share_prompt_prefill)
        while len(self.in_flight) <= cfg.distributed.max_staleness:
            problems = self.data.next(num_prompts)
            self.in_flight.append((problems, self.engine.submit(problems, n, self.sampling, self.generator)))
        problems, handle = self.in_flight.popleft()
        return problems, self.engine.result(handle)

    def update(self, rollouts: Rollouts) -> dict[str, float]:
        """PPO epochs x mini-batches of learner updates on one batch; returns mean metrics."""
        tc, alg, learner = self.cfg.trainer, self.cfg.algorithm, self.learner
        loss_fn = POLICY_LOSSES.get(alg.policy_loss)
        n = len(rollouts)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}

        def record(key: str, value: float) -> None:
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1

        # The engine's entropies are missing (vLLM): the learner's stand in, in the same pass.
        want_entropy = self.entropy_ctl.value > 0 or rollouts.entropies is None
        value_fn = None
        mini_size = n // tc.mini_batches
        for epoch in range(tc.ppo_epochs):
            order = torch.randperm(n, generator=self.generator, device=self.generator.device).cpu() if tc.ppo_epochs > 1 or tc.mini_batches > 1 \
                else torch.arange(n)
            for m in range(tc.mini_batches):
                mini = rollouts.select(order[m * mini_size:(m + 1) * mini_size])
                # The loss is a sum over micro-batches normalised by mini-batch counts, so the
                # micro-batch split does not change the gradient.
                counts_kw = dict(num_tokens=float(mini.loss_mask.sum()), num_seqs=float(len(mini)),
                                 norm_length=float(self.cfg.rollout.max_new_tokens))
                if learner.critic is not None:
                    value_fn = lambda micro, values, kw=counts_kw: self._value_loss(micro, values, kw, record)  # noqa: E731
                learner.zero_grad()
                total_loss = learner.forward_backward(
                    mini, lambda micro, logp, ent, kw=counts_kw: self._micro_loss(micro, logp, ent, loss_fn, kw, record),
                    with_entropy=want_entropy, value_loss_fn=value_fn)
                grad_norm = learner.clip_grad_norm()
                record("loss/total", total_loss)
                record("grad_norm", grad_norm)
                if not (math.isfinite(total_loss) and math.isfinite(grad_norm)):
                    learner.zero_grad()
                    self.nonfinite_streak += 1
                    record("nonfinite_skipped", 1.0)
                    if self.nonfinite_streak >= tc.max_nonfinite_steps:
                        last = self.run.latest_checkpoint()
                        raise NonFiniteLossError(
                            f"{self.nonfinite_streak} consecutive non-finite loss/gradient steps at step {self.step + 1}; "
                            f"last good checkpoint: {last or 'none written yet'}. Lower trainer.lr or check rewards."
                        )
                    continue
                self.nonfinite_streak = 0
                for k, v in learner.optim_step(lr_factor(self.step, tc.steps, tc.warmup_steps, tc.lr_schedule)).items():
                    record(k, v)
        out = {k: sums[k] / counts[k] for k in sums}
        out["lr"] = learner.optimizer.param_groups[0]["lr"]
        return out

    def _value_loss(self, micro: Rollouts, values: torch.Tensor, counts_kw: dict, record: Callable) -> torch.Tensor:
        """PPO clipped value loss of the critic on one micro-batch, aggregated like the policy loss."""
        alg = self.cfg.algorithm
        mask = micro.completion_mask.to(values.device)
        out = value_loss(values, micro.values.to(values.device), micro.returns.to(values.device), mask,
                         clip_range=alg.critic.value_clip)
        loss = aggregate(out.loss, mask, alg.aggregation, **counts_kw)
        record("critic/loss", float(loss.detach()))
        for k, v in out.metrics.items():
            record(f"critic/{k}", float(v))
        return loss

    def _micro_loss(self, micro: Rollouts, logp: torch.Tensor, entropy: Optional[torch.Tensor], loss_fn: Callable,
                    counts_kw: dict, record: Callable) -> torch.Tensor:
        """Policy loss (+ KL, - entropy bonus) of one micro-batch, normalised by mini-batch counts."""
        alg = self.cfg.algorithm
        entropy_coef = self.entropy_ctl.value
        mask = micro.loss_mask.to(logp.device)
        old = micro.old_logprobs.to(logp.device) if micro.old_logprobs is not None else logp.detach()
        behaviour = micro.behaviour_logprobs.to(logp.device)
        is_weights = None
        if alg.correction.name is not None:
            corr = CORRECTIONS.get(alg.correction.name)(CorrectionInput(behaviour, old, mask), alg.correction)
            is_weights, mask = corr.weights, mask * corr.mask
            for k, v in corr.metrics.items():
                record(k if "/" in k else f"correction/{k}", float(v))
        out = loss_fn(
            PolicyLossInput(logprobs=logp, old_logprobs=old, advantages=micro.advantages.to(logp.device), mask=mask,
                            is_weights=is_weights, behaviour_logprobs=behaviour,
                            entropy=entropy if entropy_coef > 0 else None),
            alg.loss,
        )
        loss = aggregate(out.loss, mask, alg.aggregation, **counts_kw)
        record("loss/policy", float(loss.detach()))
        for k, v in out.metrics.items():
            record(f"loss/{k}", float(v))
        # Train-inference mismatch: behaviour (engine) vs old (learner at rollout weights).
        for k, v in mismatch_metrics(behaviour, old.detach(), micro.completion_mask.to(logp.device)).items():
            record(k, float(v))
        if micro.ref_logprobs is not None:
            kl = kl_estimate(logp, micro.ref_logprobs.to(logp.device), alg.kl.estimator)
            record("kl/mean", float((kl.detach() * mask).sum() / mask.sum().clamp_min(1)))
            if not alg.kl.in_reward:
                loss = loss + self.kl_ctl.value * aggregate(kl, mask, alg.aggregation, **counts_kw)
        if entropy is not None:
            record("entropy/learner", float((entropy.detach() * mask).sum() / mask.sum().clamp_min(1)))
            if entropy_coef > 0:
                loss = loss - entropy_coef * aggregate(entropy, mask, alg.aggregation, **counts_kw)
        return loss

    @staticmethod
    def _rollout_metrics(r: Rollouts) -> dict[str, float]:
        from posttrain.algorithms.advantages import group_stats

        lengths = r.completion_lengths
        _, std, _ = group_stats(r.rewards, r.group_ids)
        m = {
            "reward/mean": float(r.rewards.mean()),
            "reward/std": float(r.rewards.std()) if len(r) > 1 else 0.0,
            "response_length/mean": float(lengths.mean()),
            "response_length/max": float(lengths.max()),
            "truncated_frac": float(r.truncated.float().mean()),
            "groups/zero_std_frac": float((std == 0).float().mean()),
        }
        if r.entropies is not None:  # the sampler's; the learner's are entropy/learner
            m["entropy/mean"] = float((r.entropies * r.completion_mask).sum() / r.completion_mask.sum().clamp_min(1))
        for name, values in r.reward_components.items():
            m[f"reward_component/{name}"] = float(values.mean())
        return m

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, problems: Optional[list[Problem]] = None, chunk: int = 64) -> EvalResult:
        """Held-out accuracy: one sample per problem at ``trainer.eval_temperature``.

        Uses its own fixed-seed generator so evaluating never shifts the training RNG.
        """
        problems = problems or self.eval_problems
        params = SamplingParams(max_new_tokens=self.cfg.rollout.max_new_tokens,
                                temperature=self.cfg.trainer.eval_temperature,
                                top_p=self.cfg.rollout.top_p, top_k=self.cfg.rollout.top_k,
                                stop=tuple(self.cfg.rollout.stop))
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.trainer.seed + 7919)
        correct, rewards, lengths = [], [], []
        for s in range(0, len(problems), chunk):
            r = self.engine.generate(problems[s:s + chunk], 1, params, gen)
            self.score(r, self.eval_reward)
            flags, _ = correct_flags({k: v.tolist() for k, v in r.reward_components.items()}, r.rewards.tolist())
            correct += [float(f) for f in flags]
            rewards += r.rewards.tolist()
            lengths += r.completion_lengths.tolist()
        return EvalResult(float(np.mean(correct)), len(problems), float(np.mean(rewards)), float(np.mean(lengths)))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            **self.learner.state_dict(),
            # prompts submitted ahead but not trained on are sampled again after a resume
            "sampler_position": self.data.position - sum(len(p) for p, _ in self.in_flight),
            "generator": self.generator.get_state(),
            "torch_rng": torch.random.get_rng_state(),
            "nonfinite_streak": self.nonfinite_streak,
            "kl_coef": self.kl_ctl.value,
            "entropy_coef": self.entropy_ctl.value,
            "config": to_dict(self.cfg),
        }

    def load_state(self, checkpoint: Path) -> None:
        state = load_trainer_state(checkpoint)
        self.learner.load_checkpoint(checkpoint, state)
        self.step = int(state["step"])
        self.engine.load_weights(self.learner.export_weights(), self.step)
        self.data.position = int(state["sampler_position"])
        self.generator.set_state(state["generator"])
        torch.random.set_rng_state(state["torch_rng"])
        self.nonfinite_streak = int(state["nonfinite_streak"])
        self.kl_ctl.value = float(state["kl_coef"])
        self.entropy_ctl.value = float(state["entropy_coef"])

    def save_checkpoint(self) -> Path:
        with self.learner.fp32_policy():  # checkpoints hold the fp32 masters either way
            return self.run.save_checkpoint(self.step, self.learner.policy, self.tokenizer, self.state_dict(),
                                            keep=self.cfg.trainer.keep_checkpoints,
                                            extra_weights=self.learner.extra_weights())

    def close(self) -> None:
        """Stop the rollout engine (vLLM's runs in its own process; Ray workers are actors)."""
        self.in_flight.clear()
        self.engine.close()


def _unique_prompt_tokens(r: Rollouts) -> int:
    """Prompt tokens the learner processes when each group's prompt runs once."""
    per_group = torch.zeros(int(r.group_ids.max()) + 1, dtype=torch.long)
    per_group[r.group_ids] = r.prompt_mask.sum(-1).long()  # rows of a group share their prompt
    return int(per_group.sum())

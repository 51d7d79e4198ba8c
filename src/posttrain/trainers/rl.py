"""The RL trainer: one readable loop from prompts to optimizer step.

    for each step:
        problems   = sampler.next(num_prompts)                      # seeded, resumable
        rollouts   = engine.generate(problems, n)                   # tokens, behaviour log-probs, entropies
        rollouts.rewards, components = reward(group) for each group # group-aware rewards
        rollouts.ref_logprobs / old_logprobs  (only when needed)
        rollouts.advantages = ADVANTAGES[estimator](...)            # [N, T]
        for epoch, mini-batch, micro-batch:
            logp = learner log-probs (chunked output projection)
            loss = aggregate(POLICY_LOSSES[loss](...)) + kl + entropy terms
            backward; after the mini-batch: clip, optimizer step, LR schedule
        engine.sync_weights(policy); log; evaluate; checkpoint

Old log-probs: with one epoch and one mini-batch the policy has not moved when the loss is
computed, so old = current.detach() exactly and no extra forward pass is needed (TRL does the
same). Otherwise they are recomputed before the first update ("recompute"), or taken from the
rollout engine ("behaviour", the bypass mode of verl).
"""

from __future__ import annotations

import copy
import math
import random
import time
from contextlib import nullcontext
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
from posttrain.algorithms.corrections import mismatch_metrics
from posttrain.algorithms.overlong import dapo_overlong_penalty, mask_truncated
from posttrain.algorithms.regularizers import AdaptiveEntropyController, AdaptiveKLController, kl_in_reward, \
    top_entropy_mask
from posttrain.config import RLConfig, to_dict
from posttrain.evaluation.runner import correct_flags
from posttrain.algorithms.advantages_token import gae_returns, value_loss
from posttrain.models import fast_decoder
from posttrain.models.logprobs import SharedPromptPass, completion_logprobs, uses_fast_decoder
from posttrain.models.value import ValueModel
from posttrain.rewards.errors import score_group
from posttrain.rollout.batch import Rollouts
from posttrain.rollout.engine import HFRolloutEngine, SamplingParams, cpu_supports_bf16, resolve_dtype
from posttrain.runs import RunDir, load_trainer_state
from posttrain.tasks.base import Problem
from posttrain.trainers.master_weights import SplitMasterAdamW, accumulate_grad


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
    def __init__(self, cfg: RLConfig, policy, tokenizer, task, reward, run: RunDir, device: str = "cpu",
                 eval_reward=None):
        self.cfg = cfg
        self.policy = policy.to(device)
        self.tokenizer = tokenizer
        self.task = task
        self.reward = reward
        self.eval_reward = eval_reward or reward
        self.run = run
        self.device = torch.device(device)
        tc = cfg.trainer
        if tc.threads:
            torch.set_num_threads(tc.threads)
        torch.manual_seed(tc.seed)
        self.sampler = EpochSampler(list(task.problems("train")), tc.seed)
        self.eval_problems = list(task.problems("test"))[: tc.eval_problems]
        if not self.eval_problems:
            raise ValueError("the task's test split is empty: nothing to evaluate on")
        use_bf16 = tc.autocast == "bfloat16" or (tc.autocast == "auto" and self._bf16_ok())
        rollout_dtype = resolve_dtype(cfg.rollout.dtype, self.device)
        # Mixed precision with fp32 master weights (Micikevicius et al., arXiv 1710.03740): the
        # learner computes on the sampler's bf16 weights (no per-micro-batch autocast casts, 12% of
        # an update) and each gradient moves into an fp32 accumulator as soon as it lands. With
        # split_master_weights the masters are the bf16 weights plus 16 low bits
        # (trainers.master_weights) and the policy itself becomes that bf16 model; otherwise the
        # fp32 policy is the master and the sampler holds a bf16 copy. No bf16: fp32 throughout.
        self.split_master = (use_bf16 and rollout_dtype == torch.bfloat16 and tc.split_master_weights
                             and self.device.type == "cpu" and next(policy.parameters()).dtype == torch.float32)
        self.engine = HFRolloutEngine(policy, tokenizer,
                                      dtype=torch.float32 if self.split_master else rollout_dtype,
                                      chat_template=cfg.rollout.chat_template, attention=cfg.model.attention,
                                      decoder=cfg.model.decoder)
        # Check every prompt fits the context before any work starts.
        self.engine.encode(self.sampler.problems + self.eval_problems, cfg.rollout.max_new_tokens)
        if tc.activation_checkpointing and not uses_fast_decoder(policy.get_decoder(), cfg.model.decoder):
            why = "model.decoder=hf" if cfg.model.decoder == "hf" else fast_decoder.unsupported_reason(policy.get_decoder())
            raise ValueError(f"trainer.activation_checkpointing needs posttrain's lean decoder (model.decoder=auto and a "
                             f"Llama/Qwen2-architecture model), but here: {why}. Set it to false.")
        self.learner_dtype = torch.bfloat16 if use_bf16 else torch.float32
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
        self.critic = self.critic_optimizer = None
        if cfg.algorithm.uses_critic:  # from the fp32 weights, before they are split
            self.critic = ValueModel(policy).to(device)
            self.critic_optimizer = torch.optim.AdamW(self.critic.parameters(), lr=cfg.algorithm.critic.lr,
                                                      betas=tuple(tc.adam_betas), weight_decay=tc.weight_decay)
        adam = dict(lr=tc.lr, betas=tuple(tc.adam_betas), weight_decay=tc.weight_decay)
        self.learner, self.learner_autocast = self.policy, self.autocast
        if self.split_master:
            # From here the policy (the model passed in) holds bf16 weights; the master lives in the optimizer.
            self.optimizer = SplitMasterAdamW(self.policy.parameters(), **adam)  # the engine's model too
            self.learner_autocast = nullcontext
        else:
            if use_bf16 and self.engine.model is not self.policy and self.engine.dtype == torch.bfloat16:
                self.learner, self.learner_autocast = self.engine.model, nullcontext
                self._route_grads_to_master()
            # fused: one pass per parameter with no temporaries (3x faster than the per-parameter
            # loop on a CPU; the multi-tensor path would allocate temporaries the size of the model).
            self.optimizer = torch.optim.AdamW(self.policy.parameters(), fused=True, **adam)
        self.ref = None
        if cfg.algorithm.uses_reference:  # in the learner's precision, so KL is exactly 0 at the start
            self.ref = copy.deepcopy(self.learner).eval().requires_grad_(False)
        self.kl_ctl = AdaptiveKLController(cfg.algorithm.kl)
        self.entropy_ctl = AdaptiveEntropyController(cfg.algorithm.entropy)
        self.generator = torch.Generator(device=self.device).manual_seed(tc.seed)
        self.step = 0
        self.nonfinite_streak = 0
        self.sampling = SamplingParams(
            max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, stop=tuple(cfg.rollout.stop),
        )

    def _route_grads_to_master(self) -> None:
        for master, low in zip(self.policy.parameters(), self.learner.parameters(), strict=True):
            low.requires_grad_(master.requires_grad)

            def move(low: torch.Tensor, master: torch.Tensor = master) -> None:
                master.grad = accumulate_grad(master.grad, low.grad, master.dtype)
                low.grad = None

            low.register_post_accumulate_grad_hook(move)

    def _bf16_ok(self) -> bool:
        return torch.cuda.is_bf16_supported() if self.device.type == "cuda" else cpu_supports_bf16()

    # ------------------------------------------------------------------ rollouts and rewards
    def score(self, rollouts: Rollouts, reward=None) -> list[dict]:
        """Fill rewards and components group by group; returns reward-error records."""
        reward = reward or self.reward
        n = len(rollouts)
        rewards = torch.zeros(n)
        components: dict[str, torch.Tensor] = {}
        errors: list[dict] = []
        for gid in torch.unique(rollouts.group_ids).tolist():
            idx = (rollouts.group_ids == gid).nonzero().squeeze(-1).tolist()
            problem = rollouts.problems[idx[0]]
            out, errs = score_group(reward, problem, [rollouts.texts[i] for i in idx],
                                    on_error=self.cfg.trainer.on_reward_error)
            errors += errs
            rewards[idx] = torch.tensor(out.rewards, dtype=torch.float32)
            for name, values in out.components.items():
                components.setdefault(name, torch.zeros(n))[idx] = torch.tensor(values, dtype=torch.float32)
            for i, info in zip(idx, out.info):
                rollouts.metadata[i].update(info)
        rollouts.rewards, rollouts.reward_components = rewards, components
        return errors

    def _greedy_baseline(self, problems: list[Problem], rollouts: Rollouts) -> torch.Tensor:
        """ReMax: the reward of one greedy completion per prompt, broadcast to its group."""
        greedy = SamplingParams(max_new_tokens=self.sampling.max_new_tokens, top_k=1, stop=self.sampling.stop)
        base = self.engine.generate(problems, 1, greedy, self.generator)
        self.score(base)
        return base.rewards[rollouts.group_ids]

    def _logprobs(self, model, batch: Rollouts, with_entropy: bool = False, prompt_states=None):
        with self.learner_autocast():  # the learner or the reference, which shares its precision
            return completion_logprobs(
                model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask,
                temperature=self.cfg.rollout.temperature, chunk_tokens=self.cfg.trainer.logprob_chunk_tokens,
                with_entropy=with_entropy, share_prompts=self.cfg.trainer.share_prompt_pass,
                attention=self.cfg.model.attention, prompt_states=prompt_states, decoder_mode=self.cfg.model.decoder,
                checkpoint_layers=self.cfg.trainer.activation_checkpointing,  # a no-op under no_grad
            )

    def _values(self, batch: Rollouts) -> torch.Tensor:
        with self.autocast():
            return self.critic(batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask,
                               share_prompts=self.cfg.trainer.share_prompt_pass, attention=self.cfg.model.attention,
                               decoder_mode=self.cfg.model.decoder)

    def _no_grad_pass(self, rollouts: Rollouts, fn: Callable[[Rollouts], torch.Tensor]) -> torch.Tensor:
        """[N, T] from ``fn`` run per length bucket on padding-trimmed rows, zero-padded, in row order."""
        N, T = rollouts.completion_ids.shape
        out = torch.zeros((N, T))
        with torch.no_grad():
            for rows in length_buckets(rollouts, self.cfg.trainer.micro_batch_size, self.cfg.trainer.micro_batch_tokens):
                part = fn(_trim(rollouts.select(rows))).cpu()
                out[rows, : part.shape[1]] = part
        return out

    def _batched_values(self, rollouts: Rollouts) -> torch.Tensor:
        return self._no_grad_pass(rollouts, self._values)

    def _batched_logprobs(self, model, rollouts: Rollouts) -> torch.Tensor:
        return self._no_grad_pass(rollouts, lambda micro: self._logprobs(model, micro)[0])

    def _old_logprobs_mode(self) -> str:
        mode = self.cfg.trainer.old_logprobs
        if mode == "auto":
            single = self.cfg.trainer.ppo_epochs == 1 and self.cfg.trainer.mini_batches == 1
            return "current" if single else "recompute"
        return mode

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        cfg, alg = self.cfg, self.cfg.algorithm
        t0 = time.perf_counter()
        self.policy.eval()
        problems = self.sampler.next(cfg.rollout.num_prompts)
        rollouts = self.engine.generate(problems, cfg.rollout.num_completions, self.sampling, self.generator,
                                        share_prefill=cfg.rollout.share_prompt_prefill)
        gen_stats = dict(self.engine.last_stats)
        t_gen = time.perf_counter()
        errors = self.score(rollouts)
        for e in errors:
            self.run.append("reward_errors.jsonl", {"step": self.step + 1, **e})
        mode = self._old_logprobs_mode()
        if mode == "recompute":
            rollouts.old_logprobs = self._batched_logprobs(self.learner, rollouts)
        elif mode == "behaviour":
            rollouts.old_logprobs = rollouts.behaviour_logprobs
        if self.ref is not None:
            rollouts.ref_logprobs = self._batched_logprobs(self.ref, rollouts)
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
        if self.critic is not None:
            rollouts.values = self._batched_values(rollouts)
        adv_input = AdvantageInput(
            rewards=rollouts.rewards, group_ids=rollouts.group_ids, mask=mask,
            reward_components=rollouts.reward_components, token_rewards=token_rewards, logprobs=logprobs,
            ref_logprobs=rollouts.ref_logprobs, baseline_rewards=baseline, values=rollouts.values,
            answers=[str(m.get("canonical", m.get("answer"))) for m in rollouts.metadata],
        )
        rollouts.advantages = ADVANTAGES.get(alg.advantage_estimator)(adv_input, alg.advantage).float()
        if self.critic is not None:
            rollouts.returns = gae_returns(adv_input, alg.advantage).float()
        # Which tokens get a loss: DAPO overlong filtering, 80/20 high-entropy tokens.
        loss_mask = mask_truncated(mask, rollouts.truncated) if alg.mask_truncated else mask
        rollouts.loss_mask = top_entropy_mask(rollouts.entropies, loss_mask, alg.entropy.top_quantile)
        metrics = self.update(rollouts)
        if "kl/mean" in metrics:
            metrics["kl/coef"] = self.kl_ctl.update(metrics["kl/mean"], len(rollouts))
        if "entropy/learner" in metrics:
            metrics["entropy/coef"] = self.entropy_ctl.update(metrics["entropy/learner"])
        self.engine.sync_weights(self.policy)
        t_end = time.perf_counter()
        self.step += 1
        metrics.update(self._rollout_metrics(rollouts))
        metrics.update({
            "reward_errors": float(len(errors)),
            "time/gen_s": t_gen - t0, "time/learn_s": t_end - t_gen, "time/step_s": t_end - t0,
            "perf/gen_tok_per_s": gen_stats.get("gen_tok_per_s", 0.0),
            "perf/learn_tok_per_s": float((rollouts.prompt_mask.sum() + mask.sum()) / max(t_end - t_gen, 1e-9)),
            "data/position": float(self.sampler.position),
            "tokens/completion": float(mask.sum()),
            "tokens/prompt": float(rollouts.prompt_mask.sum()),
            "tokens/prompt_unique": float(_unique_prompt_tokens(rollouts)),
        })
        return metrics

    def update(self, rollouts: Rollouts) -> dict[str, float]:
        cfg, tc, alg = self.cfg, self.cfg.trainer, self.cfg.algorithm
        self.learner.train()
        loss_fn = POLICY_LOSSES.get(alg.policy_loss)
        n = len(rollouts)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}

        def record(key: str, value: float) -> None:
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1

        mini_size = n // tc.mini_batches
        for epoch in range(tc.ppo_epochs):
            order = torch.randperm(n, generator=self.generator) if tc.ppo_epochs > 1 or tc.mini_batches > 1 \
                else torch.arange(n)
            for m in range(tc.mini_batches):
                mini = rollouts.select(order[m * mini_size:(m + 1) * mini_size])
                counts_kw = dict(num_tokens=float(mini.loss_mask.sum()), num_seqs=float(len(mini)),
                                 norm_length=float(cfg.rollout.max_new_tokens))
                self.optimizer.zero_grad(set_to_none=True)
                if self.critic is not None:
                    self.critic_optimizer.zero_grad(set_to_none=True)
                total_loss = 0.0
                # Micro-batches of similar completion length waste little compute on padding;
                # the loss is a sum normalised by mini-batch counts, so the grouping is free.
                # Their prompts run through the decoder once per mini-batch (SharedPromptPass).
                shared = None
                if tc.share_prompt_pass and share_prompts_across_micro_batches(mini, tc.micro_batch_size):
                    with self.learner_autocast():
                        shared = SharedPromptPass(self.learner, mini.prompt_ids, mini.prompt_mask,
                                                  cfg.model.attention, mini.prompt_ids.shape[1] + mini.completion_ids.shape[1],
                                                  cfg.model.decoder)
                # Longest first: its activations are freed while the fp32 gradients are first
                # allocated, so the two do not stack at the memory peak.
                for rows in reversed(length_buckets(mini, tc.micro_batch_size, tc.micro_batch_tokens)):
                    micro = _trim(mini.select(rows), trim_prompt=shared is None)
                    loss, parts = self._micro_loss(micro, loss_fn, counts_kw, record,
                                                   shared.rows(rows) if shared is not None else None)
                    loss.backward()
                    total_loss += float(loss.detach())
                    if self.critic is not None:
                        self._value_loss(micro, counts_kw, record).backward()
                if shared is not None:
                    shared.backward()
                grad_norm = (self.optimizer.clip_grad_norm_(tc.max_grad_norm) if self.split_master
                             else torch.nn.utils.clip_grad_norm_(self.policy.parameters(), tc.max_grad_norm))
                record("loss/total", total_loss)
                record("grad_norm", float(grad_norm))
                if not (math.isfinite(total_loss) and math.isfinite(float(grad_norm))):
                    self.optimizer.zero_grad(set_to_none=True)
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
                factor = lr_factor(self.step, tc.steps, tc.warmup_steps, tc.lr_schedule)
                for group in self.optimizer.param_groups:
                    group["lr"] = tc.lr * factor
                self.optimizer.step()
                if self.critic is not None:
                    record("critic/grad_norm", float(torch.nn.utils.clip_grad_norm_(self.critic.parameters(),
                                                                                    tc.max_grad_norm)))
                    for group in self.critic_optimizer.param_groups:
                        group["lr"] = alg.critic.lr * factor
                    self.critic_optimizer.step()
        self.learner.eval()
        out = {k: sums[k] / counts[k] for k in sums}
        out["lr"] = self.optimizer.param_groups[0]["lr"]
        return out

    def _value_loss(self, micro: Rollouts, counts_kw: dict, record: Callable) -> torch.Tensor:
        """PPO clipped value loss of the critic on one micro-batch, aggregated like the policy loss."""
        alg = self.cfg.algorithm
        values = self._values(micro)
        mask = micro.completion_mask.to(values.device)
        out = value_loss(values, micro.values.to(values.device), micro.returns.to(values.device), mask,
                         clip_range=alg.critic.value_clip)
        loss = aggregate(out.loss, mask, alg.aggregation, **counts_kw)
        record("critic/loss", float(loss.detach()))
        for k, v in out.metrics.items():
            record(f"critic/{k}", float(v))
        return loss

    def _micro_loss(self, micro: Rollouts, loss_fn: Callable, counts_kw: dict, record: Callable, prompt_states=None):
        alg = self.cfg.algorithm
        entropy_coef = self.entropy_ctl.value
        want_entropy = entropy_coef > 0
        logp, entropy = self._logprobs(self.learner, micro, with_entropy=want_entropy, prompt_states=prompt_states)
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
                            is_weights=is_weights, behaviour_logprobs=behaviour, entropy=entropy if want_entropy else None),
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
        if want_entropy:
            record("entropy/learner", float((entropy.detach() * mask).sum() / mask.sum().clamp_min(1)))
            loss = loss - entropy_coef * aggregate(entropy, mask, alg.aggregation, **counts_kw)
        return loss, out

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
            "entropy/mean": float((r.entropies * r.completion_mask).sum() / r.completion_mask.sum().clamp_min(1)),
            "groups/zero_std_frac": float((std == 0).float().mean()),
        }
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
            "optimizer": self.optimizer.state_dict(),
            "sampler_position": self.sampler.position,
            "generator": self.generator.get_state(),
            "torch_rng": torch.random.get_rng_state(),
            "nonfinite_streak": self.nonfinite_streak,
            "kl_coef": self.kl_ctl.value,
            "critic_optimizer": self.critic_optimizer.state_dict() if self.critic is not None else None,
            "entropy_coef": self.entropy_ctl.value,
            "config": to_dict(self.cfg),
        }

    def load_state(self, checkpoint: Path) -> None:
        from safetensors.torch import load_model

        with self._fp32_policy():  # loads the exact fp32 masters when they are split
            load_model(self.policy, str(checkpoint / "model.safetensors"), strict=False)
        self.engine.sync_weights(self.policy)
        state = load_trainer_state(checkpoint)
        self.step = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.position = int(state["sampler_position"])
        self.generator.set_state(state["generator"])
        torch.random.set_rng_state(state["torch_rng"])
        self.nonfinite_streak = int(state["nonfinite_streak"])
        self.kl_ctl.value = float(state["kl_coef"])
        if self.critic is not None:
            load_model(self.critic, str(checkpoint / "critic.safetensors"))
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.entropy_ctl.value = float(state["entropy_coef"])

    def save_checkpoint(self) -> Path:
        extra = {"critic": self.critic.state_dict()} if self.critic is not None else None
        with self._fp32_policy():  # checkpoints hold the fp32 masters either way
            return self.run.save_checkpoint(self.step, self.policy, self.tokenizer, self.state_dict(),
                                            keep=self.cfg.trainer.keep_checkpoints, extra_weights=extra)

    def _fp32_policy(self):
        """Context in which ``self.policy`` holds its fp32 master weights."""
        return self.optimizer.materialized() if self.split_master else nullcontext()


def _unique_prompt_tokens(r: Rollouts) -> int:
    """Prompt tokens the learner processes when each group's prompt runs once."""
    per_group = torch.zeros(int(r.group_ids.max()) + 1, dtype=torch.long)
    per_group[r.group_ids] = r.prompt_mask.sum(-1).long()  # rows of a group share their prompt
    return int(per_group.sum())


def share_prompts_across_micro_batches(batch: Rollouts, micro_batch_size: int) -> bool:
    """Whether one prompt pass for the whole mini-batch pays: some prompt repeats, and the pass
    (distinct prompts x prompt width) is no larger than one micro-batch's forward, since its
    activations stay alive until the mini-batch's last backward."""
    distinct = torch.unique(torch.cat([batch.prompt_ids, batch.prompt_mask.long()], 1), dim=0).shape[0]
    width, longest = batch.prompt_ids.shape[1], int(batch.completion_lengths.max())
    return distinct < len(batch) and distinct * width <= micro_batch_size * (width + longest)


def length_buckets(batch: Rollouts, max_rows: int, max_tokens: int) -> list[torch.Tensor]:
    """Row indices of micro-batches: rows sorted by completion length, cut whenever a bucket
    would exceed ``max_rows`` rows or ``max_tokens`` padded tokens (rows x (prompt width +
    longest completion in the bucket); 0 = no token limit). A bucket holds at least one row.

    Sorting keeps padding small; the token cap bounds activation memory when lengths vary a lot.
    """
    order = torch.argsort(batch.completion_lengths, stable=True)
    lengths = batch.completion_lengths[order].tolist()
    prompt_width = int(batch.prompt_mask.any(0).sum())
    buckets, start = [], 0
    for i in range(1, len(lengths) + 1):
        rows = i - start
        too_many = rows > max_rows or (max_tokens and rows > 1 and rows * (prompt_width + lengths[i - 1]) > max_tokens)
        if too_many:
            buckets.append(order[start:i - 1])
            start = i - 1
    buckets.append(order[start:])
    return [b for b in buckets if len(b)]


def _trim(batch: Rollouts, trim_prompt: bool = True) -> Rollouts:
    """Drop completion right-padding (and prompt left-padding) shared by the whole micro-batch."""
    p_keep = batch.prompt_mask.any(0).nonzero()
    c_len = int(batch.completion_mask.sum(-1).max())
    p0 = int(p_keep[0]) if p_keep.numel() and trim_prompt else 0
    out = copy.copy(batch)
    out.prompt_ids, out.prompt_mask = batch.prompt_ids[:, p0:], batch.prompt_mask[:, p0:]
    for name in ("completion_ids", "completion_mask", "loss_mask", "behaviour_logprobs", "entropies", "advantages",
                 "old_logprobs", "ref_logprobs", "values", "returns"):
        value = getattr(batch, name)
        if value is not None:
            setattr(out, name, value[:, :c_len])
    return out

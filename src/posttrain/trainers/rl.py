"""The RL loop: a Sampler makes rollouts, rewards score them, a Learner updates on them.

    for each step:
        problems   = data.next(num_prompts)                         # seeded, resumable
        rollouts   = engine.generate(problems, n)                   # tokens, behaviour log-probs (hf or vllm)
        rollouts.rewards, components = reward(group) for each group # group-aware rewards
        engine.release_memory()                                     # what it rebuilds, for the learner
        rl_update.learn(rollouts, orders)                           # advantages, PPO epochs x mini-batches
        engine.load_weights(learner.export_weights(), version)      # in place; free when shared
        log; evaluate; checkpoint

The Learner (trainers/learner.py) owns weights, precision, optimizer, reference and critic; the
Sampler (rollout/sampler.py) owns sampling; RLUpdate (trainers/rl_update.py) is what the learner
does with a batch, on one rank or on each of ``distributed.learners`` data-parallel ranks
(trainers/learner_group.py). This file only orchestrates them.

Old log-probs: with one epoch and one mini-batch the policy has not moved when the loss is
computed, so old = current.detach() exactly and no extra forward pass is needed (TRL does the
same). Otherwise they are recomputed before the first update ("recompute"), or taken from the
rollout engine ("behaviour", the bypass mode of verl). Behaviour (engine) vs old (learner at the
same weights) is the train-inference mismatch the corrections act on: zero-ish with the
in-process engine, real with vLLM.
"""

from __future__ import annotations

import random
import time
from collections import deque
from pathlib import Path
from typing import Optional

import torch

from posttrain.config import RLConfig, to_dict
from posttrain.environments.episodes import episode_metrics, run_episodes
from posttrain.environments.registry import build_environment
from posttrain.rewards.errors import score_rollouts
from posttrain.rewards.process import step_token_rewards
from posttrain.rollout.batch import Rollouts
from posttrain.rollout.engine import SamplingParams, resolve_dtype
from posttrain.rollout.sampler import build_engine, context_window, encode_prompts
from posttrain.runs import RunDir, load_trainer_state
from posttrain.selection import build_selector
from posttrain.tasks.base import Problem
from posttrain.trainers.held_out import EvalResult, held_out_accuracy
from posttrain.trainers.hybrid import hpt_split
from posttrain.trainers.learner import Learner, resolve_device
from posttrain.trainers.resources import check_memory
from posttrain.trainers.rl_update import NonFiniteLossError, RLUpdate, lr_factor, mini_batch_orders
from posttrain.trainers.selected_batch import sample_selected

__all__ = ["EpochSampler", "EvalResult", "NonFiniteLossError", "RLTrainer", "lr_factor"]


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


class RLTrainer:
    def __init__(self, cfg: RLConfig, policy, tokenizer, task, reward, run: RunDir, eval_reward=None, env=None):
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
        encoded = encode_prompts(tokenizer, self.data.problems + self.eval_problems, cfg.rollout.max_new_tokens,
                                 cfg.rollout.chat_template, context_window(policy.config))
        # ... and the run must fit in memory, checked before the engine allocates its KV cache.
        check_memory(cfg, policy, max(map(len, encoded)), device=self.device)
        sampler_dtype = resolve_dtype(cfg.rollout.dtype, self.device)
        self.learner = Learner(policy, tc, cfg.model, temperature=cfg.rollout.temperature, device=self.device,
                               sampler_dtype=sampler_dtype, reference=alg.uses_reference,
                               critic_lr=alg.critic.lr if alg.uses_critic else None,
                               shard=cfg.distributed.strategy == "fsdp2")
        self.learner_group = None
        if cfg.distributed.learners > 1:  # this process is rank 0; Ray actors are ranks 1..M-1
            from posttrain.trainers.learner_group import LearnerGroup

            self.learner_group = LearnerGroup(cfg, self.learner)
        self.rl_update = RLUpdate(cfg, self.learner, self.learner_group.dp if self.learner_group else None,
                                  tokenizer=tokenizer)
        try:
            if cfg.distributed.rollout_workers:  # Ray actors, each with its own engine and reward
                from posttrain.distributed.ray_pool import RayRolloutPool

                self.engine = RayRolloutPool(cfg, tokenizer, self.learner.export_weights(), sampler_dtype)
            else:  # the hf engine shares the learner's compute weights when the dtypes agree (no sync);
                # under fsdp2 it gets a whole copy of its own
                self.engine = build_engine(cfg.rollout, cfg.model, self.learner.sampler_model(), tokenizer,
                                           sampler_dtype, tc.seed)
        except BaseException:
            if self.learner_group is not None:  # no actors or process group outlive a failed start
                self.learner_group.close()
            raise
        self.in_flight: deque = deque()  # (problems, handle) submitted ahead, asynchronous training only
        self.selector = build_selector(cfg.selection, cfg.rollout.num_completions)
        # null: single-turn sampling through engine.generate, exactly as before environments existed
        self.env = env or (build_environment(cfg.environment, reward) if cfg.environment is not None else None)
        self.eval_env = env or (build_environment(cfg.environment, self.eval_reward)
                                if cfg.environment is not None else None)
        self.generator = torch.Generator(device=self.device).manual_seed(tc.seed)
        self.step = 0
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

    def _generate(self, problems: list[Problem], n: Optional[int] = None, sampling=None) -> Rollouts:
        n, sampling = n or self.cfg.rollout.num_completions, sampling or self.sampling
        if self.env is not None:  # episodes: the environment steps and scores (environments/)
            return run_episodes(self.engine, self.env, problems, n, sampling, self.generator)
        return self.engine.generate(problems, n, sampling, self.generator,
                                    share_prefill=self.cfg.rollout.share_prompt_prefill)

    def _scored(self, rollouts: Rollouts) -> list[dict]:
        """Reward errors of ``rollouts``, scoring them here unless an environment or Ray workers
        already did where they sampled."""
        if rollouts.rewards is None:
            return self.score(rollouts)
        if self.env is not None:
            return [e for m in rollouts.metadata for e in m.get("reward_errors", [])]
        return list(self.engine.last_reward_errors)

    def sample_and_score(self, problems: list[Problem]) -> tuple[Rollouts, list[dict]]:
        """Rollouts of ``problems`` with rewards, and the reward errors."""
        rollouts = self._generate(problems)
        return rollouts, self._scored(rollouts)

    def _greedy_baseline(self, problems: list[Problem], rollouts: Rollouts) -> torch.Tensor:
        """ReMax: the reward of one greedy completion per prompt, broadcast to its group."""
        greedy = SamplingParams(max_new_tokens=self.sampling.max_new_tokens, top_k=1, stop=self.sampling.stop)
        base = self._generate(problems, 1, greedy)
        self._scored(base)
        return base.rewards[rollouts.group_ids]

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        cfg, alg, learner = self.cfg, self.cfg.algorithm, self.learner
        t0 = time.perf_counter()
        selection_metrics = {}
        if cfg.selection.name is not None:  # filtered, refilled and down-sampled (trainers/selected_batch.py)
            problems, rollouts, errors, selection_metrics = sample_selected(self)
            gen_stats, t_gen = dict(self.engine.last_stats), time.perf_counter()
        else:
            problems, rollouts = self._next_batch()
            gen_stats, t_gen = dict(self.engine.last_stats), time.perf_counter()
            errors = self._scored(rollouts)
        for e in errors:
            self.run.append("reward_errors.jsonl", {"step": self.step + 1, **e})
        if getattr(self.reward, "step_level", False):  # process rewards: step scores -> tokens (rewards/process.py)
            rollouts.token_rewards = step_token_rewards(rollouts, self.tokenizer)
        baseline = self._greedy_baseline(problems, rollouts) if alg.advantage_estimator == "remax" else None
        sampled, sft, hpt_metrics = rollouts, None, {}
        if alg.hpt_gate is not None:  # HPT: prompts the policy rarely solves learn by SFT (trainers/hybrid.py)
            rollouts, sft, hpt_metrics = hpt_split(problems, rollouts, alg.hpt_gate, self.tokenizer,
                                                   cfg.rollout.chat_template, context_window(self.learner.policy.config))
        self.engine.release_memory()  # sampling is done for this step; the learner gets that memory
        orders = mini_batch_orders(cfg, len(rollouts) if rollouts is not None else 0, self.generator)
        learn = lambda: self.rl_update.learn(rollouts, orders, self.step, baseline, sft)  # noqa: E731
        # With data-parallel learners, ranks 1..M-1 learn on the same batch alongside this one.
        metrics = self.learner_group.learn(rollouts, orders, self.step, baseline, local=learn) \
            if self.learner_group is not None else learn()
        metrics.update(hpt_metrics)
        rollouts = self.last_rollouts = sampled  # metrics (and trainer.log_completions_every) see everything sampled
        mask = rollouts.completion_mask
        t_learn = time.perf_counter()
        self.step += 1
        self.engine.load_weights(learner.export_weights(), self.step)
        t_end = time.perf_counter()
        metrics.update(self._rollout_metrics(rollouts))
        metrics.update(selection_metrics)
        metrics.update({
            "reward_errors": float(len(errors)),
            "time/gen_s": t_gen - t0, "time/learn_s": t_learn - t_gen, "time/sync_s": t_end - t_learn,
            "time/step_s": t_end - t0,
            "perf/gen_tok_per_s": gen_stats.get("gen_tok_per_s", 0.0),
            "perf/learn_tok_per_s": float((rollouts.prompt_mask.sum() + mask.sum()) / max(t_learn - t_gen, 1e-9)),
            "data/position": float(self.data.position),
            "tokens/completion": float(mask.sum()),
            "tokens/prompt": float(rollouts.prompt_mask.sum()),
            "tokens/prompt_unique": float(rollouts.unique_prompt_tokens),
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
            return problems, self._generate(problems)
        while len(self.in_flight) <= cfg.distributed.max_staleness:
            problems = self.data.next(num_prompts)
            self.in_flight.append((problems, self.engine.submit(problems, n, self.sampling, self.generator)))
        problems, handle = self.in_flight.popleft()
        return problems, self.engine.result(handle)

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
            mask = r.policy_mask
            m["entropy/mean"] = float((r.entropies * mask).sum() / mask.sum().clamp_min(1))
        for name, values in r.reward_components.items():
            m[f"reward_component/{name}"] = float(values.mean())
        if r.action_mask is not None:  # multi-turn episodes: turns, tool calls, token split
            m.update(episode_metrics(r))
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
        return held_out_accuracy(self.engine, problems, self.eval_reward, params, self.cfg.trainer.seed + 7919,
                                 self.device, self.cfg.trainer.on_reward_error, chunk, self.eval_env)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            **self.learner.state_dict(),
            # prompts submitted ahead but not trained on are sampled again after a resume
            "sampler_position": self.data.position - sum(len(p) for p, _ in self.in_flight),
            "generator": self.generator.get_state(),
            "torch_rng": torch.random.get_rng_state(),
            **self.rl_update.state(),
            "selection": self.selector.state_dict(),
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
        self.rl_update.load_state(state)
        if "selection" in state:  # checkpoints from before selection existed have none
            self.selector.load_state_dict(state["selection"])
        if self.learner_group is not None:
            self.learner_group.sync(self.learner, self.rl_update.state())

    def save_checkpoint(self) -> Path:
        if self.learner_group is not None:  # rank 0 saves for all: replicas checked, or shards gathered
            self.learner_group.before_checkpoint()
        with self.learner.fp32_policy():  # checkpoints hold the fp32 masters either way
            return self.run.save_checkpoint(self.step, self.learner.checkpoint_model(), self.tokenizer,
                                            self.state_dict(), keep=self.cfg.trainer.keep_checkpoints,
                                            extra_weights=self.learner.extra_weights())

    def close(self) -> None:
        """Stop the rollout engine (vLLM's runs in its own process; Ray workers are actors) and
        the data-parallel learner actors."""
        self.in_flight.clear()
        try:
            self.engine.close()
        finally:
            if self.learner_group is not None:
                self.learner_group.close()

"""Online DPO and DNO-style iterations: preference pairs from the policy's own samples.

    for each step:
        prompts = the next rollout.num_prompts train problems (seeded shuffled epochs)
        samples = policy(prompts), rollout.num_completions each, scored by the reward
        pairs   = per prompt: the highest-reward sample (chosen) vs the lowest (rejected);
                  prompts whose samples all score alike give no pair
        loss    = PREFERENCE_LOSSES[preference.loss] on the pairs, exactly as posttrain dpo
                  (two-pass gradient, trainers/dpo.py), reference log-probs computed fresh
        every preference.reference_update_every steps (k > 0): reference <- current policy

Held-out preference accuracy: before training, the initial policy samples the first
data.held_out_prompts test problems (rollout.num_completions each, a generator of their own) and
the same best-vs-worst rule makes held-out pairs, kept as token rows for the whole run (and in its
checkpoints, so a resumed run scores the same pairs). Every evaluation reports the preference
loss, the share of those pairs whose implicit reward beta * (log pi/pi_ref) ranks the chosen side
higher, and the mean margin, against the current reference (trainers/dpo.py score_pairs). At
step 0 the policy is the reference: every pair is a tie.

With k = 0 the reference is the initial policy throughout: online DPO with a verifier as the
judge (Guo et al., "Direct Language Model Alignment from Online AI Feedback",
arXiv:2402.04792). With k > 0 each k-step block is one iteration of the batched on-policy loop of
DNO (Rosset et al., "Direct Nash Optimization", arXiv:2404.03715): sample from the current
policy, rank, fit a DPO-like contrastive objective against the previous iterate. DNO's oracle
gives general pairwise preferences; here the configured reward ranks samples (a verifier or a
reward model), so the preference is the reward's order.

A pair's two rows are the sampled token ids themselves (not a re-tokenisation of the text), so
the loss sees exactly what the policy produced. The reference weights are checkpointed when
they are updated, so a resumed run continues the same iteration exactly.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from posttrain.config import DPOConfig, to_dict
from posttrain.rewards.errors import score_rollouts
from posttrain.rollout.batch import Rollouts
from posttrain.rollout.engine import SamplingParams, resolve_dtype
from posttrain.rollout.sampler import build_engine
from posttrain.runs import RunDir, load_trainer_state
from posttrain.trainers.dpo import collate_pairs, preference_backward, reference_pair_logps, score_pairs
from posttrain.trainers.held_out import held_out_accuracy
from posttrain.trainers.learner import Learner, resolve_device
from posttrain.trainers.preference_data import PreferencePair
from posttrain.trainers.rl import EpochSampler
from posttrain.trainers.rl_update import step_or_skip


def best_worst(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[list[int], list[int]]:
    """Row indices (chosen, rejected) per group whose rewards differ: the first highest-reward row
    and the first lowest-reward row, groups in order of first appearance."""
    chosen, rejected = [], []
    for g in dict.fromkeys(group_ids.tolist()):
        rows = torch.nonzero(group_ids == g).squeeze(-1)
        r = rewards[rows]
        if bool((r != r[0]).any()):
            chosen.append(int(rows[int(torch.argmax(r))]))
            rejected.append(int(rows[int(torch.argmin(r))]))
    return chosen, rejected


def token_rows(rollouts: Rollouts, row: int) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one sampled row, padding removed."""
    prompt = rollouts.prompt_ids[row][rollouts.prompt_mask[row].bool()]
    completion = rollouts.completion_ids[row][rollouts.completion_mask[row].bool()]
    return prompt.tolist(), completion.tolist()


def pair_batch(rollouts: Rollouts, chosen: list[int], rejected: list[int]) -> Rollouts:
    """The layout of trainers.dpo.collate_pairs (all chosen rows, then all rejected) from sampled rows."""
    batch = Rollouts.concat([rollouts.select(chosen), rollouts.select(rejected)])
    batch.group_ids = torch.arange(len(chosen)).repeat(2)
    return batch


HELD_OUT_SEED_OFFSET = 104_729  # the held-out pairs' generator: apart from training's and evaluation's seeds


class OnlineDPOTrainer:
    def __init__(self, cfg: DPOConfig, policy, tokenizer, task, reward, run: RunDir):
        self.cfg, self.tokenizer, self.reward, self.run = cfg, tokenizer, reward, run
        tc, pc = cfg.trainer, cfg.preference
        self.device = resolve_device(tc.device)
        if tc.threads:
            torch.set_num_threads(tc.threads)
        torch.manual_seed(tc.seed)
        self.prompts = EpochSampler(list(task.problems("train")), tc.seed)
        self.test_problems = list(task.problems("test"))
        self.eval_problems = self.test_problems[: tc.eval_problems]
        sampler_dtype = resolve_dtype(cfg.rollout.dtype, self.device)
        self.learner = Learner(policy, tc, cfg.model, temperature=1.0, device=self.device, sampler_dtype=sampler_dtype,
                               reference=pc.uses_reference)
        self.engine = build_engine(cfg.rollout, cfg.model, self.learner.sampler_model(), tokenizer, sampler_dtype,
                                   tc.seed)
        self.generator = torch.Generator(device=self.device).manual_seed(tc.seed)
        self.sampling = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                       top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, stop=tuple(cfg.rollout.stop))
        self.step = 0
        self.nonfinite_streak = 0
        self.reference_updated = False  # the reference is no longer the initial policy: checkpoint it
        self.held_out: Optional[list[dict]] = None  # drawn at the first evaluation of a fresh run
        self.held_out_ref: list = []  # the held-out chunks' reference log-probs, until the reference moves

    def train_step(self) -> dict[str, float]:
        cfg, tc, pc, learner = self.cfg, self.cfg.trainer, self.cfg.preference, self.learner
        t0 = time.perf_counter()
        problems = self.prompts.next(cfg.rollout.num_prompts)
        rollouts = self.engine.generate(problems, cfg.rollout.num_completions, self.sampling, self.generator)
        score_rollouts(rollouts, self.reward, tc.on_reward_error)
        self.engine.release_memory()  # sampling is done for this step; the learner gets that memory
        self.last_rollouts = rollouts  # trainer.log_completions_every shows some of them
        chosen, rejected = best_worst(rollouts.rewards, rollouts.group_ids)
        t_gen = time.perf_counter()
        metrics = {"online/pairs": float(len(chosen)), "reward/mean": float(rollouts.rewards.mean()),
                   "time/gen_s": t_gen - t0}
        if chosen:
            batch = pair_batch(rollouts, chosen, rejected)
            ref = reference_pair_logps(learner, batch)
            learner.zero_grad()
            loss, out, logps = preference_backward(learner, batch, pc.loss, pc, ref)
            grad_norm = learner.clip_grad_norm()
            metrics.update({"loss/preference": loss, "grad_norm": grad_norm,
                            **{f"preference/{k}": float(v) for k, v in out.metrics.items()},
                            "reward/chosen": float(rollouts.rewards[chosen].mean()),
                            "reward/rejected": float(rollouts.rewards[rejected].mean())})
            update, self.nonfinite_streak = step_or_skip(learner, loss, grad_norm, self.nonfinite_streak, self.step,
                                                         tc)
            metrics.update(update)
        self.step += 1
        k = pc.reference_update_every
        if k and learner.ref is not None and self.step % k == 0:  # DNO: the next iteration's reference
            learner.ref.load_state_dict(learner.model.state_dict())
            self.reference_updated = True
            self.held_out_ref = []
            metrics["online/reference_updated"] = 1.0
        self.engine.load_weights(learner.export_weights(), self.step)
        metrics["time/step_s"] = time.perf_counter() - t0
        return metrics

    def draw_held_out_pairs(self) -> list[dict]:
        """The initial policy's best-vs-worst pairs on the first data.held_out_prompts test problems."""
        cfg = self.cfg
        problems = self.test_problems[: cfg.data.held_out_prompts]
        gen = torch.Generator(device=self.device).manual_seed(cfg.trainer.seed + HELD_OUT_SEED_OFFSET)
        pairs = []
        for s in range(0, len(problems), cfg.rollout.num_prompts):
            r = self.engine.generate(problems[s:s + cfg.rollout.num_prompts], cfg.rollout.num_completions,
                                     self.sampling, gen)
            score_rollouts(r, self.reward, cfg.trainer.on_reward_error)
            for c, j in zip(*best_worst(r.rewards, r.group_ids)):
                pairs.append({"prompt": r.problems[c].prompt, "chosen": r.texts[c], "rejected": r.texts[j],
                              "chosen_rows": token_rows(r, c), "rejected_rows": token_rows(r, j)})
        return pairs

    def held_out_preference(self) -> dict[str, float]:
        pad, size, learner = self.tokenizer.pad_token_id or 0, self.cfg.data.batch_size, self.learner

        def chunk(index, items):
            batch = collate_pairs([(p["chosen_rows"], p["rejected_rows"]) for p in items],
                                  [PreferencePair(p["prompt"], p["chosen"], p["rejected"]) for p in items], pad)
            if index == len(self.held_out_ref):  # one reference pass per chunk while the reference stays
                self.held_out_ref.append(reference_pair_logps(learner, batch))
            return batch, self.held_out_ref[index], None

        items = self.held_out or []
        chunks = (chunk(i, items[s:s + size]) for i, s in enumerate(range(0, len(items), size)))
        return score_pairs(learner, self.cfg.preference, chunks)

    def evaluate(self):
        cfg = self.cfg
        if self.held_out is None and self.step == 0 and cfg.data.held_out_prompts:
            self.held_out = self.draw_held_out_pairs()
        params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.trainer.eval_temperature,
                                top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, stop=tuple(cfg.rollout.stop))
        result = held_out_accuracy(self.engine, self.eval_problems, self.reward, params, cfg.trainer.seed + 7919,
                                   self.device, cfg.trainer.on_reward_error)
        result.extra.update(self.held_out_preference())
        if self.held_out is not None:
            result.extra["held_out_pairs"] = float(len(self.held_out))
        return result

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"step": self.step, **self.learner.state_dict(), "sampler_position": self.prompts.position,
                "generator": self.generator.get_state(), "torch_rng": torch.random.get_rng_state(),
                "nonfinite_streak": self.nonfinite_streak, "reference_updated": self.reference_updated,
                "held_out_pairs": self.held_out, "config": to_dict(self.cfg)}

    def load_state(self, checkpoint: Path) -> None:
        from safetensors.torch import load_file

        state = load_trainer_state(checkpoint)
        self.learner.load_checkpoint(checkpoint, state)
        self.step = int(state["step"])
        self.prompts.position = int(state["sampler_position"])
        self.generator.set_state(state["generator"])
        torch.random.set_rng_state(state["torch_rng"])
        self.nonfinite_streak = int(state["nonfinite_streak"])
        self.reference_updated = bool(state["reference_updated"])
        self.held_out = state.get("held_out_pairs")  # absent from checkpoints that predate held-out pairs
        if self.reference_updated:
            self.learner.ref.load_state_dict(load_file(str(checkpoint / "reference.safetensors")))
        self.engine.load_weights(self.learner.export_weights(), self.step)

    def save_checkpoint(self) -> Path:
        extra = dict(self.learner.extra_weights() or {})
        if self.reference_updated:
            # clones: tied embeddings share storage, which safetensors refuses to save
            extra["reference"] = {k: v.detach().clone() for k, v in self.learner.ref.state_dict().items()}
        with self.learner.fp32_policy():
            return self.run.save_checkpoint(self.step, self.learner.checkpoint_model(), self.tokenizer, self.state_dict(),
                                            keep=self.cfg.trainer.keep_checkpoints, extra_weights=extra or None)

    def close(self) -> None:
        self.engine.close()


def step_info(m: dict) -> str:
    loss = f"loss {m['loss/preference']:.3f} " if "loss/preference" in m else ""
    return f"{loss}pairs {m['online/pairs']:.0f} reward {m['reward/mean']:.3f} {m['time/step_s']:.1f}s/step"


__all__ = ["OnlineDPOTrainer", "best_worst", "pair_batch", "step_info", "token_rows"]

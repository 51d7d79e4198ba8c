"""Supervised fine-tuning on demonstrations, through the same Learner as RL.

    for each step:
        batch = the next data.batch_size demonstrations (seeded shuffled epochs)
        loss  = - sum_{i, t} m_it log pi_theta(y_it | x_i, y_i<t) / sum_{i, t} m_it      (token mean)
        learner.forward_backward(batch, loss); clip; learner.optim_step(lr schedule)
        log; every trainer.eval_every steps: held-out loss and held-out task accuracy; checkpoint

m is 1 on completion tokens only (the EOS that ends them included), so prompt tokens never get
a loss. The normaliser is the whole batch's token count, so micro-batching does not change the
gradient (as in RL's token-mean aggregation). Held-out accuracy samples the task's test problems
through the hf engine exactly as ``posttrain rl`` evaluates, so an SFT run and the RL run that
starts from it (``model.name: <this run directory>``) report comparable numbers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from posttrain.config import SFTConfig, to_dict
from posttrain.rollout.engine import SamplingParams, resolve_dtype
from posttrain.rollout.sampler import build_engine, context_window
from posttrain.runs import RunDir, load_trainer_state
from posttrain.trainers.held_out import held_out_accuracy
from posttrain.trainers.learner import Learner, resolve_device
from posttrain.trainers.rl import EpochSampler
from posttrain.trainers.rl_update import step_or_skip
from posttrain.trainers.sft_data import DemonstrationError, collate, encode, load_demonstrations


def completion_nll(logp: torch.Tensor, mask: torch.Tensor, num_tokens: float) -> torch.Tensor:
    """- sum(m * log p) / num_tokens: the token-mean NLL when ``num_tokens`` counts the whole batch."""
    return -(logp * mask).sum() / num_tokens


class SFTTrainer:
    def __init__(self, cfg: SFTConfig, policy, tokenizer, task, reward, run: RunDir, demos: tuple[list, list]):
        self.cfg, self.tokenizer, self.reward, self.run = cfg, tokenizer, reward, run
        tc = cfg.trainer
        self.device = resolve_device(tc.device)
        if tc.threads:
            torch.set_num_threads(tc.threads)
        torch.manual_seed(tc.seed)
        train, held_out = demos
        max_length = min(cfg.data.max_length, context_window(policy.config))
        self.train = list(zip(encode(tokenizer, train, cfg.rollout.chat_template, max_length), train))
        self.held_out = list(zip(encode(tokenizer, held_out, cfg.rollout.chat_template, max_length), held_out)) \
            if held_out else []
        self.eval_problems = list(task.problems("test"))[: tc.eval_problems]
        self.max_length = max_length
        # items are (encoded, demonstration) pairs; expert iteration fills them round by round
        self.data = EpochSampler(self.train, tc.seed) if self.train else None
        sampler_dtype = resolve_dtype(cfg.rollout.dtype, self.device)
        self.learner = Learner(policy, tc, cfg.model, temperature=1.0, device=self.device, sampler_dtype=sampler_dtype)
        self.engine = build_engine(cfg.rollout, cfg.model, self.learner.sampler_model(), tokenizer, sampler_dtype,
                                   tc.seed)
        self.step = 0
        self.nonfinite_streak = 0

    def _batch(self, items):
        return collate([e for e, _ in items], [d for _, d in items], pad_id=self.tokenizer.pad_token_id or 0)

    def train_step(self) -> dict[str, float]:
        tc, learner = self.cfg.trainer, self.learner
        t0 = time.perf_counter()
        batch = self._batch(self.data.next(self.cfg.data.batch_size))
        num_tokens = float(batch.completion_mask.sum())
        learner.zero_grad()
        loss = learner.forward_backward(
            batch, lambda micro, logp, _: completion_nll(logp, micro.completion_mask.to(logp.device), num_tokens))
        grad_norm = learner.clip_grad_norm()
        metrics = {"loss/nll": loss, "grad_norm": grad_norm, "tokens/completion": num_tokens,
                   "tokens/prompt": float(batch.prompt_mask.sum()), "data/position": float(self.data.position)}
        update, self.nonfinite_streak = step_or_skip(learner, loss, grad_norm, self.nonfinite_streak, self.step, tc)
        metrics.update(update)
        self.step += 1
        self.engine.load_weights(learner.export_weights(), self.step)
        metrics["time/step_s"] = time.perf_counter() - t0
        metrics["perf/learn_tok_per_s"] = (num_tokens + metrics["tokens/prompt"]) / metrics["time/step_s"]
        return metrics

    def held_out_loss(self) -> Optional[float]:
        """Token-mean NLL of the held-out demonstrations (None without any)."""
        if not self.held_out:
            return None
        nll = tokens = 0.0
        for s in range(0, len(self.held_out), self.cfg.data.batch_size):
            batch = self._batch(self.held_out[s:s + self.cfg.data.batch_size])
            logp = self.learner.logprobs(batch)
            nll -= float((logp * batch.completion_mask).sum())
            tokens += float(batch.completion_mask.sum())
        return nll / tokens

    def evaluate(self):
        cfg = self.cfg
        params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.trainer.eval_temperature,
                                top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, stop=tuple(cfg.rollout.stop))
        result = held_out_accuracy(self.engine, self.eval_problems, self.reward, params, cfg.trainer.seed + 7919,
                                   self.device, cfg.trainer.on_reward_error)
        loss = self.held_out_loss()
        if loss is not None:
            result.extra["held_out_nll"] = loss
        return result

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"step": self.step, **self.learner.state_dict(),
                "sampler_position": self.data.position if self.data is not None else 0,
                "torch_rng": torch.random.get_rng_state(), "nonfinite_streak": self.nonfinite_streak,
                "config": to_dict(self.cfg)}

    def load_state(self, checkpoint: Path) -> None:
        state = load_trainer_state(checkpoint)
        self.learner.load_checkpoint(checkpoint, state)
        self.step = int(state["step"])
        self.engine.load_weights(self.learner.export_weights(), self.step)
        if self.data is not None:
            self.data.position = int(state["sampler_position"])
        torch.random.set_rng_state(state["torch_rng"])
        self.nonfinite_streak = int(state["nonfinite_streak"])

    def save_checkpoint(self) -> Path:
        with self.learner.fp32_policy():  # checkpoints hold the fp32 masters either way
            return self.run.save_checkpoint(self.step, self.learner.checkpoint_model(), self.tokenizer,
                                            self.state_dict(), keep=self.cfg.trainer.keep_checkpoints)

    def close(self) -> None:
        self.engine.close()


def _step_info(m: dict) -> str:
    return f"nll {m['loss/nll']:.3f} grad {m['grad_norm']:.2f} {m['time/step_s']:.1f}s/step"


def train_sft(cfg: SFTConfig, output_dir: Optional[str] = None, resume: bool = False,
              stop_after: Optional[int] = None, quiet: bool = False) -> dict:
    """SFT per ``cfg``; returns the summary. Data, task, reward and run directory are checked
    before the model loads; ``stop_after`` ends this call early (resumable), for tests."""
    from posttrain.models.loading import describe_source
    from posttrain.rewards.registry import build_reward
    from posttrain.tasks.registry import build_task
    from posttrain.trainers.rl_run import launch

    describe_source(cfg.model.name)
    resolve_device(cfg.trainer.device)
    task = build_task(cfg.task)
    demos = load_demonstrations(cfg.data, task)
    build_reward(cfg.reward)
    return launch(cfg, output_dir, resume, stop_after, quiet, "sft", step_info=_step_info,
                  build=lambda model, tokenizer, run: SFTTrainer(cfg, model, tokenizer, task,
                                                           build_reward(cfg.reward, tokenizer=tokenizer), run, demos))


__all__ = ["DemonstrationError", "SFTTrainer", "completion_nll", "train_sft"]

"""Supervised fine-tuning on demonstrations, through the same Learner as RL.

    for each step:
        batch = the next data.batch_size demonstrations (seeded shuffled epochs; with
                data.length_bucketing, batches of similar length: LengthBucketSampler)
        loss  = sum_{i, t} m_it l_it / sum_{i, t} m_it                                   (token mean)
                l_it = -log pi_theta(y_it | x_i, y_i<t) for sft.loss=nll, or an f-divergence
                variant's l_it (algorithms/sft_losses.py) given the reference's token log-probs
        learner.forward_backward(batch, loss); clip; learner.optim_step(lr schedule)
        log; every trainer.eval_every steps: held-out loss and held-out task accuracy; checkpoint

m is 1 on completion tokens only (the EOS that ends them included), so prompt tokens never get
a loss. The normaliser is the whole batch's token count, so micro-batching does not change the
gradient (as in RL's token-mean aggregation). Held-out accuracy samples the task's test problems
through the hf engine exactly as ``posttrain rl`` evaluates, so an SFT run and the RL run that
starts from it (``model.name: <this run directory>``) report comparable numbers.

The f-divergence losses' reference is the policy the run starts from: the learner's frozen
reference (a copy, or with model.lora the base with the adapter off, no copy). As in posttrain dpo,
a demonstration's reference token log-probs are computed the first time it is batched and cached
for the rest of the run, and the cache travels in the checkpoint, so a resumed run computes the
same values in the same batches as an uninterrupted one. The held-out loss stays the NLL under
every sft.loss, so runs with different losses compare.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from posttrain.algorithms.sft_losses import needs_reference, token_losses
from posttrain.config import SFTConfig, to_dict
from posttrain.config_supervised import SFTLossConfig
from posttrain.rollout.engine import SamplingParams, resolve_dtype
from posttrain.rollout.sampler import build_engine, context_window
from posttrain.runs import RunDir, load_trainer_state
from posttrain.trainers.held_out import held_out_accuracy
from posttrain.trainers.learner import Learner, resolve_device
from posttrain.trainers.rl import EpochSampler
from posttrain.trainers.rl_update import step_or_skip
from posttrain.trainers.sft_data import DemonstrationError, collate, encode, load_demonstrations, padding_fraction


def completion_nll(logp: torch.Tensor, mask: torch.Tensor, num_tokens: float) -> torch.Tensor:
    """- sum(m * log p) / num_tokens: the token-mean NLL when ``num_tokens`` counts the whole batch."""
    return -(logp * mask).sum() / num_tokens


def completion_loss(name: str, logp: torch.Tensor, mask: torch.Tensor, num_tokens: float,
                    ref_logp: Optional[torch.Tensor] = None, alpha: float = 0.5) -> torch.Tensor:
    """sum(m * l) / num_tokens for SFT loss ``name`` (l per token, algorithms/sft_losses.py).

    Masked positions are dropped with ``where``: there l can be inf (exp of a padded log-ratio)
    and inf * 0 would be NaN. ``nll`` is ``completion_nll`` exactly."""
    if name == "nll":
        return completion_nll(logp, mask, num_tokens)
    per_token = token_losses(name, logp, ref_logp, alpha)
    return torch.where(mask.bool(), per_token, torch.zeros_like(per_token)).sum() / num_tokens


class LengthBucketSampler(EpochSampler):
    """``EpochSampler``'s contract (``next(k)``, an integer ``position``) with batches of similar length.

    A batch is collated to [rows, longest prompt + longest completion] (prompts left-padded,
    completions right-padded), so its padding depends on both lengths. Epoch e's order: the
    seeded shuffle of ``EpochSampler`` cut into windows of ``window`` batches; each window is
    arranged, among these candidates, as the one whose batches have the smallest padded grid
    sum_b rows_b (max prompt_b + max completion_b):

        - as shuffled (so a window never pads more than without bucketing);
        - sorted by prompt + completion length;
        - sorted by prompt length, cut into k slabs, each slab sorted by completion length,
          for k = 1 .. batches in the window (k = 1: by completion length alone; k = all: by
          prompt length alone; in between: both vary, and both get grouped);

    then cut into batches of ``batch_size`` whose order is shuffled (seeded), so step lengths do
    not run long-to-short. Every item still comes once an epoch; the order depends on (seed,
    epoch) alone, so ``position`` resumes it exactly. Batches line up with the cuts when the
    trainer always asks for ``batch_size`` items and the data size is a multiple of it (otherwise
    one batch per epoch straddles the boundary, as with ``EpochSampler``).
    """

    def __init__(self, items: list, lengths: Sequence[tuple[int, int]], batch_size: int, window: int, seed: int):
        super().__init__(items, seed)
        if len(lengths) != len(items):
            raise ValueError(f"LengthBucketSampler: {len(lengths)} lengths for {len(items)} items")
        self.lengths, self.batch_size, self.window = [tuple(x) for x in lengths], batch_size, window

    def _grid(self, order: list[int]) -> int:
        bs, lengths = self.batch_size, self.lengths
        return sum(len(b) * (max(lengths[i][0] for i in b) + max(lengths[i][1] for i in b))
                   for b in (order[s:s + bs] for s in range(0, len(order), bs)))

    def _arrange(self, window: list[int]) -> list[int]:
        lengths, bs = self.lengths, self.batch_size
        # sorted() is stable: ties keep the shuffled order
        candidates = [window, sorted(window, key=lambda i: sum(lengths[i]))]
        by_prompt = sorted(window, key=lambda i: lengths[i][0])
        batches = -(-len(window) // bs)
        for slabs in range(1, batches + 1):
            per = -(-batches // slabs) * bs
            candidates.append([i for s in range(0, len(window), per)
                               for i in sorted(by_prompt[s:s + per], key=lambda i: lengths[i][1])])
        return min(candidates, key=self._grid)  # the first of equals

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._order:
            order = list(range(len(self.problems)))
            rng = random.Random(self.seed * 1_000_003 + epoch)
            rng.shuffle(order)
            out, span, bs = [], self.window * self.batch_size, self.batch_size
            for s in range(0, len(order), span):
                arranged = self._arrange(order[s:s + span])
                batches = [arranged[b:b + bs] for b in range(0, len(arranged), bs)]
                rng.shuffle(batches)
                out.extend(i for b in batches for i in b)
            self._order = {epoch: out}
        return self._order[epoch]


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
        # expert iteration's config has no sft section: it trains on the NLL
        self.loss_cfg = getattr(cfg, "sft", None) or SFTLossConfig()
        # items are (encoded, demonstration) pairs; expert iteration fills them round by round
        self.data = self._sampler(self.train, tc.seed) if self.train else None
        sampler_dtype = resolve_dtype(cfg.rollout.dtype, self.device)
        self.learner = Learner(policy, tc, cfg.model, temperature=1.0, device=self.device, sampler_dtype=sampler_dtype,
                               reference=needs_reference(self.loss_cfg.loss))
        # (prompt ids, completion ids) -> the reference's token log-probs [len(completion)], filled as batched
        self.ref_logps: dict[tuple, torch.Tensor] = {}
        self.engine = build_engine(cfg.rollout, cfg.model, self.learner.sampler_model(), tokenizer, sampler_dtype,
                                   tc.seed)
        self.step = 0
        self.nonfinite_streak = 0

    def _sampler(self, items: list, seed: int) -> EpochSampler:
        dc = self.cfg.data
        if not dc.length_bucketing:
            return EpochSampler(items, seed)
        return LengthBucketSampler(items, [(len(p), len(c)) for (p, c), _ in items], dc.batch_size,
                                   dc.bucket_window, seed)

    def _batch(self, items):
        return collate([e for e, _ in items], [d for _, d in items], pad_id=self.tokenizer.pad_token_id or 0)

    @staticmethod
    def _key(encoded) -> tuple:
        prompt, completion = encoded
        return tuple(prompt), tuple(completion)

    def _attach_reference(self, batch, items) -> None:
        """Set ``batch.ref_logprobs`` [N, T]; one reference pass per distinct demonstration, ever."""
        missing = list({self._key(e): (e, d) for e, d in items if self._key(e) not in self.ref_logps}.values())
        if missing:
            logp = self.learner.logprobs(self._batch(missing), "ref")
            for row, (encoded, _) in enumerate(missing):
                self.ref_logps[self._key(encoded)] = logp[row, :len(encoded[1])].clone()
        ref = torch.zeros_like(batch.completion_mask)
        for row, (encoded, _) in enumerate(items):
            ref[row, :len(encoded[1])] = self.ref_logps[self._key(encoded)]
        batch.ref_logprobs = ref  # select / trim slice it with the rows of each micro-batch

    def train_step(self) -> dict[str, float]:
        tc, learner, lc = self.cfg.trainer, self.learner, self.loss_cfg
        t0 = time.perf_counter()
        items = self.data.next(self.cfg.data.batch_size)
        batch = self._batch(items)
        num_tokens = float(batch.completion_mask.sum())
        if lc.loss != "nll":
            self._attach_reference(batch, items)
        nll = [0.0]

        def loss_fn(micro, logp, _):
            mask = micro.completion_mask.to(logp.device)
            if lc.loss == "nll":
                return completion_nll(logp, mask, num_tokens)
            nll[0] += float(completion_nll(logp.detach(), mask, num_tokens))  # logged next to the loss optimised
            return completion_loss(lc.loss, logp, mask, num_tokens, micro.ref_logprobs.to(logp.device), lc.alpha)

        learner.zero_grad()
        loss = learner.forward_backward(batch, loss_fn)
        grad_norm = learner.clip_grad_norm()
        metrics = {"loss/nll": loss if lc.loss == "nll" else nll[0], "grad_norm": grad_norm,
                   "tokens/completion": num_tokens, "tokens/prompt": float(batch.prompt_mask.sum()),
                   "data/padding_frac": padding_fraction(batch), "data/position": float(self.data.position)}
        if lc.loss != "nll":
            metrics["loss/sft"] = loss
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
                "ref_logps": [(list(p), list(c), v) for (p, c), v in self.ref_logps.items()],
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
        # .get: checkpoints written before the f-divergence losses have no cache (they trained on nll)
        self.ref_logps = {(tuple(p), tuple(c)): v for p, c, v in state.get("ref_logps", [])}

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


__all__ = ["DemonstrationError", "LengthBucketSampler", "SFTTrainer", "completion_loss", "completion_nll",
           "train_sft"]

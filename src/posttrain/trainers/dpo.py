"""Preference optimisation on pairs (DPO and the losses of algorithms/preference.py), through the
same Learner, run loop and held-out evaluation as RL and SFT.

    for each step:
        pairs = the next data.batch_size pairs (seeded shuffled epochs)
        s     = sum over each completion's tokens of log pi_theta         [B, 2] (chosen, rejected)
        ref   = the same under the reference, cached per pair              [B, 2] (None: reference-free)
        loss  = mean_b PREFERENCE_LOSSES[preference.loss](s, ref, lengths, margins)_b
        clip; learner.optim_step(lr schedule); log; evaluate every trainer.eval_every; checkpoint

A pair becomes two ``Rollouts`` rows built as SFT builds a demonstration (sft_data.encode /
collate: the prompt rendered as the sampler renders it, the completion's tokens plus EOS), all
chosen rows first, then the rejected ones; s is the learner's RL log-prob pass summed over the
completion mask (``sequence_logps``), so prompt tokens never count.

Micro-batching. ``forward_backward`` cuts rows into length buckets (``micro_batch_size``,
``micro_batch_tokens``), so the chosen and rejected rows of a pair usually land in different
micro-batches, while a pair's loss is not a sum of per-row terms. One graph over the whole batch
would defeat micro-batching; handing the learner micro-batches of whole pairs would still be
re-cut by its buckets (micro_batch_size=1, or a token cap, splits every pair). Instead the
gradient is taken in two passes, exact whatever the micro-batching: with L = mean_b l_b(s_b),
grad L = sum_i (dL/ds_i) grad s_i. Pass 1 (no grad, ``learner.logprobs``) gives s for all 2B
rows, hence L, its metrics and g = dL/ds (autograd on a [B, 2] leaf, so every registered loss
works unchanged). Pass 2 is ``forward_backward`` on the surrogate sum_i g_i s_i, a sum over rows
that any split into micro-batches accumulates exactly (a sequence-level policy gradient with
advantage -g_i, kept in ``batch.advantages``). Both passes run the same weights and differ only
by the rounding of differently padded micro-batches (the decoders here use no dropout); the test
checks the gradient against direct forward passes at micro_batch_size 1. The price is one no-grad
forward per step (about a third of a forward + backward), the pass RL spends on old log-probs.

Reference log-probs are computed once per pair, the first time the pair is used (training pairs
in their first epoch, held-out pairs at the first evaluation), and kept in an [n, 2] table per
split. The tables are saved in trainer_state.pt, so a resumed run reads the very numbers the
interrupted one used (nothing is recomputed, nothing depends on a pass reproducing bit for bit);
a resume whose pairs or ``preference.reference_model`` differ from the run's is refused.
Reference-free losses (simpo, orpo, or ``preference.reference_free``) load no reference model.

Pre-DPO (``preference.reference_model: PATH``): the reference is that model (a run directory or a
model directory, e.g. an earlier DPO run) instead of a frozen copy of the initial policy. It must
share the policy's vocabulary and is installed as ``learner.ref`` in the learner's compute dtype;
the learner is built with ``reference=False`` so no copy of the policy is made.

Evaluation: held-out preference accuracy (the share of held-out pairs whose chosen completion has
the strictly higher implicit reward of the loss: beta (s - ref) for DPO and its kin, the
length-normalised log-prob for SimPO, the log-odds for ORPO), the held-out loss and reward margin,
and held-out task accuracy sampled exactly as ``posttrain rl`` evaluates.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Optional

import torch

from posttrain.algorithms.preference import PREFERENCE_LOSSES, PreferenceInput, sequence_logps
from posttrain.config import DPOConfig, to_dict
from posttrain.rollout.batch import Rollouts
from posttrain.rollout.engine import SamplingParams, resolve_dtype
from posttrain.rollout.sampler import build_engine, context_window
from posttrain.runs import RunDir, load_trainer_state
from posttrain.tasks.base import Problem
from posttrain.trainers.held_out import held_out_accuracy
from posttrain.trainers.learner import Learner, resolve_device
from posttrain.trainers.preference_data import SYNTHETIC, PreferenceDataError, PreferencePair, load_preferences
from posttrain.trainers.rl import EpochSampler
from posttrain.trainers.rl_update import step_or_skip
from posttrain.trainers.sft_data import Demonstration, collate, encode


# ------------------------------------------------------------------ data
def _prompt_hash(prompt) -> float:
    """A stable number in [0, 1) per prompt: pairs of one prompt fall on the same side."""
    text = json.dumps(prompt, sort_keys=True, ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


def load_pairs(data_cfg, task, pref_cfg=None):
    """(train, held-out) pairs per ``data:``; errors name the file and line, before any model loads."""
    if data_cfg.path in SYNTHETIC:
        problems = task.problems("train") if getattr(task, "name", None) == "arithmetic" else None
        pairs = SYNTHETIC[data_cfg.path](data_cfg.synthetic_size, 0, problems=problems)
    else:
        pairs = load_preferences(data_cfg.path)
    if data_cfg.validation_path:
        train, held = pairs, load_preferences(data_cfg.validation_path)
    else:
        train = [p for p in pairs if _prompt_hash(p.prompt) >= data_cfg.validation_fraction]
        held = [p for p in pairs if _prompt_hash(p.prompt) < data_cfg.validation_fraction]
    if not train:
        raise PreferenceDataError(f"all {len(pairs)} pairs fell in the held-out slice; lower "
                                  "data.validation_fraction or give data.validation_path")
    with_margin = next((p for p in train + held if p.margin is not None), None)
    if with_margin is not None and pref_cfg is not None and pref_cfg.use_margins and not pref_cfg.takes_margins:
        raise PreferenceDataError(f"{with_margin.source}: the pair has a 'margin', which preference.loss="
                                  f"{pref_cfg.loss} does not take; set preference.use_margins=false to ignore margins")
    return train, held


def _sides(pairs: list[PreferencePair]) -> list[Demonstration]:
    """The chosen completions of ``pairs``, then the rejected ones, as demonstrations."""
    return ([Demonstration(Problem(p.source, p.prompt), p.chosen, f"{p.source} (chosen)") for p in pairs]
            + [Demonstration(Problem(p.source, p.prompt), p.rejected, f"{p.source} (rejected)") for p in pairs])


def encode_pairs(tokenizer, pairs: list[PreferencePair], chat_template: bool, max_length: int):
    """(chosen (prompt ids, completion ids + EOS), rejected (...)) per pair; errors before training."""
    rows = encode(tokenizer, _sides(pairs), chat_template, max_length)
    return list(zip(rows[: len(pairs)], rows[len(pairs):]))


def collate_pairs(encoded, pairs: list[PreferencePair], pad_id: int = 0) -> Rollouts:
    """2B rows: the chosen completion of every pair, then the rejected ones (pair b: rows b, B + b)."""
    batch = collate([c for c, _ in encoded] + [r for _, r in encoded], _sides(pairs), pad_id)
    batch.group_ids = torch.arange(len(pairs)).repeat(2)  # the two sides of a pair share their prompt
    return batch


def pair_logps(token_logps: torch.Tensor, batch: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs and lengths, [B, 2] each (column 0 chosen), of a ``collate_pairs`` batch."""
    total, length = sequence_logps(token_logps, batch.completion_mask)
    B = len(batch) // 2
    return torch.stack([total[:B], total[B:]], 1), torch.stack([length[:B], length[B:]], 1)


def _surrogate(micro: Rollouts, logp: torch.Tensor, _) -> torch.Tensor:
    """sum_i g_i s_i over the micro-batch's rows: its gradient is that of the preference loss."""
    keep = micro.completion_mask.to(logp.device).bool()
    return torch.where(keep, micro.advantages.to(logp.device) * logp, torch.zeros_like(logp)).sum()


def preference_backward(learner: Learner, batch: Rollouts, loss_name: str, pcfg, ref_logps=None, margins=None):
    """Accumulate into ``learner`` the gradient of the batch's mean preference loss, exactly for any
    micro-batching (two passes, see the module docstring). Returns (loss, loss output, logps [B, 2])."""
    logps, lengths = pair_logps(learner.logprobs(batch), batch)
    leaf = logps.double().requires_grad_(True)
    out = PREFERENCE_LOSSES.get(loss_name)(PreferenceInput(
        leaf, lengths.double(), None if ref_logps is None else ref_logps.double(),
        margins=None if margins is None else margins.double()), pcfg)
    loss = out.loss.mean()
    (g,) = torch.autograd.grad(loss, leaf)
    batch = copy.copy(batch)
    batch.advantages = torch.cat([g[:, 0], g[:, 1]]).float()[:, None].expand_as(batch.completion_mask).contiguous()
    learner.forward_backward(batch, _surrogate)
    return float(loss.detach()), out, logps


def reference_pair_logps(learner: Learner, batch: Rollouts) -> Optional[torch.Tensor]:
    """[B, 2] float64 reference sequence log-probs of a ``collate_pairs`` batch; None without a reference."""
    if learner.ref is None:
        return None
    return pair_logps(learner.logprobs(batch, "ref"), batch)[0].double()


def score_pairs(learner: Learner, pcfg, chunks) -> dict[str, float]:
    """Mean preference loss, reward accuracy and reward margin over held-out pairs, given as
    (``collate_pairs`` batch, reference log-probs [B, 2] or None, margins or None) per chunk; a
    lazy iterable, so each chunk's reference pass runs just before it is needed. Empty: {}."""
    sums = {"held_out_pref_loss": 0.0, "held_out_pref_accuracy": 0.0, "held_out_reward_margin": 0.0}
    count = 0
    for batch, ref, margins in chunks:
        logps, lengths = pair_logps(learner.logprobs(batch), batch)
        out = PREFERENCE_LOSSES.get(pcfg.loss)(PreferenceInput(logps.double(), lengths.double(), ref,
                                                               margins=margins), pcfg)
        n = logps.shape[0]
        for key, value in zip(sums, (out.loss.sum(), out.metrics["reward_accuracy"] * n,
                                     out.metrics["reward_margin"] * n)):
            sums[key] += float(value)
        count += n
    return {k: v / count for k, v in sums.items()} if count else {}


# ------------------------------------------------------------------ trainer
class DPOTrainer:
    def __init__(self, cfg: DPOConfig, policy, tokenizer, task, reward, run: RunDir, pairs: tuple[list, list],
                 reference=None):
        self.cfg, self.tokenizer, self.reward, self.run = cfg, tokenizer, reward, run
        tc, pc = cfg.trainer, cfg.preference
        self.device = resolve_device(tc.device)
        if tc.threads:
            torch.set_num_threads(tc.threads)
        torch.manual_seed(tc.seed)
        max_length = min(cfg.data.max_length, context_window(policy.config))
        self.splits, self.digests = {}, {}
        for split, items in zip(("train", "held_out"), pairs):
            encoded = encode_pairs(tokenizer, items, cfg.rollout.chat_template, max_length) if items else []
            self.splits[split] = [(i, e, p) for i, (e, p) in enumerate(zip(encoded, items))]
            self.digests[split] = hashlib.sha256(json.dumps(encoded).encode()).hexdigest()[:16]
        # Reference sequence log-probs per pair, NaN until first computed (see the module docstring).
        self.ref_logps = {s: torch.full((len(v), 2), math.nan, dtype=torch.float64) for s, v in self.splits.items()}
        self.eval_problems = list(task.problems("test"))[: tc.eval_problems]
        self.data = EpochSampler(self.splits["train"], tc.seed)
        sampler_dtype = resolve_dtype(cfg.rollout.dtype, self.device)
        self.learner = Learner(policy, tc, cfg.model, temperature=1.0, device=self.device, sampler_dtype=sampler_dtype,
                               reference=pc.uses_reference and reference is None)
        if reference is not None:  # Pre-DPO: a guiding reference in the learner's compute dtype
            dtype = next(self.learner.model.parameters()).dtype
            self.learner.ref = reference.to(self.device, dtype).eval().requires_grad_(False)
        self.engine = build_engine(cfg.rollout, cfg.model, self.learner.sampler_model(), tokenizer, sampler_dtype,
                                   tc.seed)
        self.step = 0
        self.nonfinite_streak = 0

    def _batch(self, items) -> Rollouts:
        return collate_pairs([e for _, e, _ in items], [p for _, _, p in items], self.tokenizer.pad_token_id or 0)

    def _margins(self, items) -> Optional[torch.Tensor]:
        if not self.cfg.preference.takes_margins or all(p.margin is None for _, _, p in items):
            return None
        return torch.tensor([p.margin or 0.0 for _, _, p in items], dtype=torch.float64)

    def reference(self, split: str, items) -> Optional[torch.Tensor]:
        """[B, 2] reference sequence log-probs of ``items``: one reference pass per pair, ever."""
        if self.learner.ref is None:
            return None
        table = self.ref_logps[split]
        missing = list({item[0]: item for item in items if math.isnan(table[item[0], 0])}.values())  # once each
        if missing:
            batch = self._batch(missing)
            table[[i for i, _, _ in missing]] = reference_pair_logps(self.learner, batch)
        return table[[i for i, _, _ in items]]

    def train_step(self) -> dict[str, float]:
        tc, learner, pc = self.cfg.trainer, self.learner, self.cfg.preference
        t0 = time.perf_counter()
        items = self.data.next(self.cfg.data.batch_size)
        batch = self._batch(items)
        ref = self.reference("train", items)
        learner.zero_grad()
        loss, out, logps = preference_backward(learner, batch, pc.loss, pc, ref, self._margins(items))
        grad_norm = learner.clip_grad_norm()
        metrics = {"loss/preference": loss, "grad_norm": grad_norm,
                   **{f"preference/{k}": float(v) for k, v in out.metrics.items()},
                   "logps/chosen": float(logps[:, 0].mean()), "logps/rejected": float(logps[:, 1].mean()),
                   "tokens/completion": float(batch.completion_mask.sum()),
                   "tokens/prompt": float(batch.prompt_mask.sum()), "data/position": float(self.data.position)}
        update, self.nonfinite_streak = step_or_skip(learner, loss, grad_norm, self.nonfinite_streak, self.step, tc)
        metrics.update(update)
        self.step += 1
        self.engine.load_weights(learner.export_weights(), self.step)
        metrics["time/step_s"] = time.perf_counter() - t0
        metrics["perf/learn_tok_per_s"] = (metrics["tokens/completion"] + metrics["tokens/prompt"]) / metrics[
            "time/step_s"]
        return metrics

    def held_out_preference(self) -> dict[str, float]:
        """Loss, accuracy and reward margin over the held-out pairs (empty without any)."""
        items, size = self.splits["held_out"], self.cfg.data.batch_size
        chunks = (items[s:s + size] for s in range(0, len(items), size))
        return score_pairs(self.learner, self.cfg.preference, ((self._batch(c), self.reference("held_out", c),
                                                                self._margins(c)) for c in chunks))

    def evaluate(self):
        cfg = self.cfg
        params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.trainer.eval_temperature,
                                top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, stop=tuple(cfg.rollout.stop))
        result = held_out_accuracy(self.engine, self.eval_problems, self.reward, params, cfg.trainer.seed + 7919,
                                   self.device, cfg.trainer.on_reward_error)
        result.extra.update(self.held_out_preference())
        return result

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"step": self.step, **self.learner.state_dict(), "sampler_position": self.data.position,
                "torch_rng": torch.random.get_rng_state(), "nonfinite_streak": self.nonfinite_streak,
                "ref_logps": self.ref_logps, "data_digests": self.digests,
                "reference_model": self.cfg.preference.reference_model, "config": to_dict(self.cfg)}

    def load_state(self, checkpoint: Path) -> None:
        state = load_trainer_state(checkpoint)
        # The cached reference log-probs belong to the run's pairs and reference model.
        if state["data_digests"] != self.digests:
            raise ValueError("the preference pairs (or their tokens) differ from the run's: resume with its data")
        cached = any(bool(torch.isfinite(t).any()) for t in state["ref_logps"].values())
        if cached and self.learner.ref is not None and state["reference_model"] != self.cfg.preference.reference_model:
            raise ValueError(f"the checkpoint caches reference log-probs of preference.reference_model="
                             f"{state['reference_model']}, not {self.cfg.preference.reference_model}")
        self.learner.load_checkpoint(checkpoint, state)
        self.step = int(state["step"])
        self.engine.load_weights(self.learner.export_weights(), self.step)
        self.data.position = int(state["sampler_position"])
        torch.random.set_rng_state(state["torch_rng"])
        self.nonfinite_streak = int(state["nonfinite_streak"])
        self.ref_logps = {split: table.clone() for split, table in state["ref_logps"].items()}

    def save_checkpoint(self) -> Path:
        with self.learner.fp32_policy():  # checkpoints hold the fp32 masters either way
            return self.run.save_checkpoint(self.step, self.learner.checkpoint_model(), self.tokenizer,
                                            self.state_dict(), keep=self.cfg.trainer.keep_checkpoints)

    def close(self) -> None:
        self.engine.close()


def _step_info(m: dict) -> str:
    return (f"loss {m['loss/preference']:.3f} acc {m['preference/reward_accuracy']:.2f} "
            f"margin {m['preference/reward_margin']:.3f} grad {m['grad_norm']:.2f} {m['time/step_s']:.1f}s/step")


def load_reference(path: str, tokenizer):
    """Pre-DPO's guiding reference model; it must read the policy's tokens."""
    from posttrain.models.loading import load_model_and_tokenizer

    model, ref_tokenizer = load_model_and_tokenizer(path)
    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"preference.reference_model={path} has another vocabulary than model.name; the reference "
                         "must score the policy's tokens (use a model fine-tuned from the same base)")
    return model


def train_dpo(cfg: DPOConfig, output_dir: Optional[str] = None, resume: bool = False,
              stop_after: Optional[int] = None, quiet: bool = False) -> dict:
    """Preference optimisation per ``cfg``; returns the summary. Data, models' sources, task,
    reward and run directory are checked before any model loads; ``stop_after`` ends this call
    early (resumable), for tests."""
    from posttrain.models.loading import describe_source
    from posttrain.rewards.registry import build_reward
    from posttrain.tasks.registry import build_task
    from posttrain.trainers.rl_run import launch

    if cfg.data.path == "online":  # pairs from the policy's own samples (trainers/online_dpo.py)
        return _train_online(cfg, output_dir, resume, stop_after, quiet)
    describe_source(cfg.model.name)
    if cfg.preference.reference_model:
        describe_source(cfg.preference.reference_model)
    resolve_device(cfg.trainer.device)
    task = build_task(cfg.task)
    pairs = load_pairs(cfg.data, task, cfg.preference)
    build_reward(cfg.reward)

    def build(model, tokenizer, run):
        reference = load_reference(cfg.preference.reference_model, tokenizer) if cfg.preference.reference_model \
            else None
        return DPOTrainer(cfg, model, tokenizer, task, build_reward(cfg.reward, tokenizer=tokenizer), run, pairs,
                          reference)

    return launch(cfg, output_dir, resume, stop_after, quiet, "dpo", build=build, step_info=_step_info)


def _train_online(cfg: DPOConfig, output_dir, resume, stop_after, quiet) -> dict:
    from posttrain.models.loading import describe_source
    from posttrain.rewards.registry import build_reward
    from posttrain.tasks.registry import build_task
    from posttrain.trainers.online_dpo import OnlineDPOTrainer, step_info
    from posttrain.trainers.rl_run import launch

    describe_source(cfg.model.name)
    if cfg.preference.reference_model:
        raise ValueError("preference.reference_model (Pre-DPO) is not supported with data.path=online yet")
    resolve_device(cfg.trainer.device)
    task = build_task(cfg.task)
    build_reward(cfg.reward)
    return launch(cfg, output_dir, resume, stop_after, quiet, "dpo", step_info=step_info, samples=True,
                  build=lambda model, tokenizer, run: OnlineDPOTrainer(
                      cfg, model, tokenizer, task, build_reward(cfg.reward, tokenizer=tokenizer), run))


__all__ = ["DPOTrainer", "PreferenceDataError", "collate_pairs", "encode_pairs", "load_pairs", "pair_logps",
           "preference_backward", "reference_pair_logps", "score_pairs", "train_dpo"]

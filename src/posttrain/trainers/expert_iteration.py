"""Expert iteration / rejection-sampling fine-tuning: sample, keep what the verifier accepts, SFT.

    for round r = 1..rounds:
        prompts = the next expert.prompts_per_round train problems (seeded shuffled epochs)
        samples = policy(prompts), rollout.num_completions each at rollout.temperature
        kept    = the correct ones (the reward's `correct` component, else reward > 0),
                  duplicates of a prompt's completion dropped, at most expert.keep_per_prompt each
        expert.steps_per_round SFT steps on kept (token-mean NLL of completion tokens, as posttrain sft)

The "expert" is the policy filtered by the verifier (Anthony et al., "Thinking Fast and Slow
with Deep Learning and Tree Search", arXiv:1705.08439); on LLMs this is rejection-sampling
fine-tuning (RFT, Yuan et al., arXiv:2308.01825) and ReST-EM (Singh et al., arXiv:2312.06585),
the baseline RL papers compare against. Training continues across rounds from the current
weights (RFT); ReST-EM's restart from the base model each round is not implemented. Everything
else is SFTTrainer's: the Learner, the loss, checkpoints, held-out task accuracy. A round's kept
set and the prompt position are checkpointed, so a resumed run continues mid-round exactly.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from posttrain.evaluation.runner import correct_flags
from posttrain.rewards.errors import score_rollouts
from posttrain.rollout.engine import SamplingParams
from posttrain.rollout.sampler import context_window, render_prompt
from posttrain.runs import load_trainer_state
from posttrain.trainers.rl import EpochSampler
from posttrain.trainers.sft import SFTTrainer
from posttrain.trainers.sft_data import Demonstration, DemonstrationError, encode


class NothingToImitateError(RuntimeError):
    """A round's samples held no correct completion, so there is nothing to fine-tune on."""


def keep_correct(problems, texts: list[str], flags: list[bool], group_ids: list[int], cap: int) -> list[Demonstration]:
    """Correct completions, deduplicated per prompt (stripped text), at most ``cap`` per prompt, in sample order."""
    kept, seen = [], {}
    for text, ok, g in zip(texts, flags, group_ids):
        chosen = seen.setdefault(g, set())
        if ok and text.strip() and text.strip() not in chosen and len(chosen) < cap:
            chosen.add(text.strip())
            kept.append(Demonstration(problems[g], text, f"round sample of {problems[g].id}"))
    return kept


class ExpertIterationTrainer(SFTTrainer):
    def __init__(self, cfg, policy, tokenizer, task, reward, run):
        # A round sample is prompt + up to max_new_tokens + EOS: refused now (before the engine
        # starts), not after the first round of a started run.
        problems = list(task.problems("train"))
        limit = min(cfg.data.max_length, context_window(policy.config))
        longest = max((len(render_prompt(tokenizer, p.prompt, cfg.rollout.chat_template)) for p in problems), default=0)
        if longest + cfg.rollout.max_new_tokens + 1 > limit:
            raise DemonstrationError(
                f"data.max_length={cfg.data.max_length} (at most the model's context window) leaves {limit} tokens, "
                f"too few for a round sample: the longest train prompt has {longest} tokens, + "
                f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} + EOS; raise data.max_length to at least "
                f"{longest + cfg.rollout.max_new_tokens + 1} or lower rollout.max_new_tokens")
        super().__init__(cfg, policy, tokenizer, task, reward, run, demos=([], None))
        self.prompts = EpochSampler(problems, cfg.trainer.seed)
        self.by_id = {p.id: p for p in self.prompts.problems}
        self.sample_gen = torch.Generator(device=self.device).manual_seed(cfg.trainer.seed + 1)
        self.kept: list[tuple[str, str]] = []  # this round's (problem id, completion)
        self.round_metrics: dict[str, float] = {}

    def _collect(self) -> None:
        cfg, ex = self.cfg, self.cfg.expert
        t0 = time.perf_counter()
        problems = self.prompts.next(ex.prompts_per_round)
        params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, stop=tuple(cfg.rollout.stop))
        r = self.engine.generate(problems, cfg.rollout.num_completions, params, self.sample_gen)
        score_rollouts(r, self.reward, cfg.trainer.on_reward_error)
        self.engine.release_memory()  # the round's SFT steps follow; they get that memory
        flags, _ = correct_flags({k: v.tolist() for k, v in r.reward_components.items()}, r.rewards.tolist())
        demos = keep_correct(problems, r.texts, flags, r.group_ids.tolist(), ex.keep_per_prompt)
        if not demos:
            raise NothingToImitateError(
                f"round {self.step // ex.steps_per_round + 1}: none of {len(r)} samples ({len(problems)} prompts x "
                f"{cfg.rollout.num_completions}) was correct, so there is nothing to imitate; raise "
                "rollout.num_completions or expert.prompts_per_round, or start from a stronger model (e.g. after sft)")
        self._set_round([(d.problem.id, d.completion) for d in demos])
        self.round_metrics = {"expert/samples": float(len(r)), "expert/correct_frac": sum(flags) / len(flags),
                              "expert/kept": float(len(demos)),
                              "expert/prompts_solved": float(len({d.problem.id for d in demos})),
                              "expert/sample_s": time.perf_counter() - t0}

    def _set_round(self, kept: list[tuple[str, str]], position: int = 0) -> None:
        self.kept = kept
        demos = [Demonstration(self.by_id[pid], text, f"round sample of {pid}") for pid, text in kept]
        self.train = list(zip(encode(self.tokenizer, demos, self.cfg.rollout.chat_template, self.max_length), demos))
        self.data = EpochSampler(self.train, self.cfg.trainer.seed + self.step)
        self.data.position = position

    def train_step(self) -> dict[str, float]:
        fresh = self.step % self.cfg.expert.steps_per_round == 0
        if fresh:
            self._collect()
        metrics = super().train_step()
        metrics["expert/round"] = float((self.step - 1) // self.cfg.expert.steps_per_round + 1)
        if fresh:
            metrics.update(self.round_metrics)
        return metrics

    def state_dict(self) -> dict:
        return {**super().state_dict(), "expert": {
            "kept": [list(k) for k in self.kept], "round_position": self.data.position if self.data else 0,
            "prompt_position": self.prompts.position, "sample_gen": self.sample_gen.get_state()}}

    def load_state(self, checkpoint) -> None:
        super().load_state(checkpoint)  # restores sampler_position into self.data, replaced below
        state = load_trainer_state(checkpoint)["expert"]
        self.prompts.position = int(state["prompt_position"])
        self.sample_gen.set_state(state["sample_gen"])
        if state["kept"]:
            round_start = self.step - self.step % self.cfg.expert.steps_per_round
            step, self.step = self.step, round_start  # the round's sampler was seeded at its first step
            self._set_round([tuple(k) for k in state["kept"]], int(state["round_position"]))
            self.step = step


def _step_info(m: dict) -> str:
    return f"round {m['expert/round']:.0f} nll {m['loss/nll']:.3f} {m['time/step_s']:.1f}s/step"


def train_expert_iteration(cfg, output_dir: Optional[str] = None, resume: bool = False,
                           stop_after: Optional[int] = None, quiet: bool = False) -> dict:
    """``posttrain ei``: checks as ``posttrain sft`` does, then the shared run loop."""
    from posttrain.models.loading import describe_source
    from posttrain.rewards.registry import build_reward
    from posttrain.tasks.registry import build_task
    from posttrain.trainers.learner import resolve_device
    from posttrain.trainers.rl_run import launch

    describe_source(cfg.model.name)
    resolve_device(cfg.trainer.device)
    task = build_task(cfg.task)
    build_reward(cfg.reward)
    return launch(cfg, output_dir, resume, stop_after, quiet, "ei", step_info=_step_info,
                  build=lambda model, tokenizer, run: ExpertIterationTrainer(
                      cfg, model, tokenizer, task, build_reward(cfg.reward, tokenizer=tokenizer), run))

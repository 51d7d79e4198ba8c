"""Typed run configuration: YAML file + dotted command-line overrides.

``load_config("cfg.yaml", ["trainer.lr=1e-5"])`` returns a ``RLConfig``. Unknown keys, wrong
types and out-of-range values raise ``ConfigError`` naming the dotted key and what is
allowed, before any work starts. ``dump_config`` writes the resolved config back to YAML.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from posttrain.algorithms.base import AdvantageConfig, CorrectionConfig, PolicyLossConfig
from posttrain.selection.base import SelectionConfig
from posttrain.algorithms.regularizers import EntropyConfig, KLConfig
from posttrain.models.logprobs import CHUNK_ROWS
from posttrain.models.moe_config import MoEConfig, moe_issue
from posttrain.loggers import LoggingConfig  # trainer.report_to, trainer.log_completions(_every)


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or out of range."""


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoRAConfig:
    """``model.lora``: train a LoRA adapter (peft) instead of every weight; ``model.lora={}`` on the
    command line turns it on with these defaults. W x -> W x + (alpha / rank) B A x on each target
    module; the base stays frozen (models/lora.py)."""

    rank: int = 8  # r: A is [r, in], B is [out, r]
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input, training passes only (RL and DPO assume 0: a deterministic forward)
    # module names (suffixes, as peft matches them): by default every linear projection of a
    # Llama/Qwen2 layer, attention and MLP (QLoRA, arXiv 2305.14314: all linear layers are needed to
    # match full fine-tuning); embeddings and the output head stay frozen
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def __post_init__(self) -> None:
        _check(self.rank >= 1, "model.lora.rank", "must be >= 1")
        _check(self.alpha > 0, "model.lora.alpha", "must be > 0")
        _check(0 <= self.dropout < 1, "model.lora.dropout", "must be in [0, 1)")
        _check(len(self.target_modules) >= 1, "model.lora.target_modules", "must name at least one module")
        _check(all(m.strip() for m in self.target_modules), "model.lora.target_modules", "has an empty name")
        _check(len(set(self.target_modules)) == len(self.target_modules), "model.lora.target_modules",
               "names a module twice")
        import importlib.util

        _check(importlib.util.find_spec("peft") is not None, "model.lora",
               "needs the peft package: pip install -e '.[lora]' (or pip install peft)")


@dataclass
class ModelConfig:
    name: str = "tiny-random"  # directory, .gguf file, run directory, hub id or alias
    # attention kernel: auto = eager (matmul + softmax) on CPU for short sequences, else the model's own
    attention: Literal["auto", "eager", "sdpa"] = "auto"
    # forward pass: auto = posttrain's lean decoder (models/fast_decoder.py) for Llama/Qwen2
    # architectures, transformers' forward for the rest; hf = always transformers'
    decoder: Literal["auto", "hf"] = "auto"
    # LoRA adapter training (pip install -e '.[lora]'); null: every weight trains. The learner runs
    # transformers' forward with the adapter; the sampler (hf or vllm) gets merged weights
    lora: Optional[LoRAConfig] = None


@dataclass
class RolloutConfig:
    num_prompts: int = 8  # prompts per step
    num_completions: int = 8  # completions per prompt (the group size)
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    stop: list[str] = field(default_factory=list)  # stop strings (kept out of the text)
    chat_template: bool = True  # wrap prompts with the tokenizer's chat template
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on CPUs with AVX512_BF16/AMX, else fp32
    share_prompt_prefill: bool = True  # prefill each prompt once for its n completions (hf engine)
    # hf: posttrain's in-process engine (shares the learner's weights); vllm: vLLM's LLM, weights
    # pushed after every optimizer step (pip install -e '.[vllm]', see the README)
    engine: Literal["hf", "vllm"] = "hf"
    kv_cache_gb: float = 2.0  # vllm on CPU: KV-cache memory (VLLM_CPU_KVCACHE_SPACE)
    gpu_memory_utilization: float = 0.4  # vllm on GPU: its share of GPU memory (the learner needs the rest)
    enforce_eager: bool = True  # vllm: no graph compilation (start 20-30 s instead of 75-120 s on CPU)
    # vllm on CPU: VLLM_CPU_OMP_THREADS_BIND for its model process; null keeps vLLM's default
    # (all cores but one, left to its scheduler): "0-1" computes on both cores of a 2-core machine
    vllm_cpu_threads_bind: Optional[str] = None

    def __post_init__(self) -> None:
        _check(self.kv_cache_gb > 0, "rollout.kv_cache_gb", "must be > 0")
        _check(0 < self.gpu_memory_utilization < 1, "rollout.gpu_memory_utilization", "must be in (0, 1)")
        _check(self.num_prompts >= 1, "rollout.num_prompts", "must be >= 1")
        _check(self.num_completions >= 1, "rollout.num_completions", "must be >= 1")
        _check(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
        _check(self.temperature > 0, "rollout.temperature", "must be > 0")
        _check(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        _check(self.top_k >= 0, "rollout.top_k", "must be >= 0")


@dataclass
class CriticConfig:
    """The value model used when ``advantage_estimator`` is ``gae`` (PPO with a critic)."""

    lr: float = 1e-5
    value_clip: Optional[float] = 0.2  # PPO clipped value loss range (TRL/verl cliprange_value)

    def __post_init__(self) -> None:
        _check(self.lr > 0, "algorithm.critic.lr", "must be > 0")
        _check(self.value_clip is None or self.value_clip > 0, "algorithm.critic.value_clip", "must be > 0 or null")


@dataclass
class AlgorithmConfig:
    advantage_estimator: str = "grpo"
    policy_loss: str = "ppo_clip"
    aggregation: str = "token-mean"
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)  # behaviour vs old log-probs
    kl: KLConfig = field(default_factory=KLConfig)  # KL to the frozen initial policy; coef 0 loads no reference
    entropy: EntropyConfig = field(default_factory=EntropyConfig)
    overlong_buffer: int = 0  # DAPO soft overlong punishment over the last N tokens; 0 disables
    overlong_penalty: float = 1.0  # DAPO penalty factor
    mask_truncated: bool = False  # DAPO overlong filtering: truncated samples get no loss
    critic: CriticConfig = field(default_factory=CriticConfig)  # used by advantage_estimator: gae
    # HPT (trainers/hybrid.py): a prompt whose rollout accuracy is <= this gate learns by SFT on its
    # answer instead of RL; null: RL everywhere
    hpt_gate: Optional[float] = None
    # multi-turn episodes: each turn credited with its own step rewards on (algorithms/advantages_turn.py)
    turn_credit: bool = False
    moe: MoEConfig = field(default_factory=MoEConfig)  # MoE models: routing replay (R3), aux loss (models/moe.py)

    def __post_init__(self) -> None:
        from posttrain.algorithms import ADVANTAGES, AGGREGATIONS, CORRECTIONS, POLICY_LOSSES

        _check(self.advantage_estimator in ADVANTAGES, "algorithm.advantage_estimator",
               f"must be one of {ADVANTAGES.names()}")
        _check(self.policy_loss in POLICY_LOSSES, "algorithm.policy_loss", f"must be one of {POLICY_LOSSES.names()}")
        _check(self.aggregation in AGGREGATIONS, "algorithm.aggregation", f"must be one of {list(AGGREGATIONS)}")
        _check(self.correction.name is None or self.correction.name in CORRECTIONS, "algorithm.correction.name",
               f"must be null or one of {CORRECTIONS.names()}")
        _check(not self.kl.in_reward or self.advantage_estimator in TOKEN_REWARD_ESTIMATORS, "algorithm.kl.in_reward",
               f"needs an estimator that reads per-token rewards: {list(TOKEN_REWARD_ESTIMATORS)}")
        _check(not self.kl.in_reward or self.kl.coef > 0 or self.kl.target is not None, "algorithm.kl.in_reward",
               "needs algorithm.kl.coef > 0 or a kl.target: with coefficient 0 the KL reward is 0 and no reference "
               "model is loaded")
        _check(self.hpt_gate is None or 0.0 <= self.hpt_gate < 1.0, "algorithm.hpt_gate", "must be in [0, 1) or null")
        from posttrain.algorithms.advantages_turn import TURN_CREDIT_ESTIMATORS

        _check(not self.turn_credit or self.advantage_estimator in TURN_CREDIT_ESTIMATORS, "algorithm.turn_credit",
               f"cannot be used with advantage_estimator={self.advantage_estimator}, which gives one advantage per "
               f"episode; use one of {list(TURN_CREDIT_ESTIMATORS)}")
        _check(self.overlong_buffer >= 0, "algorithm.overlong_buffer", "must be >= 0")
        _check(self.overlong_penalty >= 0, "algorithm.overlong_penalty", "must be >= 0")

    @property
    def uses_critic(self) -> bool:
        return self.advantage_estimator == "gae"

    @property
    def uses_reference(self) -> bool:
        """A frozen reference model is loaded for the KL term, or for ace's confidence shift
        (log pi - log pi_ref), which needs it whatever the KL coefficient."""
        return self.kl.coef > 0 or self.kl.target is not None or self.advantage_estimator == "ace"


TOKEN_REWARD_ESTIMATORS = ("gae", "reinforce_plus_plus", "optimal_token_baseline")


@dataclass
class TrainerConfig(LoggingConfig):
    steps: int = 20
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    max_grad_norm: float = 1.0
    ppo_epochs: int = 1  # passes over each batch
    mini_batches: int = 1  # optimizer steps per pass (the batch split in this many parts)
    # Samples per forward/backward (gradient accumulation), capped at micro_batch_tokens padded
    # tokens (rows x (prompt + longest completion); 0: no cap) so long sequences stay bounded;
    # null: 8192 in bf16, 4096 in fp32 (the same activation bytes, trainers.learner.token_cap).
    # SmolLM2-135M, 8 x 8 completions of up to 64 tokens, 2 cores: on an AMX CPU (bf16 matmul
    # ~2.6 TFLOP/s) 64 rows took 25-30% less update time than 16 for +0.3 GB peak RSS (small
    # matmuls leave AMX idle); on a Zen 4 CPU (~0.9 TFLOP/s) 32 and 64 were within 3% of 16.
    micro_batch_size: int = 64
    micro_batch_tokens: Optional[int] = None
    old_logprobs: Literal["auto", "recompute", "behaviour"] = "auto"
    autocast: Literal["auto", "bfloat16", "none"] = "auto"  # learner compute dtype
    logprob_chunk_tokens: int = CHUNK_ROWS  # rows of [rows, vocab] logits at once (models/logprobs.py: why)
    share_prompt_pass: bool = True  # learner runs each group's prompt once (exact; fewer FLOPs)
    # skip the passes of rows whose gradient is exactly 0 (A = 0 on every token, e.g. a GRPO group
    # with equal rewards; see RLUpdate.rows_to_learn); per-token metrics then cover the learned rows
    skip_zero_advantage_rows: bool = True
    # recompute each decoder layer in the backward (lean decoder only, see model.decoder): in
    # benchmarks/vs_trl.py on 2 cores, peak RSS 3.28 -> 3.03 GB, learner 3.9-4.3 s -> 4.7 s per step
    activation_checkpointing: bool = False
    # bf16 learner on a CPU: keep each fp32 master weight as its bf16 value plus 16 low bits (exact
    # fp32 AdamW, 2 bytes per weight less: -270 MB for SmolLM2-135M); false, or CUDA: a separate
    # fp32 master (see trainers/learner.py)
    split_master_weights: bool = True
    seed: int = 0
    eval_every: int = 0  # 0: only before and after training
    eval_problems: int = 200
    eval_temperature: float = 1.0
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    on_reward_error: Literal["zero", "abort"] = "abort"
    max_nonfinite_steps: int = 3  # stop after this many consecutive non-finite steps
    threads: int = 0  # torch threads; 0 keeps torch's default
    device: Literal["auto", "cpu", "cuda"] = "auto"  # learner and hf engine; auto: CUDA when available

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.steps >= 1, "trainer.steps", "must be >= 1")
        _check(self.lr > 0, "trainer.lr", "must be > 0")
        _check(self.weight_decay >= 0, "trainer.weight_decay", "must be >= 0")
        _check(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "trainer.adam_betas",
               "must be two numbers in [0, 1)")
        _check(self.warmup_steps >= 0, "trainer.warmup_steps", "must be >= 0")
        _check(self.max_grad_norm > 0, "trainer.max_grad_norm", "must be > 0")
        _check(self.ppo_epochs >= 1, "trainer.ppo_epochs", "must be >= 1")
        _check(self.mini_batches >= 1, "trainer.mini_batches", "must be >= 1")
        _check(self.micro_batch_size >= 1, "trainer.micro_batch_size", "must be >= 1")
        _check(self.micro_batch_tokens is None or self.micro_batch_tokens >= 0, "trainer.micro_batch_tokens",
               "must be >= 0 (0: no token limit) or null (by precision)")
        _check(self.logprob_chunk_tokens >= 16, "trainer.logprob_chunk_tokens", "must be >= 16")
        _check(self.eval_every >= 0, "trainer.eval_every", "must be >= 0")
        _check(self.eval_problems >= 1, "trainer.eval_problems", "must be >= 1")
        _check(self.eval_temperature > 0, "trainer.eval_temperature", "must be > 0")
        _check(self.checkpoint_every >= 0, "trainer.checkpoint_every", "must be >= 0")
        _check(self.keep_checkpoints >= 1, "trainer.keep_checkpoints", "must be >= 1")
        _check(self.max_nonfinite_steps >= 1, "trainer.max_nonfinite_steps", "must be >= 1")
        _check(self.threads >= 0, "trainer.threads", "must be >= 0")


@dataclass
class DistributedConfig:
    """Ray rollout workers and asynchronous training (posttrain.distributed; pip install -e '.[ray]')."""

    rollout_workers: int = 0  # Ray actors that sample (and score); 0: the in-process engine
    cpus_per_worker: int = 1  # Ray CPUs (and torch threads) per rollout worker
    address: Optional[str] = None  # null: a local Ray cluster from this machine; auto or host:port: join one
    # rollouts may come from weights up to this many optimizer steps old (0: synchronous, on-policy)
    max_staleness: int = 0
    learners: int = 1  # data-parallel learner processes: this one (rank 0) + learners-1 Ray actors
    cpus_per_learner: int = 1  # Ray CPUs (and torch threads, on every rank) per learner when learners > 1
    # ddp: every learner holds a full replica; fsdp2: weights, gradients and optimizer state are
    # sharded over the learners (torch fully_shard; posttrain.distributed.fsdp), needs learners >= 2
    strategy: str = "ddp"

    def __post_init__(self) -> None:
        _check(self.rollout_workers >= 0, "distributed.rollout_workers", "must be >= 0")
        _check(self.cpus_per_worker >= 1, "distributed.cpus_per_worker", "must be >= 1")
        _check(self.max_staleness >= 0, "distributed.max_staleness", "must be >= 0")
        _check(self.max_staleness == 0 or self.rollout_workers >= 1, "distributed.max_staleness",
               "needs distributed.rollout_workers >= 1 (the in-process engine cannot sample while the learner trains)")
        _check(self.learners >= 1, "distributed.learners", "must be >= 1")
        _check(self.cpus_per_learner >= 1, "distributed.cpus_per_learner", "must be >= 1")
        _check(self.strategy in ("ddp", "fsdp2"), "distributed.strategy", "must be ddp or fsdp2")
        _check(self.strategy != "fsdp2" or self.learners >= 2, "distributed.strategy",
               "fsdp2 shards over data-parallel learners and needs distributed.learners >= 2 (one learner has nothing "
               "to shard over); set distributed.learners=2 or more, or distributed.strategy=ddp")


@dataclass
class RLConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: dict = field(default_factory=lambda: {"name": "arithmetic"})  # validated by the task builder
    reward: dict = field(default_factory=lambda: {"type": "numeric"})  # validated by the reward builder
    # Held-out evaluation scores with this reward's `correct` component (default: the training
    # reward). Label-free training rewards such as majority vote need a ground-truth verifier here.
    eval_reward: Optional[dict] = None
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)  # which prompts and rollouts to learn from
    # multi-turn episodes: {type: tools | guess_the_number | single_turn, ...}; null: one completion per sample
    environment: Optional[dict] = None
    output_dir: Optional[str] = None  # default: a new folder under runs/

    def __post_init__(self) -> None:
        _check(self.algorithm.overlong_buffer <= self.rollout.max_new_tokens, "algorithm.overlong_buffer",
               "must be <= rollout.max_new_tokens")
        if self.algorithm.hpt_gate is not None:
            _check(self.trainer.ppo_epochs == 1 and self.trainer.mini_batches == 1 and self.distributed.learners == 1
                   and self.environment is None, "algorithm.hpt_gate",
                   "needs trainer.ppo_epochs=1, trainer.mini_batches=1, distributed.learners=1 and no environment "
                   "(its SFT part joins the single update of one learner)")
        # gdpo's default normalises a composite reward's parts; any other reward's components are
        # one reward's diagnostics (majority vote's gt_reward is even a label), so it would fail at step 1.
        _check(self.algorithm.advantage_estimator != "gdpo" or self.algorithm.advantage.gdpo_components
               or self.reward.get("type") == "composite", "algorithm.advantage.gdpo_components",
               "gdpo needs a composite reward (its parts are the components it normalises) or an explicit "
               "list of reward components")
        # pure reads step scores only; a step reward's steps reach only token-level estimators (rewards/process.py;
        # importing it also registers the step-level reward types)
        from posttrain.rewards.process import step_reward_issue

        step_issue = step_reward_issue(self.reward, self.algorithm.advantage_estimator, self.environment)
        _check(step_issue is None, *(step_issue or ("", "")))
        _check(moe_issue(self) is None, *(moe_issue(self) or ("", "")))
        _check(self.environment is None or self.distributed.rollout_workers == 0, "environment",
               "runs episodes in the trainer's process: set distributed.rollout_workers=0 (Ray workers sample "
               "single turns only)")
        sel = self.selection
        if sel.name is not None:
            from posttrain.selection import SELECTORS

            _check(sel.name in SELECTORS, "selection.name", f"must be one of {', '.join(SELECTORS.names())}")
            _check(self.distributed.max_staleness == 0, "selection.name",
                   "needs distributed.max_staleness=0: a selector decides on scored groups before the next batch is "
                   "sampled")
            _check(sel.max_rounds >= 0, "selection.max_rounds", "must be >= 0")
            _check(0.0 <= sel.low <= sel.high <= 1.0, "selection.low", "and selection.high need 0 <= low <= high <= 1")
            _check(0.0 < sel.alpha <= 1.0, "selection.alpha", "must be in (0, 1] (the TD(0) step size of sec; 0.5 "
                   "is the paper's)")
            _check(sel.temperature > 0, "selection.temperature", "must be > 0 (the softmax temperature over the arms "
                   "of sec and dump; lower is greedier)")
            _check(sel.window >= 1, "selection.window", "must be >= 1 (recent |advantages| kept per arm by dump)")
            _check(sel.ucb_c >= 0, "selection.ucb_c", "must be >= 0 (0 turns off dump's exploration bonus)")
            _check(0.0 < sel.token_fraction <= 1.0, "selection.token_fraction", "must be in (0, 1] (the fraction of "
                   "tokens d3s keeps; 1 keeps all)")
            _check(sel.anneal_steps >= 0, "selection.anneal_steps", "must be >= 0 (0: d3s keeps a constant fraction)")
            _check(sel.replay_size >= 1, "selection.replay_size", "must be >= 1 (groups the replay buffer holds)")
            _check(sel.max_replay_age >= 0, "selection.max_replay_age", "must be >= 0 (steps a group may be replayed "
                   "after it was sampled)")
        if sel.replay_fraction != 0:  # cures' rollout replay: a fraction of every batch from its buffer
            _check(sel.name == "cures", "selection.replay_fraction", f"is read by cures only, not {sel.name}")
            _check(0 < sel.replay_fraction < 1 and sel.replayed_groups(self.rollout.num_prompts) >= 1,
                   "selection.replay_fraction", f"must be in [1/rollout.num_prompts, 1) = [1/{self.rollout.num_prompts}"
                   f", 1), or 0: at least one group replayed and one generated fresh per step")
            _check(sel.max_replay_age >= 1, "selection.max_replay_age", "must be >= 1 with selection.replay_fraction "
                   "> 0 (a group is replayed one step after it was sampled at the earliest)")
        if sel.name == "replay" or sel.replay_fraction > 0:
            # A replayed sample is off-policy: only the correction reweights it by pi_theta / pi_behaviour,
            # and with old = behaviour log-probs that ratio is 1.
            who = "replay" if sel.name == "replay" else "selection.replay_fraction > 0"
            _check(self.algorithm.correction.name is not None, "selection.name",
                   f"{who} needs an off-policy correction for its stale samples: set algorithm.correction.name "
                   "(e.g. tis_token)")
            _check(self.trainer.old_logprobs != "behaviour", "selection.name",
                   f"{who} needs trainer.old_logprobs auto or recompute: with behaviour log-probs as the old ones "
                   "the correction's ratio pi_old / pi_behaviour is 1 for a replayed sample")
        per_group = sel.completions_kept(self.rollout.num_completions)
        if sel.name in ("pods", "d3s"):  # d3s may keep all n and select tokens only
            top = self.rollout.num_completions - (sel.name == "pods")
            _check(0 < per_group <= top, "selection.keep_completions",
                   f"must be between 1 and rollout.num_completions{' - 1' * (sel.name == 'pods')} = {top} for "
                   f"{sel.name}")
        if self.model.lora is not None:
            _check(self.distributed.strategy != "fsdp2", "model.lora",
                   "does not work with distributed.strategy=fsdp2 yet; use distributed.strategy=ddp (an adapter is "
                   "small: every learner holds all of it)")
            _check(not self.trainer.activation_checkpointing, "model.lora",
                   "runs the learner on transformers' forward, and trainer.activation_checkpointing needs posttrain's "
                   "lean decoder; set trainer.activation_checkpointing=false")
        _check(self.distributed.strategy != "fsdp2" or not self.algorithm.uses_critic, "distributed.strategy",
               f"fsdp2 does not shard a critic (algorithm.advantage_estimator={self.algorithm.advantage_estimator} "
               f"trains a value model); use distributed.strategy=ddp with it")
        batch = self.rollout.num_prompts * per_group
        _check(batch % self.trainer.mini_batches == 0, "trainer.mini_batches",
               f"must divide the batch of {batch} samples (rollout.num_prompts x rollout.num_completions, or x "
               f"selection.keep_completions under pods and d3s)")
        _check(self.distributed.learners <= batch // self.trainer.mini_batches, "distributed.learners",
               f"must be <= the mini-batch of {batch // self.trainer.mini_batches} samples, so that every "
               f"data-parallel rank gets a row (raise rollout.num_prompts or lower trainer.mini_batches)")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}")


# ------------------------------------------------------------------ generic typed loading
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_MAX_DEPTH = 100  # nesting allowed in free-form sections (task, reward, eval_reward)


def _one_line(exc: BaseException) -> str:
    """PyYAML's messages span several lines (with a caret under the column): one line for the CLI."""
    return " ".join(str(exc).split())


def _short(text: str, limit: int = 120) -> str:
    """``repr(text)``, cut to ``limit`` characters so that a huge override keeps the message short."""
    return repr(text if len(text) <= limit else text[: limit - 20] + "...")


def _check_tree(value: Any, key: str) -> None:
    """Reject values of free-form sections that cannot be written back to config.yaml: a
    self-referential YAML alias (``&a [*a]``) or nesting deeper than ``_MAX_DEPTH``.

    Shared (acyclic) aliases are fine; each node is walked once (heights are memoised), so a
    value built from many aliases of aliases costs its number of distinct nodes, not its size
    once expanded.
    """
    heights: dict[int, int] = {}  # id -> height of a finished node
    open_: set[int] = set()  # ids on the current path

    def walk(node: Any, where: str, depth: int) -> int:
        if not isinstance(node, (dict, list)):
            return 0
        ident = id(node)
        if ident in open_:
            raise ConfigError(f"{where} refers to itself (a YAML alias inside its own anchor); write the value out")
        if ident not in heights:
            if depth >= _MAX_DEPTH:
                raise ConfigError(f"{where} is nested more than {_MAX_DEPTH} levels deep")
            open_.add(ident)
            items = node.items() if isinstance(node, dict) else enumerate(node)
            height = 0
            for k, v in items:
                height = max(height, walk(v, f"{where}.{k}" if isinstance(node, dict) else f"{where}[{k}]", depth + 1))
            open_.discard(ident)
            heights[ident] = height + 1
        if depth + heights[ident] > _MAX_DEPTH:
            raise ConfigError(f"{where} is nested more than {_MAX_DEPTH} levels deep")
        return heights[ident]

    walk(value, key, 0)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (Union, types.UnionType):
        specific = None  # the reason a branch of the right kind gave (e.g. "must be a finite number")
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                if not str(exc).startswith(f"{key} must be {_type_name(arg)}, got "):
                    specific = specific or exc
                continue
        if specific is not None:
            raise ConfigError(str(specific)) from None
    elif tp is type(None):
        if value is None:
            return None
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            _check_tree(value, key)
            return value
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return from_dict(tp, value, key)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            number = value  # YAML 1.1 reads 3e-5 (no dot) as a string
        if number is not None:
            try:
                number = float(number)
            except OverflowError:  # an int beyond the float range
                number = math.inf
            if not math.isfinite(number):  # .inf, .nan, 1e999
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config annotation {tp!r} at {key}")
    raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and mistyped values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"unknown config key {where!r}; allowed keys here: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    for f in dataclasses.fields(cls):
        # Free-form sections (task, reward) keep their default keys (e.g. the task name) unless
        # given: `task.max_operand=20` alone still means the default task.
        if f.name in kwargs and hints[f.name] is dict and f.default_factory is not dataclasses.MISSING:
            kwargs[f.name] = {**f.default_factory(), **kwargs[f.name]}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as exc:  # range checks of nested configs owned by other modules
        raise ConfigError(str(exc)) from exc


def apply_override(data: dict, override: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to the nested dict ``data`` in place."""
    if "=" not in override:
        raise ConfigError(f"override {_short(override)} must look like key.path=value")
    path, raw = override.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {_short(override)} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {_short(override)}: value is not valid YAML ({_one_line(exc)})") from exc
    except RecursionError:
        raise ConfigError(f"override {_short(override)}: value is nested too deeply") from None
    node = data
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {_short(override)}: {k} is not a section")
        node = child
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = (), cls: type = RLConfig) -> Any:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except OSError as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {_one_line(exc)}") from exc
        except RecursionError:
            raise ConfigError(f"config file {path} is nested too deeply to read") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for override in overrides:
        apply_override(data, override)
    return from_dict(cls, data)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# The configs of the supervised and preference trainers live next door (this file holds RL's and
# the typed loader); importable from here like every other config.
from posttrain.config_supervised import (  # noqa: E402,F401
    DPOConfig,
    DPODataConfig,
    DPOPreferenceConfig,
    EIConfig,
    ExpertConfig,
    SFTConfig,
    SFTDataConfig,
)

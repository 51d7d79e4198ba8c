"""Configs of ``posttrain sft`` and ``posttrain dpo`` (the RL config and the typed loader that
reads all of them are in posttrain.config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from posttrain.algorithms.preference import PreferenceConfig
from posttrain.config import ConfigError, ModelConfig, RolloutConfig, TrainerConfig, _check


@dataclass
class SFTDataConfig:
    """``data:`` of ``posttrain sft``: where the demonstrations come from (trainers/sft_data.py)."""

    path: Optional[str] = None  # JSONL: {"prompt", "completion"} or {"messages"}; null: the task's demonstrations
    validation_path: Optional[str] = None  # JSONL for the held-out loss; null: the task's test demonstrations
    completion: Literal["answer", "solution"] = "answer"  # task demonstrations: the answer, or metadata["solution"]
    batch_size: int = 16  # demonstrations per optimizer step
    max_length: int = 1024  # prompt + completion tokens; a longer demonstration is an error
    # Batches of similar-length demonstrations: each epoch's shuffled order is cut into windows of
    # bucket_window batches, arranged by prompt and completion length inside a window, and the
    # window's batches shuffled (sft.LengthBucketSampler). Less padding; each demonstration still once an epoch.
    length_bucketing: bool = False
    bucket_window: int = 16  # batches per sorted window (larger: less padding, batches less random)

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "data.batch_size", "must be >= 1")
        _check(self.max_length >= 2, "data.max_length", "must be >= 2")
        _check(self.bucket_window >= 1, "data.bucket_window", "must be >= 1 (batches per sorted window)")


@dataclass
class SFTLossConfig:
    """``sft:`` of ``posttrain sft``: the loss (algorithms/sft_losses.py SFT_LOSSES). ``nll`` is plain
    SFT; ``forward_kl``, ``js`` and ``alpha`` are the f-divergence variants (catalog 004-48), whose
    reference is the policy the run starts from (its token log-probs, computed once up front)."""

    loss: str = "nll"
    alpha: float = 0.5  # loss: alpha only; in (0, 1)

    def __post_init__(self) -> None:
        from posttrain.algorithms.sft_losses import SFT_LOSSES

        _check(self.loss in SFT_LOSSES, "sft.loss", f"must be one of {SFT_LOSSES.names()}, got {self.loss!r}")
        _check(0.0 < self.alpha < 1.0, "sft.alpha",
               f"must be in (0, 1), got {self.alpha} (alpha -> 0 is sft.loss=nll, alpha -> 1 is forward_kl)")


@dataclass
class SFTConfig:
    """``posttrain sft``: supervised fine-tuning on demonstrations through the same Learner as RL.
    ``task``/``reward``/``rollout`` serve the held-out task accuracy (sampled as in RL)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    sft: SFTLossConfig = field(default_factory=SFTLossConfig)
    task: dict = field(default_factory=lambda: {"name": "arithmetic"})
    reward: dict = field(default_factory=lambda: {"type": "numeric"})
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    output_dir: Optional[str] = None


@dataclass
class DPODataConfig:
    """``data:`` of ``posttrain dpo``: preference pairs (trainers/preference_data.py)."""

    # JSONL of {prompt, chosen, rejected[, margin]}, synthetic:arithmetic, or online: pairs from the
    # policy's own samples each step, best vs worst by the reward (trainers/online_dpo.py)
    path: str = "synthetic:arithmetic"
    validation_path: Optional[str] = None  # JSONL of held-out pairs; null: a validation_fraction slice of path
    validation_fraction: float = 0.1  # held-out share, by a hash of the prompt (a prompt is never on both sides)
    synthetic_size: int = 512  # synthetic:arithmetic: at most this many pairs (from the task's train split)
    batch_size: int = 16  # pairs per optimizer step
    max_length: int = 1024  # prompt + completion tokens; a longer chosen or rejected side is an error
    # data.path: online only: held-out pairs are the initial policy's own samples on the first N test
    # problems (rollout.num_completions each, best vs worst by the reward), drawn once; 0: none
    held_out_prompts: int = 64

    def __post_init__(self) -> None:
        from posttrain.trainers.preference_data import SYNTHETIC

        _check(bool(self.path), "data.path", "must name a JSONL preference file, synthetic:arithmetic or online")
        _check(not self.path.startswith("synthetic:") or self.path in SYNTHETIC, "data.path",
               f"synthetic data must be one of {sorted(SYNTHETIC)}")
        _check(0.0 <= self.validation_fraction < 1.0, "data.validation_fraction", "must be in [0, 1)")
        _check(self.synthetic_size >= 2, "data.synthetic_size", "must be >= 2")
        _check(self.batch_size >= 1, "data.batch_size", "must be >= 1")
        _check(self.max_length >= 2, "data.max_length", "must be >= 2")
        _check(self.held_out_prompts >= 0, "data.held_out_prompts", "must be >= 0")


@dataclass
class DPOPreferenceConfig(PreferenceConfig):
    """``preference:`` of ``posttrain dpo``: the loss (algorithms/preference.py PREFERENCE_LOSSES),
    its parameters (PreferenceConfig's fields), and the reference model."""

    loss: str = "dpo"
    # Pre-DPO: a guiding reference (a run directory or model directory, e.g. an earlier DPO run)
    # instead of a frozen copy of the initial policy. null: the initial policy.
    reference_model: Optional[str] = None
    use_margins: bool = True  # a pair's 'margin' is the loss's offset m (losses that take one)
    # data.path: online only: every k steps the reference becomes the current policy (DNO-style
    # iterations); 0: the initial policy throughout
    reference_update_every: int = 0
    # Not fields: the losses that read no reference model, and those that take no margins.
    REFERENCE_FREE_LOSSES = ("simpo", "orpo")
    NO_MARGIN_LOSSES = ("ipo", "orpo", "lipo")

    def __post_init__(self) -> None:
        from posttrain.algorithms.preference import PREFERENCE_LOSSES

        try:
            super().__post_init__()
        except ValueError as exc:  # PreferenceConfig names its keys algorithm.preference.*
            raise ConfigError(str(exc).replace("algorithm.preference.", "preference.")) from None
        _check(self.loss in PREFERENCE_LOSSES, "preference.loss", f"must be one of {PREFERENCE_LOSSES.names()}")
        _check(self.reference_update_every >= 0, "preference.reference_update_every", "must be >= 0")
        _check(self.reference_model is None or self.uses_reference, "preference.reference_model",
               f"is set, but preference.loss={self.loss}{' with reference_free' * self.reference_free} uses no "
               "reference model")

    @property
    def uses_reference(self) -> bool:
        return self.loss not in self.REFERENCE_FREE_LOSSES and not self.reference_free

    @property
    def takes_margins(self) -> bool:
        return self.use_margins and self.loss not in self.NO_MARGIN_LOSSES


@dataclass
class DPOConfig:
    """``posttrain dpo``: preference optimisation on pairs through the same Learner as RL and SFT.
    ``task``/``reward``/``rollout`` serve the held-out task accuracy (sampled as in RL)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DPODataConfig = field(default_factory=DPODataConfig)
    preference: DPOPreferenceConfig = field(default_factory=DPOPreferenceConfig)
    task: dict = field(default_factory=lambda: {"name": "arithmetic"})
    reward: dict = field(default_factory=lambda: {"type": "numeric"})
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    output_dir: Optional[str] = None

    def __post_init__(self) -> None:
        k = self.preference.reference_update_every
        _check(k == 0 or (self.data.path == "online" and self.preference.uses_reference
                          and self.preference.reference_model is None), "preference.reference_update_every",
               "needs data.path=online, a loss with a reference model and no preference.reference_model")
        # A LoRA run's reference is its base with the adapter off, which cannot move to the current policy.
        _check(k == 0 or self.model.lora is None, "preference.reference_update_every",
               "does not work with model.lora yet (the reference is the adapter-free base); set it to 0")


@dataclass
class ExpertConfig:
    """``expert:`` of ``posttrain ei`` (trainers/expert_iteration.py). Rounds = trainer.steps / steps_per_round."""

    steps_per_round: int = 5  # SFT steps on each round's kept samples
    prompts_per_round: int = 32  # train prompts sampled per round (rollout.num_completions each)
    keep_per_prompt: int = 4  # distinct correct completions kept per prompt at most

    def __post_init__(self) -> None:
        _check(self.steps_per_round >= 1, "expert.steps_per_round", "must be >= 1")
        _check(self.prompts_per_round >= 1, "expert.prompts_per_round", "must be >= 1")
        _check(self.keep_per_prompt >= 1, "expert.keep_per_prompt", "must be >= 1")


@dataclass
class EIConfig:
    """``posttrain ei``: expert iteration (sample, keep the verified-correct, SFT, repeat)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: dict = field(default_factory=lambda: {"name": "arithmetic"})
    reward: dict = field(default_factory=lambda: {"type": "numeric"})  # the verifier that filters, and held-out accuracy
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # how rounds sample (num_completions, temperature)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)  # batch_size, max_length of the SFT steps
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    output_dir: Optional[str] = None

    def __post_init__(self) -> None:
        _check(self.data.path is None and self.data.validation_path is None, "data.path",
               "is not used by posttrain ei (its demonstrations are the policy's own verified samples): remove it")
        # A round's samples get a plain shuffled sampler (expert_iteration._set_round): refuse
        # the option rather than ignore it.
        _check(not self.data.length_bucketing, "data.length_bucketing", "is not supported by posttrain ei yet: "
               "remove it")

"""Rewards: verifiers (math, numeric, code sandbox), shaping (format, length, DAPO overlong),
composition, group rewards (TTRL majority vote), and error policies. Self-certainty (a
tensor function, imports torch) lives in ``posttrain.rewards.self_certainty``.

Every reward follows ``posttrain.rewards.base.Reward``: ``reward(problem, completions) ->
RewardOutput`` for one group of completions. ``build_reward(spec)`` builds one from config.
"""

from posttrain.rewards.base import Reward, RewardOutput
from posttrain.rewards.code_reward import CodeReward
from posttrain.rewards.errors import RewardError, score_group
from posttrain.rewards.extract import extract_answer
from posttrain.rewards.majority import MajorityVoteReward, majority_vote
from posttrain.rewards.math import MathReward, NumericReward, answers_equivalent, canonical_answer
from posttrain.rewards.noise import NoisyReward
from posttrain.rewards.registry import REWARDS, build_reward, register_reward
from posttrain.rewards.sandbox import SANDBOX_CAPABILITIES, SandboxError, SandboxResult, detect_capabilities, run_python
from posttrain.rewards.shaping import CompositeReward, FormatReward, LengthReward, OverlongReward, ThinkFormatReward

__all__ = [
    "REWARDS",
    "SANDBOX_CAPABILITIES",
    "CodeReward",
    "CompositeReward",
    "FormatReward",
    "LengthReward",
    "MajorityVoteReward",
    "MathReward",
    "NoisyReward",
    "NumericReward",
    "OverlongReward",
    "Reward",
    "RewardError",
    "RewardOutput",
    "SandboxError",
    "SandboxResult",
    "ThinkFormatReward",
    "answers_equivalent",
    "build_reward",
    "canonical_answer",
    "detect_capabilities",
    "extract_answer",
    "majority_vote",
    "register_reward",
    "run_python",
    "score_group",
]


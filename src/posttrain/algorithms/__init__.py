"""Advantage estimators, policy losses, aggregation, KL, regularisers and mismatch corrections.

Importing the package fills the registries (``ADVANTAGES``, ``POLICY_LOSSES``, ``CORRECTIONS``);
``catalog.catalog()`` lists everything with its paper.
"""

from posttrain.algorithms import (  # noqa: F401  (fill the registries)
    advantages,
    advantages_copo,
    advantages_otb,
    advantages_pear,
    advantages_shaped,
    advantages_token,
    corrections,
    hapo,
    losses,
    losses_sequence,
    preference,
)
from posttrain.algorithms.advantages_token import gae_returns, value_loss
from posttrain.algorithms.aggregation import AGGREGATIONS, aggregate
from posttrain.algorithms.base import (
    ADVANTAGES,
    CORRECTIONS,
    POLICY_LOSSES,
    AdvantageConfig,
    AdvantageInput,
    CorrectionConfig,
    CorrectionInput,
    CorrectionOutput,
    PolicyLossConfig,
    PolicyLossInput,
    PolicyLossOutput,
)
from posttrain.algorithms.corrections import mismatch_metrics
from posttrain.algorithms.kl import KL_ESTIMATORS, kl_estimate
from posttrain.algorithms.overlong import dapo_overlong_penalty, mask_truncated
from posttrain.algorithms.regularizers import (
    AdaptiveEntropyController,
    AdaptiveKLController,
    EntropyConfig,
    KLConfig,
    kl_in_reward,
    top_entropy_mask,
)

__all__ = [
    "ADVANTAGES", "AGGREGATIONS", "CORRECTIONS", "KL_ESTIMATORS", "POLICY_LOSSES", "AdaptiveEntropyController",
    "AdaptiveKLController", "AdvantageConfig", "AdvantageInput", "CorrectionConfig", "CorrectionInput",
    "CorrectionOutput", "EntropyConfig", "KLConfig", "PolicyLossConfig", "PolicyLossInput", "PolicyLossOutput",
    "aggregate", "dapo_overlong_penalty", "gae_returns", "kl_estimate", "kl_in_reward", "mask_truncated",
    "mismatch_metrics", "top_entropy_mask", "value_loss",
]

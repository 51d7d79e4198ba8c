"""Advantage estimators, policy losses, aggregation, KL and mismatch corrections."""

from posttrain.algorithms import advantages, losses  # noqa: F401  (fill the registries)
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
from posttrain.algorithms.kl import KL_ESTIMATORS, kl_estimate

__all__ = [
    "ADVANTAGES", "AGGREGATIONS", "CORRECTIONS", "KL_ESTIMATORS", "POLICY_LOSSES", "AdvantageConfig",
    "AdvantageInput", "CorrectionConfig", "CorrectionInput", "CorrectionOutput", "PolicyLossConfig",
    "PolicyLossInput", "PolicyLossOutput", "aggregate", "kl_estimate",
]

"""Data selection and curricula: which prompts to sample and which rollouts to learn from.

``posttrain list selection`` lists the registered selectors; the contract is in ``base.py``.
"""

from posttrain.selection.base import SELECTORS, ScoredGroups, SelectionConfig, Selector, build_selector
from posttrain.selection import curricula, downsampling, replay, selectors  # noqa: F401,E402  (fill SELECTORS)

__all__ = ["SELECTORS", "ScoredGroups", "SelectionConfig", "Selector", "build_selector"]

"""Everything the algorithm library offers, with its paper: ``posttrain list algorithms [--json]``."""

from __future__ import annotations

import posttrain.algorithms  # noqa: F401  (importing the package fills the registries)
from posttrain.algorithms.aggregation import AGGREGATION_INFO, AGGREGATIONS
from posttrain.algorithms.base import ADVANTAGES, CORRECTIONS, POLICY_LOSSES
from posttrain.algorithms.kl import KL_ESTIMATORS, KL_INFO
from posttrain.algorithms.preference import PREFERENCE_LOSSES
from posttrain.algorithms.sft_losses import SFT_LOSSES


def summary_line(doc: str | None) -> str:
    """The first line of a docstring ("" when there is none)."""
    lines = (doc or "").strip().splitlines()
    return lines[0].strip() if lines else ""


def catalog() -> list[dict]:
    """One dict per item: {"kind", "name", "paper", "summary"}.

    kinds: "advantage", "policy_loss", "correction", "preference_loss", "sft_loss", "aggregation", "kl". ``paper`` is
    "Title (arXiv:id)" or "" for textbook methods; ``summary`` is the first docstring line.
    """
    rows: list[dict] = []
    registries = (("advantage", ADVANTAGES), ("policy_loss", POLICY_LOSSES), ("correction", CORRECTIONS),
                  ("preference_loss", PREFERENCE_LOSSES), ("sft_loss", SFT_LOSSES))
    for kind, registry in registries:
        for entry in registry.entries():
            rows.append({"kind": kind, "name": entry.name, "paper": entry.paper, "summary": summary_line(entry.fn.__doc__)})
    for mode in AGGREGATIONS:
        summary, paper = AGGREGATION_INFO[mode]
        rows.append({"kind": "aggregation", "name": mode, "paper": paper, "summary": summary})
    for name in KL_ESTIMATORS:
        summary, paper = KL_INFO[name]
        rows.append({"kind": "kl", "name": name, "paper": paper, "summary": summary})
    return rows

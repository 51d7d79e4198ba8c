"""Every registered algorithm cites its paper; the catalog covers everything; configs validate."""

from __future__ import annotations

import pytest

from posttrain.algorithms import (
    ADVANTAGES,
    AGGREGATIONS,
    CORRECTIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    AdvantageConfig,
    CorrectionConfig,
    PolicyLossConfig,
)
from posttrain.algorithms.base import Registry
from posttrain.algorithms.catalog import catalog

ENTRIES = [e for r in (ADVANTAGES, POLICY_LOSSES, CORRECTIONS) for e in r.entries()]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: f"{e.kind}:{e.name}")
def test_entry_cites_a_paper(entry):
    if entry.textbook:
        return
    assert entry.paper and "arXiv:" in entry.paper, entry.name
    doc = entry.fn.__doc__ or ""
    assert "arXiv" in doc, f"{entry.name}: docstring must name the paper's arXiv id"
    assert entry.paper in doc, f"{entry.name}: docstring must carry the paper's title and id"
    assert doc.strip().splitlines()[0], entry.name


def test_expected_names_are_registered():
    assert {"gae", "grpo", "dr_grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "remax", "opo",
            "gpg", "grpo_passk", "gdpo", "lite_ppo", "w_reinforce", "unlikeliness", "seed_grpo", "minirl", "pure",
            "ace"} <= set(ADVANTAGES.names())
    assert {"ppo_clip", "gspo", "gspo_token", "luspo", "gmpo", "cispo", "sapo", "gpg", "kl_cov", "clip_cov",
            "dppo_tv", "dppo_kl", "dro", "reinforce_is"} <= set(POLICY_LOSSES.names())
    assert {"tis_token", "tis_sequence", "mis_token", "icepop", "mis_sequence", "reject_k1", "reject_k2",
            "reject_k3"} <= set(CORRECTIONS.names())


def test_catalog_covers_everything():
    rows = catalog()
    keys = {(r["kind"], r["name"]) for r in rows}
    assert len(keys) == len(rows)
    assert {("advantage", n) for n in ADVANTAGES.names()} <= keys
    assert {("policy_loss", n) for n in POLICY_LOSSES.names()} <= keys
    assert {("correction", n) for n in CORRECTIONS.names()} <= keys
    assert {("aggregation", n) for n in AGGREGATIONS} <= keys
    assert {("kl", n) for n in KL_ESTIMATORS} <= keys
    for r in rows:
        assert set(r) == {"kind", "name", "paper", "summary"} and r["summary"], r


def test_registry_rejects_duplicates_and_unknown_names():
    reg: Registry = Registry("thing")
    reg.register("a", paper="P (arXiv:0000.00000)")(lambda: None)
    with pytest.raises(ValueError, match="twice"):
        reg.register("a")(lambda: None)
    with pytest.raises(KeyError, match="registered: a"):
        reg.get("b")


@pytest.mark.parametrize(
    "cls, kwargs, key",
    [
        (AdvantageConfig, {"eps": -1.0}, "algorithm.advantage.eps"),
        (AdvantageConfig, {"gamma": 1.5}, "algorithm.advantage.gamma"),
        (AdvantageConfig, {"lam": -0.1}, "algorithm.advantage.lam"),
        (AdvantageConfig, {"gdpo_components": ["a"], "gdpo_weights": [1.0, 2.0]}, "algorithm.advantage.gdpo_weights"),
        (AdvantageConfig, {"unlikeliness_beta": 2.0}, "algorithm.advantage.unlikeliness_beta"),
        (AdvantageConfig, {"psr_weight": -1.0}, "algorithm.advantage.psr_weight"),
        (PolicyLossConfig, {"clip_low": -0.1}, "algorithm.loss.clip_low"),
        (PolicyLossConfig, {"dual_clip": 0.5}, "algorithm.loss.dual_clip"),
        (PolicyLossConfig, {"cispo_max_ratio": 0.0}, "algorithm.loss.cispo_max_ratio"),
        (PolicyLossConfig, {"cispo_min_ratio": 9.0}, "algorithm.loss.cispo_min_ratio"),
        (PolicyLossConfig, {"kl_cov_ratio": 0.0}, "algorithm.loss.kl_cov_ratio"),
        (PolicyLossConfig, {"clip_cov_lb": 6.0}, "algorithm.loss.clip_cov_lb"),
        (PolicyLossConfig, {"sapo_tau_neg": 0.0}, "algorithm.loss.sapo_tau_pos/neg"),
        (PolicyLossConfig, {"is_cap": 0.0}, "algorithm.loss.is_cap"),
        (CorrectionConfig, {"threshold_high": 0.5}, "algorithm.correction.threshold_high"),
        (CorrectionConfig, {"threshold_low": 3.0}, "algorithm.correction.threshold_low"),
        (CorrectionConfig, {"kl_threshold": 0.0}, "algorithm.correction.kl_threshold"),
    ],
)
def test_config_validation_names_the_key(cls, kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        cls(**kwargs)


def test_config_defaults_are_the_papers():
    loss = PolicyLossConfig()
    assert (loss.gspo_clip_low, loss.gspo_clip_high) == (3e-4, 4e-4)  # GSPO
    assert (loss.sapo_tau_pos, loss.sapo_tau_neg) == (1.0, 1.05)  # SAPO
    assert (loss.kl_cov_ratio, loss.kl_cov_coef) == (0.002, 1.0)  # KL-Cov
    assert (loss.clip_cov_ratio, loss.clip_cov_lb, loss.clip_cov_ub) == (0.0002, 1.0, 5.0)  # Clip-Cov
    assert loss.gmpo_clip_low == loss.gmpo_clip_high == 0.4  # GMPO
    assert AdvantageConfig().psr_weight == 0.1  # W-REINFORCE
    assert CorrectionConfig().low == 0.5

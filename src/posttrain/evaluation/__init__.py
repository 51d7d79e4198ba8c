"""Evaluation: sampling metrics (pass@k, maj@k, best-of-N, ...), rliable-style statistics with
seeded bootstrap intervals, training-dynamics diagnostics, reward-model / judge reliability
(RETA, flip rates), and the HTML run report.

Everything here is numpy (+ matplotlib for the report); no torch is imported.
"""

from posttrain.evaluation.analysis import (
    FormatShareTracker,
    SelfCorrectionFit,
    classify_format,
    fit_self_correction,
    fit_self_correction_from_counts,
    format_shares,
)
from posttrain.evaluation.metrics import (
    accuracy_by_difficulty,
    answer_diversity,
    answer_entropy,
    best_of_n,
    correct_fn_from_flags,
    cost_of_pass,
    distinct_answers,
    is_abstention,
    maj_at_k,
    majority_vote,
    mean_at_k,
    pass_at_k,
    pass_at_k_table,
    scaling_curve,
    weighted_majority,
)
from posttrain.evaluation.report import RunData, group_seed_runs, load_run, render_pass_at_k_table, write_report
from posttrain.evaluation.reward_model_eval import (
    distractor_flips,
    order_swap_flips,
    pairwise_margin,
    protocol_disagreement,
    rate_with_ci,
    reta_curve,
    reta_per_prompt,
    reta_summary,
)
from posttrain.evaluation.stats import (
    Interval,
    PerformanceProfile,
    aggregate_mean,
    aggregate_median,
    aggregate_with_ci,
    iqm,
    optimality_gap,
    performance_profile,
    probability_of_improvement,
    probability_of_improvement_ci,
    stratified_bootstrap_ci,
)

__all__ = [
    # metrics
    "pass_at_k",
    "pass_at_k_table",
    "maj_at_k",
    "mean_at_k",
    "best_of_n",
    "majority_vote",
    "weighted_majority",
    "is_abstention",
    "correct_fn_from_flags",
    "distinct_answers",
    "answer_entropy",
    "answer_diversity",
    "cost_of_pass",
    "accuracy_by_difficulty",
    "scaling_curve",
    # stats
    "Interval",
    "PerformanceProfile",
    "iqm",
    "aggregate_mean",
    "aggregate_median",
    "optimality_gap",
    "stratified_bootstrap_ci",
    "aggregate_with_ci",
    "probability_of_improvement",
    "probability_of_improvement_ci",
    "performance_profile",
    # analysis
    "classify_format",
    "format_shares",
    "FormatShareTracker",
    "SelfCorrectionFit",
    "fit_self_correction",
    "fit_self_correction_from_counts",
    # reward-model / judge reliability
    "reta_curve",
    "reta_per_prompt",
    "reta_summary",
    "pairwise_margin",
    "distractor_flips",
    "order_swap_flips",
    "protocol_disagreement",
    "rate_with_ci",
    # report
    "RunData",
    "load_run",
    "group_seed_runs",
    "write_report",
    "render_pass_at_k_table",
]

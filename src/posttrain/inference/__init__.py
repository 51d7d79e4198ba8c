"""Test-time scaling: majority vote, weighted majority vote and best-of-N selection over N
sampled completions, with self-certainty, mean log-prob and reward-model scorers.

>>> from posttrain.inference import majority_vote, weighted_majority_vote, select_best_of_n
>>> majority_vote(["12", "13", "12.0"])
'12'
>>> weighted_majority_vote(["12", "13", "13"], [0.9, 0.2, 0.3])
'12'
>>> select_best_of_n(["a", "b", "c"], [0.1, 0.5, 0.2])
'b'

Scores for a batch of rollouts: :func:`score_rollouts` (``"self_certainty"``,
``"mean_logprob"``, ``"reward_model"``); see :mod:`posttrain.inference.scorers`.
Evaluation of all of these over a test set: :func:`posttrain.evaluation.runner.evaluate`.
"""

from posttrain.inference.scorers import (
    SCORERS,
    completion_self_certainty,
    mean_logprob,
    reward_model_scores,
    score_rollouts,
    vote_weights,
)
from posttrain.inference.selection import (
    answer_clusters,
    best_of_n_index,
    majority_vote,
    select_best_of_n,
    weighted_majority_vote,
)

__all__ = [
    "SCORERS",
    "answer_clusters",
    "best_of_n_index",
    "completion_self_certainty",
    "majority_vote",
    "mean_logprob",
    "reward_model_scores",
    "score_rollouts",
    "select_best_of_n",
    "vote_weights",
    "weighted_majority_vote",
]

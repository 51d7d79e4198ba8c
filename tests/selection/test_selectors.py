"""Selectors against hand-computed values, their config errors, and their listing."""

import itertools
import json
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.config import ConfigError, load_config
from posttrain.selection import SELECTORS, ScoredGroups, SelectionConfig, build_selector
from posttrain.selection.selectors import max_variance_subset
from posttrain.tasks.base import Problem


def _groups(rewards: list[list[float]], correct: list[list[bool]] | None = None) -> ScoredGroups:
    """A scored batch of groups given row by row (group g = problem p{g})."""
    flat = [r for g in rewards for r in g]
    ids = [g for g, rows in enumerate(rewards) for _ in rows]
    flags = [c for g in correct for c in g] if correct is not None else [r > 0 for r in flat]
    return ScoredGroups([Problem(id=f"p{g}", prompt=f"q{g}") for g in range(len(rewards))], torch.tensor(ids),
                        torch.tensor(flat), torch.tensor(flags))


def test_dynamic_sampling_drops_groups_whose_rewards_all_agree():
    sel = build_selector(SelectionConfig(name="dynamic_sampling"), 3)
    batch = _groups([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.2, 0.2, 0.7]])
    assert sel.keep_groups(batch).tolist() == [False, True, False, True]
    assert sel.refills


def test_online_difficulty_keeps_the_pass_rate_band():
    sel = build_selector(SelectionConfig(name="online_difficulty", low=0.3, high=0.7), 3)
    # pass rates 1, 1/3, 0, 2/3 (correctness, not the reward, decides: group 3 has equal rewards)
    batch = _groups([[1, 1, 1], [1, 0, 0], [0, 0, 0], [0.5, 0.5, 0.5]],
                    [[True] * 3, [True, False, False], [False] * 3, [True, True, False]])
    assert batch.pass_rates.tolist() == pytest.approx([1.0, 1 / 3, 0.0, 2 / 3])
    assert sel.keep_groups(batch).tolist() == [False, True, False, True]


def test_srpo_history_skips_prompts_solved_in_an_earlier_epoch_and_keeps_its_state():
    sel = build_selector(SelectionConfig(name="srpo_history"), 2)
    sel.observe(_groups([[1, 1], [0, 0], [1, 0]]), epoch=0)  # p0 solved; p1 all wrong; p2 mixed
    p = [Problem(id=f"p{g}", prompt="") for g in range(3)]
    assert [sel.accept(x, 0) for x in p] == [True, True, True]  # same epoch: still sampled
    assert [sel.accept(x, 1) for x in p] == [False, True, True]  # later epochs: p0 skipped
    assert sel.metrics() == {"selection/solved_prompts": 1.0, "selection/skipped_prompts": 1.0}
    fresh = build_selector(SelectionConfig(name="srpo_history"), 2)
    fresh.load_state_dict(sel.state_dict())
    assert [fresh.accept(x, 2) for x in p] == [False, True, True] and fresh.skipped == 2


def test_pods_max_variance_subset_by_hand():
    # m = 3 of [0.1, 0.9, 0.5, 0.3, 0.8] (population variances): bottom 3 {.1,.3,.5} .0267;
    # {.1,.3} + top {.9} .1156; {.1} + top {.8,.9} .1267 (the best); top 3 {.5,.8,.9} .0289.
    assert max_variance_subset(torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8]), 3).tolist() == [0, 1, 4]
    # binary rewards: as close to half right, half wrong as the group allows
    assert max_variance_subset(torch.tensor([1.0, 0, 0, 0, 1, 0]), 4).tolist() == [0, 1, 2, 4]
    sel = build_selector(SelectionConfig(name="pods", keep_completions=2), 4)
    keep = sel.keep_rows(_groups([[0, 1, 1, 1], [0.5, 0.5, 0.5, 0.5]]))
    assert keep.tolist() == [True, True, False, False, True, True, False, False]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=2, max_size=8), st.data())
def test_pods_subset_is_the_brute_force_optimum(values, data):
    rewards = torch.tensor(values, dtype=torch.float64) / 4
    m = data.draw(st.integers(1, len(values)))
    best = max(float(rewards[list(s)].var(unbiased=False)) for s in itertools.combinations(range(len(values)), m))
    got = max_variance_subset(rewards, m)
    assert len(got) == m and float(rewards[got].var(unbiased=False)) == pytest.approx(best, abs=1e-12)


def test_selection_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match=re.escape(f"selection.name must be one of {', '.join(SELECTORS.names())}")):
        load_config(None, ["selection.name=nope"])
    with pytest.raises(ConfigError, match="needs distributed.max_staleness=0"):
        load_config(None, ["selection.name=dynamic_sampling", "distributed.rollout_workers=1",
                           "distributed.max_staleness=1"])
    with pytest.raises(ConfigError, match="keep_completions must be between 1 and rollout.num_completions - 1 = 3"):
        load_config(None, ["selection.name=pods", "rollout.num_completions=4", "selection.keep_completions=4"])
    with pytest.raises(ConfigError, match="mini_batches must divide the batch of 12 samples"):  # 4 prompts x 3 kept
        load_config(None, ["selection.name=pods", "rollout.num_prompts=4", "rollout.num_completions=6",
                           "trainer.mini_batches=5"])


def test_selectors_are_listed_with_their_papers():
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "list", "algorithms", "--json"], capture_output=True,
                         text=True, check=True).stdout
    rows = [r for r in json.loads(out) if r["kind"] == "selection"]
    assert sorted(r["name"] for r in rows) == SELECTORS.names()
    assert all("arXiv:" in r["paper"] and r["summary"] for r in rows)

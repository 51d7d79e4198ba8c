"""d3s (sample- and token-level down-sampling) and replay (a buffer of earlier informative groups):
hand-computed values, the RL loop on the tiny model, and exact resume of the buffer."""

import io
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import ConfigError, load_config
from posttrain.rollout.batch import Rollouts
from posttrain.selection import SelectionConfig, build_selector
from posttrain.selection.downsampling import token_fraction
from posttrain.selection.replay import ReplayBuffer
from posttrain.tasks.base import Problem
from posttrain.trainers import rl
from posttrain.trainers.rl_run import train_rl
from tests.selection.test_selection_loop import LEARNABLE, _rows


def test_d3s_token_mask_keeps_the_largest_abs_advantage_times_entropy():
    sel = build_selector(SelectionConfig(name="d3s", token_fraction=0.5), 4)
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, 0.0]])
    ent = torch.tensor([[0.1, 0.4, 0.3], [0.1, 0.3, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # |A| H on the 5 loss tokens: 0.1, 0.4, 0.3, 0.2, 0.6 (the padded 0 x 9.0 is not a loss token).
    # ceil(0.5 x 5) = 3 tokens: 0.6, 0.4, 0.3.
    kept = sel.keep_tokens(adv, ent, mask, step=0)
    assert kept.tolist() == [[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]]
    assert sel.keep_tokens(adv, ent, mask, step=0).sum() == 3  # stateless: same answer again
    zeros = sel.keep_tokens(torch.zeros(2, 3), ent, mask, step=0)  # all tied at 0: still 3 of 5, earliest first
    assert zeros.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]


def test_d3s_schedule_relaxes_linearly_to_all_tokens():
    assert token_fraction(0.2, 0, 10) == pytest.approx(0.2)
    assert token_fraction(0.2, 5, 10) == pytest.approx(0.6)
    assert token_fraction(0.2, 30, 10) == 1.0
    assert token_fraction(0.2, 30, 0) == 0.2  # no schedule
    sel = build_selector(SelectionConfig(name="d3s", token_fraction=0.2, anneal_steps=10), 4)
    adv, ent, mask = torch.ones(1, 5), torch.arange(1.0, 6.0).unsqueeze(0), torch.ones(1, 5)
    assert sel.keep_tokens(adv, ent, mask, step=10).sum() == 5


def test_d3s_keeps_the_max_variance_rollouts_of_each_group():
    from posttrain.selection.base import ScoredGroups

    sel = build_selector(SelectionConfig(name="d3s", keep_completions=2), 4)
    groups = ScoredGroups([Problem("a", "a"), Problem("b", "b")], torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]),
                          torch.tensor([0.0, 1.0, 0.2, 0.9, 0.5, 0.5, 0.5, 0.1]), torch.zeros(8, dtype=torch.bool))
    # group 0: {0.0, 1.0} has the largest variance; group 1: any 0.5 with the 0.1 (first 0.5 after a stable sort)
    assert torch.nonzero(sel.keep_rows(groups)).squeeze(-1).tolist() == [0, 1, 4, 7]


def _group(rewards, step, pid="p"):
    n = len(rewards)
    problem = Problem(pid, f"prompt {pid}", answer="1", category="c")
    return problem, Rollouts(
        prompt_ids=torch.ones(n, 2, dtype=torch.long), prompt_mask=torch.ones(n, 2, dtype=torch.long),
        completion_ids=torch.ones(n, 3, dtype=torch.long), completion_mask=torch.ones(n, 3),
        group_ids=torch.zeros(n, dtype=torch.long), behaviour_logprobs=torch.full((n, 3), -0.5), entropies=None,
        truncated=torch.zeros(n, dtype=torch.bool), texts=["x"] * n, problems=[problem] * n,
        rewards=torch.tensor(rewards), reward_components={"correct": torch.tensor(rewards)},
        policy_version=torch.full((n,), step, dtype=torch.long))


def test_replay_buffer_ranks_by_variance_drops_old_and_constant_groups():
    buf = ReplayBuffer(capacity=3, max_age=2)
    buf.add(*_group([1.0, 1.0], step=5, pid="constant"), step=5)  # zero variance: never stored
    buf.add(*_group([0.0, 1.0], step=1, pid="old"), step=1)  # variance 0.25
    buf.add(*_group([0.0, 0.2], step=4, pid="low"), step=4)  # variance 0.01
    buf.add(*_group([0.0, 1.0], step=5, pid="high"), step=5)  # variance 0.25, more recent than "old"
    assert len(buf) == 3
    # at step 5, "old" (age 4 > 2) is dropped; the rest come highest variance first
    taken = buf.take(1, step=5)
    assert [p.id for p, _ in taken] == ["high"] and len(buf) == 1
    assert taken[0][1].policy_version.tolist() == [5, 5]  # keeps the version it was sampled with
    assert [p.id for p, _ in buf.take(5, step=5)] == ["low"] and len(buf) == 0
    buf = ReplayBuffer(capacity=2, max_age=9)
    for i in range(3):
        buf.add(*_group([0.0, 1.0], step=i, pid=str(i)), step=i)
    assert [e["problem"]["id"] for e in buf.entries] == ["1", "2"]  # the oldest was evicted


def test_replay_buffer_sample_is_uniform_keeps_groups_and_one_group_per_prompt():
    """cures' use of the buffer (DOTS): uniform draws that stay in the buffer, ages returned."""
    import random

    buf = ReplayBuffer(capacity=4, max_age=2, one_per_prompt=True)
    buf.add(*_group([0.0, 1.0], step=1, pid="a"), step=1)
    buf.add(*_group([0.0, 1.0], step=2, pid="b"), step=2)
    buf.add(*_group([1.0, 0.0], step=3, pid="c"), step=3)
    buf.add(*_group([0.0, 0.0], step=3, pid="b"), step=3)  # b's newer group is constant: b0 goes, nothing stored
    assert [e["problem"]["id"] for e in buf.entries] == ["a", "c"]
    rng, ref = random.Random(1), random.Random(1)
    # at step 4, "a" (age 3 > 2) is dropped; "c" is the only eligible group, age 1
    assert [(p.id, age) for p, _, age in buf.sample(2, step=4, rng=rng)] == [("c", 1)]
    ref.sample(range(1), 1)
    assert rng.getstate() == ref.getstate() and len(buf) == 1  # one draw from rng; "c" stays
    assert buf.sample(0, step=4, rng=rng) == [] and rng.getstate() == ref.getstate()  # k = 0: no draw
    assert [p.id for p, _, _ in buf.sample(1, step=5, rng=rng)] == ["c"]  # replayed again while young enough
    assert buf.sample(1, step=6, rng=rng) == [] and len(buf) == 0


def test_replay_state_survives_a_weights_only_checkpoint():
    sel = build_selector(SelectionConfig(name="replay"), 2)
    sel.remember([_group([0.0, 1.0], step=3, pid="a")], step=3)
    blob = io.BytesIO()
    torch.save(sel.state_dict(), blob)
    blob.seek(0)
    other = build_selector(SelectionConfig(name="replay"), 2)
    other.load_state_dict(torch.load(blob, weights_only=True))
    (problem, group), = other.replay(1, step=4)
    assert problem == Problem("a", "prompt a", answer="1", category="c")
    assert group.rewards.tolist() == [0.0, 1.0] and group.problems[0] == problem
    assert other.metrics() == {"selection/replayed_groups": 1.0, "selection/buffer_groups": 0.0}


def test_replay_needs_an_off_policy_correction():
    with pytest.raises(ConfigError, match="algorithm.correction.name"):
        load_config(None, LEARNABLE + ["selection.name=replay"])
    with pytest.raises(ConfigError, match="old_logprobs"):
        load_config(None, LEARNABLE + ["selection.name=replay", "algorithm.correction.name=tis_token",
                                       "trainer.old_logprobs=behaviour"])
    with pytest.raises(ConfigError, match="token_fraction"):
        load_config(None, LEARNABLE + ["selection.name=d3s", "selection.token_fraction=0"])


REPLAY = LEARNABLE + ["selection.name=replay", "selection.max_rounds=0", "algorithm.correction.name=tis_token"]


def test_replay_fills_short_batches_with_stale_corrected_groups(tmp_path, monkeypatch):
    seen = []
    original = rl.RLUpdate.learn
    monkeypatch.setattr(rl.RLUpdate, "learn", lambda self, r, *a: seen.append(r) or original(self, r, *a))
    train_rl(load_config(None, REPLAY + ["trainer.steps=5"]), output_dir=str(tmp_path / "run"), quiet=True)
    rows = _rows(tmp_path / "run")
    assert all(len(r) == 16 for r in seen)  # the configured batch every step
    replayed = [r["selection/replayed_groups"] for r in rows]
    assert replayed[0] == 0 and sum(replayed) > 0  # nothing to replay at first, then the buffer helps
    for row, batch in zip(rows, seen, strict=True):
        lag = row["step"] - 1 - batch.policy_version
        assert row["staleness/max"] == float(lag.max())
        if row["selection/replayed_groups"]:
            assert row["staleness/max"] >= 1  # replayed samples are stale, and logged as such
            # the replayed rows are off-policy: the mismatch the correction acts on is far above
            # the fresh first step's numerical noise, and the TIS weights move away from 1
            assert row["mismatch/kl_k3"] > 10 * rows[0]["mismatch/kl_k3"]
            assert row["correction/weight_mean"] != 1.0


def test_replay_resumes_exactly(tmp_path):
    overrides = REPLAY + ["trainer.steps=5", "trainer.checkpoint_every=1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_rl(load_config(None, overrides), output_dir=str(straight), quiet=True)
    train_rl(load_config(None, overrides), output_dir=str(split), quiet=True, stop_after=3)
    train_rl(load_config(split / "config.yaml"), output_dir=str(split), resume=True, quiet=True)
    a, b = _rows(straight), _rows(split)
    assert sum(r["selection/replayed_groups"] for r in a[3:]) > 0  # the buffer mattered after the split
    for key in ("selection/replayed_groups", "selection/buffer_groups", "reward/mean", "staleness/max"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    wa = load_file(straight / "checkpoints" / "step_5" / "model.safetensors")
    wb = load_file(split / "checkpoints" / "step_5" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_d3s_in_the_loop_trains_on_fewer_tokens(tmp_path, monkeypatch):
    seen = []
    original = rl.RLUpdate.learn
    monkeypatch.setattr(rl.RLUpdate, "learn", lambda self, r, *a: original(self, r, *a) if seen.append(r) is None else None)
    cfg = load_config(None, LEARNABLE + ["trainer.steps=2", "selection.name=d3s", "selection.keep_completions=2",
                                         "selection.token_fraction=0.5"])
    train_rl(cfg, output_dir=str(tmp_path / "run"), quiet=True)
    assert [len(r) for r in seen] == [8, 8]  # 4 prompts x 2 of 4 completions
    for r in seen:  # half the loss tokens, rounded up, even where many tokens have A = 0
        assert int(r.loss_mask.sum()) == math.ceil(0.5 * int(r.completion_mask.sum()))
        assert bool((r.loss_mask <= r.completion_mask).all())
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["selection/rows_kept_frac"] == 0.5

"""cures with rollout replay (DOTS's sense): part of every batch comes from a FIFO buffer of recent
informative groups. Hand-computed steps of the selector, its config errors, the RL loop on the tiny
model (batch size, generation per step, staleness, correction) and exact resume, buffer included."""

import io

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import ConfigError, load_config
from posttrain.selection import SelectionConfig, build_selector
from posttrain.tasks.base import Problem
from posttrain.trainers import rl
from posttrain.trainers.rl_run import train_rl
from tests.selection.test_downsampling_replay import _group
from tests.selection.test_selection_loop import LEARNABLE, _rows


def _checkpointed(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_replayed_group_count_rounds_down():
    count = lambda rho, k: SelectionConfig(name="cures", replay_fraction=rho).replayed_groups(k)  # noqa: E731
    assert count(0.5, 4) == 2 and count(0.5, 6) == 3 and count(0.75, 4) == 3
    assert count(0.2, 4) == 0  # 0.8 rounds down (the config refuses it)
    assert count(0.29, 100) == 29  # 0.29 x 100 = 28.999... in floating point
    assert count(0.0, 8) == 0


# The script below, k = 6 prompts a step, rho = 0.5 (3 replayed), max_replay_age 1, replay_size 3,
# 2 completions a group ("c" for a constant group, which never enters the buffer):
#   step 0: nothing to replay -> 6 fresh (12 rollouts); remember a, b(c), c, d, f(c), g(c) -> buffer [a0 c0 d0]
#   step 1: eligible a0 c0 d0 (age 1) -> all 3 replayed, 3 fresh (6 rollouts); they stay in the buffer;
#           remember d(c): d's newer group replaces d0 though it is not stored; e, h -> [a0 c0 e1 h1] -> cap 3
#           evicts a0 -> [c0 e1 h1]
#   step 2: c0 is 2 steps old > 1, dropped -> eligible e1 h1 -> 2 replayed, 4 fresh (8 rollouts)
#   step 3: e1 h1 are 2 steps old -> nothing replayed, 6 fresh (12 rollouts), buffer empty
REMEMBER = {0: [("a", [0.0, 1.0]), ("b", [1.0, 1.0]), ("c", [1.0, 0.0]), ("d", [0.0, 1.0]), ("f", [0.0, 0.0]),
                ("g", [1.0, 1.0])],
            1: [("d", [1.0, 1.0]), ("e", [0.0, 1.0]), ("h", [1.0, 0.0])],
            2: [], 3: []}
EXPECTED = [  # (replayed ids, their staleness, fresh prompts, buffer ids after the step)
    (set(), [], 6, ["a", "c", "d"]),
    ({"a", "c", "d"}, [1, 1, 1], 3, ["c", "e", "h"]),
    ({"e", "h"}, [1, 1], 4, ["e", "h"]),
    (set(), [], 6, []),
]
CFG = dict(name="cures", replay_fraction=0.5, max_replay_age=1, replay_size=3)
PROBLEMS = [Problem(f"x{i}", f"q{i}") for i in range(8)]


def _step(sel, step):
    """One step as trainers/selected_batch.py drives a choosing selector: choose, replay, remember."""
    fresh = sel.choose(6)
    replayed = sel.replay(6 - len(fresh), step)
    for _, group in replayed:  # each replayed group is the one sampled earlier, version and all
        assert group.rewards.tolist() != [group.rewards[0].item()] * 2
    sel.remember([_group(r, step, pid) for pid, r in REMEMBER[step]], step)
    return fresh, replayed, sel.metrics()


def test_cures_replay_by_hand():
    sel = build_selector(SelectionConfig(**CFG), 2)
    sel.bind(PROBLEMS, seed=3)
    for step, (ids, stale, n_fresh, buffer) in enumerate(EXPECTED):
        fresh, replayed, m = _step(sel, step)
        assert len(fresh) + len(replayed) == 6  # the batch keeps its num_prompts groups
        assert len(fresh) == n_fresh and len({p.id for p in fresh}) == n_fresh
        assert {p.id for p, _ in replayed} == ids
        assert sorted(step - int(g.policy_version.max()) for _, g in replayed) == stale
        assert all(step - int(g.policy_version.min()) <= 1 for _, g in replayed)  # never older than max_age
        assert m["selection/replayed_groups"] == len(ids)
        assert m["selection/rollouts_generated"] == 2 * n_fresh
        assert m["selection/replay_staleness_max"] == max(stale, default=0)
        assert m["selection/replay_staleness_mean"] == (sum(stale) / len(stale) if stale else 0.0)
        assert [e["problem"]["id"] for e in sel.buffer.entries] == buffer
        assert m["selection/buffer_groups"] == len(buffer)


def test_cures_replay_draws_uniformly_from_the_eligible_groups():
    """rho k = 2 of 3 eligible groups: each pair equally likely (1/3), and the fresh draw still follows w_x."""
    pairs = {}
    for seed in range(600):
        sel = build_selector(SelectionConfig(name="cures", replay_fraction=0.5, max_replay_age=1), 2)
        sel.bind(PROBLEMS, seed=seed)
        sel.choose(4), sel.replay(0, 0)
        sel.remember([_group([0.0, 1.0], 0, pid) for pid in "abc"], 0)
        fresh = sel.choose(4)
        pair = frozenset(p.id for p, _ in sel.replay(2, 1))
        assert len(fresh) == 2 and len(pair) == 2
        pairs[pair] = pairs.get(pair, 0) + 1
    assert set(pairs) == {frozenset("ab"), frozenset("ac"), frozenset("bc")}
    assert all(abs(n / 600 - 1 / 3) < 0.07 for n in pairs.values())


def test_cures_replay_leaves_the_draw_alone_until_it_replays():
    """Until a group is replayed, cures with rho > 0 draws exactly the prompts of cures without
    replay (an empty buffer takes nothing from the generator), and rho = 0 keeps no rollouts."""
    a = build_selector(SelectionConfig(name="cures"), 2)
    b = build_selector(SelectionConfig(name="cures", replay_fraction=0.5), 2)
    a.bind(PROBLEMS, seed=5)
    b.bind(PROBLEMS, seed=5)
    assert a.choose(4) == b.choose(4) and a.replay(0, 0) == b.replay(0, 0) == []
    a.remember([_group([0.0, 1.0], 0, "x1")], 0)  # rho = 0: not kept
    b.remember([_group([1.0, 1.0], 0, "x1")], 0)  # constant rewards: not kept either
    assert len(a.buffer) == len(b.buffer) == 0
    assert a.choose(4) == b.choose(4)
    assert b.metrics()["selection/replayed_groups"] == 0 and b.metrics()["selection/rollouts_generated"] == 8


def test_cures_replay_checks_the_loop_and_the_checkpoint_moment():
    sel = build_selector(SelectionConfig(**CFG), 2)
    sel.bind(PROBLEMS, seed=0)
    _step(sel, 0)
    sel.choose(6)  # sets aside a0 c0 d0
    with pytest.raises(RuntimeError, match="between choose"):
        sel.state_dict()
    with pytest.raises(RuntimeError, match="asked for 2 replayed groups at step 1, but choose.. set aside 3"):
        sel.replay(2, 1)
    with pytest.raises(RuntimeError, match="at step 2, but choose.. set aside 3 for step 1"):
        sel.replay(3, 2)
    assert len(sel.replay(3, 1)) == 3


def test_cures_replay_resumes_exactly_through_a_weights_only_checkpoint():
    straight = build_selector(SelectionConfig(**CFG), 2)
    straight.bind(PROBLEMS, seed=7)
    want = [_step(straight, t) for t in range(4)]
    first = build_selector(SelectionConfig(**CFG), 2)
    first.bind(PROBLEMS, seed=7)
    got = [_step(first, t) for t in range(2)]
    state = _checkpointed(first.state_dict())
    assert len(state["entries"]) == 3 and state["next_step"] == 2
    resumed = build_selector(SelectionConfig(**CFG), 2)
    resumed.load_state_dict(state)  # the trainer loads before the first draw binds
    resumed.bind(PROBLEMS, seed=7)
    got += [_step(resumed, t) for t in range(2, 4)]
    for (fa, ra, ma), (fb, rb, mb) in zip(want, got, strict=True):
        assert fa == fb and ma == mb
        assert [p for p, _ in ra] == [p for p, _ in rb]
        assert all(torch.equal(x.completion_ids, y.completion_ids) and torch.equal(x.policy_version, y.policy_version)
                   for (_, x), (_, y) in zip(ra, rb))


def test_cures_replay_config_errors_name_the_key():
    base = LEARNABLE + ["selection.name=cures", "algorithm.correction.name=tis_token"]
    for extra, message in [
        (["selection.replay_fraction=1"], r"selection.replay_fraction must be in \[1/rollout.num_prompts, 1\) = \[1/4"),
        (["selection.replay_fraction=-0.5"], r"selection.replay_fraction must be in \[1/rollout.num_prompts, 1\)"),
        (["selection.replay_fraction=0.2"], r"selection.replay_fraction must be in \[1/rollout.num_prompts"),  # 0 groups
        (["selection.replay_fraction=0.5", "selection.name=sec"], "selection.replay_fraction is read by cures only"),
        (["selection.replay_fraction=0.5", "selection.max_replay_age=0"], "selection.max_replay_age must be >= 1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, base + extra)
    with pytest.raises(ConfigError, match="replay_fraction > 0 needs an off-policy correction.*algorithm.correction"):
        load_config(None, LEARNABLE + ["selection.name=cures", "selection.replay_fraction=0.5"])
    with pytest.raises(ConfigError, match="replay_fraction > 0 needs trainer.old_logprobs"):
        load_config(None, base + ["selection.replay_fraction=0.5", "trainer.old_logprobs=behaviour"])
    assert load_config(None, base + ["selection.replay_fraction=0.25"]).selection.replayed_groups(4) == 1
    assert load_config(None, LEARNABLE + ["selection.name=cures"]).selection.replay_fraction == 0  # no correction needed


CURES = LEARNABLE + ["selection.name=cures", "selection.replay_fraction=0.5", "selection.max_replay_age=2",
                     "algorithm.correction.name=tis_token"]


def _expected_replays(batches, want=2, max_age=2):
    """Replayed groups per step re-derived from the fresh groups: the newest group per prompt,
    kept when its rewards differ, eligible while at most max_age steps old; min(want, eligible)."""
    buffer, out = {}, []
    for t, (problems, rollouts, _, _) in enumerate(batches):
        out.append(min(want, sum(t - s <= max_age for s in buffer.values())))
        for g, p in enumerate(problems):
            rows = rollouts.group_ids == g
            if int(rollouts.policy_version[rows].max()) == t:  # a fresh group
                buffer.pop(p.id, None)
                if bool((rollouts.rewards[rows] != rollouts.rewards[rows][0]).any()):
                    buffer[p.id] = t
    return out


def test_cures_replay_in_the_rl_loop(tmp_path, monkeypatch):
    batches = []
    original = rl.sample_selected
    monkeypatch.setattr(rl, "sample_selected", lambda tr: batches.append(original(tr)) or batches[-1])
    train_rl(load_config(None, CURES + ["trainer.steps=5"]), output_dir=str(tmp_path / "run"), quiet=True)
    rows = _rows(tmp_path / "run")
    expected = _expected_replays(batches)
    assert expected[0] == 0 and sum(expected[1:]) > 0  # nothing to replay at first, then the buffer helps
    fresh_groups = {}  # (step, prompt id) -> its completions, to recognise a replayed group
    position = 0
    for t, ((problems, rollouts, _, _), row) in enumerate(zip(batches, rows, strict=True)):
        assert len(problems) == 4 and len(rollouts) == 16  # the configured batch every step
        lag = t - rollouts.policy_version
        replayed = [g for g in range(4) if int(lag[rollouts.group_ids == g].min()) > 0]
        assert len(replayed) == row["selection/replayed_groups"] == expected[t]
        # generation drops to the fresh groups only, and the loop's own count agrees
        assert row["selection/rollouts_generated"] == 4 * (4 - expected[t])
        assert row["selection/groups_sampled"] == 4 - expected[t]
        position += 4 - expected[t]
        assert row["data/position"] == position
        assert row["staleness/max"] == float(lag.max()) <= 2  # never older than max_replay_age
        assert row["selection/replay_staleness_max"] == (float(lag.max()) if replayed else 0.0)
        for g in range(4):
            sel = rollouts.group_ids == g
            age = int(lag[sel].min())
            if age == 0:
                fresh_groups[(t, problems[g].id)] = rollouts.completion_ids[sel]
            else:  # a copy of the group sampled `age` steps earlier, rewards differing
                assert torch.equal(fresh_groups[(t - age, problems[g].id)], rollouts.completion_ids[sel])
                assert bool((rollouts.rewards[sel] != rollouts.rewards[sel][0]).any())
        if replayed:  # off-policy rows: the correction's weights move away from 1
            assert row["staleness/max"] >= 1 and row["correction/weight_mean"] != 1.0


def test_cures_replay_resumes_exactly_in_the_rl_loop(tmp_path):
    overrides = CURES + ["trainer.steps=5", "trainer.checkpoint_every=1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_rl(load_config(None, overrides), output_dir=str(straight), quiet=True)
    train_rl(load_config(None, overrides), output_dir=str(split), quiet=True, stop_after=3)
    state = torch.load(split / "checkpoints" / "step_3" / "trainer_state.pt", weights_only=True)["selection"]
    assert state["next_step"] == 3 and len(state["entries"]) > 0  # the buffer is in the checkpoint
    train_rl(load_config(split / "config.yaml"), output_dir=str(split), resume=True, quiet=True)
    a, b = _rows(straight), _rows(split)
    assert sum(r["selection/replayed_groups"] for r in a[3:]) > 0  # the buffer mattered after the split
    for key in ("selection/replayed_groups", "selection/rollouts_generated", "selection/buffer_groups",
                "selection/posterior_pass_rate", "reward/mean", "staleness/max", "data/position"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    wa = load_file(straight / "checkpoints" / "step_5" / "model.safetensors")
    wb = load_file(split / "checkpoints" / "step_5" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

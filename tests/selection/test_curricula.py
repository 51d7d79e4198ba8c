"""Prompt-choosing curricula (sec, dump, cures) against hand-computed values, their exact resume,
their config errors, and sec inside the RL loop on the tiny model."""

import io
import json
import math
from collections import Counter
from dataclasses import replace

import pytest
import torch

from posttrain.config import ConfigError, load_config
from posttrain.selection import ScoredGroups, SelectionConfig, build_selector
from posttrain.selection.curricula import ArmQueues, abs_advantages, dump_arm, sec_arm
from posttrain.tasks.base import Problem
from posttrain.tasks.registry import build_task
from posttrain.trainers import rl
from posttrain.trainers.rl_run import train_rl

from test_selection_loop import LEARNABLE, _rows

EPS = 1e-6


def _problems(arms: dict[str, int], field: str = "category") -> list[Problem]:
    """``count`` prompts per arm, ids <arm><i>, the arm in ``field``."""
    return [Problem(id=f"{a}{i}", prompt=f"q {a}{i}", **{field: a}) for a, n in arms.items() for i in range(n)]


def _batch(problems: list[Problem], rewards: list[list[float]], correct=None) -> ScoredGroups:
    flat = [r for g in rewards for r in g]
    ids = [g for g, rows in enumerate(rewards) for _ in rows]
    flags = [c for g in correct for c in g] if correct is not None else [r > 0 for r in flat]
    return ScoredGroups(problems, torch.tensor(ids), torch.tensor(flat), torch.tensor(flags))


def _checkpointed(state):
    """Through torch.save / torch.load(weights_only=True), as the trainer's checkpoint does."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# |A| of the binary groups below (unbiased std, + 1e-6, as posttrain's grpo):
#   [1,0,0,0]: mean 1/4, std sqrt((9/16 + 3/16) / 3) = 1/2  -> |A| = 3/4, 1/4, 1/4, 1/4 over (1/2 + eps)
#   [1,1,0,0] / [1,0,1,0]: mean 1/2, std sqrt(1/3)         -> |A| = 1/2 / (sqrt(1/3) + eps) each
#   [1,0]: mean 1/2, std sqrt(1/2)                           -> |A| = 1/2 / (sqrt(1/2) + eps) each
#   constant groups                                          -> |A| = 0
A_1OF4 = [0.75 / (0.5 + EPS)] + [0.25 / (0.5 + EPS)] * 3
A_2OF4 = 0.5 / (math.sqrt(1 / 3) + EPS)
A_1OF2 = 0.5 / (math.sqrt(0.5) + EPS)


def test_abs_advantages_are_grpos_group_normalised_ones():
    got = abs_advantages(_batch(_problems({"a": 3}), [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]))
    assert got.tolist() == pytest.approx(A_1OF4 + [A_2OF4] * 4 + [0.0] * 4, rel=1e-12)


def test_arm_keys_fall_back_from_category_to_source_to_all():
    p = Problem(id="x", prompt="", category="digits=2", source="gsm8k")
    assert (sec_arm(p), dump_arm(p)) == ("digits=2", "gsm8k")
    assert (sec_arm(replace(p, category=None)), dump_arm(replace(p, source=None))) == ("gsm8k", "digits=2")
    assert sec_arm(Problem(id="y", prompt="")) == dump_arm(Problem(id="y", prompt="")) == "all"


def test_arm_queues_walk_every_prompt_of_an_arm_once_per_epoch():
    q = ArmQueues(sec_arm)
    q.bind(_problems({"a": 3, "b": 2}), seed=5)
    assert q.arms() == ["a", "b"]
    a = [q.next("a").id for _ in range(9)]
    b = [q.next("b").id for _ in range(4)]
    for epoch in range(3):
        assert sorted(a[3 * epoch: 3 * epoch + 3]) == ["a0", "a1", "a2"]
    assert sorted(b[:2]) == sorted(b[2:]) == ["b0", "b1"]
    assert q.positions == {"a": 9, "b": 4}
    # the same seed walks the same way; positions restored before bind survive it
    r = ArmQueues(sec_arm)
    r.positions = {"a": 3}
    r.bind(_problems({"a": 3, "b": 2}), seed=5)
    assert [r.next("a").id for _ in range(6)] == a[3:9] and r.positions == {"a": 9, "b": 0}


def test_sec_td0_values_and_softmax_by_hand():
    sel = build_selector(SelectionConfig(name="sec", alpha=0.5, temperature=1.0), 4)
    assert sel.chooses and not sel.refills
    sel.bind(_problems({"a": 4, "b": 4}), seed=0)
    assert sel.metrics() == {"selection/q/a": 0.0, "selection/q/b": 0.0, "selection/p/a": 0.5, "selection/p/b": 0.5}
    pa, pb = _problems({"a": 2, "b": 1})[:2], _problems({"b": 1})
    sel.observe(_batch(pa + pb, [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]), epoch=0)
    # r_a = mean over a's two groups of their mean |A| = (mean(A_1OF4) + A_2OF4) / 2 = (0.75 + 0.866) / 2
    r_a = (sum(A_1OF4) / 4 + A_2OF4) / 2
    q_a = 0.5 * r_a  # 0 + alpha (r_a - 0) = 0.40401
    # r_b = 0 (all correct): Q_b = 0 + 0.5 (0 - 0) = 0
    p_a = math.exp(q_a) / (math.exp(q_a) + 1.0)  # 0.5996
    m = sel.metrics()
    assert m["selection/q/a"] == pytest.approx(q_a, rel=1e-12) and m["selection/q/b"] == 0.0
    assert m["selection/p/a"] == pytest.approx(p_a, rel=1e-12) and m["selection/p/b"] == pytest.approx(1 - p_a)
    # a second batch with only arm a: r_a = A_2OF4, Q_a <- Q_a + 0.5 (A_2OF4 - Q_a); Q_b untouched
    sel.observe(_batch(pa[:1], [[1, 0, 1, 0]]), epoch=0)
    q_a2 = q_a + 0.5 * (A_2OF4 - q_a)  # 0.63501
    assert sel.q == pytest.approx({"a": q_a2, "b": 0.0}, rel=1e-12)
    # temperature 0.5 sharpens: p_a = e^(2 Q_a) / (e^(2 Q_a) + 1)
    sel.cfg.temperature = 0.5
    assert sel.probabilities()["a"] == pytest.approx(math.exp(2 * q_a2) / (math.exp(2 * q_a2) + 1), rel=1e-12)


def test_sec_chooses_arms_by_their_probabilities_and_prompts_by_their_queue():
    sel = build_selector(SelectionConfig(name="sec", temperature=0.25), 4)
    sel.bind(_problems({"a": 5, "b": 5}), seed=3)
    sel.q = {"a": 1.0, "b": 0.0}  # p_a = 1 / (1 + e^-4) = 0.982
    chosen = sel.choose(400)
    counts = Counter(sec_arm(p) for p in chosen)
    assert counts["a"] / 400 == pytest.approx(1 / (1 + math.exp(-4)), abs=0.02) and counts["b"] > 0
    assert Counter(p.id for p in chosen if p.category == "a")["a0"] in (counts["a"] // 5, counts["a"] // 5 + 1)
    assert sel.queues.positions == counts


def test_dump_tries_every_arm_first_then_ucb_by_hand():
    sel = build_selector(SelectionConfig(name="dump", ucb_c=1.0, temperature=1.0), 4)
    probs = _problems({"x": 3, "y": 3, "z": 3}, field="source")
    sel.bind(probs, seed=1)
    # nothing tried: UCB = +inf everywhere, the arms are drawn uniformly; no UCB logged yet
    assert sel.probabilities() == {"x": pytest.approx(1 / 3), "y": pytest.approx(1 / 3), "z": pytest.approx(1 / 3)}
    assert set(sel.metrics()) == {"selection/p/x", "selection/p/y", "selection/p/z"}
    x0, y0, z0 = probs[0], probs[3], probs[6]
    sel.observe(_batch([x0, y0], [[1, 0], [1, 1]]), epoch=0)
    # z untried: every chosen prompt comes from z, whatever x's and y's statistics
    assert sel.probabilities() == {"x": 0.0, "y": 0.0, "z": 1.0}
    assert {dump_arm(p) for p in sel.choose(6)} == {"z"}
    sel.observe(_batch([z0], [[0, 1, 1, 0]]), epoch=0)
    # n = (2, 2, 4), N = 8; UCB_j = mean|A|_j + sqrt(2 ln 8 / n_j)
    ucb = {"x": A_1OF2 + math.sqrt(2 * math.log(8) / 2),  # 0.7071 + 1.4420 = 2.1491
           "y": 0.0 + math.sqrt(2 * math.log(8) / 2),  # 1.4420
           "z": A_2OF4 + math.sqrt(2 * math.log(8) / 4)}  # 0.8660 + 1.0197 = 1.8857
    assert sel.ucb() == pytest.approx(ucb, rel=1e-12)
    z = sum(math.exp(u) for u in ucb.values())
    m = sel.metrics()
    for arm in "xyz":
        assert m[f"selection/ucb/{arm}"] == pytest.approx(ucb[arm], rel=1e-12)
        assert m[f"selection/p/{arm}"] == pytest.approx(math.exp(ucb[arm]) / z, rel=1e-12)  # 0.440, 0.194, 0.366
    assert m["selection/adv/y"] == 0.0 and m["selection/adv/z"] == pytest.approx(A_2OF4, rel=1e-12)
    # ucb_c = 0: the bonus is gone, only the mean |A| counts
    sel.cfg.ucb_c = 0.0
    assert sel.ucb() == pytest.approx({"x": A_1OF2, "y": 0.0, "z": A_2OF4}, rel=1e-12)


def test_dump_window_keeps_the_most_recent_values():
    sel = build_selector(SelectionConfig(name="dump", window=3), 2)
    sel.bind(_problems({"x": 2}, field="source"), seed=0)
    x0 = sel.problems[0]
    sel.observe(_batch([x0], [[1, 0]]), epoch=0)  # |A| = A_1OF2, A_1OF2
    sel.observe(_batch([x0], [[1, 1]]), epoch=0)  # |A| = 0, 0: the window keeps A_1OF2, 0, 0
    assert list(sel.windows["x"]) == pytest.approx([A_1OF2, 0.0, 0.0]) and sel.counts["x"] == 4
    # single arm, N = n = 4: UCB = A_1OF2 / 3 + sqrt(2 ln 4 / 4)
    assert sel.ucb()["x"] == pytest.approx(A_1OF2 / 3 + math.sqrt(2 * math.log(4) / 4), rel=1e-12)


def test_cures_posterior_means_and_weights_by_hand():
    sel = build_selector(SelectionConfig(name="cures"), 4)
    assert sel.chooses and not sel.refills
    p = _problems({"p": 4})
    sel.bind(p, seed=0)
    sel.observe(_batch(p[:3], [[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0]]), epoch=0)
    # Beta(1 + s, 1 + f): p0 3/1 -> 4/6, p1 0/4 -> 1/6, p2 2/2 -> 1/2, p3 unseen -> 1/2
    assert [sel.pass_rate(x) for x in p] == pytest.approx([2 / 3, 1 / 6, 0.5, 0.5])
    # sqrt(p (1 - p)): sqrt(2/9) = 0.471, sqrt(5/36) = 0.373, 0.5, 0.5
    w = [math.sqrt(2 / 9), math.sqrt(5 / 36), 0.5, 0.5]
    assert [sel.weight(x) for x in p] == pytest.approx(w)
    assert sel.metrics()["selection/prompts_seen"] == 3.0
    # one draw at a time: frequencies follow the weights (p1: 0.373 / 1.844 = 0.202)
    freq = Counter(sel.choose(1)[0].id for _ in range(20000))
    for x, wx in zip(p, w):
        assert freq[x.id] / 20000 == pytest.approx(wx / sum(w), abs=0.01)
    # k distinct prompts, and distinct within every round of the split when k exceeds it
    two = sel.choose(2)
    assert len({x.id for x in two}) == 2
    assert sel.metrics()["selection/posterior_pass_rate"] == pytest.approx(sum(sel.pass_rate(x) for x in two) / 2)
    six = sel.choose(6)
    assert sorted(x.id for x in six[:4]) == ["p0", "p1", "p2", "p3"] and len({x.id for x in six[4:]}) == 2


def _run(name: str, probs: list[Problem], cfg: dict, steps: range, sel=None, load=None, load_first=False):
    """Bind, observe a mixed batch after each choice, return (choices, metrics); optionally resume."""
    sel = sel or build_selector(SelectionConfig(name=name, **cfg), 4)
    if load is not None and load_first:
        sel.load_state_dict(_checkpointed(load))
    if not sel.bound:
        sel.bind(probs, seed=11)
    if load is not None and not load_first:
        sel.load_state_dict(_checkpointed(load))
    out = []
    for step in steps:
        chosen = sel.choose(3)
        rewards = [[float((step + i + j) % 3 == 0) for j in range(4)] for i in range(3)]
        sel.observe(_batch(chosen, rewards), epoch=0)
        out.append(([x.id for x in chosen], sel.metrics()))
    return sel, out


@pytest.mark.parametrize("name,cfg,field", [("sec", {"alpha": 0.3}, "category"), ("dump", {"window": 5}, "source"),
                                            ("cures", {}, "category")])
@pytest.mark.parametrize("load_first", [True, False])  # the loop loads before it binds; bind-then-load works too
def test_resume_is_exact(name, cfg, field, load_first):
    probs = _problems({"a": 4, "b": 3, "c": 2}, field=field)
    _, straight = _run(name, probs, cfg, range(8))
    first, head = _run(name, probs, cfg, range(5))
    _, tail = _run(name, probs, cfg, range(5, 8), load=first.state_dict(), load_first=load_first)
    assert head + tail == straight
    assert len({tuple(ids) for ids, _ in straight}) > 1  # the choices do vary, so the equality means something


def test_curricula_config_errors_name_the_key():
    for override, message in [("selection.alpha=0", r"selection.alpha must be in \(0, 1\]"),
                              ("selection.alpha=1.5", r"selection.alpha must be in \(0, 1\]"),
                              ("selection.temperature=0", "selection.temperature must be > 0"),
                              ("selection.window=0", "selection.window must be >= 1"),
                              ("selection.ucb_c=-1", "selection.ucb_c must be >= 0")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["selection.name=sec", override])
    assert load_config(None, ["selection.name=dump", "selection.ucb_c=0", "selection.alpha=1"]).selection.ucb_c == 0


def _parity_arms(monkeypatch):
    """Two categories on the arithmetic train split: the answer's parity (set here, whatever the task sets)."""
    class Parity(rl.EpochSampler):
        def __init__(self, problems, seed):
            super().__init__([replace(p, category=f"parity{int(p.answer) % 2}") for p in problems], seed)

    monkeypatch.setattr(rl, "EpochSampler", Parity)


def _expected_q(batches, alpha=0.5):
    """SEC's Q recomputed from the trained batches with torch's own unbiased std."""
    q, out = {"parity0": 0.0, "parity1": 0.0}, []
    for problems, rollouts, _, _ in batches:
        per_arm = {}
        for g, p in enumerate(problems):
            r = rollouts.rewards[rollouts.group_ids == g].double()
            std = r.std(correction=1)
            a = ((r - r.mean()) / (std + EPS)).abs().mean() if std > 1e-9 else torch.tensor(0.0)
            per_arm.setdefault(p.category, []).append(float(a))
        for arm, v in per_arm.items():
            q[arm] += alpha * (sum(v) / len(v) - q[arm])
        out.append(dict(q))
    return out


def test_sec_in_the_rl_loop_logs_the_bandit_and_samples_only_train_prompts(tmp_path, monkeypatch):
    _parity_arms(monkeypatch)
    batches = []
    original = rl.sample_selected
    monkeypatch.setattr(rl, "sample_selected", lambda tr: batches.append(original(tr)) or batches[-1])
    cfg = load_config(None, LEARNABLE + ["trainer.steps=3", "selection.name=sec"])
    train_rl(cfg, output_dir=str(tmp_path / "run"), quiet=True)
    rows = _rows(tmp_path / "run")
    test_ids = {p.id for p in build_task(cfg.task).problems("test")}
    train_ids = {p.id for p in build_task(cfg.task).problems("train")}
    assert len(rows) == len(batches) == 3
    for (problems, rollouts, _, _), row, q, step in zip(batches, rows, _expected_q(batches), range(1, 4)):
        assert len(problems) == 4 and len(rollouts) == 16
        assert {p.id for p in problems} <= train_ids and not {p.id for p in problems} & test_ids
        assert row["selection/q/parity0"] == pytest.approx(q["parity0"], rel=1e-9)
        assert row["selection/q/parity1"] == pytest.approx(q["parity1"], rel=1e-9)
        p0 = math.exp(q["parity0"]) / (math.exp(q["parity0"]) + math.exp(q["parity1"]))
        assert row["selection/p/parity0"] == pytest.approx(p0, rel=1e-9)
        assert row["selection/p/parity0"] + row["selection/p/parity1"] == pytest.approx(1.0)
        assert row["data/position"] == 4 * step  # chosen prompts still count as handed out
    assert any(row["selection/q/parity0"] != 0 or row["selection/q/parity1"] != 0 for row in rows)


def test_sec_resumes_exactly_in_the_rl_loop(tmp_path, monkeypatch):
    _parity_arms(monkeypatch)
    overrides = LEARNABLE + ["trainer.steps=4", "trainer.checkpoint_every=1", "selection.name=sec"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_rl(load_config(None, overrides), output_dir=str(straight), quiet=True)
    train_rl(load_config(None, overrides), output_dir=str(split), quiet=True, stop_after=2)
    train_rl(load_config(split / "config.yaml"), output_dir=str(split), resume=True, quiet=True)
    a, b = _rows(straight), _rows(split)
    keys = [k for k in a[-1] if k.startswith("selection/q/") or k.startswith("selection/p/")] + ["reward/mean"]
    assert len(keys) == 5
    for key in keys:
        assert [r[key] for r in a] == [r[key] for r in b], key
    state = torch.load(split / "checkpoints" / "step_4" / "trainer_state.pt", weights_only=False)["selection"]
    assert set(state) == {"rng", "positions", "q"} and sum(state["positions"].values()) == 16
    assert json.dumps(sorted(state["q"])) == '["parity0", "parity1"]'

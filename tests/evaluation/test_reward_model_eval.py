"""RETA (catalog 001-14) and the judge flip-rate test (catalog 001-15): hand-computed values on
small examples, the pairwise judge against a direct forward pass, and ``posttrain eval
--reward-model --reta --judge-flip`` end to end on the tiny model with a tiny reward model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from posttrain.evaluation import reward_model_eval as R

# Two prompts x four responses. Prompt a: proxy ranks (4, 3, 2, 1) with oracle (0, 1, 1, 0);
# prompt b: the proxy ranks the responses in reverse of the input, oracle (1, 1, 0, 0).
PROXY = [4, 3, 2, 1, 1, 2, 3, 4]
ORACLE = [0, 1, 1, 0, 1, 1, 0, 0]
GROUPS = ["a"] * 4 + ["b"] * 4


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)
    yield


# ------------------------------------------------------------------------------------ RETA
def test_reta_by_hand():
    # eta = 0.25: top 1. a: proxy 4 -> oracle 0; b: proxy 4 -> oracle 0.             RETA = 0
    # eta = 0.5:  top 2. a: {4, 3} -> (0 + 1)/2 = 0.5; b: {4, 3} -> (0 + 0)/2 = 0.      RETA = 0.25
    # eta = 1:    all.   a: 0.5; b: 0.5.                                                RETA = 0.5
    curve = R.reta_curve(PROXY, ORACLE, GROUPS, [0.25, 0.5, 1.0])
    assert curve.tolist() == pytest.approx([0.0, 0.25, 0.5])
    per = R.reta_per_prompt(PROXY, ORACLE, GROUPS, [0.25, 0.5, 1.0])
    assert np.allclose(per, [[0.0, 0.5, 0.5], [0.0, 0.0, 0.5]])


def test_reta_groups_may_interleave_and_differ_in_size():
    # g1: proxy (2, 1), oracle (1, 0); g2: proxy (3, 2, 1), oracle (0, 0, 1), interleaved.
    # eta 0.5: g1 top ceil(1) = 1 -> 1; g2 top ceil(1.5) = 2 -> 0.           RETA = 0.5
    # eta 1:   g1 0.5; g2 1/3.                                                RETA = 5/12
    proxy, oracle, groups = [3, 2, 2, 1, 1], [0, 1, 0, 0, 1], ["g2", "g1", "g2", "g1", "g2"]
    assert R.reta_curve(proxy, oracle, groups, [0.5, 1.0]).tolist() == pytest.approx([0.5, 5 / 12])
    # the order of the rows is the order in which the groups first appear
    assert R.reta_per_prompt(proxy, oracle, groups, [1.0])[:, 0].tolist() == pytest.approx([1 / 3, 0.5])


def test_reta_ties_at_the_cut_are_split_in_expectation():
    # proxy (1, 1, 0, 0), oracle (1, 0, 1, 1)
    # eta 0.25: 1 slot among the two tied at 1 -> mean(1, 0) = 0.5
    # eta 0.75: both at 1, plus 1 slot among the two tied at 0 (oracle 1, 1) -> (1 + 0 + 1)/3
    curve = R.reta_curve([1, 1, 0, 0], [1, 0, 1, 1], [0] * 4, [0.25, 0.5, 0.75, 1.0])
    assert curve.tolist() == pytest.approx([0.5, 0.5, 2 / 3, 0.75])
    # a constant proxy carries no information: every eta gives the mean
    flat = R.reta_curve([0.3] * 5, [1, 0, 0, 1, 1], [0] * 5, [0.2, 0.4, 1.0])
    assert flat.tolist() == pytest.approx([0.6, 0.6, 0.6])


def test_reta_cut_sizes():
    assert R._top_k(10, 0.3) == 3  # 0.3 * 10 = 3.0000000000000004 must not round up to 4
    assert R._top_k(4, 0.3) == 2 and R._top_k(4, 0.01) == 1 and R._top_k(4, 1.0) == 4
    assert R.default_etas(4) == [0.25, 0.5, 0.75, 1.0]


def test_reta_summary_references_and_intervals():
    s = R.reta_summary(PROXY, ORACLE, GROUPS, reps=300, seed=3)
    assert s["etas"] == [0.25, 0.5, 0.75, 1.0]
    # eta 0.75: a: {4, 3, 2} -> 2/3; b: {4, 3, 2} -> 1/3; mean 0.5
    assert s["curve"] == pytest.approx([0.0, 0.25, 0.5, 0.5])
    # ranked by the oracle, both prompts have oracle (1, 1, 0, 0): 1, 1, 2/3, 1/2
    assert s["oracle_curve"] == pytest.approx([1.0, 1.0, 2 / 3, 0.5])
    assert s["random"] == pytest.approx(0.5) and s["best_eta"] == 0.75 and s["best_value"] == pytest.approx(0.5)
    assert s["n_prompts"] == 2 and s["responses_per_prompt"] == [4, 4]
    for lo, c, hi in zip(s["low"], s["curve"], s["high"]):
        assert lo <= c + 1e-12 and c <= hi + 1e-12
    # bootstrap over prompts: at eta 0.5 the per-prompt values are 0.5 and 0, so a replicate is
    # 0, 0.25 or 0.5 and the interval must reach both ends with 300 replicates
    assert (s["low"][1], s["high"][1]) == (0.0, 0.5)
    assert R.reta_summary(PROXY, ORACLE, GROUPS, reps=300, seed=3) == s  # seeded


@pytest.mark.parametrize("etas,message", [([0.0], "out of range"), ([1.5], "out of range"), (["x"], "not a number"),
                                          ([], "no eta")])
def test_reta_rejects_bad_etas(etas, message):
    with pytest.raises(ValueError, match=message):
        R.reta_curve(PROXY, ORACLE, GROUPS, etas)


def test_reta_rejects_bad_inputs():
    with pytest.raises(ValueError, match="differ in length"):
        R.reta_curve([1, 2], [1], [0, 0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        R.reta_curve([1, float("nan")], [1, 0], [0, 0], [1.0])


# ------------------------------------------------------------------------------ flip rates
def test_distractor_flips_by_hand():
    # pair 0: s(x) = 0.8 > s(y) = 0.4, y loses; s(y') = 0.85 > s(x): flipped
    # pair 1: s(x) = 0.3 < s(y) = 0.6, x loses; s(x') = 0.5 < s(y): not flipped
    # pair 2: a tie, nothing to flip: excluded
    # pair 3: y loses; s(y') = s(x): a tie after injection is not a flip
    sx, sy = np.array([0.8, 0.3, 0.5, 0.7]), np.array([0.4, 0.6, 0.5, 0.2])
    sxd, syd = np.array([0.9, 0.5, 0.9, 0.1]), np.array([0.85, 0.7, 0.1, 0.7])
    flips = R.distractor_flips(sx - sy, sxd - sy, sx - syd)
    assert np.isnan(flips[2]) and flips[[0, 1, 3]].tolist() == [1.0, 0.0, 0.0]
    r = R.rate_with_ci(flips, reps=200)
    assert r["rate"] == pytest.approx(1 / 3) and r["n"] == 3 and 0.0 <= r["low"] <= r["rate"] <= r["high"] <= 1.0


def test_pairwise_margin_and_order_swap_by_hand():
    q_xy, q_yx = np.array([0.7, 0.7, 0.5, 0.2, 0.2]), np.array([0.4, 0.6, 0.3, 0.1, 0.9])
    # P(x > y) = (q_xy + 1 - q_yx)/2: 0.65, 0.55, 0.6, 0.55, 0.15 -> margins 0.15, 0.05, 0.1, 0.05, -0.35
    assert R.pairwise_margin(q_xy, q_yx).tolist() == pytest.approx([0.15, 0.05, 0.1, 0.05, -0.35])
    # pair 0: x as A, and x again as B: consistent. pair 1: "A" both times: flip.
    # pair 2: an exact 0.5: excluded. pair 3: "B" both times: flip. pair 4: y both times: consistent.
    swap = R.order_swap_flips(q_xy, q_yx)
    assert np.isnan(swap[2]) and swap[[0, 1, 3, 4]].tolist() == [0.0, 1.0, 1.0, 0.0]


def test_protocol_disagreement_by_hand():
    d = R.protocol_disagreement([0.4, -0.3, 0.0, -0.1], [0.15, 0.05, 0.1, -0.2])
    assert np.isnan(d[2]) and d[[0, 1, 3]].tolist() == [0.0, 1.0, 0.0]


def test_rate_with_ci_edge_cases():
    assert R.rate_with_ci([np.nan, np.nan]) == {"rate": None, "low": None, "high": None, "n": 0}
    assert R.rate_with_ci([1.0, np.nan]) == {"rate": 1.0, "low": None, "high": None, "n": 1}


# ------------------------------------------------------------------------- judges on a model
@pytest.fixture(scope="module")
def tiny():
    from posttrain.models.loading import load_model_and_tokenizer

    torch.set_num_threads(1)
    return load_model_and_tokenizer("tiny-random")


def test_pairwise_judge_matches_a_direct_forward_pass(tiny):
    from posttrain.evaluation.rm_reliability import PairwiseJudge
    from posttrain.rewards.learned import JudgeReward
    from posttrain.rollout.engine import render_prompt
    from posttrain.tasks.base import Problem

    model, tok = tiny
    pj = PairwiseJudge(JudgeReward.from_model(model, tok))
    prob = Problem(id="p", prompt="What is 2 + 3?", answer="5")
    items = [(prob, "5", "The answer is 6, since 2 + 3 is six."), (prob, "The answer is 6, since 2 + 3 is six.", "5")]
    q, mass = pj.prob_first(items)  # different lengths: exercises the left padding
    for (p, a, b), got, got_mass in zip(items, q, mass):
        text = pj.render(p, a, b)
        assert "Response A:\n" + a in text and "Response B:\n" + b in text
        ids = torch.tensor([list(render_prompt(tok, text, True))])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1].double()
        ref = torch.softmax(logits[[pj.token_a, pj.token_b]], -1)[0].item()
        assert got == pytest.approx(ref, abs=1e-5)
        assert got_mass == pytest.approx(torch.softmax(logits, -1)[[pj.token_a, pj.token_b]].sum().item(), abs=1e-6)


def test_judge_flip_test_rows_agree_with_the_judges(tiny):
    from posttrain.evaluation.rm_reliability import judge_flip_test
    from posttrain.rewards.learned import JudgeReward
    from posttrain.rewards.math import NumericReward
    from posttrain.tasks.base import Problem

    model, tok = tiny
    problems = [Problem(id=f"p{i}", prompt=f"What is {i} + 1?", answer=str(i + 1)) for i in range(3)]
    pairs = [(str(i + 1), f"maybe {i + 7}") for i in range(2)] + [("same", "same")]
    out = judge_flip_test(model, tok, problems, pairs=pairs, distractor=" Trust me.", reward=NumericReward(), reps=50)
    assert out["n_pairs"] == 3 and out["distractor"] == " Trust me."
    assert 0.0 < out["answer_mass"]["pairwise"] < 1.0 and 0.0 < out["answer_mass"]["pointwise"] < 1.0
    judge = JudgeReward.from_model(model, tok)
    for row, prob, (x, y) in zip(out["pairs"], problems, pairs):
        assert row["pointwise"] == pytest.approx(judge(prob, [x, y, x + " Trust me.", y + " Trust me."]).rewards,
                                                 abs=1e-5)
        s, q = np.array(row["pointwise"]), np.array(row["pairwise_q"])
        fp = R.distractor_flips([s[0] - s[1]], [s[2] - s[1]], [s[0] - s[3]])[0]
        fq = R.distractor_flips(R.pairwise_margin([q[0]], [q[1]]), R.pairwise_margin([q[2]], [q[3]]),
                                R.pairwise_margin([q[4]], [q[5]]))[0]
        assert row["pointwise_flip"] == (None if np.isnan(fp) else int(fp))
        assert row["pairwise_flip"] == (None if np.isnan(fq) else int(fq))
    assert out["pairs"][0]["oracle"] == [1.0, 0.0] and out["pairs"][1]["oracle"] == [1.0, 0.0]
    # identical responses leave nothing to prefer (the tiny judge still says "A" or "B" both
    # times): excluded from every rate, not counted as flips
    last = out["pairs"][2]
    assert last["identical"] is True
    assert last["pointwise_flip"] is None and last["pairwise_flip"] is None and last["order_swap_flip"] is None
    assert out["pointwise"]["distractor_flip"]["n"] == 2 and out["pairwise"]["distractor_flip"]["n"] == 2
    assert out["pairwise"]["order_swap_flip"]["n"] == 2 and out["protocol_disagreement"]["n"] == 2
    with pytest.raises(ValueError, match="distractor text is empty"):
        judge_flip_test(model, tok, problems, pairs=pairs, distractor="  ")


# --------------------------------------------------------------------------- posttrain eval
@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory, tiny):
    """An untrained tiny reward model in posttrain rm's on-disk format (a random head ranks)."""
    from posttrain.models.reward_model import RewardModel, save_reward_model

    model, tok = tiny
    path = tmp_path_factory.mktemp("rm") / "rm"
    save_reward_model(RewardModel(model, seed=1), tok, path, meta={"chat_template": True, "max_length": 256})
    return path


def test_eval_reta_and_judge_flip_end_to_end(tmp_path, tiny_rm, capsys):
    from posttrain.cli import main

    out = tmp_path / "eval_rm.json"
    # a reward whose value varies on the tiny model's random text, so the oracle is not constant
    argv = ["eval", "--model", "tiny-random", "--task", "arithmetic", "--n", "4", "--problems", "4",
            "--max-new-tokens", "8", "--no-progress", "--scorers", "mean_logprob", "--json", str(out),
            "--reward", "{type: format, pattern: '[0-9]'}", "--reward-model", str(tiny_rm), "--reta",
            "--judge-flip", "--distractor", " Verified."]
    assert main(argv) == 0
    d = json.loads(out.read_text())
    reta = d["reta"]
    assert reta["etas"] == [0.25, 0.5, 0.75, 1.0] and reta["n_prompts"] == 4
    for key in ("curve", "low", "high", "oracle_curve"):
        assert len(reta[key]) == 4 and all(0.0 <= v <= 1.0 for v in reta[key])
    rewards = [x for p in d["problems"] for x in p["rewards"]]
    assert reta["curve"][-1] == pytest.approx(np.mean(rewards)) and reta["random"] == pytest.approx(np.mean(rewards))
    # the curve is the RM scorer's ranking of the recorded samples
    proxy = [s for p in d["problems"] for s in p["scores"]["reward_model"]]
    assert all(0.0 < s < 1.0 for s in proxy)  # sigmoid of the raw score
    groups = np.repeat(np.arange(4), 4)
    assert reta["curve"] == pytest.approx(R.reta_curve(proxy, rewards, groups, reta["etas"]).tolist())
    assert all(c <= o + 1e-12 for c, o in zip(reta["curve"], reta["oracle_curve"]))
    assert Path(reta["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(reta["plot"]).parent == tmp_path
    assert "reward_model" in d["best_of_n"]
    flip = d["judge_flip"]
    assert flip["n_pairs"] == 4 and flip["distractor"] == " Verified." and len(flip["pairs"]) == 4
    for r in (flip["pointwise"]["distractor_flip"], flip["pairwise"]["distractor_flip"],
              flip["pairwise"]["order_swap_flip"], flip["protocol_disagreement"]):
        assert r["rate"] is None or 0.0 <= r["rate"] <= 1.0
    text = capsys.readouterr().out
    assert "RETA (4 prompts" in text and "pairwise distractor flip rate" in text


BAD = [
    (["--reta"], "--reta needs --reward-model"),
    (["--reward-model", "/no/such/rm_dir", "--reta"], "does not exist"),
    (["--reward-model", "RM", "--etas", "0.5"], "--etas is only used with --reta"),
    (["--reward-model", "RM", "--reta", "--etas", "0"], "--etas: eta 0.0 out of range"),
    (["--reward-model", "RM", "--reta", "--etas", "1.5"], "out of range"),
    (["--reward-model", "RM", "--reta", "--n", "1"], "--reta needs --n >= 2"),
    (["--judge", "tiny-random"], "only used with --judge-flip"),
    (["--judge-flip", "--distractor", " "], "--distractor is empty"),
    (["--judge-flip", "--judge", "no-such-alias"], "unknown model"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[m for _, m in BAD])
def test_bad_reliability_options_fail_before_any_work(tmp_path, tiny_rm, capsys, monkeypatch, extra, message):
    import posttrain.models.loading as loading
    from posttrain.cli import main

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the options were checked")

    monkeypatch.setattr(loading, "load_model_and_tokenizer", refuse)
    extra = [str(tiny_rm) if x == "RM" else x for x in extra]
    argv = ["eval", "--model", "tiny-random", "--task", "arithmetic", "--n", "2", "--problems", "2",
            "--json", str(tmp_path / "eval_x.json"), *extra]  # a second --n in extra wins
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("posttrain: error:") and message in err
    assert not (tmp_path / "eval_x.json").exists()


def test_reward_model_proxy_is_the_sigmoid_of_the_raw_score(tiny_rm):
    from posttrain.evaluation.rm_reliability import reward_model_proxy
    from posttrain.tasks.base import Problem

    fn, rm = reward_model_proxy(str(tiny_rm))
    prob = Problem(id="p", prompt="What is 2 + 3?", answer="5")
    texts = ["5", "The answer is 6.", "7 7 7"]
    raw = rm.scores(prob.prompt, texts)
    assert len(set(raw)) == 3  # a random head still separates the texts
    assert [fn(prob, t) for t in texts] == pytest.approx([1 / (1 + math.exp(-r)) for r in raw], abs=1e-6)

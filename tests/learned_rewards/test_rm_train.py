"""Training a tiny reward model end to end; save/load; the reward_model reward; the CLI."""

import json
import time

import pytest
import torch

from posttrain.models.reward_model import RewardModel, load_reward_model, save_reward_model
from posttrain.rewards.learned import RewardModelReward, encode_text_pair
from posttrain.rewards.registry import build_reward
from posttrain.tasks.base import Problem
from posttrain.trainers.reward_model import RMConfig, train_reward_model

PROMPT = "How was the movie?"
TEXTS = ["The movie was good.", "The movie was bad.", "It was fine, I guess.", ""]


def test_separable_preferences_are_learned_quickly(tmp_path, good_bad):
    data = good_bad(tmp_path / "prefs.jsonl", n=64, seed=1)
    cfg = RMConfig(model="tiny-random", data=str(data), lr=1e-3, epochs=2, batch_size=8, eval_fraction=0.25, seed=1)
    t0 = time.perf_counter()
    summary = train_reward_model(cfg, output_dir=str(tmp_path / "out"), quiet=True)
    assert time.perf_counter() - t0 < 30
    assert summary["n_train_pairs"] == 48 and summary["n_eval_pairs"] == 16
    assert summary["eval_after"]["accuracy"] > 0.9
    assert summary["train_accuracy"] > 0.9
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    out = tmp_path / "out"
    assert {"config.yaml", "metrics.jsonl", "summary.json", "model"} <= {p.name for p in out.iterdir()}
    model_dir = out / "model"
    for name in ("COMPLETE", "model.safetensors", "config.json", "value_head.safetensors", "reward_model.json"):
        assert (model_dir / name).exists(), name
    assert not list(out.glob("*.tmp-*"))  # atomic save leaves nothing behind
    meta = json.loads((model_dir / "reward_model.json").read_text())
    assert meta["hidden_size"] == 64 and meta["reward_std"] > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("train/loss" in r for r in rows) == summary["steps"] == 12


def test_refuses_non_empty_output_dir(tmp_path, good_bad):
    data = good_bad(tmp_path / "prefs.jsonl", n=4)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        train_reward_model(RMConfig(data=str(data)), output_dir=str(tmp_path / "out"), quiet=True)
    assert (tmp_path / "out" / "x").read_text() == "keep me"


def test_save_load_round_trip_same_scores(trained_rm, tmp_path):
    out, _ = trained_rm
    rm, tok, meta = load_reward_model(out)
    seqs = [encode_text_pair(tok, PROMPT, t, chat_template=True, max_length=512)[0] for t in TEXTS]
    pad = tok.pad_token_id
    before = rm.score_ids(seqs, pad, batch_size=4)
    save_reward_model(rm, tok, tmp_path / "copy", meta)
    again, _, meta2 = load_reward_model(tmp_path / "copy")
    after = again.score_ids(seqs, pad, batch_size=4)
    assert after == pytest.approx(before, abs=1e-6)
    assert meta2["reward_mean"] == meta["reward_mean"]
    # batching and padding do not change a score
    assert rm.score_ids(seqs, pad, batch_size=1) == pytest.approx(before, abs=1e-5)


def test_reward_model_reward_via_build_reward(trained_rm):
    out, summary = trained_rm
    reward = build_reward({"type": "reward_model", "path": str(out)})
    assert isinstance(reward, RewardModelReward) and reward.name == "reward_model"
    res = reward(Problem(id="p", prompt=PROMPT), TEXTS)
    assert len(res.rewards) == len(TEXTS) and res.components["rm_score"] == res.rewards
    assert res.rewards[0] > res.rewards[1]  # good beats bad
    # the model directory works too; normalize uses the stored training mean/std
    norm = build_reward({"type": "reward_model", "path": str(out / "model"), "normalize": True, "batch_size": 1})
    res_n = norm(Problem(id="p", prompt=PROMPT), TEXTS)
    mean, std = summary["reward_mean"], summary["reward_std"]
    assert res_n.rewards == pytest.approx([(r - mean) / std for r in res.rewards], abs=1e-4)
    assert res_n.components["rm_score"] == pytest.approx(res.rewards, abs=1e-5)


def test_reward_model_reward_matches_in_memory_model(trained_rm):
    out, _ = trained_rm
    rm, tok, meta = load_reward_model(out)
    direct = RewardModelReward.from_model(rm, tok, meta)
    loaded = RewardModelReward(str(out))
    p = Problem(id="p", prompt=[{"role": "user", "content": PROMPT}])  # chat-message prompts work too
    assert loaded(p, TEXTS).rewards == pytest.approx(direct(p, TEXTS).rewards, abs=1e-6)


def test_reward_model_path_errors(tmp_path, trained_rm):
    with pytest.raises(ValueError, match="does not exist"):
        build_reward({"type": "reward_model", "path": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="is not a reward model"):
        build_reward({"type": "reward_model", "path": str(tmp_path)})
    with pytest.raises(ValueError, match="no option"):
        build_reward({"type": "reward_model", "path": str(trained_rm[0]), "bogus": 1})
    out, _ = trained_rm
    rm, tok, meta = load_reward_model(out)
    broken = save_reward_model(rm, tok, tmp_path / "broken", meta)
    (broken / "COMPLETE").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        RewardModelReward(str(broken))


def test_head_reads_last_non_pad_token():
    from posttrain.models.tiny import tiny_model_and_tokenizer

    lm, tok = tiny_model_and_tokenizer()
    rm = RewardModel(lm)
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        batched = rm(ids, mask)
        alone = rm(ids[:1, :3], mask[:1, :3])
        hidden = lm.base_model(input_ids=ids[:1, :3]).last_hidden_state[0, -1]
    assert batched[0].item() == pytest.approx(alone[0].item(), abs=1e-5)
    assert alone[0].item() == pytest.approx(rm.value_head(hidden).item(), abs=1e-5)


def test_rm_inside_rl_training(trained_rm, tmp_path):
    from posttrain.config import load_config
    from posttrain.trainers.rl_run import train_rl

    out, _ = trained_rm
    cfg = load_config(None, ["model.name=tiny-random", "trainer.steps=1", "trainer.eval_problems=4",
                             "rollout.num_prompts=2", "rollout.num_completions=2", "rollout.max_new_tokens=8",
                             "reward.type=reward_model", f"reward.path={out}", "task.test_size=20"])
    summary = train_rl(cfg, output_dir=str(tmp_path / "rl"), quiet=True)
    assert summary["steps"] == 1
    row = json.loads((tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()[0])
    assert "reward_component/rm_score" in row


def test_cli_rm(tmp_path, capsys, good_bad):
    from posttrain.cli import main

    data = good_bad(tmp_path / "prefs.jsonl", n=16)
    cfg = tmp_path / "rm.yaml"
    cfg.write_text(f"model: tiny-random\ndata: {data}\nlr: 1.0e-3\nepochs: 1\nbatch_size: 8\n")
    assert main(["rm", str(cfg), "eval_fraction=0.25", "--output-dir", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model" / "COMPLETE").exists()
    assert "posttrain rm: summary" in capsys.readouterr().out
    # bad data: one clear line naming file:line, exit code 2, nothing written
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q"}\n')
    assert main(["rm", str(cfg), f"data={bad}", "--output-dir", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2:" in err and "missing key" in err
    assert not (tmp_path / "out2").exists()
    assert main(["list", "rewards"]) == 0
    listed = capsys.readouterr().out.split()
    assert "reward_model" in listed and "judge" in listed

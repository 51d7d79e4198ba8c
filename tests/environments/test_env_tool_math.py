"""The tool-use math environment and OTC's tool-efficiency term (arXiv:2504.14870), against values
computed by hand; episodes with a scripted model and the real python tool; a tiny-model RL run."""

import json
import math

import pytest

from posttrain.config import load_config
from posttrain.environments import EpisodeState, ToolMath, build_environment, episode_metrics, run_episodes
from posttrain.environments.tool_math import otc_mapping, otc_tool_reward
from posttrain.models.tiny import tiny_model_and_tokenizer, tiny_tokenizer
from posttrain.rewards.math import NumericReward
from posttrain.rollout.sampler import SamplingParams
from posttrain.tasks.base import Problem
from posttrain.trainers.rl_run import train_rl

from env_scripted import ScriptedEngine


def test_otc_tool_reward_hand_values():
    # OTC-PPO: cos(m pi / (2m + c))
    assert otc_tool_reward(0) == 1.0
    assert otc_tool_reward(1, c=1.0) == pytest.approx(0.5)  # cos(pi/3)
    assert otc_tool_reward(2, c=1.0) == pytest.approx(0.30901699)  # cos(2pi/5)
    assert otc_tool_reward(1, c=2.0) == pytest.approx(math.sqrt(0.5))  # cos(pi/4)
    # OTC-GRPO: f(m, n) = 2nm/(m+n); sin(f pi / (2n)); n = 0 falls back to the cosine form
    assert (otc_mapping(0, 0), otc_mapping(3, 0), otc_mapping(1, 3)) == (0.0, 3.0, 1.5)
    assert otc_tool_reward(2, 2) == pytest.approx(1.0)  # the optimum
    assert otc_tool_reward(1, 2) == pytest.approx(math.sqrt(3) / 2)  # f = 4/3: sin(pi/3)
    assert otc_tool_reward(4, 2) == pytest.approx(math.sqrt(3) / 2)  # f = 8/3: sin(2pi/3)
    assert otc_tool_reward(3, 1) == pytest.approx(math.sqrt(0.5))  # f = 3/2: sin(3pi/4)
    assert otc_tool_reward(0, 0) == 1.0 and otc_tool_reward(3, 0, 1.0) == pytest.approx(math.cos(3 * math.pi / 7))
    with pytest.raises(ValueError, match="must be >= 0"):
        otc_tool_reward(-1, 2)


def _episode(group, calls, correct):
    """(state, step rewards, infos) of an ended episode with ``calls`` tool calls then an answer."""
    state = EpisodeState(problem=Problem(id=f"g{group}", prompt="q", answer="1"), messages=[], group=group)
    infos = [{"tool_call": True, "tool": "python", "tool_error": False} for _ in range(calls)]
    infos.append({"components": {"correct": float(correct), "reward_error": 0.0}})
    return state, [0.0] * calls + [float(correct)], infos


def test_otc_grpo_scales_rewards_by_the_groups_fewest_correct_calls():
    env = ToolMath(NumericReward(), tools=["calculator"], otc="grpo", otc_alpha=2.0)
    # group 0: correct with 2 calls, correct with 1 (n = 1), wrong with 0; group 1: only a wrong one (n falls back to 0)
    eps = [_episode(0, 2, True), _episode(0, 1, True), _episode(0, 0, False), _episode(1, 3, False)]
    states, rewards, infos = map(list, zip(*eps))
    env.finish(states, rewards, infos)
    # m=2, n=1: f = 4/3, sin(2pi/3) = 0.8660; m=1: 1; m=0, n=1: f = 0, sin 0 = 0; m=3, n=0: cos(3pi/7)
    r_tool = [math.sqrt(3) / 2, 1.0, 0.0, math.cos(3 * math.pi / 7)]
    assert [sum(r) for r in rewards] == pytest.approx([2.0 * math.sqrt(3) / 2, 2.0, 0.0, 0.0])
    assert rewards[0] == pytest.approx([0.0, 0.0, math.sqrt(3)])  # the scaled reward stays on the answer's step
    assert [i[-1]["components"]["otc/tool"] for i in infos] == pytest.approx(r_tool)
    assert [i[-1]["components"]["otc/optimal_calls"] for i in infos] == [1.0, 1.0, 1.0, 0.0]
    assert [i[-1]["components"]["otc/task_reward"] for i in infos] == [1.0, 1.0, 0.0, 0.0]
    assert all(i[-1]["components"]["correct"] == c for i, c in zip(infos, [1, 1, 0, 0]))  # accuracy untouched
    # OTC-PPO ignores the group: cos(m pi / (2m + c)) with c = 1
    eps = [_episode(0, 2, True), _episode(0, 1, True)]
    states, rewards, infos = map(list, zip(*eps))
    ToolMath(NumericReward(), tools=["calculator"], otc="ppo").finish(states, rewards, infos)
    assert [sum(r) for r in rewards] == pytest.approx([math.cos(2 * math.pi / 5), 0.5])
    # a composite reward's format part pays a wrong answer: its numeric/correct, not r > 0, decides n
    right, wrong = _episode(0, 2, True), _episode(0, 0, False)
    wrong[1][-1] = 0.2
    wrong[2][-1]["components"] = {"numeric/correct": 0.0}
    right[2][-1]["components"] = {"numeric/correct": 1.0}
    states, rewards, infos = map(list, zip(right, wrong))
    ToolMath(NumericReward(), tools=["calculator"], otc="grpo").finish(states, rewards, infos)
    assert sum(rewards[0]) == pytest.approx(1.0) and infos[0][-1]["components"]["otc/optimal_calls"] == 2.0
    # no otc: nothing changes
    states, rewards, infos = map(list, zip(*[_episode(0, 2, True)]))
    ToolMath(NumericReward(), tools=["calculator"]).finish(states, rewards, infos)
    assert rewards == [[0.0, 0.0, 1.0]] and "otc/tool" not in infos[0][-1]["components"]


def test_tool_math_episodes_with_the_python_tool_and_otc():
    tok = tiny_tokenizer()
    eos = tok.eos_token_id
    call = '<tool_call>{"name": "python", "arguments": {"code": "print(123 * 456)"}}</tool_call>'
    first = {0: call, 1: "56088", 2: "7"}  # one tool call then the answer; the answer at once; a wrong answer

    def script(row, turn):
        text = first[row] if turn == 0 else "56088"
        return tok(text, add_special_tokens=False).input_ids + [eos], True

    env = build_environment({"type": "tool_math", "otc": "grpo", "max_turns": 3}, NumericReward())
    problem = Problem(id="mul", prompt="What is 123 * 456?", answer="56088")
    r = run_episodes(ScriptedEngine(tok, script), env, [problem], 3, SamplingParams(max_new_tokens=200))
    system = r.metadata[0]["messages"][0]
    assert system["role"] == "system" and system["content"].startswith("Solve the problem.")
    assert '"name": "python"' in system["content"]
    assert r.metadata[0]["messages"][3] == {"role": "tool", "content": "56088"}  # the sandbox ran the code
    assert [m["tool_calls"] for m in r.metadata] == [1, 0, 0]
    # both correct episodes: n = 0 (the direct answer), so the one with a call gets cos(pi/3) = 0.5
    assert r.rewards.tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert r.metadata[0]["step_rewards"] == pytest.approx([0.0, 0.5])
    assert r.reward_components["otc/tool"].tolist() == pytest.approx([0.5, 1.0, 1.0])
    assert r.reward_components["otc/task_reward"].tolist() == [1.0, 1.0, 0.0]
    assert r.reward_components["correct"].tolist() == [1.0, 1.0, 0.0]
    metrics = episode_metrics(r)
    assert metrics["env/tool_use_frac"] == pytest.approx(1 / 3)
    assert metrics["env/tool_calls_per_episode"] == pytest.approx(1 / 3)


def test_bad_tool_math_options_are_clear_errors():
    with pytest.raises(ValueError, match="environment.otc must be null, 'grpo' or 'ppo', got 'best'"):
        build_environment({"type": "tool_math", "otc": "best"}, None)
    with pytest.raises(ValueError, match="environment.otc_c must be a finite number > 0"):
        build_environment({"type": "tool_math", "otc": "ppo", "otc_c": 0}, None)
    with pytest.raises(ValueError, match="environment.otc_alpha"):
        build_environment({"type": "tool_math", "otc_alpha": -1}, None)
    with pytest.raises(ValueError, match="tools is empty"):
        build_environment({"type": "tool_math", "tools": []}, None)
    with pytest.raises(ValueError, match=r"has no option\(s\) \['otc_n'\]"):
        build_environment({"type": "tool_math", "otc_n": 2}, None)


def test_example_config_loads_and_builds_its_environment():
    from pathlib import Path

    from posttrain.rewards.registry import build_reward

    path = Path(__file__).resolve().parents[2] / "examples" / "tool_math.yaml"
    cfg = load_config(str(path), ["algorithm.turn_credit=true"])
    env = build_environment(cfg.environment, build_reward(cfg.reward))
    assert isinstance(env, ToolMath) and env.otc == "grpo" and env.max_turns == 3 and list(env.tools) == ["python"]
    assert cfg.rollout.stop == ["</tool_call>"] and cfg.task["name"] == "multi_digit_arithmetic"


TOOL_MATH = ["task={name: multi_digit_arithmetic, digits: 3, test_size: 4}",
             "environment={type: tool_math, tools: [python], max_turns: 2, otc: grpo}", "reward={type: numeric}",
             "rollout.num_prompts=2", "rollout.num_completions=2", "rollout.max_new_tokens=4",
             "trainer.eval_problems=2", "trainer.threads=1", "trainer.lr=1e-3", "trainer.steps=2"]


def test_tool_math_trains_and_logs_tool_rate_and_otc_per_step(tmp_path):
    # the tools' system prompt is ~600 characters: the tiny random model, with a wider context
    model, tok = tiny_model_and_tokenizer(max_positions=1024)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    cfg = load_config(None, [f"model.name={tmp_path / 'tiny'}"] + TOOL_MATH)
    summary = train_rl(cfg, output_dir=str(tmp_path / "run"), quiet=True)
    assert summary["steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if "env/tool_use_frac" in row]
    assert len(train) == 2
    for row in train:
        assert 0.0 <= row["env/tool_use_frac"] <= 1.0 and row["env/tool_calls_per_episode"] >= 0.0
        # r_tool is in (0, 1] wherever a tool call was made or not (no episode here has n > m)
        assert 0.0 < row["reward_component/otc/tool"] <= 1.0
        assert "reward_component/otc/task_reward" in row
    # held-out evaluation reports the episodes' tool use too (before and after training)
    evals = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals][0] == 0 and len(evals) >= 2
    for e in evals:
        assert 0.0 <= e["env/tool_use_frac"] <= 1.0 and 1.0 <= e["env/turns_mean"] <= 3.0
        assert e["env/tool_calls_per_episode"] >= e["env/tool_use_frac"]

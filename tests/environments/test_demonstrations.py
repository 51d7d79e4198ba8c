"""Tool-call demonstrations (environments/demonstrations.py, ``posttrain demos``): the prompt is
exactly the environment's first turn, the call parses and, run through the environment's real
python tool, prints the problem's answer; the CLI's refusals; ``posttrain sft`` trains on the
file with a loss on the call's tokens only."""

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.config import load_config
from posttrain.environments import SingleTurn, ToolEnvironment, build_environment, parse_tool_call
from posttrain.environments.demonstrations import tool_call_demonstrations
from posttrain.rewards.math import NumericReward
from posttrain.rewards.registry import build_reward
from posttrain.tasks.registry import build_task

ROOT = Path(__file__).resolve().parents[2]
TOOL_MATH = str(ROOT / "examples" / "tool_math.yaml")


def _example():
    """(env, task) of examples/tool_math.yaml, built as `posttrain rl` builds them."""
    cfg = load_config(TOOL_MATH)
    return build_environment(cfg.environment, build_reward(cfg.reward)), build_task(cfg.task)


def _mixed_problems(task, n_each=2):
    """The first ``n_each`` train problems of each operator of the task."""
    out, counts = [], {}
    for p in task.problems("train"):
        op = p.metadata["ops"][0]
        if counts.get(op, 0) < n_each:
            out.append(p)
            counts[op] = counts.get(op, 0) + 1
    return out


def test_prompt_is_the_first_turn_and_the_call_parses():
    env, task = _example()
    problems = _mixed_problems(task)
    assert sorted({p.metadata["ops"][0] for p in problems}) == ["*", "+"]
    demos = tool_call_demonstrations(env, problems, "multi_digit_arithmetic")
    assert len(demos) == len(problems)
    for demo, p in zip(demos, problems):
        *prompt, call = demo["messages"]
        assert prompt == env.reset(p).messages  # system tool prompt included, byte for byte
        assert prompt[0]["role"] == "system" and '"name": "python"' in prompt[0]["content"]
        assert call["role"] == "assistant"
        parsed = parse_tool_call(call["content"])
        assert parsed.error is None and parsed.name == "python"
        assert parsed.arguments == {"code": f"print({p.metadata['expr']})"}
    assert demos[0]["messages"][-1]["content"] == (
        '<tool_call>{"name": "python", "arguments": {"code": "print(%s)"}}</tool_call>' % problems[0].metadata["expr"])


def _run_call(env, problem, call: str):
    """One environment step on ``call`` after reset, as the episode runner makes it."""
    state = env.reset(problem)
    state.messages.append({"role": "assistant", "content": call})
    state.turn, state.max_turns = 1, env.max_turns
    return env.step(state, call)


def test_the_call_run_by_the_real_python_tool_prints_the_answer():
    env, task = _example()
    problems = _mixed_problems(task, n_each=2)
    # negative operands are parenthesised in the expression: 3-digit arithmetic with - and negatives
    signed = build_task({"name": "arithmetic", "ops": ["-", "*"], "min_operand": -99, "max_operand": 99})
    negative = [p for p in signed.problems("train") if any(x < 0 for x in p.metadata["operands"])][:2]
    assert all("(-" in p.metadata["expr"] for p in negative)
    for name, probs in (("multi_digit_arithmetic", problems), ("arithmetic", negative)):
        for demo, p in zip(tool_call_demonstrations(env, probs, name), probs):
            result = _run_call(env, p, demo["messages"][-1]["content"])
            assert result.info["tool_call"] and not result.info["tool_error"], result.observation
            assert not result.done and result.observation == p.answer  # the sandbox printed the reference answer
    # the calculator tool takes the expression itself
    calc = build_environment({"type": "tool_math", "tools": ["calculator"]}, NumericReward())
    p = problems[-1]
    demo = tool_call_demonstrations(calc, [p], "multi_digit_arithmetic")[0]
    assert parse_tool_call(demo["messages"][-1]["content"]).arguments == {"expression": p.metadata["expr"]}
    assert _run_call(calc, p, demo["messages"][-1]["content"]).observation == p.answer


def test_answer_turn_follows_the_tools_real_result():
    env, task = _example()
    problems = _mixed_problems(task, n_each=1)
    demos = tool_call_demonstrations(env, problems, "multi_digit_arithmetic", answers=True)
    assert len(demos) == 2 * len(problems)
    for p, first, second in zip(problems, demos[::2], demos[1::2]):
        *head, call, result, answer = second["messages"]
        assert head + [call] == first["messages"]  # the same first turn and call
        assert result == {"role": env.observation_role, "content": p.answer}  # what the sandbox printed
        assert answer == {"role": "assistant", "content": p.answer}
        # the answer, sent as the next message, ends the episode with the full reward
        state = env.reset(p)
        state.messages += [call, result]
        state.turn, state.max_turns = 1, env.max_turns
        step = env.step(state, answer["content"])
        assert step.done and step.reward == 1.0
    wrong = replace(problems[0], answer="-1")  # a call that cannot print this answer is refused, named
    with pytest.raises(ValueError, match=re.escape(f"problem {wrong.id!r}: the demonstrated call did not return its "
                                                   "answer '-1'")):
        tool_call_demonstrations(env, [wrong], "multi_digit_arithmetic", answers=True)


def test_unsupported_task_tool_or_environment_is_a_clear_error():
    env, task = _example()
    p = task.problems("train")[0]
    with pytest.raises(ValueError, match=r"task 'countdown'.*supported tasks are \['arithmetic', "
                                         r"'multi_digit_arithmetic'\]"):
        tool_call_demonstrations(env, [p], "countdown")

    def lookup(key: str) -> str:
        """Look a key up."""
        return key

    user_tool = ToolEnvironment([lookup], NumericReward())
    with pytest.raises(ValueError, match=r"tool 'lookup'.*supported tools are \['calculator', 'python'\]"):
        tool_call_demonstrations(user_tool, [p], "multi_digit_arithmetic")
    with pytest.raises(ValueError, match=r"tool 'calculator' is not one of the environment's tools \['python'\]"):
        tool_call_demonstrations(env, [p], "multi_digit_arithmetic", tool="calculator")
    with pytest.raises(ValueError, match="has no tools"):
        tool_call_demonstrations(SingleTurn(NumericReward()), [p], "multi_digit_arithmetic")


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_cli_writes_n_lines_refuses_to_overwrite_and_names_what_is_missing(tmp_path, capsys):
    from posttrain.models.tiny import tiny_tokenizer

    out = tmp_path / "demos.jsonl"
    assert main(["demos", TOOL_MATH, "model.name=tiny-random", "--out", str(out), "--limit", "5"]) == 0
    rows = _lines(out)
    env, task = _example()
    env.bind_tokenizer(tiny_tokenizer())  # the CLI binds model.name's tokenizer: the result's role
    assert len(rows) == 10  # the call's turn and the answer's turn per problem
    assert rows == tool_call_demonstrations(env, task.problems("train")[:5], "multi_digit_arithmetic", answers=True)
    before = out.read_text()
    assert main(["demos", TOOL_MATH, "--out", str(out), "--limit", "3"]) == 2
    assert "already exists: pass --force" in capsys.readouterr().err and out.read_text() == before
    assert main(["demos", TOOL_MATH, "--out", str(out), "--limit", "3", "--split", "test", "--force",
                 "--first-turn-only"]) == 0
    rows = _lines(out)
    assert len(rows) == 3 and rows[0]["messages"][-2]["content"] == task.problems("test")[0].prompt
    assert [p.name for p in tmp_path.iterdir()] == ["demos.jsonl"]  # no temporary file left
    # an RL config without an environment: section, before anything is written
    plain = tmp_path / "plain.jsonl"
    assert main(["demos", str(ROOT / "examples" / "arithmetic.yaml"), "--out", str(plain)]) == 2
    err = capsys.readouterr().err
    assert "has no environment: section" in err and "examples/tool_math.yaml" in err and not plain.exists()
    # a task or tool the call builder does not know, named before any problem is generated
    assert main(["demos", TOOL_MATH, "task={name: countdown}", "--out", str(plain)]) == 2
    assert "task 'countdown'" in capsys.readouterr().err and not plain.exists()
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("some text")
    search = f"environment={{type: tool_math, tools: [{{type: search, directory: {docs}}}]}}"
    assert main(["demos", TOOL_MATH, search, "--out", str(plain)]) == 2
    assert "tool 'search'" in capsys.readouterr().err and not plain.exists()


def test_sft_on_the_demonstrations_learns_only_the_call(tmp_path):
    from posttrain.models.tiny import tiny_model_and_tokenizer
    from posttrain.rollout.sampler import render_prompt

    # tiny-random, with a context wide enough for the tools' system prompt (~780 tokens of its tokenizer)
    model, tok = tiny_model_and_tokenizer(max_positions=1024)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    demos, val = tmp_path / "demos.jsonl", tmp_path / "val.jsonl"
    assert main(["demos", TOOL_MATH, "--out", str(demos), "--limit", "4", "--first-turn-only"]) == 0
    assert main(["demos", TOOL_MATH, "--out", str(val), "--split", "test", "--limit", "2", "--first-turn-only"]) == 0
    run = tmp_path / "sft"
    code = main(["sft", str(ROOT / "examples" / "tool_math_sft.yaml"), f"model.name={tmp_path / 'tiny'}",
                 f"data.path={demos}", f"data.validation_path={val}", "data.batch_size=4", "trainer.steps=2",
                 "trainer.threads=1", "trainer.eval_problems=1", "rollout.max_new_tokens=4", "--output-dir", str(run)])
    assert code == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tokens/completion" in r]
    assert len(steps) == 2
    # batch = all 4 demonstrations: the loss's tokens are the calls' tokens + EOS, nothing of the prompt
    records = _lines(demos)
    call_tokens = sum(len(tok(r["messages"][-1]["content"], add_special_tokens=False).input_ids) + 1 for r in records)
    prompt_tokens = sum(len(render_prompt(tok, r["messages"][:-1], True)) for r in records)
    for r in steps:
        assert r["tokens/completion"] == call_tokens and r["tokens/prompt"] == prompt_tokens
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2] and all(e["held_out_nll"] > 0 for e in evals)
    assert (run / "checkpoints" / "step_2" / "model.safetensors").is_file()  # a model for `posttrain rl`


def test_smollm2_demonstrations_fit_the_sft_example_and_render_the_tool_role(tmp_path):
    from transformers import AutoTokenizer

    from posttrain.config import SFTConfig
    from posttrain.environments.tools import template_renders_role
    from posttrain.models.loading import ModelLoadError, _gguf_cached, resolve_alias
    from posttrain.trainers.sft_data import encode, read_jsonl

    try:
        tok = AutoTokenizer.from_pretrained(str(_gguf_cached(resolve_alias("smollm2-135m-instruct"))))
    except ModelLoadError as exc:
        pytest.skip(f"SmolLM2 is not installed here: {exc}")
    out = tmp_path / "demos.jsonl"
    assert main(["demos", TOOL_MATH, "--out", str(out), "--limit", "8"]) == 0
    cfg = load_config(str(ROOT / "examples" / "tool_math_sft.yaml"), cls=SFTConfig)
    encoded = encode(tok, read_jsonl(out), cfg.rollout.chat_template, cfg.data.max_length)
    assert all(len(p) + len(c) <= 300 for p, c in encoded)  # ~217 + ~37: well inside max_length
    # the completion is the call and EOS; the tool's result would come back as a `tool` message
    assert tok.decode(encoded[0][1][:-1]) == _lines(out)[0]["messages"][-1]["content"]
    assert encoded[0][1][-1] == tok.eos_token_id and template_renders_role(tok, "tool")

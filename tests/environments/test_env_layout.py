"""The multi-turn token layout with SmolLM2's real tokenizer and chat template (no model weights).

A scripted engine plays the model, so each model turn's tokens are known; the row that
``run_episodes`` builds must then be the chat template's rendering of the whole conversation.
"""

import pytest
import torch

from posttrain.environments import GuessTheNumber, ToolEnvironment, run_episodes
from posttrain.rewards.math import NumericReward
from posttrain.rollout.sampler import SamplingParams
from posttrain.tasks.base import Problem

from env_scripted import ScriptedEngine


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from posttrain.models.loading import ModelLoadError, _gguf_cached, resolve_alias

    try:
        path = _gguf_cached(resolve_alias("smollm2-135m-instruct"))
    except ModelLoadError as exc:
        pytest.skip(f"SmolLM2 is not installed here: {exc}")
    return AutoTokenizer.from_pretrained(str(path))


CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "12 * 7"}}</tool_call>'
PROBLEM = Problem(id="mul", prompt="What is 12 * 7?", answer="84")


def encode(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def rendered(tok, messages, generation_prompt=False):
    return encode(tok, tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt))


def split(r, i):
    """(row tokens: prompt + continuation, model-token flags, behaviour log-probs) of row i."""
    prompt = r.prompt_ids[i][r.prompt_mask[i].bool()].tolist()
    real = r.completion_mask[i].bool()
    return prompt + r.completion_ids[i][real].tolist(), r.action_mask[i][real].tolist(), r.behaviour_logprobs[i][real]


@pytest.mark.parametrize("first_turn_ended", [True, False], ids=["eos", "cut"])
def test_two_turn_tool_episode_equals_the_template_rendered_at_once(smollm2_tokenizer, first_turn_ended):
    tok = smollm2_tokenizer
    eos = tok.eos_token_id
    turn1 = encode(tok, "Let me compute. " + CALL) + ([eos] if first_turn_ended else [])
    turn2 = encode(tok, "12 * 7 = 84. The answer is 84.") + [eos]
    engine = ScriptedEngine(tok, lambda row, turn: ((turn1, first_turn_ended), (turn2, True))[turn])
    env = ToolEnvironment(["calculator"], NumericReward(), max_turns=4)
    r = run_episodes(engine, env, [PROBLEM], 1, SamplingParams(max_new_tokens=64))

    meta = r.metadata[0]
    messages = meta["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert messages[3]["content"] == "84" and messages[4]["content"] == "12 * 7 = 84. The answer is 84."
    row, model, logps = split(r, 0)
    # The row is the whole conversation rendered at once, up to the model's final EOS; the
    # template only adds its newline after that.
    whole = rendered(tok, messages)
    assert row == whole[: len(row)] and tok.decode(whole[len(row):]) == "\n"
    assert row == rendered(tok, messages[:-1], generation_prompt=True) + turn2
    # the prompt is reset's messages; every turn's engine prompt was the row so far
    assert r.prompt_ids[0][r.prompt_mask[0].bool()].tolist() == rendered(tok, messages[:2], True)
    P = int(r.prompt_mask.sum())
    assert engine.prompts[1][0] == row[: len(row) - len(turn2)] and engine.prompts[0][0] == row[:P]
    # model tokens: mask 1 and the sampled log-probs; environment tokens: no loss, log-prob 0
    env_tokens = [t for t, m in zip(row[P:], model) if m == 0]
    closing = "" if first_turn_ended else "<|im_end|>"  # a cut turn is closed by the template, not the model
    assert tok.decode(env_tokens) == closing + "\n<|im_start|>tool\n84<|im_end|>\n<|im_start|>assistant\n"
    assert [t for t, m in zip(row[P:], model) if m == 1] == turn1 + turn2
    assert model == [1.0] * len(turn1) + [0.0] * len(env_tokens) + [1.0] * len(turn2)
    expected_logps = [-0.25 - 0.01 * k for k in range(len(turn1))] + [0.0] * len(env_tokens) + \
        [-0.25 - 0.01 * k for k in range(len(turn2))]
    assert torch.allclose(logps, torch.tensor(expected_logps))
    assert torch.equal(r.entropies[0] == 0, r.action_mask[0] == 0)
    assert r.rewards.tolist() == [1.0] and meta["step_rewards"] == [0.0, 1.0]
    assert (meta["turns"], meta["tool_calls"], meta["tool_errors"], meta["stop_reason"]) == (2, 1, 0, "done")
    assert meta["retokenized"] == 0 and meta["env_tokens"] == len(env_tokens)
    assert r.reward_components["reward_error"].tolist() == [0.0] and r.policy_version.tolist() == [3]
    assert not r.truncated[0] and engine.last_stats["generate_calls"] == 2


def test_a_non_canonical_split_is_kept_and_flagged(smollm2_tokenizer):
    """The model may sample a word as pieces its text does not re-tokenise to: the row keeps the
    sampled pieces, the environment tokens come from the text difference, and the turn is counted."""
    tok = smollm2_tokenizer
    eos = tok.eos_token_id
    pieces = [tok.convert_tokens_to_ids(c) for c in "Fifty"] + [eos]
    assert pieces[:-1] != encode(tok, "Fifty")
    engine = ScriptedEngine(tok, lambda row, turn: ((pieces, True), (encode(tok, "42") + [eos], True))[turn])
    env = GuessTheNumber(1, 100, max_turns=2)
    r = run_episodes(engine, env, [Problem(id="g", prompt="Guess.", answer="42")], 1, SamplingParams(max_new_tokens=8))
    meta = r.metadata[0]
    assert meta["retokenized"] == 1 and r.rewards.tolist() == [1.0]
    row, model, _ = split(r, 0)
    assert tok.decode(row) == tok.apply_chat_template(meta["messages"], tokenize=False)[:-1]
    P = int(r.prompt_mask.sum())
    assert row[P:P + len(pieces)] == pieces and model[: len(pieces)] == [1.0] * len(pieces)


def test_token_and_turn_caps(smollm2_tokenizer):
    tok = smollm2_tokenizer
    eos = tok.eos_token_id
    guess = encode(tok, "50") + [eos]
    engine = ScriptedEngine(tok, lambda row, turn: (guess, True))
    problem = Problem(id="g", prompt="Guess.", answer="7")
    r = run_episodes(engine, GuessTheNumber(1, 100, max_turns=3), [problem], 2, SamplingParams(max_new_tokens=8))
    assert [m["stop_reason"] for m in r.metadata] == ["done", "done"]  # the game ends itself at its last turn
    assert [m["turns"] for m in r.metadata] == [3, 3] and r.rewards.tolist() == [0.0, 0.0]
    assert r.group_ids.tolist() == [0, 0] and len(engine.prompts[0]) == 2  # one problem, n = 2

    class Endless(GuessTheNumber):  # never ends by itself: the runner's caps do
        def step(self, state, message):
            res = super().step(state, message)
            res.done, res.observation = False, res.observation or "again"
            return res

    r = run_episodes(engine, Endless(1, 100, max_turns=3), [problem], 1, SamplingParams(max_new_tokens=8))
    assert (r.metadata[0]["stop_reason"], r.metadata[0]["turns"], bool(r.truncated[0])) == ("max_turns", 3, True)
    env_len = len(tok("\n<|im_start|>user\nlower<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids)
    env = Endless(1, 100, max_turns=10, max_tokens=2 * len(guess) + env_len + 1)
    r = run_episodes(engine, env, [problem], 1, SamplingParams(max_new_tokens=8))
    meta = r.metadata[0]
    assert meta["stop_reason"] == "max_tokens" and meta["turns"] == 2
    assert int(r.completion_mask.sum()) <= env.max_tokens and meta["messages"][-1]["role"] == "assistant"
    # the last turn was cut to the room left under the cap
    env = Endless(1, 100, max_turns=10, max_tokens=len(guess) + env_len + 1)
    r = run_episodes(engine, env, [problem], 1, SamplingParams(max_new_tokens=8))
    assert int(r.completion_mask.sum()) == env.max_tokens and bool(r.truncated[0])
    assert r.metadata[0]["model_tokens"] == len(guess) + 1

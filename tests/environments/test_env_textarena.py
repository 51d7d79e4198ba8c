"""The TextArena adapter (environments.external): real TextArena games played by a scripted
player against outcomes worked out by hand, its seeding and error cases, and RL steps with the
tiny model through it from a YAML-style config."""

import json
import math
import random

import pytest

pytest.importorskip("textarena", reason="the textarena extra is not installed (pip install -e '.[textarena]')")

from posttrain.config import load_config  # noqa: E402
from posttrain.environments.external import TextArenaEnvironment, TextArenaTask  # noqa: E402
from posttrain.environments.registry import build_environment  # noqa: E402
from posttrain.models.tiny import tiny_model_and_tokenizer  # noqa: E402
from posttrain.tasks.base import Problem  # noqa: E402
from posttrain.tasks.registry import build_task  # noqa: E402
from posttrain.trainers import rl  # noqa: E402
from posttrain.trainers.rl_run import train_rl  # noqa: E402

GAME = {"min_number": 1, "max_number": 8}


def start(env, problem):
    state = env.reset(problem)
    state.max_turns = env.max_turns  # what run_episodes sets
    return state


def play(env, state, message):
    state.turn += 1
    state.messages.append({"role": "assistant", "content": message})
    return env.step(state, message)


def test_binary_search_wins_every_game_with_reward_1():
    task = TextArenaTask("GuessTheNumber-v0", GAME, train_size=6, test_size=2)
    env = TextArenaEnvironment("GuessTheNumber-v0", GAME, max_turns=4)  # ceil(log2(8)) + 1 guesses suffice
    for problem in task.problems("train"):
        state = start(env, problem)
        assert state.messages[0] == {"role": "user", "content": problem.prompt}
        assert "between 1 and 8" in problem.prompt and "[5]" in problem.prompt
        target = state.data["game"].game.game_number
        lo, hi, guesses = 1, 8, []
        while True:
            guess = (lo + hi) // 2
            guesses.append(guess)
            res = play(env, state, f"I guess [{guess}].")
            if res.done:
                break
            # the observation is the game's hint alone, without its echo of the move
            assert res.reward == 0.0 and "[{}]".format(guess) not in res.observation
            if guess < target:
                assert res.observation == "The target number is higher."
                lo = guess + 1
            else:
                assert res.observation == "The target number is lower."
                hi = guess - 1
        assert guesses[-1] == target and len(guesses) <= 4
        assert res.reward == 1.0 and res.info["won"] and res.info["components"] == {"textarena_reward": 1.0,
                                                                                    "correct": 1.0}


def test_invalid_moves_cut_turns_and_unfinished_games_follow_the_rules():
    env = TextArenaEnvironment("GuessTheNumber-v0", GAME, max_turns=5)
    problem = Problem(id="any-task-problem", prompt="ignored")  # no textarena seed: one from the id
    state = start(env, problem)
    first = play(env, state, "no brackets here")  # TextArena allows one invalid move, then ends the game
    assert not first.done and first.observation.startswith("You attempted an invalid move.")
    last = play(env, state, "still none")
    # no valid guess made: Guess-the-Number's completion fraction is 0
    assert last.done and last.reward == 0.0 and last.info["invalid_move"] and not last.info["won"]
    # posttrain's cap ends an unfinished game with unfinished_reward
    capped = TextArenaEnvironment("GuessTheNumber-v0", GAME, max_turns=1, unfinished_reward=-0.5)
    state = start(capped, problem)
    target = state.data["game"].game.game_number
    res = play(capped, state, f"[{1 if target != 1 else 2}]")
    assert res.done and res.reward == -0.5 and res.info["components"]["correct"] == 0.0


def test_games_are_seeded_per_problem_and_leave_the_global_random_stream_alone():
    task = TextArenaTask("GuessTheNumber-v0", {"min_number": 1, "max_number": 1000}, train_size=20, test_size=20)
    train, test = task.problems("train"), task.problems("test")
    assert not {p.id for p in train} & {p.id for p in test}
    env = TextArenaEnvironment("GuessTheNumber-v0", {"min_number": 1, "max_number": 1000})
    assert env.max_turns == 10  # the game's own limit when max_turns is not given
    random.seed(123)
    expected = [random.random() for _ in range(3)]
    random.seed(123)
    targets = [start(env, p).data["game"].game.game_number for p in train]
    assert [random.random() for _ in range(3)] == expected  # TextArena's random.seed did not leak
    # the n episodes of one problem play the same game; different problems mostly do not
    assert targets == [start(env, p).data["game"].game.game_number for p in train]
    assert len(set(targets)) > 10
    assert task.problems("train") is train  # built once


def test_bad_games_and_options_fail_with_the_fix_named():
    with pytest.raises(ValueError, match="not a single-player game"):
        TextArenaEnvironment("TicTacToe-v0")
    with pytest.raises(ValueError, match="unknown textarena game 'Chess-v9'"):
        TextArenaTask("Chess-v9")
    with pytest.raises(ValueError, match=r"task 'textarena' has no option\(s\) \['max_turns'\]"):
        build_task({"name": "textarena", "max_turns": 3})
    with pytest.raises(ValueError, match=r"environment 'textarena' has no option\(s\) \['low'\]"):
        build_environment({"type": "textarena", "low": 1}, None)
    env = TextArenaEnvironment("TowerOfHanoi-v0")
    wrong = TextArenaTask("GuessTheNumber-v0", GAME, train_size=1, test_size=1).problems("test")[0]
    with pytest.raises(ValueError, match="use the same env_id in task and environment"):
        env.reset(wrong)


def test_example_config_builds_its_task_and_environment():
    cfg = load_config("examples/textarena.yaml")
    task = build_task({**cfg.task, "train_size": 2, "test_size": 1})
    env = build_environment(cfg.environment, None)
    assert env.name == "textarena(GuessTheNumber-v0)" and env.max_turns == 6 and env.max_tokens == 512
    assert "between 1 and 20" in task.problems("train")[0].prompt
    # binary search over 1..20 needs ceil(log2(20)) = 5 guesses, within max_turns
    assert math.ceil(math.log2(20)) < env.max_turns


TEXTARENA = ["task={name: textarena, env_id: GuessTheNumber-v0, env_kwargs: {max_number: 8}, test_size: 2}",
             "environment={type: textarena, env_id: GuessTheNumber-v0, env_kwargs: {max_number: 8}, max_turns: 2}",
             "rollout.num_prompts=2", "rollout.num_completions=2", "rollout.max_new_tokens=4",
             "trainer.eval_problems=2", "trainer.threads=1", "trainer.lr=1e-3", "trainer.steps=2"]


def test_rl_steps_through_a_textarena_game(tmp_path, monkeypatch):
    # the game's rules are ~510 tokens of the tiny tokenizer: the tiny random model with a wider context
    model, tok = tiny_model_and_tokenizer(max_positions=1024)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    seen = []
    original = rl.RLUpdate.learn
    monkeypatch.setattr(rl.RLUpdate, "learn", lambda self, r, *a: original(self, r, *a) if seen.append(r) is None else None)
    summary = train_rl(load_config(None, [f"model.name={tmp_path / 'tiny'}"] + TEXTARENA),
                       output_dir=str(tmp_path / "run"), quiet=True)
    assert summary["steps"] == 2 and len(seen) == 2
    for r in seen:
        env_tokens = (r.completion_mask == 1) & (r.action_mask == 0)
        assert (r.loss_mask[env_tokens] == 0).all() and (r.behaviour_logprobs[env_tokens] == 0).all()
        assert set(r.reward_components) >= {"textarena_reward", "correct"}
        assert all(p.source == "textarena" and "textarena_seed" in p.metadata for p in r.problems)
        # every game ends within 2 moves (a win, or two invalid moves: a random model's 4 tokens are
        # rarely "[n]"); a first invalid move gets TextArena's notice as the observation
        assert all(m["stop_reason"] == "done" and m["turns"] <= 2 for m in r.metadata)
        two = [m for m in r.metadata if m["turns"] == 2]
        assert two and all("invalid move" in m["turn_info"][0]["feedback"] for m in two)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if "env/turns_mean" in row]
    assert [row["step"] for row in train_rows] == [1, 2] and all(1 < row["env/turns_mean"] <= 2 for row in train_rows)

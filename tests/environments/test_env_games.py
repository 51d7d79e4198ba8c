"""Guess-the-number: secrets, feedback, win and loss, turn limits."""

import pytest

from posttrain.environments.games import GuessTheNumber, guess_the_number_problems, last_integer
from posttrain.tasks.base import Problem


def play(env, problem, guesses):
    s = env.reset(problem)
    s.max_turns = env.max_turns
    out = []
    for g in guesses:
        s.turn += 1
        r = env.step(s, g)
        out.append(r)
        if r.done:
            break
    return s, out


def test_feedback_and_a_win():
    env = GuessTheNumber(1, 100, max_turns=7)
    _, steps = play(env, Problem(id="a", prompt="guess", answer="37"), ["50", "I think 25", "no digits", "37"])
    assert [r.observation for r in steps] == ["lower", "higher", "Reply with one integer between 1 and 100.", None]
    assert [r.reward for r in steps] == [0.0, 0.0, 0.0, 1.0] and steps[-1].done and steps[-1].info["won"]
    assert [r.info["guess"] for r in steps] == [50, 25, None, 37]


def test_binary_search_wins_within_seven_turns_and_a_loss_at_the_cap():
    env = GuessTheNumber(1, 100, max_turns=7)
    for secret in (1, 2, 50, 99, 100):
        s = env.reset(Problem(id=f"s{secret}", prompt="guess", answer=str(secret)))
        s.max_turns, lo, hi = 7, 1, 100
        while True:
            s.turn += 1
            guess = (lo + hi) // 2
            r = env.step(s, str(guess))
            if r.done:
                break
            lo, hi = (guess + 1, hi) if r.observation == "higher" else (lo, guess - 1)
        assert r.reward == 1.0 and s.turn <= 7
    _, steps = play(GuessTheNumber(1, 100, max_turns=3), Problem(id="x", prompt="g", answer="10"), ["1", "2", "3", "4"])
    assert len(steps) == 3 and steps[-1].done and steps[-1].reward == 0.0 and steps[-1].observation is None
    assert not steps[-1].info["won"] and steps[-1].info["feedback"] == "higher"


def test_secrets():
    env = GuessTheNumber(1, 10)
    no_answer = Problem(id="hash-me", prompt="g")
    assert env.secret(no_answer) == env.secret(no_answer) and 1 <= env.secret(no_answer) <= 10
    with pytest.raises(ValueError, match="outside"):
        env.secret(Problem(id="p", prompt="g", answer="11"))
    probs = guess_the_number_problems(20, 1, 10, max_turns=4, seed=3)
    assert probs == guess_the_number_problems(20, 1, 10, max_turns=4, seed=3)
    assert all(1 <= int(p.answer) <= 10 for p in probs) and len({p.answer for p in probs}) > 3
    assert "between 1 and 10" in probs[0].prompt and "4 guesses" in probs[0].prompt
    assert last_integer("maybe 3, no, -4") == -4 and last_integer("none") is None


def test_task_source():
    from posttrain.environments.games import GuessTheNumberTask

    task = GuessTheNumberTask(1, 50, max_turns=6, train_size=30, test_size=5, seed=2)
    train, test = task.problems("train"), task.problems("test")
    assert (len(train), len(test)) == (30, 5) and train == task.problems("train")
    assert not {p.id for p in train} & {p.id for p in test}
    with pytest.raises(ValueError, match="unknown split"):
        task.problems("val")

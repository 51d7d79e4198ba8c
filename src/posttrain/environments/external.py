"""TextArena's single-player games as posttrain environments (``pip install -e '.[textarena]'``).

TextArena (``textarena`` on PyPI; Guertler et al., "TextArena", arXiv 2504.11442) is a
collection of text games for evaluating and training LLM agents: Guess-the-Number, Tower of
Hanoi, Mastermind, Minesweeper, FrozenLake, a multi-armed bandit, and more. A game is driven as

    game = textarena.make("GuessTheNumber-v0-raw"); game.reset(num_players=1, seed=s)
    player, messages = game.get_observation()     # [(sender, text, ObservationType), ...]
    done, info = game.step(action_text)           # ... until done
    rewards, game_info = game.close()             # {0: reward}, {0: {"reason": ..., ...}}

``TextArenaEnvironment`` maps that loop onto posttrain's contract (``environments.base``):

* ``reset(problem)`` starts a fresh game seeded with the problem's ``textarena_seed`` (from
  ``TextArenaTask``) or, for another task's problems, a stable hash of the problem id, so the
  ``n`` episodes of one problem play the same game (a GRPO group compares like with like). The
  first message is the game's opening observation (its rules and prompt) as a user message,
  after an optional ``system_prompt``.
* ``step(state, message)`` plays the model's message as the action. The observation is the
  text of the game's new messages, joined by newlines, without the game's echo of the model's
  own action (the conversation already holds it). Invalid moves are the game's business: its
  "invalid move, resubmit" notice is an observation like any other.
* Rewards are outcome rewards: 0 on every step before the last; when the game ends, its reward
  for player 0. TextArena's single-player games give 1 for a win and otherwise a completion
  fraction in [0, 1) (e.g. Guess-the-Number: 1 - |last guess - target| / range), so the step's
  ``components`` are ``textarena_reward`` and ``correct`` = [reward >= 1], which held-out
  accuracy counts. An episode that posttrain's ``max_turns`` ends before the game does gets
  ``unfinished_reward`` (default 0) and ``correct`` 0. The last step's info carries the game's
  ``reason`` and ``invalid_move``.
* Randomness. TextArena seeds and draws from Python's global ``random`` (``State.__init__``
  calls ``random.seed``); every call into a game runs with that game's own saved ``random``
  state swapped in and the caller's restored after, so a game is reproducible from its seed and
  actions, and playing never shifts the rest of the process's random stream.

From YAML (``examples/textarena.yaml``): ``task: {name: textarena, env_id: ..., env_kwargs: {...}}``
for the seeded games and ``environment: {type: textarena, env_id: ..., max_turns: ...}`` to play
them; importing this module registers both names.

Only single-player games are supported (two-player games need an opponent policy, which is a
different training setup); a multi-player id is refused when the environment is built, as is an
unknown id, and a game that cannot start offline (word games that download nltk corpora) fails
then with its error. Offline-safe examples: ``GuessTheNumber-v0``, ``TowerOfHanoi-v0``,
``Mastermind-v0``, ``FrozenLake-v0``, ``Minesweeper-v0``, ``Bandit-v0``.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from typing import Any, Optional

from posttrain.environments.base import Environment, EpisodeState, StepResult
from posttrain.environments.registry import register_environment
from posttrain.tasks.base import Problem, check_split
from posttrain.tasks.registry import register_task

__all__ = ["TextArenaEnvironment", "TextArenaTask", "import_textarena"]

INSTALL_HINT = "install it with `pip install -e '.[textarena]'` (or `pip install textarena`)"


def import_textarena():
    """The ``textarena`` module, or an error saying how to install it (imported lazily: it is an
    optional extra and imports an OpenAI client at start-up)."""
    try:
        import textarena
    except ImportError as e:
        raise ImportError(f"the textarena environment needs the textarena package ({e}); {INSTALL_HINT}") from e
    return textarena


@contextlib.contextmanager
def _own_random(holder: dict):
    """Run with ``holder["rng"]`` (a ``random.getstate()``) as the global random state, save it
    back afterwards and restore the caller's state (see "Randomness" in the module docstring)."""
    outer = random.getstate()
    if holder.get("rng") is not None:
        random.setstate(holder["rng"])
    try:
        yield
    finally:
        holder["rng"] = random.getstate()
        random.setstate(outer)


def _seed_of(problem: Problem) -> int:
    seed = problem.metadata.get("textarena_seed")
    if seed is not None:
        return int(seed)
    return int.from_bytes(hashlib.sha256(problem.id.encode()).digest()[:4], "big")


class _Game:
    """One running TextArena game with its own random state."""

    def __init__(self, env_id: str, env_kwargs: dict[str, Any], seed: int):
        ta = import_textarena()
        self.random: dict = {"rng": None}
        with _own_random(self.random):
            self.game = ta.make(_raw_id(ta, env_id), **env_kwargs)
            self.game.reset(num_players=1, seed=seed)

    def observe(self) -> str:
        """The game's messages to player 0 since the last call, without its echo of the player's action."""
        ta = import_textarena()
        with _own_random(self.random):
            player, messages = self.game.get_observation()
        if player != 0:
            raise RuntimeError(f"textarena game {self.game.env_id!r} expects player {player} to move; posttrain "
                               "plays single-player games only")
        keep = [text for sender, text, kind in messages
                if not (sender == 0 and kind == ta.ObservationType.PLAYER_ACTION)]
        return "\n".join(str(t).strip() for t in keep if str(t).strip())

    def play(self, action: str) -> tuple[bool, dict]:
        with _own_random(self.random):
            done, info = self.game.step(action=action)
        return bool(done), dict(info or {})

    def outcome(self) -> tuple[float, dict]:
        with _own_random(self.random):
            rewards, game_info = self.game.close()
        if not rewards or 0 not in rewards:
            raise RuntimeError(f"textarena game {self.game.env_id!r} ended without a reward for player 0 "
                               f"(rewards={rewards!r})")
        return float(rewards[0]), dict((game_info or {}).get(0, {}))

    @property
    def max_turns(self) -> Optional[int]:
        turns = getattr(getattr(self.game, "state", None), "max_turns", None)
        return int(turns) if turns else None


def _raw_id(ta, env_id: str) -> str:
    """The id of the game without TextArena's observation wrappers (posttrain renders the
    conversation with the chat template itself); ids registered without versions have no
    ``-raw`` twin and no wrappers to drop."""
    from textarena.envs.registration import ENV_REGISTRY

    if env_id not in ENV_REGISTRY:
        singles = sorted(k for k in ENV_REGISTRY if k.endswith("-v0") and "-raw" not in k)
        raise ValueError(f"unknown textarena game {env_id!r}; ids look like {singles[:8]} "
                         "(textarena.pprint_registry_detailed() lists all)")
    return env_id + "-raw" if env_id + "-raw" in ENV_REGISTRY else env_id


def _probe(env_id: str, env_kwargs: dict[str, Any]) -> _Game:
    """Start one game now, so an unknown id, a multi-player game or a game that cannot start
    offline fails when the environment is built, before any model loads."""
    try:
        return _Game(env_id, env_kwargs, seed=0)
    except AssertionError as e:  # TextArena's multi-player states assert their player count
        raise ValueError(f"textarena game {env_id!r} is not a single-player game ({e}); posttrain's textarena "
                         "environment plays single-player games (e.g. GuessTheNumber-v0, TowerOfHanoi-v0)") from e
    except (ValueError, ImportError):
        raise
    except Exception as e:  # e.g. a word game whose nltk corpus is not on this machine
        raise RuntimeError(f"textarena game {env_id!r} with options {env_kwargs} could not start: "
                           f"{type(e).__name__}: {e}") from e


class TextArenaEnvironment(Environment):
    """A TextArena single-player game as an ``Environment`` (see the module docstring).

    ``env_id``: a TextArena id such as ``"GuessTheNumber-v0"``; ``env_kwargs``: options for the
    game's constructor (e.g. ``{"max_number": 10}``); ``max_turns``: model messages per episode
    (None: the game's own turn limit); ``max_tokens``: the episode's token cap;
    ``unfinished_reward``: the reward of an episode cut by ``max_turns`` before the game ended;
    ``system_prompt``: an optional first message.
    """

    observation_role = "user"

    def __init__(self, env_id: str = "GuessTheNumber-v0", env_kwargs: Optional[dict[str, Any]] = None,
                 max_turns: Optional[int] = None, max_tokens: Optional[int] = None, unfinished_reward: float = 0.0,
                 system_prompt: Optional[str] = None):
        self.env_id, self.env_kwargs = str(env_id), dict(env_kwargs or {})
        probe = _probe(self.env_id, self.env_kwargs)
        turns = max_turns if max_turns is not None else probe.max_turns
        if turns is None:
            raise ValueError(f"textarena game {self.env_id!r} has no turn limit of its own; set max_turns")
        if int(turns) < 1:
            raise ValueError(f"textarena environment: max_turns must be >= 1, got {turns}")
        self.max_turns, self.max_tokens = int(turns), max_tokens
        self.unfinished_reward = float(unfinished_reward)
        self.system_prompt = system_prompt
        self.name = f"textarena({self.env_id})"

    def reset(self, problem: Problem) -> EpisodeState:
        expected = problem.metadata.get("textarena_env_id")
        if expected is not None and expected != self.env_id:
            raise ValueError(f"problem {problem.id!r} was made for textarena game {expected!r}, but the environment "
                             f"plays {self.env_id!r}; use the same env_id in task and environment")
        game = _Game(self.env_id, self.env_kwargs, _seed_of(problem))
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": game.observe()})
        return EpisodeState(problem=problem, messages=messages, data={"game": game})

    def step(self, state: EpisodeState, message: str) -> StepResult:
        game: _Game = state.data["game"]
        done, step_info = game.play(message)
        if done:
            reward, game_info = game.outcome()
            info = {"won": reward >= 1.0, "reason": game_info.get("reason"),
                    "invalid_move": bool(game_info.get("invalid_move", False)),
                    "components": {"textarena_reward": reward, "correct": float(reward >= 1.0)}}
            return StepResult(None, reward, True, info)
        observation = game.observe()
        if state.last_turn:  # posttrain's cap ends the episode; the game had not finished
            info = {"won": False, "reason": f"stopped after max_turns={state.max_turns} model messages",
                    "invalid_move": False,
                    "components": {"textarena_reward": self.unfinished_reward, "correct": 0.0}}
            return StepResult(None, self.unfinished_reward, True, info)
        return StepResult(observation, 0.0, False, {"feedback": observation, **step_info})


class TextArenaTask:
    """A ``TaskSource`` of seeded games: problem i of a split is the game started with seed
    ``2 * i + offset`` (train: even offsets from ``seed``, test: odd), so the two splits never
    share a game; its prompt is the game's opening observation (what the model first sees)."""

    def __init__(self, env_id: str = "GuessTheNumber-v0", env_kwargs: Optional[dict[str, Any]] = None,
                 train_size: int = 1000, test_size: int = 100, seed: int = 0):
        if train_size < 1 or test_size < 1:
            raise ValueError(f"textarena task needs train_size and test_size >= 1, got {train_size}, {test_size}")
        self.env_id, self.env_kwargs = str(env_id), dict(env_kwargs or {})
        _probe(self.env_id, self.env_kwargs)
        self.sizes, self.seed = {"train": int(train_size), "test": int(test_size)}, int(seed)
        self.name = f"textarena({self.env_id})"
        self._cache: dict[str, list[Problem]] = {}

    def problems(self, split: str) -> list[Problem]:
        check_split(split)
        if split not in self._cache:
            offset = 0 if split == "train" else 1
            out = []
            for i in range(self.sizes[split]):
                game_seed = 2 * (self.seed * 1_000_003 + i) + offset
                prompt = _Game(self.env_id, self.env_kwargs, game_seed).observe()
                out.append(Problem(id=f"textarena-{self.env_id}-{split}-{game_seed}", prompt=prompt,
                                   source="textarena", category=self.env_id,
                                   metadata={"textarena_seed": game_seed, "textarena_env_id": self.env_id}))
            self._cache[split] = out
        return self._cache[split]


register_environment("textarena")(TextArenaEnvironment)


@register_task("textarena")
def _textarena_task(params: dict[str, Any]) -> TextArenaTask:
    allowed = ["env_id", "env_kwargs", "train_size", "test_size", "seed"]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"task 'textarena' has no option(s) {unknown}; allowed: {allowed}")
    return TextArenaTask(**params)

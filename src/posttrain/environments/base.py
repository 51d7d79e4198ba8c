"""The environment contract: an episode is a conversation between the policy and an environment.

    state  = env.reset(problem)              # EpisodeState: the first messages, turn 0
    result = env.step(state, model_message)  # StepResult(observation, reward, done, info)

Who does what:

* The environment sees and returns text only. ``reset`` gives the conversation's first
  messages (chat messages ``{"role", "content"}``, e.g. a system prompt describing tools, then
  the problem's prompt). ``step`` is called once per model message, with the message's text,
  after the runner has appended it to ``state.messages`` as an ``assistant`` message and
  counted it in ``state.turn``. It returns the step's reward, whether the episode is over, an
  ``info`` dict (logged per turn), and, when the episode goes on, the observation: the text of
  the next message, which the runner appends with the role ``env.observation_role``
  (``"user"`` by default; tool environments answer as ``"tool"`` when the chat template renders
  that role). An environment never tokenises and never sees token ids.
* The runner (``environments.episodes.run_episodes``) renders and tokenises. Each model turn is
  sampled by the rollout engine's ordinary ``generate`` on the conversation so far, rendered
  with the tokenizer's chat template and its generation prompt (``rollout.sampler.render_prompt``,
  the same rendering every engine uses). The environment's tokens between two model turns are
  the difference of two renderings: the conversation up to and including the observation (with
  the generation prompt) minus everything already in the sequence. They hold the template's end
  of the model's turn that the model did not sample (e.g. the newline after the end-of-turn
  token), the observation message, and the next generation prompt.
* What is masked. In the ``Rollouts`` row of an episode, the prompt is the rendering of
  ``reset``'s messages and the completion is the whole continuation: model turn 1, environment
  tokens, model turn 2, ... ``completion_mask`` is 1 on every real token of the continuation
  (model and environment: the learner attends to both and counts positions over both);
  ``action_mask`` is 1 on model tokens only, so environment tokens get no loss;
  ``behaviour_logprobs`` (and ``entropies``) hold the sampled log-probs on model tokens and 0 on
  environment tokens.
* Rewards. The episode's reward (``Rollouts.rewards``) is the sum of its steps' rewards: an
  outcome-rewarded environment returns 0 until its last step. Per-step rewards and infos stay
  in the row's ``metadata`` (``step_rewards``, ``turn_info``), so a per-turn estimator can use
  them. ``info["components"]`` (name -> float) is summed per episode into
  ``Rollouts.reward_components``; the last step's other ``info`` keys are also copied to the top
  level of the row's metadata, where single-turn rewards put theirs (e.g. a parsed answer).
* Caps. ``max_turns`` bounds the model messages of an episode, ``max_tokens`` the tokens of its
  continuation (model and environment tokens together; ``None``: only the sampling budget and
  the model's context bound it). Each model turn samples at most the engine's
  ``max_new_tokens``, less when the token cap is near. ``step`` runs after every model message,
  including the last one allowed: ``state.turn >= state.max_turns`` tells the environment it is
  the last, and an environment that scores at the end should do so then. If a cap stops an
  episode that the environment did not end, its reward is what its steps returned.
* ``step_many(states, messages)`` steps several episodes at once (the runner calls it once per
  turn for all live episodes); the default calls ``step`` for each. Group-aware rewards
  (``SingleTurn``) and environments that run tools concurrently override it.
* ``bind_tokenizer(tokenizer)`` is called once by the runner before the first ``reset``, for an
  environment whose messages depend on what the chat template can render; the default does
  nothing.
* ``finish(states, step_rewards, infos)`` is called once by the runner after every episode of
  the batch has ended, before the batch is built, with each episode's per-step reward and info
  lists, which it may change in place: a term that needs every episode of a problem (OTC-GRPO's
  fewest tool calls among the correct ones, ``tool_math``) goes there. The default does nothing.

A single-turn task is the one-step case: ``SingleTurn(reward)`` scores the first model message
with the task's ``Reward`` (group by group, so group-aware rewards such as majority vote keep
working) and ends the episode, so its ``Rollouts`` equal the engine's single-turn ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from posttrain.rewards.base import Reward
from posttrain.rewards.errors import score_group
from posttrain.tasks.base import Problem

__all__ = ["EpisodeState", "Environment", "SingleTurn", "StepResult", "prompt_messages"]


@dataclass
class StepResult:
    observation: Optional[str] = None  # text of the next message; None when done
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class EpisodeState:
    problem: Problem
    messages: list[dict[str, str]]  # the conversation so far: reset's messages, then the turns
    turn: int = 0  # model messages so far (the current one included while ``step`` runs)
    max_turns: int = 1  # set by the runner from ``Environment.max_turns``
    group: int = 0  # index of the problem in the batch; the episodes of one problem share it
    data: dict[str, Any] = field(default_factory=dict)  # the environment's own per-episode state

    @property
    def last_turn(self) -> bool:
        return self.turn >= self.max_turns


def prompt_messages(prompt: Any) -> list[dict[str, str]]:
    """A problem's prompt as chat messages (plain text is one user message)."""
    if isinstance(prompt, list):
        return [dict(m) for m in prompt]
    return [{"role": "user", "content": str(prompt)}]


class Environment:
    """Base class; subclasses implement ``step`` and usually ``reset`` (see the module docstring)."""

    name: str = "environment"
    max_turns: int = 1
    max_tokens: Optional[int] = None
    observation_role: str = "user"

    def bind_tokenizer(self, tokenizer) -> None:
        """Called once by the runner before any ``reset``; the default ignores it."""

    def reset(self, problem: Problem) -> EpisodeState:
        """The first messages of an episode: by default the problem's prompt."""
        return EpisodeState(problem=problem, messages=prompt_messages(problem.prompt))

    def step(self, state: EpisodeState, message: str) -> StepResult:
        raise NotImplementedError

    def step_many(self, states: Sequence[EpisodeState], messages: Sequence[str]) -> list[StepResult]:
        return [self.step(s, m) for s, m in zip(states, messages)]

    def finish(self, states: Sequence[EpisodeState], step_rewards: list[list[float]],
               infos: list[list[dict[str, Any]]]) -> None:
        """Called once per batch after every episode ended; may rewrite the lists in place. Default: nothing."""


class SingleTurn(Environment):
    """One model message scored by ``reward`` (a ``posttrain.rewards`` Reward), then done.

    ``on_error`` is the reward error policy of ``rewards.errors.score_group``; the step's info
    carries the reward's info for the completion, its components (``reward_error`` included)
    and, on the first episode of a failing group, ``reward_errors`` (the error records).
    """

    def __init__(self, reward: Reward, on_error: str = "zero"):
        self.reward = reward
        self.on_error = on_error
        self.name = f"single_turn({getattr(reward, 'name', type(reward).__name__)})"

    def step(self, state: EpisodeState, message: str) -> StepResult:
        return self.step_many([state], [message])[0]

    def step_many(self, states: Sequence[EpisodeState], messages: Sequence[str]) -> list[StepResult]:
        results: list[Optional[StepResult]] = [None] * len(states)
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(states):
            groups.setdefault(s.group, []).append(i)
        for idx in groups.values():
            problem = states[idx[0]].problem
            out, errors = score_group(self.reward, problem, [messages[i] for i in idx], on_error=self.on_error)
            for j, i in enumerate(idx):
                info = dict(out.info[j])
                info["components"] = {name: float(values[j]) for name, values in out.components.items()}
                if errors and j == 0:
                    info["reward_errors"] = errors
                results[i] = StepResult(observation=None, reward=float(out.rewards[j]), done=True, info=info)
        return results  # type: ignore[return-value]

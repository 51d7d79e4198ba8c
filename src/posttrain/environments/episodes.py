"""Run a batch of episodes with a rollout engine; the result is a ``Rollouts``, the pipeline's one batch type.

    rollouts = run_episodes(engine, env, problems, n, params, generator)

One row per episode (``n`` per problem, group id = index of the problem). The row's prompt is
the rendering of ``env.reset``'s messages; its completion is the whole continuation after it:

    model turn 1 | environment tokens | model turn 2 | environment tokens | ... | model turn K

Every model turn is one call of the engine's ordinary ``generate`` on the conversation so far
(problems whose prompt is the list of messages; the first turn of all ``n`` episodes of a
problem shares one prompt prefill when their first messages agree). The environment tokens are
the difference of renderings (see ``environments.base``): the chat template's rendering of the
conversation through the observation, with the generation prompt, minus the tokens already in
the row. When that rendering starts with exactly the row's tokens, the engine's next prompt is
the row itself and the behaviour log-probs of the next turn are exact. When it does not (the
model sampled a token sequence that its own text does not re-tokenise to: a BPE tokenizer can
sample a non-canonical split of a word), the environment tokens are taken from the difference of the rendered texts,
the row keeps the sampled tokens, and ``metadata["retokenized"]`` counts the turns where the
engine's context differed from the row (the learner's recomputed old log-probs are then the
exact ones; the behaviour log-probs of the next turn were sampled in a slightly different context).

Masks (the contract's): ``completion_mask`` 1 on every real continuation token, ``action_mask``
1 on model tokens only, ``behaviour_logprobs``/``entropies`` 0 on environment tokens.
``truncated``: the last model turn ended without EOS or stop string, or a cap ended an episode
the environment had not ended. The messages given to the environment and stored in the
conversation are the decoded model tokens without the turn's final EOS (special tokens sampled
inside a message and stop strings kept: the model wrote them and the next turn must see them);
``texts`` is the whole continuation decoded without special tokens, a readable transcript.

Per row ``metadata``: ``turns``, ``tool_calls``, ``tool_errors`` (counts of steps whose info has
a true ``tool_call`` / ``tool_error``), ``stop_reason`` (done | max_turns | max_tokens),
``step_rewards``, ``turn_info`` (each step's info), ``model_tokens``, ``env_tokens``,
``retokenized``, ``messages`` (the whole conversation), plus the last step's info keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

import torch

from posttrain.environments.base import Environment, EpisodeState
from posttrain.rollout.batch import Rollouts
from posttrain.rollout.sampler import SamplingParams, context_window, render_prompt
from posttrain.tasks.base import Problem

__all__ = ["between_turn_tokens", "episode_metrics", "run_episodes"]

STOP_REASONS = ("done", "max_turns", "max_tokens")


@dataclass
class _Episode:
    state: EpisodeState
    prompt: list[int]
    ids: list[int] = field(default_factory=list)
    model: list[float] = field(default_factory=list)  # 1 on model tokens, 0 on environment tokens
    logps: list[float] = field(default_factory=list)
    ents: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    infos: list[dict] = field(default_factory=list)
    stop_reason: Optional[str] = None
    cut: bool = False  # the last model turn ended without EOS or stop string
    retokenized: int = 0

    def add(self, ids: list[int], model: bool, logps=None, ents=None) -> None:
        self.ids += ids
        self.model += [1.0 if model else 0.0] * len(ids)
        self.logps += list(logps) if logps is not None else [0.0] * len(ids)
        self.ents += list(ents) if ents is not None else [0.0] * len(ids)


def _context(engine) -> int:
    if hasattr(engine, "max_model_len"):  # vLLM
        return min(context_window(engine.config), int(engine.max_model_len))
    model = getattr(engine, "model", None)
    return context_window(model.config) if model is not None else 2**31


def _eos_ids(engine, tokenizer) -> set[int]:
    ids = set(getattr(engine, "eos_ids", ()) or ())
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _render_text(tokenizer, messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def between_turn_tokens(tokenizer, messages: list[dict], row: list[int], eos_text: Optional[str]) -> tuple[list[int], bool]:
    """Environment tokens after a model turn: ``(ids, exact)``.

    ``messages`` ends with the model's message and the observation; ``row`` is the prompt plus
    the continuation so far (ending with the model's sampled tokens); ``eos_text`` is the text
    of the EOS token the model ended its turn with (None when it did not). ``exact``: the
    template's rendering of ``messages`` starts with ``row`` token for token, so the next
    turn's prompt is the row itself.
    """
    full = render_prompt(tokenizer, messages, True)
    if full[: len(row)] == row:
        return full[len(row):], True
    before = _render_text(tokenizer, messages[:-2], True)  # what the model answered
    closed = _render_text(tokenizer, messages[:-1], False)  # through the model's message
    after = _render_text(tokenizer, messages, True)  # through the observation, with the generation prompt
    content = messages[-2]["content"]
    if not (closed.startswith(before + content) and after.startswith(closed)):
        raise ValueError(
            "the chat template is not prefix-stable: rendering a conversation with one more message changes "
            "how the earlier messages render (e.g. a template that drops reasoning from earlier turns or trims "
            "messages), so the environment's tokens cannot be inserted between turns")
    closing = closed[len(before) + len(content):]  # the template's end of the model's turn
    if eos_text and closing.startswith(eos_text):
        closing = closing[len(eos_text):]  # the model sampled it
    return tokenizer(closing + after[len(closed):], add_special_tokens=False).input_ids, False


def _first_turn_shared(episodes: list[_Episode], n: int) -> bool:
    """True when the ``n`` episodes of every problem start from the same messages."""
    if n <= 1:
        return False
    return all(episodes[i].state.messages == episodes[i - i % n].state.messages for i in range(len(episodes)))


def _check_step(env: Environment, ep: _Episode, res) -> None:
    if not res.done and res.observation is None and ep.state.turn < ep.state.max_turns:
        raise ValueError(f"environment {env.name!r} returned neither done nor an observation for problem "
                         f"{ep.state.problem.id!r} at turn {ep.state.turn}")


def run_episodes(engine, env: Environment, problems: Sequence[Problem], n: int, params: SamplingParams,
                 generator: Optional[torch.Generator] = None) -> Rollouts:
    """``n`` episodes of ``env`` per problem, sampled with ``engine`` (hf or vllm); see the module docstring.

    ``params.max_new_tokens`` bounds each model turn; ``env.max_turns`` and ``env.max_tokens``
    bound each episode. The engine's ``last_stats`` is set to the sums over all turns.
    """
    if not problems or n < 1:
        raise ValueError(f"run_episodes needs at least one problem and n >= 1, got {len(problems)} problems, n={n}")
    tok = engine.tokenizer
    chat = bool(getattr(engine, "chat_template", True)) and bool(getattr(tok, "chat_template", None))
    if env.max_turns < 1:
        raise ValueError(f"environment {env.name!r}: max_turns must be >= 1, got {env.max_turns}")
    if env.max_turns > 1 and not chat:
        raise ValueError(f"environment {env.name!r} has {env.max_turns} turns: multi-turn episodes need the "
                         "tokenizer's chat template (rollout.chat_template true and a tokenizer that has one)")
    env.bind_tokenizer(tok)
    eos, context = _eos_ids(engine, tok), _context(engine)
    episodes: list[_Episode] = []
    for g, problem in enumerate(problems):
        for _ in range(n):
            state = env.reset(problem)
            state.group, state.max_turns = g, env.max_turns
            episodes.append(_Episode(state, render_prompt(tok, state.messages, chat)))
    stats = {"gen_wall_s": 0.0, "gen_tokens": 0.0, "generate_calls": 0.0}
    live = list(episodes)
    first = True
    while live:
        budgets = []
        for ep in live:
            room = context - len(ep.prompt) - len(ep.ids)
            cap = env.max_tokens - len(ep.ids) if env.max_tokens is not None else room
            budgets.append(max(1, min(params.max_new_tokens, cap, room)))
        call = min(max(budgets), min(context - len(ep.prompt) - len(ep.ids) for ep in live))
        turn_params = replace(params, max_new_tokens=max(1, call))
        if first and _first_turn_shared(live, n):
            heads = [replace(ep.state.problem, prompt=list(ep.state.messages)) for ep in live[::n]]
            out = engine.generate(heads, n, turn_params, generator)
        else:
            asks = [replace(ep.state.problem, prompt=list(ep.state.messages)) for ep in live]
            out = engine.generate(asks, 1, turn_params, generator)
        first = False
        for k in ("gen_wall_s", "gen_tokens"):
            stats[k] += float(getattr(engine, "last_stats", {}).get(k, 0.0))
        stats["generate_calls"] += 1
        lengths = out.completion_mask.sum(-1).long().tolist()
        messages, eos_texts = [], []
        for r, (ep, budget) in enumerate(zip(live, budgets)):
            L = min(lengths[r], budget)
            ids = out.completion_ids[r, :L].tolist()
            ended = not bool(out.truncated[r]) and L == lengths[r]
            ends_eos = ended and bool(ids) and ids[-1] in eos
            ents = out.entropies[r, :L].tolist() if out.entropies is not None else None
            ep.add(ids, True, out.behaviour_logprobs[r, :L].tolist(), ents)
            ep.cut = not ended
            # Special tokens stay in the text (a trailing EOS is the template's end of turn), so the
            # next turn's rendering re-tokenises to the sampled tokens.
            text = tok.decode(ids[:-1] if ends_eos else ids, skip_special_tokens=False)
            ep.state.turn += 1
            ep.state.messages.append({"role": "assistant", "content": text})
            messages.append(text)
            eos_texts.append(tok.decode(ids[-1:]) if ends_eos else None)
        results = env.step_many([ep.state for ep in live], messages)
        still = []
        for ep, res, eos_text in zip(live, results, eos_texts):
            _check_step(env, ep, res)
            ep.rewards.append(float(res.reward))
            ep.infos.append(dict(res.info))
            if res.done:
                ep.stop_reason = "done"
                continue
            if ep.state.turn >= ep.state.max_turns:
                ep.stop_reason = "max_turns"
                continue
            ep.state.messages.append({"role": env.observation_role, "content": str(res.observation)})
            between, exact = between_turn_tokens(tok, ep.state.messages, ep.prompt + ep.ids, eos_text)
            over_cap = env.max_tokens is not None and len(ep.ids) + len(between) >= env.max_tokens
            if over_cap or len(ep.prompt) + len(ep.ids) + len(between) >= context:
                ep.state.messages.pop()  # the observation never reached the model
                ep.stop_reason = "max_tokens"
                continue
            ep.retokenized += 0 if exact else 1
            ep.add(between, False)
            still.append(ep)
        live = still
    # group-level terms (e.g. OTC-GRPO's) need every episode of the batch ended: Environment.finish
    env.finish([ep.state for ep in episodes], [ep.rewards for ep in episodes], [ep.infos for ep in episodes])
    stats["gen_tok_per_s"] = stats["gen_tokens"] / max(stats["gen_wall_s"], 1e-9)
    if hasattr(engine, "last_stats"):
        engine.last_stats = stats
    return _to_rollouts(episodes, n, tok, getattr(engine, "policy_version", 0), entropies=out.entropies is not None)


def _metadata(ep: _Episode) -> dict[str, Any]:
    last = ep.infos[-1] if ep.infos else {}
    meta = {k: v for k, v in last.items() if k not in ("components", "reward_errors")}
    errors = [e for info in ep.infos for e in info.get("reward_errors", [])]
    if errors:
        meta["reward_errors"] = errors
    model_tokens = int(sum(ep.model))
    meta.update(
        turns=ep.state.turn,
        tool_calls=sum(1 for i in ep.infos if i.get("tool_call")),
        tool_errors=sum(1 for i in ep.infos if i.get("tool_error")),
        stop_reason=ep.stop_reason,
        step_rewards=list(ep.rewards),
        turn_info=[{k: v for k, v in i.items() if k != "reward_errors"} for i in ep.infos],
        model_tokens=model_tokens,
        env_tokens=len(ep.ids) - model_tokens,
        retokenized=ep.retokenized,
        messages=ep.state.messages,
    )
    return meta


def _to_rollouts(episodes: list[_Episode], n: int, tok, version: int, entropies: bool) -> Rollouts:
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    N = len(episodes)
    P = max(len(ep.prompt) for ep in episodes)
    T = max(1, max(len(ep.ids) for ep in episodes))
    prompt_ids = torch.full((N, P), pad, dtype=torch.long)
    prompt_mask = torch.zeros((N, P), dtype=torch.long)
    completion_ids = torch.full((N, T), pad, dtype=torch.long)
    completion_mask, action_mask = torch.zeros((N, T)), torch.zeros((N, T))
    logps, ents = torch.zeros((N, T)), torch.zeros((N, T))
    components: dict[str, torch.Tensor] = {}
    for i, ep in enumerate(episodes):
        p, t = len(ep.prompt), len(ep.ids)
        prompt_ids[i, P - p:], prompt_mask[i, P - p:] = torch.tensor(ep.prompt), 1
        if t:
            completion_ids[i, :t], completion_mask[i, :t] = torch.tensor(ep.ids), 1.0
            action_mask[i, :t] = torch.tensor(ep.model)
            logps[i, :t], ents[i, :t] = torch.tensor(ep.logps), torch.tensor(ep.ents)
        for info in ep.infos:
            for name, value in info.get("components", {}).items():
                components.setdefault(name, torch.zeros(N))[i] += float(value)
    return Rollouts(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        group_ids=torch.arange(N) // max(n, 1),
        behaviour_logprobs=logps,
        entropies=ents if entropies else None,
        truncated=torch.tensor([ep.cut or ep.stop_reason != "done" for ep in episodes], dtype=torch.bool),
        texts=[tok.decode(ep.ids, skip_special_tokens=True) for ep in episodes],
        problems=[ep.state.problem for ep in episodes],
        rewards=torch.tensor([sum(ep.rewards) for ep in episodes], dtype=torch.float32),
        reward_components=components,
        action_mask=action_mask,
        metadata=[_metadata(ep) for ep in episodes],
        policy_version=torch.full((N,), int(version), dtype=torch.long),
    )


def episode_metrics(rollouts: Rollouts) -> dict[str, float]:
    """Per-batch means of what ``run_episodes`` records: turns, tool calls (per episode, and the
    fraction of episodes with at least one) and error rate, token split."""
    return metadata_metrics(rollouts.metadata)


def metadata_metrics(meta: Sequence[dict]) -> dict[str, float]:
    """``episode_metrics`` of episodes' metadata dicts (those of several batches together)."""
    n = max(len(meta), 1)
    calls = sum(m.get("tool_calls", 0) for m in meta)
    env_tokens = sum(m.get("env_tokens", 0) for m in meta)
    all_tokens = env_tokens + sum(m.get("model_tokens", 0) for m in meta)
    out = {
        "env/turns_mean": sum(m.get("turns", 0) for m in meta) / n,
        "env/tool_calls_per_episode": calls / n,
        "env/tool_use_frac": sum(1 for m in meta if m.get("tool_calls", 0) > 0) / n,  # episodes calling a tool
        "env/tool_error_rate": sum(m.get("tool_errors", 0) for m in meta) / max(calls, 1),
        "env/env_token_frac": env_tokens / max(all_tokens, 1),
        "env/retokenized_frac": sum(1 for m in meta if m.get("retokenized")) / n,
    }
    for reason in STOP_REASONS:
        out[f"env/stop_{reason}_frac"] = sum(1 for m in meta if m.get("stop_reason") == reason) / n
    return out

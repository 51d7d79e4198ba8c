"""A rollout engine that 'samples' scripted replies: the layout tests' stand-in for a model.

It follows the Sampler contract (``generate(problems, n, params, generator) -> Rollouts``) and
records the token ids of every prompt it was asked to continue, rendered exactly as the real
engines render them (``rollout.sampler.render_prompt``).
"""

import torch

from posttrain.rollout.batch import Rollouts
from posttrain.rollout.sampler import render_prompt


class ScriptedEngine:
    """``script(row, turn) -> (token ids, ended)``: ``ended`` False means cut at the budget (no EOS)."""

    chat_template = True
    policy_version = 3

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script = tokenizer, script
        self.eos_ids = {tokenizer.eos_token_id}
        self.prompts: list[list[list[int]]] = []  # per generate call, the prompt ids of each row
        self.last_stats = {}
        self.rows_seen = 0

    def generate(self, problems, n, params, generator=None, share_prefill=True):
        turn = len(self.prompts)
        prompts = [render_prompt(self.tokenizer, p.prompt, True) for p in problems for _ in range(n)]
        self.prompts.append(prompts)
        outs = [self.script(row, turn) for row in range(len(prompts))]
        N, T = len(prompts), max(len(ids) for ids, _ in outs)
        ids = torch.zeros((N, T), dtype=torch.long)
        mask, logps = torch.zeros((N, T)), torch.zeros((N, T))
        for i, (toks, _) in enumerate(outs):
            ids[i, :len(toks)], mask[i, :len(toks)] = torch.tensor(toks), 1.0
            logps[i, :len(toks)] = -0.25 - 0.01 * torch.arange(len(toks))  # recognisable, never 0
        P = max(len(p) for p in prompts)
        self.last_stats = {"gen_wall_s": 0.5, "gen_tokens": float(mask.sum())}
        return Rollouts(
            prompt_ids=torch.zeros((N, P), dtype=torch.long), prompt_mask=torch.ones((N, P), dtype=torch.long),
            completion_ids=ids, completion_mask=mask, group_ids=torch.arange(len(problems)).repeat_interleave(n),
            behaviour_logprobs=logps, entropies=mask * 0.5,
            truncated=torch.tensor([not ended for _, ended in outs]), texts=[""] * N,
            problems=[p for p in problems for _ in range(n)])

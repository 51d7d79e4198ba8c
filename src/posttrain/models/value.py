"""The critic for PPO with GAE: a copy of the policy's decoder with a scalar value head.

V(s_t) is read from the hidden state that predicts completion token t (the state before the
token is generated), so values line up with log-probs and advantages position by position.
The head starts at zero, so the first advantages are plain discounted returns.
"""

from __future__ import annotations

import copy

import torch

from posttrain.models.logprobs import _hidden_states


class ValueModel(torch.nn.Module):
    def __init__(self, policy):
        super().__init__()
        self.decoder = copy.deepcopy(policy.get_decoder())
        hidden = policy.get_input_embeddings().weight.shape[1]
        self.head = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def get_decoder(self):
        return self.decoder

    def forward(self, prompt_ids, prompt_mask, completion_ids, completion_mask, share_prompts: bool = True,
                attention: str = "auto", decoder_mode: str = "auto"):
        """Values [n, T] (0 on padding)."""
        device = self.head.weight.device
        hidden = _hidden_states(self, prompt_ids.to(device), prompt_mask.to(device), completion_ids.to(device),
                                completion_mask.to(device), share_prompts, attention, decoder_mode=decoder_mode)
        return self.head(hidden).squeeze(-1).float() * completion_mask.to(device)

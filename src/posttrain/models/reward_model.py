"""The Bradley–Terry reward model: network, on-disk format, save and load.

``RewardModel`` is a causal LM backbone (``lm.base_model``) plus a scalar head
``Linear(H, 1)`` read at the *last non-pad token* of the sequence (found from the attention
mask, so tokenizers whose pad token equals eos, like SmolLM2's, are handled). It is trained on
preference pairs with the Bradley–Terry loss (Bradley & Terry 1952; Ouyang et al. 2022
"InstructGPT", arXiv:2203.02155) by ``posttrain rm`` (the ``trainers/reward_model.py`` training
loop, a higher layer that imports this module) and scored by
``posttrain.rewards.learned.RewardModelReward``.

On-disk layout written by ``save_reward_model`` (atomically: a temporary sibling directory,
``COMPLETE`` written last, then renamed into place)::

    DIR/                    backbone (save_pretrained, safetensors) + tokenizer
    DIR/value_head.safetensors   head weights ("weight" [1, H], "bias" [1])
    DIR/reward_model.json        head config (``META_FILE``): hidden size, format version, plus
                                 the caller's meta (chat_template, max_length, reward mean/std, ...)
    DIR/COMPLETE

``resolve_reward_model_dir`` accepts that directory or an RM run directory holding it as
``model/``; ``load_reward_model`` returns ``(reward_model, tokenizer, meta)`` in eval mode.

Prompt rendering (``encode_text_pair``) is not here: it follows the rollout engine's
``render_prompt`` and lives in ``posttrain.rewards.learned``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

__all__ = [
    "FORMAT_VERSION",
    "HEAD_FILE",
    "META_FILE",
    "RewardModel",
    "save_reward_model",
    "load_reward_model",
    "resolve_reward_model_dir",
]

FORMAT_VERSION = 1
HEAD_FILE = "value_head.safetensors"
META_FILE = "reward_model.json"


# ------------------------------------------------------------------ model
def _hidden_size(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.hidden_size)


class RewardModel(torch.nn.Module):
    """``lm`` (a causal LM; only its ``base_model`` runs) + ``value_head`` = Linear(H, 1)."""

    def __init__(self, lm, head: Optional[torch.nn.Linear] = None, seed: int = 0):
        super().__init__()
        self.lm = lm
        hidden = _hidden_size(lm.config)
        if head is None:
            head = torch.nn.Linear(hidden, 1)
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                # std 1/sqrt(H+1), as OpenAI's lm-human-preferences initialises its reward head
                head.weight.copy_(torch.randn(1, hidden, generator=gen) / math.sqrt(hidden + 1))
                head.bias.zero_()
            head = head.to(next(lm.parameters()).device)
        self.value_head = head

    def forward(self, input_ids, attention_mask):
        out = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (positions[None, :] * attention_mask.long()).argmax(-1)  # last position with mask 1
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1)

    @torch.no_grad()
    def score_ids(self, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int = 8) -> list[float]:
        """Scores of token-id sequences, batched, right-padded."""
        device = self.value_head.weight.device
        out: list[float] = []
        for s in range(0, len(sequences), batch_size):
            ids, mask = _pad(sequences[s:s + batch_size], pad_id)
            out += self(ids.to(device), mask.to(device)).float().cpu().tolist()
        return out


def _pad(sequences: Sequence[Sequence[int]], pad_id: int):
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


# ------------------------------------------------------------------ save / load
def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_reward_model(rm, tokenizer, path: str | Path, meta: Optional[dict] = None) -> Path:
    """Write backbone + tokenizer + head + ``reward_model.json`` to ``path`` atomically
    (a temporary sibling directory, ``COMPLETE`` written last, then renamed into place)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        rm.lm.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        head = rm.value_head
        save_file({"weight": head.weight.detach().float().cpu().contiguous(),
                   "bias": head.bias.detach().float().cpu().contiguous()}, str(tmp / HEAD_FILE))
        info = {"format_version": FORMAT_VERSION, "hidden_size": int(head.in_features), "head_file": HEAD_FILE,
                "pooling": "last_non_pad_token", **(meta or {})}
        (tmp / META_FILE).write_text(json.dumps(info, indent=2, default=float) + "\n")
        _fsync_tree(tmp)
        (tmp / "COMPLETE").write_text(json.dumps({"time": time.time()}) + "\n")
        _fsync_tree(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def resolve_reward_model_dir(path: str | Path) -> Path:
    """``path`` itself when it holds ``reward_model.json``, else ``path/model`` (an RM run
    directory); raises ``ValueError`` naming what is missing."""
    p = Path(path).expanduser()
    for cand in (p, p / "model"):
        if (cand / META_FILE).is_file():
            if not (cand / "COMPLETE").exists():
                raise ValueError(f"reward model {cand} is incomplete (no COMPLETE marker): it was not fully written")
            return cand
    if not p.exists():
        raise ValueError(f"reward model path {p} does not exist")
    raise ValueError(f"{p} is not a reward model: no {META_FILE} in it or in {p / 'model'} "
                     "(train one with `posttrain rm CONFIG`)")


def load_reward_model(path: str | Path, device: str = "cpu"):
    """Return ``(reward_model, tokenizer, meta)`` in eval mode."""
    from safetensors.torch import load_file

    from posttrain.models.loading import load_model_and_tokenizer

    d = resolve_reward_model_dir(path)
    meta = json.loads((d / META_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{d / META_FILE}: unsupported format_version {meta.get('format_version')!r}")
    lm, tokenizer = load_model_and_tokenizer(str(d))
    state = load_file(str(d / meta.get("head_file", HEAD_FILE)))
    hidden = int(meta["hidden_size"])
    if tuple(state["weight"].shape) != (1, hidden) or _hidden_size(lm.config) != hidden:
        raise ValueError(f"{d}: value head of shape {tuple(state['weight'].shape)} does not fit a backbone "
                         f"of hidden size {_hidden_size(lm.config)}")
    head = torch.nn.Linear(hidden, 1)
    head.load_state_dict(state)
    rm = RewardModel(lm, head).to(device).eval()
    return rm, tokenizer, meta

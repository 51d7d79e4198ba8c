"""Non-finite losses: an absurd learning rate blows the weights up after the first step, so
every later loss is NaN. Those steps are skipped (no optimizer step) and logged with
``nonfinite_skipped``; after ``trainer.max_nonfinite_steps`` in a row the run stops with
``NonFiniteLossError`` naming the last good checkpoint, which loads with transformers.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import load_config
from posttrain.trainers.rl import NonFiniteLossError
from posttrain.trainers.rl_run import train_rl

K = 3
OVERRIDES = [
    "model.name=tiny-random",
    "reward={type: format, pattern: '[0-9]', match: search}",  # some reward: non-zero gradients
    "rollout.num_prompts=2",
    "rollout.num_completions=8",
    "rollout.max_new_tokens=8",
    "trainer.lr=1e30",
    "trainer.steps=10",
    "trainer.micro_batch_size=16",
    "trainer.checkpoint_every=1",
    "trainer.keep_checkpoints=10",
    "trainer.eval_problems=4",
    f"trainer.max_nonfinite_steps={K}",
    "trainer.seed=1",
]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_nonfinite_steps_are_skipped_logged_and_stop_the_run(tmp_path, record):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as info:
        train_rl(load_config(None, OVERRIDES), output_dir=str(run), quiet=True)
    message = str(info.value)
    rows = _rows(run / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    skipped = [r["step"] for r in rows if r.get("nonfinite_skipped")]
    # step 1 is finite (and ruins the weights); K - 1 skipped steps are logged; the K-th raises
    assert steps == list(range(1, K + 1)), steps
    assert skipped == list(range(2, K + 1)), rows
    assert all(not math.isfinite(r["loss/total"]) or not math.isfinite(r["grad_norm"]) for r in rows[1:])
    assert f"{K} consecutive non-finite" in message and f"step {K + 1}" in message

    # The message names the last good checkpoint, as a path that exists and is complete.
    named = re.findall(r"last good checkpoint is (\S+?)(?:[;)]|$)", message)
    assert named, message
    last_good = Path(named[-1])
    assert last_good == run / "checkpoints" / f"step_{K}" and (last_good / "COMPLETE").exists(), message
    # Skipped steps did not touch the weights: every checkpoint after step 1 holds step 1's.
    w1 = load_file(run / "checkpoints" / "step_1" / "model.safetensors")
    wk = load_file(last_good / "model.safetensors")
    assert all(torch.equal(w1[k], wk[k]) for k in w1)
    assert all(torch.isfinite(t).all() for t in wk.values())

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(last_good)
    assert model.config.num_hidden_layers == 2
    record("non-finite", f"lr=1e30: steps {skipped} skipped and logged, stopped at step {K + 1} with "
                         f"NonFiniteLossError naming {last_good.name}, which loads with from_pretrained")


def test_nonfinite_before_any_checkpoint_says_so(tmp_path):
    overrides = [o for o in OVERRIDES if not o.startswith("trainer.checkpoint_every")]
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written yet"):
        train_rl(load_config(None, overrides), output_dir=str(tmp_path / "run"), quiet=True)

"""Bradley–Terry reward model training on preference pairs.

Model: a causal LM backbone (``lm.base_model``) plus a scalar head ``Linear(H, 1)`` read at
the *last non-pad token* of ``prompt + completion + eos`` (found from the attention mask, so
tokenizers whose pad token equals eos, like SmolLM2's, are handled).

Loss per pair (Bradley & Terry 1952; Ouyang et al. 2022 "InstructGPT", arXiv:2203.02155)::

    -log σ(r_chosen - r_rejected - m)  +  c · (r_chosen + r_rejected)²

* ``m``: margin. A per-pair ``margin`` field in the data wins over ``RMConfig.margin``
  (Touvron et al. 2023, "Llama 2", arXiv:2307.09288, §3.2.2; TRL's ``RewardTrainer`` reads the
  same per-example ``margin`` column).
* ``c``: ``RMConfig.center_rewards_coefficient``; the auxiliary term that keeps rewards centred
  at zero, as in Eisenstein et al. 2023, "Helping or Herding? Reward Model Ensembles Mitigate
  but do not Eliminate Reward Hacking" (arXiv:2312.09244), implemented like TRL's
  ``center_rewards_coefficient``: ``c * mean((r_c + r_r)**2)`` over the batch.

Data: preference pairs from a JSONL file or ``data: "synthetic:arithmetic"``
(``trainers.preference_data``), so ``examples/rm.yaml`` runs out of the box.

Sequences are rendered like the rollout engine renders prompts (``render_prompt``: the
tokenizer's chat template with the generation prompt), followed by the completion tokens and
eos; longer ones keep their last ``max_length`` tokens (the reward is read at the end).

Output directory::

    OUT/config.yaml         resolved RMConfig
    OUT/metrics.jsonl       one row per optimizer step, plus one per evaluation
    OUT/summary.json        accuracies, losses, reward statistics
    OUT/model/              backbone (save_pretrained, safetensors) + tokenizer
    OUT/model/value_head.safetensors   head weights ("weight" [1, H], "bias" [1])
    OUT/model/reward_model.json        head config: hidden size, chat_template, max_length,
                                       reward mean/std (for normalisation), base model
    OUT/model/COMPLETE      written last; the directory is renamed into place atomically

The model side (``RewardModel``, the on-disk format, ``save_reward_model``,
``load_reward_model``, ``resolve_reward_model_dir``) lives in ``posttrain.models.reward_model``
and ``encode_text_pair`` in ``posttrain.rewards.learned``; both are re-exported here. Load a
trained model with ``load_reward_model(OUT)`` or score with
``posttrain.rewards.learned.RewardModelReward(OUT)``.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from posttrain.config import ConfigError
from posttrain.models.reward_model import (  # noqa: F401  (re-exported: model side, importable from here too)
    FORMAT_VERSION,
    HEAD_FILE,
    META_FILE,
    RewardModel,
    _pad,
    load_reward_model,
    resolve_reward_model_dir,
    save_reward_model,
)
from posttrain.rewards.learned import encode_text_pair  # noqa: F401  (re-exported; rewards-level: it needs render_prompt)
from posttrain.trainers.preference_data import (  # re-exported: part of this module's API
    SYNTHETIC,
    PreferenceDataError,
    PreferencePair,
    load_preferences,
    synthetic_arithmetic_pairs,
)

__all__ = [
    "RMConfig",
    "PreferencePair",
    "PreferenceDataError",
    "RewardModel",
    "bradley_terry_loss",
    "pairwise_accuracy",
    "load_preferences",
    "synthetic_arithmetic_pairs",
    "encode_text_pair",
    "save_reward_model",
    "load_reward_model",
    "resolve_reward_model_dir",
    "train_reward_model",
]


# ------------------------------------------------------------------ config
@dataclass
class RMConfig:
    model: str = "tiny-random"  # directory, .gguf file, run directory, hub id or alias
    data: str = ""  # JSONL file of {prompt, chosen, rejected[, margin]}, or "synthetic:arithmetic"
    eval_fraction: float = 0.1  # held-out share of the pairs (0 disables evaluation)
    lr: float = 1e-5
    epochs: int = 1
    batch_size: int = 8  # pairs per optimizer step
    max_length: int = 512  # tokens per prompt+completion; longer ones keep their end
    seed: int = 0
    output_dir: Optional[str] = None  # default: a new folder under runs/
    margin: float = 0.0  # used for pairs without their own "margin"
    center_rewards_coefficient: float = 0.0  # 0 disables the centring term
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 0  # linear warm-up, then constant
    chat_template: bool = True  # render prompts with the tokenizer's chat template
    synthetic_size: int = 512  # pairs for data="synthetic:arithmetic"
    stats_pairs: int = 512  # training pairs scored after training for the reward mean/std
    threads: int = 0  # torch threads; 0 keeps torch's default

    def __post_init__(self) -> None:
        def check(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"{key} {msg}")

        check(bool(self.data), "data", "must name a JSONL preference file (prompt/chosen/rejected) "
              "or 'synthetic:arithmetic'")
        check(not self.data.startswith("synthetic:") or self.data in SYNTHETIC, "data",
              f"synthetic data must be one of {sorted(SYNTHETIC)}")
        check(0.0 <= self.eval_fraction < 1.0, "eval_fraction", "must be in [0, 1)")
        check(self.lr > 0, "lr", "must be > 0")
        check(self.epochs >= 1, "epochs", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.max_length >= 8, "max_length", "must be >= 8")
        check(self.center_rewards_coefficient >= 0, "center_rewards_coefficient", "must be >= 0")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(self.synthetic_size >= 2, "synthetic_size", "must be >= 2")
        check(self.stats_pairs >= 1, "stats_pairs", "must be >= 1")
        check(self.threads >= 0, "threads", "must be >= 0")


# ------------------------------------------------------------------ data

def _load_data(cfg: RMConfig) -> list[PreferencePair]:
    if cfg.data in SYNTHETIC:
        return SYNTHETIC[cfg.data](cfg.synthetic_size, cfg.seed)
    return load_preferences(cfg.data)


# ------------------------------------------------------------------ model and loss
def bradley_terry_loss(r_chosen, r_rejected, margin=None, center_coef: float = 0.0):
    """Mean over the batch of ``-log σ(r_c - r_r - margin)`` plus ``center_coef * mean((r_c + r_r)²)``.

    ``margin``: None, a float or a tensor shaped like the rewards.
    """
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -torch.nn.functional.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def pairwise_accuracy(r_chosen, r_rejected) -> float:
    """Share of pairs with ``r_c > r_r``; an exact tie counts one half."""
    r_c, r_r = torch.as_tensor(r_chosen, dtype=torch.float64), torch.as_tensor(r_rejected, dtype=torch.float64)
    if r_c.numel() == 0:
        return float("nan")
    return float(((r_c > r_r).double() + 0.5 * (r_c == r_r).double()).mean())


# ------------------------------------------------------------------ training
def _split(pairs: list[PreferencePair], fraction: float, seed: int):
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = 0 if fraction <= 0 or len(pairs) < 2 else min(len(pairs) - 1, max(1, round(fraction * len(pairs))))
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]


def _encode_all(pairs, tokenizer, cfg: RMConfig):
    rows, truncated = [], 0
    for p in pairs:
        c, tc = encode_text_pair(tokenizer, p.prompt, p.chosen, chat_template=cfg.chat_template, max_length=cfg.max_length)
        r, tr = encode_text_pair(tokenizer, p.prompt, p.rejected, chat_template=cfg.chat_template,
                                 max_length=cfg.max_length)
        truncated += int(tc) + int(tr)
        rows.append((c, r, cfg.margin if p.margin is None else p.margin))
    return rows, truncated


def _batch_rewards(rm, rows, pad_id: int, device):
    """One forward over chosen+rejected of ``rows``; returns (r_c, r_r, margins)."""
    seqs = [c for c, _, _ in rows] + [r for _, r, _ in rows]
    ids, mask = _pad(seqs, pad_id)
    rewards = rm(ids.to(device), mask.to(device)).float()
    n = len(rows)
    margins = torch.tensor([m for _, _, m in rows], dtype=torch.float32, device=rewards.device)
    return rewards[:n], rewards[n:], margins


def _evaluate(rm, rows, pad_id, device, cfg: RMConfig) -> dict:
    if not rows:
        return {"accuracy": float("nan"), "loss": float("nan"), "n_pairs": 0}
    was_training = rm.training
    rm.eval()
    rc, rr, losses = [], [], []
    with torch.no_grad():
        for s in range(0, len(rows), cfg.batch_size):
            chunk = rows[s:s + cfg.batch_size]
            c, r, m = _batch_rewards(rm, chunk, pad_id, device)
            losses.append(float(bradley_terry_loss(c, r, m, cfg.center_rewards_coefficient)) * len(chunk))
            rc += c.cpu().tolist()
            rr += r.cpu().tolist()
    rm.train(was_training)
    return {"accuracy": pairwise_accuracy(rc, rr), "loss": sum(losses) / len(rows), "n_pairs": len(rows),
            "reward_chosen": float(sum(rc) / len(rc)), "reward_rejected": float(sum(rr) / len(rr)),
            "scores": rc + rr}


def _progress(total: int, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold]RM[/]"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[info]}"), disable=not enabled, transient=False)
    return progress, progress.add_task("rm", total=total, info="")


def _prepare_dir(cfg: RMConfig, output_dir: Optional[str]) -> Path:
    from posttrain.runs import RunDirError, check_writable, new_run_dir

    path = Path(output_dir or cfg.output_dir or new_run_dir(name="rm"))
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise RunDirError(f"output directory {path} already exists and is not empty; choose another --output-dir")
    check_writable(path)
    return path


def train_reward_model(cfg: RMConfig, output_dir: Optional[str] = None, quiet: bool = False) -> dict:
    """Train per ``cfg``; returns the summary (also written to ``OUT/summary.json``).

    Cheap checks (data file, model source, output directory) run before any weights load.
    """
    from posttrain.config import dump_config
    from posttrain.models.loading import describe_source, load_model_and_tokenizer
    from posttrain.runs import RunDir

    pairs = _load_data(cfg)
    describe_source(cfg.model)
    path = _prepare_dir(cfg, output_dir)
    say = (lambda *a: None) if quiet else print
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        torch.manual_seed(cfg.seed)
        lm, tokenizer = load_model_and_tokenizer(cfg.model)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        rm = RewardModel(lm.to(device), seed=cfg.seed).to(device)
        train_pairs, eval_pairs = _split(pairs, cfg.eval_fraction, cfg.seed)
        train_rows, trunc_train = _encode_all(train_pairs, tokenizer, cfg)
        eval_rows, trunc_eval = _encode_all(eval_pairs, tokenizer, cfg)
    except BaseException:
        if created and path.exists():
            shutil.rmtree(path)
        raise
    tmp_config = path / f"config.yaml.tmp{os.getpid()}"
    dump_config(cfg, tmp_config)
    os.replace(tmp_config, path / "config.yaml")
    run = RunDir(path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    say(f"reward model: {cfg.model} | {len(train_rows)} train / {len(eval_rows)} eval pairs"
        f"{f' | {trunc_train + trunc_eval} sequences truncated to {cfg.max_length} tokens' if trunc_train + trunc_eval else ''}"
        f" | output {path}")

    optimizer = torch.optim.AdamW(rm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)
    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs

    before = _evaluate(rm, eval_rows, pad_id, device, cfg)
    before.pop("scores", None)
    run.append("metrics.jsonl", {"step": 0, "epoch": 0, **{f"eval/{k}": v for k, v in before.items()}})
    if eval_rows:
        say(f"eval pairwise accuracy before training: {before['accuracy']:.3f}")

    rng = random.Random(cfg.seed + 1)
    step, t0 = 0, time.perf_counter()
    epochs: list[dict] = []
    rm.train()
    progress, bar = _progress(total, enabled=not quiet and sys.stdout.isatty())
    with progress:
        for epoch in range(1, cfg.epochs + 1):
            order = list(range(len(train_rows)))
            rng.shuffle(order)
            ep_correct, ep_loss, ep_n = 0.0, 0.0, 0
            for s in range(0, len(order), cfg.batch_size):
                batch = [train_rows[i] for i in order[s:s + cfg.batch_size]]
                rc, rr, m = _batch_rewards(rm, batch, pad_id, device)
                loss = bradley_terry_loss(rc, rr, m, cfg.center_rewards_coefficient)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite reward-model loss at step {step + 1}; lower lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(rm.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                step += 1
                acc = pairwise_accuracy(rc.detach().cpu(), rr.detach().cpu())
                ep_correct += acc * len(batch)
                ep_loss += float(loss.detach()) * len(batch)
                ep_n += len(batch)
                row = {"step": step, "epoch": epoch, "train/loss": float(loss.detach()), "train/accuracy": acc,
                       "train/reward_chosen": float(rc.detach().mean()), "train/reward_rejected": float(rr.detach().mean()),
                       "train/margin": float((rc - rr).detach().mean()), "grad_norm": float(grad_norm),
                       "lr": scheduler.get_last_lr()[0], "time/wall_s": time.perf_counter() - t0}
                run.append("metrics.jsonl", row)
                progress.update(bar, completed=step,
                                info=f"epoch {epoch} loss {ep_loss / ep_n:.4f} acc {ep_correct / ep_n:.3f}")
            ev = _evaluate(rm, eval_rows, pad_id, device, cfg)
            ev.pop("scores", None)
            summary_ep = {"epoch": epoch, "train_accuracy": ep_correct / max(ep_n, 1),
                          "train_loss": ep_loss / max(ep_n, 1), "eval": ev}
            epochs.append(summary_ep)
            run.append("metrics.jsonl", {"step": step, "epoch": epoch, **{f"eval/{k}": v for k, v in ev.items()},
                                         "train/epoch_accuracy": summary_ep["train_accuracy"],
                                         "train/epoch_loss": summary_ep["train_loss"]})
            msg = (f"epoch {epoch}/{cfg.epochs}: train acc {summary_ep['train_accuracy']:.3f} "
                   f"loss {summary_ep['train_loss']:.4f}")
            if eval_rows:
                msg += f" | eval acc {ev['accuracy']:.3f} loss {ev['loss']:.4f}"
            if progress.live.is_started:
                progress.console.print(msg)
            else:
                say(msg)
    train_wall = time.perf_counter() - t0

    # Final-weight statistics on (up to stats_pairs) training pairs: accuracy and the score
    # mean/std that RewardModelReward(normalize=True) uses.
    stats = _evaluate(rm, train_rows[: cfg.stats_pairs], pad_id, device, cfg)
    scores = torch.tensor(stats.pop("scores"))
    reward_mean = float(scores.mean())
    reward_std = float(scores.std()) if scores.numel() > 1 else 1.0
    rm.eval()
    meta = {"base_model": cfg.model, "chat_template": cfg.chat_template, "max_length": cfg.max_length,
            "reward_mean": reward_mean, "reward_std": reward_std if reward_std > 0 else 1.0,
            "train_accuracy": stats["accuracy"], "eval_accuracy": epochs[-1]["eval"]["accuracy"]}
    model_dir = save_reward_model(rm, tokenizer, path / "model", meta)
    summary = {
        "model": cfg.model,
        "n_train_pairs": len(train_rows),
        "n_eval_pairs": len(eval_rows),
        "truncated_sequences": trunc_train + trunc_eval,
        "steps": step,
        "train_accuracy": stats["accuracy"],  # final weights, first stats_pairs training pairs
        "train_loss": stats["loss"],
        "train_accuracy_last_epoch": epochs[-1]["train_accuracy"],  # running, during the last epoch
        "eval_before": before,
        "eval_after": epochs[-1]["eval"],
        "epochs": epochs,
        "reward_mean": reward_mean,
        "reward_std": meta["reward_std"],
        "train_wall_s": train_wall,
        "output_dir": str(path),
        "model_dir": str(model_dir),
    }
    run.write_json("summary.json", summary)
    run.close()
    if not quiet:
        _print_summary(summary)
    return summary


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _print_summary(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="posttrain rm: summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("pairs (train / eval)", f"{s['n_train_pairs']} / {s['n_eval_pairs']}")
    table.add_row("train pairwise accuracy", _fmt(s["train_accuracy"]))
    table.add_row("eval pairwise accuracy before", _fmt(s["eval_before"]["accuracy"]))
    table.add_row("eval pairwise accuracy after", _fmt(s["eval_after"]["accuracy"]))
    table.add_row("eval loss after", _fmt(s["eval_after"]["loss"]))
    table.add_row("reward mean / std", f"{s['reward_mean']:.3f} / {s['reward_std']:.3f}")
    table.add_row("steps", str(s["steps"]))
    table.add_row("training wall-clock (s)", f"{s['train_wall_s']:.1f}")
    table.add_row("model directory", s["model_dir"])
    Console().print(table)

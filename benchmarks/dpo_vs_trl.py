"""posttrain's DPO vs TRL's DPOTrainer, on the same pairs and settings, in one invocation: step time
and peak RSS.

Same model (SmolLM2-135M-Instruct through posttrain's loader; TRL gets the model object, as
benchmarks/vs_trl.py hands it), same pairs (examples/dpo.yaml's synthetic arithmetic pairs, its
held-out 10% left out, written to one JSONL that both read; or ``--pairs FILE``), the same pairs in
the same order (posttrain's seeded epoch order, which a sampler replays in TRL over a dataset of the
pairs drawn, each once, so TRL's precompute scores each pair once as posttrain's cache does), the same tokens
(TRL gets each prompt rendered by the chat template as posttrain renders it, and appends EOS as
posttrain does; the TRL worker checks every pair's token ids against posttrain's encoding and
reports the count that differ), batch size 16 pairs, max length, sigmoid DPO loss with beta 0.1,
AdamW lr 1e-6 constant (no warm-up in either: it does not change the timing), betas (0.9, 0.99),
no weight decay, gradient clipping at 1.0, seed. Each system runs in its own subprocess (peak RSS
of the whole process by ``os.wait4``, loading included), both under the same allocator (tcmalloc
when installed: the ``posttrain`` command re-executes itself under it; the TRL worker is started
with it preloaded).

posttrain runs as its user runs it: ``posttrain dpo examples/dpo.yaml data.path=PAIRS ...`` with
``data.validation_fraction=0`` (the held-out pairs are already out of the file), one held-out task
problem (its evaluation before and after training is outside the step times) and no intermediate
checkpoint; its step time is metrics.jsonl's ``time/step_s`` (which includes handing the new
weights to its sampler, a cost ``posttrain dpo`` pays for the held-out task evaluation). By default
2 + 20 steps of 16 pairs draw 352 pairs from the example's 179: about two epochs, so half of
posttrain's measured steps run reference passes and half read the cache; the table gives both
medians.

TRL, configured as a competent user would on this CPU:

* ``gradient_checkpointing=False`` (DPOConfig's default is True; recomputation only saves memory,
  of which 135M parameters need little);
* weights loaded in bf16 (TRL then trains them in bf16, with ``bf16=True``): what posttrain
  computes in, but a cheaper and less precise update than posttrain's fp32 master weights, so
  the choice favours TRL. On a CPU without bf16 instructions (bf16 emulated, slower than fp32)
  posttrain's auto computes in fp32, and TRL keeps fp32 weights with ``bf16=False``;
* ``precompute_ref_log_probs=True``: the reference log-probs are computed once, before training,
  and TRL keeps no reference model (without it TRL would hold a second copy and run a reference
  forward every step). posttrain also computes each pair's reference log-probs once, but inside
  the step that first uses the pair, so its first-epoch steps carry a no-grad reference pass that
  TRL's steps do not; the table therefore also gives "reference + training", TRL's precompute time
  plus all steps against the sum of posttrain's steps;
* attention: both eager and sdpa are run, as two TRL rows, and the comparison is against the
  faster (vs_trl.py found eager faster for sampling at these lengths on CPU; a DPO step is a
  padded forward and backward, where it is not known in advance);
* ``torch_compile`` off: padded batch shapes change every step, and on CPU each new shape means a
  recompilation.

    pip install -e '.[bench]'                 # TRL is a benchmark-only extra
    python benchmarks/dpo_vs_trl.py           # 20 measured steps after 2 warm-up steps
    python benchmarks/dpo_vs_trl.py --smoke   # tiny random model, 2 + 1 steps, seconds

Writes OUT/dpo_vs_trl.json and .md (``--out-dir``, default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
CONFIG = ROOT / "examples" / "dpo.yaml"
TRL_ROWS = {"trl_eager": "eager", "trl_sdpa": "sdpa"}


def settings(args) -> dict:
    return {"model": args.model, "batch_size": args.batch_size, "max_length": args.max_length, "beta": args.beta,
            "lr": args.lr, "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
            "adam_betas": [0.9, 0.99], "weight_decay": 0.0, "max_grad_norm": 1.0, "loss": "sigmoid DPO"}


def posttrain_overrides(args, pairs: Path) -> list[str]:
    return [f"model.name={args.model}", f"data.path={pairs}", "data.validation_fraction=0",
            f"data.batch_size={args.batch_size}", f"data.max_length={args.max_length}", "preference.loss=dpo",
            f"preference.beta={args.beta}", "preference.use_margins=false", f"trainer.lr={args.lr}",
            "trainer.lr_schedule=constant", "trainer.warmup_steps=0", "trainer.adam_betas=[0.9, 0.99]",
            "trainer.weight_decay=0", "trainer.max_grad_norm=1.0", f"trainer.steps={args.steps + args.warmup}",
            f"trainer.seed={args.seed}", "trainer.eval_problems=1", "trainer.checkpoint_every=0"]


def load_train_pairs(args) -> list:
    """The pairs both systems train on: ``--pairs``, or examples/dpo.yaml's train pairs."""
    from posttrain.config import load_config
    from posttrain.config_supervised import DPOConfig
    from posttrain.tasks.registry import build_task
    from posttrain.trainers.dpo import load_pairs
    from posttrain.trainers.preference_data import load_preferences

    if args.pairs:
        return load_preferences(args.pairs)
    cfg = load_config(CONFIG, [f"model.name={args.model}"], cls=DPOConfig)
    train, _held_out = load_pairs(cfg.data, build_task(cfg.task), cfg.preference)
    return train


def write_pairs(pairs, path: Path) -> None:
    path.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in pairs))


def step_order(n_pairs: int, args) -> list[int]:
    """Indices of the pairs in the order posttrain's DPO trainer draws them (its seeded epoch sampler)."""
    from posttrain.trainers.rl import EpochSampler

    return EpochSampler(list(range(n_pairs)), args.seed).next(args.batch_size * (args.steps + args.warmup))


# ---------------------------------------------------------------------------------- TRL worker
def prompt_text(tokenizer, prompt, chat_template: bool = True) -> str:
    """The prompt as the text posttrain's sampler tokenizes (rollout.sampler.render_prompt)."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in prompt) if isinstance(prompt, list) else str(prompt)


def worker_trl(args, attention: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from posttrain.bench import peak_rss_mb
    from posttrain.models.loading import load_model_and_tokenizer
    from posttrain.trainers.dpo import encode_pairs
    from posttrain.trainers.preference_data import load_preferences

    every = load_preferences(args.pairs_file)
    drawn = step_order(len(every), args)
    # The dataset holds each pair drawn once (file order), so TRL's precompute scores each pair once, as
    # posttrain's cache does; the sampler below replays posttrain's order over it, epochs included.
    used = sorted(set(drawn))
    pairs = [every[i] for i in used]
    order = [used.index(i) for i in drawn]
    model, tokenizer = load_model_and_tokenizer(args.model)
    from vs_trl import fast_dtype  # bf16 only where the CPU has bf16 instructions, as posttrain's auto

    bf16 = fast_dtype() == torch.bfloat16
    if bf16:
        model = model.to(torch.bfloat16)
    model.config._attn_implementation = attention
    data = Dataset.from_list([{"prompt": prompt_text(tokenizer, p.prompt), "chosen": p.chosen,
                               "rejected": p.rejected} for p in pairs])
    precompute, consumed = {"s": 0.0}, []

    class Trainer(DPOTrainer):
        """TRL's DPOTrainer, timed around its reference precompute and fed posttrain's pair order."""

        def _precompute_ref_logps(self, *a, **kw):
            t = time.perf_counter()
            out = super()._precompute_ref_logps(*a, **kw)
            precompute["s"] += time.perf_counter() - t
            return out

        def _get_train_sampler(self, train_dataset=None):
            return order

        def training_step(self, model, inputs, *a, **kw):
            consumed.append(int(inputs["attention_mask"].sum()))  # the tokens TRL actually trained on
            return super().training_step(model, inputs, *a, **kw)

    steps, compute = [], []

    class Timer(TrainerCallback):
        # A step is timed from the end of the previous one (the first: from its start), so it counts
        # the batch's collation, which the Trainer does before on_step_begin and posttrain inside its step.
        last = None

        def on_step_begin(self, *a, **kw):
            self.t0 = time.perf_counter()
            self.last = self.t0 if self.last is None else self.last

        def on_step_end(self, *a, **kw):
            now = time.perf_counter()
            steps.append(now - self.last)
            compute.append(now - self.t0)
            self.last = now

    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(
            output_dir=tmp, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
            learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.99,
            weight_decay=0.0, max_grad_norm=1.0, beta=args.beta, loss_type=["sigmoid"], max_length=args.max_length,
            max_steps=args.steps + args.warmup, logging_steps=1, report_to="none", save_strategy="no",
            seed=args.seed, bf16=bf16, use_cpu=True, gradient_checkpointing=False, precompute_ref_log_probs=True,
            disable_tqdm=True, dataloader_num_workers=0)
        t = time.perf_counter()
        trainer = Trainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                          callbacks=[Timer()])
        setup_s = time.perf_counter() - t
        ds = trainer.train_dataset
        # The same tokens as posttrain? posttrain's encoding of the same pairs, pair by pair.
        ours = encode_pairs(tokenizer, pairs, True, args.max_length)
        rows = [(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) for row in ds]
        differ = sum((p, c, r) != (list(oc[0]), list(oc[1]), list(orj[1])) for (p, c, r), (oc, orj) in zip(rows, ours))
        trainer.train()
    if len(steps) != args.steps + args.warmup or len(consumed) != len(steps):
        raise RuntimeError(f"TRL ran {len(steps)} steps ({len(consumed)} training_step calls), not "
                           f"{args.steps + args.warmup}")
    tokens = consumed
    measured = steps[args.warmup:]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"step_s": statistics.median(measured), "steps_measured": len(measured), "step_times": steps,
            "compute_step_s": statistics.median(compute[args.warmup:]), "sum_steps_s": sum(steps),
            "ref_precompute_s": precompute["s"], "setup_s": setup_s,
            "reference_plus_training_s": precompute["s"] + sum(steps),
            "tokens_per_step": statistics.median(tokens[args.warmup:]), "tokens": tokens,
            "learner_tok_per_s": statistics.median(n / s for n, s in zip(tokens[args.warmup:], measured)),
            "pairs_with_other_tokens": differ, "pairs_checked": len(ours), "pairs_in_dataset": len(ds),
            "losses": losses, "attention": model.config._attn_implementation, "weights": "bf16" if bf16 else "fp32",
            "gradient_checkpointing": config.gradient_checkpointing,
            "precompute_ref_log_probs": config.precompute_ref_log_probs, "worker_peak_rss_mb": peak_rss_mb()}


# ---------------------------------------------------------------------------------- processes
def wait_child(cmd: list[str], env: dict, log: Path, what: str) -> tuple[float, float]:
    """Run ``cmd``, output to ``log``; (peak RSS of that process in MB, wall seconds)."""
    print(f"[dpo_vs_trl] running {what} ...", flush=True)
    t = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"[dpo_vs_trl] {what} failed (exit {code}); log {log}:\n{log.read_text()[-3000:]}")
    wall = time.perf_counter() - t
    print(f"[dpo_vs_trl] {what} done in {wall:.0f} s", flush=True)
    return usage.ru_maxrss / 1024.0, wall


def run_posttrain(args, pairs: Path, work: Path, n_pairs: int) -> dict:
    run_dir = work / "posttrain_run"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # our own scratch run of an earlier invocation
    cmd = [sys.executable, "-m", "posttrain.cli", "dpo", str(CONFIG), *posttrain_overrides(args, pairs), *args.set,
           "--output-dir", str(run_dir)]
    rss, wall = wait_child(cmd, {**os.environ, "PYTHONUNBUFFERED": "1"}, work / "posttrain.log", "posttrain dpo")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [r["time/step_s"] for r in rows]
    tokens = [r["tokens/prompt"] + r["tokens/completion"] for r in rows]
    measured = list(zip(times, tokens))[args.warmup:]
    # Which steps ran a reference pass: those drawing a pair for the first time (posttrain's cache).
    drawn, seen, fresh = step_order(n_pairs, args), set(), []
    for k in range(len(rows)):
        batch = drawn[k * args.batch_size:(k + 1) * args.batch_size]
        fresh.append(not seen.issuperset(batch))
        seen.update(batch)
    split = {flag: [t for (t, _), f in zip(measured, fresh[args.warmup:]) if f == flag] for flag in (True, False)}
    summary = json.loads((run_dir / "summary.json").read_text())
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # a full model per invocation is not needed
    return {"step_s": statistics.median(t for t, _ in measured), "steps_measured": len(measured),
            "step_times": times, "sum_steps_s": sum(times), "reference_plus_training_s": sum(times),
            "tokens_per_step": statistics.median(n for _, n in measured), "tokens": tokens,
            "learner_tok_per_s": statistics.median(n / t for t, n in measured),
            "step_s_with_reference_pass": statistics.median(split[True]) if split[True] else None,
            "step_s_reference_cached": statistics.median(split[False]) if split[False] else None,
            "steps_with_reference_pass": len(split[True]),
            "losses": [r["loss/preference"] for r in rows], "peak_rss_mb": rss, "process_wall_s": wall,
            "summary_peak_rss_mb": summary["peak_rss_mb"], "command": cmd[1:]}


def run_trl(args, name: str, pairs: Path, work: Path) -> dict:
    from posttrain.allocator import find_tcmalloc, preload_env

    out = work / f"{name}.json"
    cmd = [sys.executable, __file__, "--worker", name, "--worker-out", str(out), "--pairs-file", str(pairs),
           "--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed),
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--beta", str(args.beta),
           "--lr", str(args.lr)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    library = find_tcmalloc()
    if library:  # the allocator the posttrain command runs under
        env = preload_env(env, library)
    rss, wall = wait_child(cmd, env, work / f"{name}.log", f"TRL DPOTrainer ({TRL_ROWS[name]} attention)")
    return json.loads(out.read_text()) | {"peak_rss_mb": rss, "process_wall_s": wall,
                                          "allocator": "tcmalloc" if library else "system (glibc)"}


# ---------------------------------------------------------------------------------- report
def table(results: dict) -> str:
    p = results["posttrain"]
    trl = {name: results[name] for name in TRL_ROWS if name in results}
    best = min(trl, key=lambda n: trl[n]["step_s"])
    names = list(trl)
    s = results["settings"]
    lines = [f"# posttrain DPO vs TRL DPOTrainer ({s['model']}, {results['pairs']} pairs, batch {s['batch_size']}, "
             f"beta {s['beta']:g}, lr {s['lr']:g}, {s['warmup']} warm-up + {s['steps']} measured steps)", "",
             "| figure | posttrain | " + " | ".join(f"TRL {trl[n]['attention']}" for n in names)
             + f" | posttrain vs TRL {trl[best]['attention']} |", "|---|---:|" + "---:|" * len(names) + "---|"]

    def row(label, key, fmt, compare):
        cells = [format(p[key], fmt)] + [format(trl[n][key], fmt) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {compare(p[key], trl[best][key])} |")

    def faster(a, b):
        return f"{b / a:.2f}x faster" if a < b else f"{a / b:.2f}x slower"

    row("median step time (s)", "step_s", ".2f", faster)
    for label, key in (("  posttrain steps with a reference pass", "step_s_with_reference_pass"),
                       ("  posttrain steps with cached reference", "step_s_reference_cached")):
        if p[key] is not None:
            lines.append(f"| {label} | {p[key]:.2f} | " + " | ".join("" for _ in names)
                         + f" | {faster(p[key], trl[best]['step_s'])} |")
    row("learner tok/s (prompt + completion)", "learner_tok_per_s", ".0f", lambda a, b: f"{a / b:.2f}x")
    row("tokens per step", "tokens_per_step", ".0f", lambda a, b: "same" if a == b else f"{a / b:.3f}x")
    row("reference + training (s)", "reference_plus_training_s", ".1f", faster)
    row("peak RSS (MB)", "peak_rss_mb", ".0f", lambda a, b: f"{a / b:.2f} of TRL's")
    row("loss after the last step", "last_loss", ".4f", lambda a, b: f"{a - b:+.4f}")
    lines += ["", f"Median step time over the {s['steps']} steps after {s['warmup']} warm-up steps. posttrain's steps "
              "include each pair's reference pass the first time the pair is used (its reference log-probs are cached "
              "per pair), TRL computed them all before training (precompute_ref_log_probs: "
              + ", ".join(f"{trl[n]['ref_precompute_s']:.1f} s with {trl[n]['attention']}" for n in names)
              + "); 'reference + training' is that precompute plus all steps, against the sum of posttrain's steps. "
              "TRL's step is timed from the end of the previous step, so it counts the batch's collation (the Trainer "
              "collates before on_step_begin; posttrain's step collates inside); from on_step_begin alone: "
              + ", ".join(f"{trl[n]['compute_step_s']:.2f} s with {trl[n]['attention']}" for n in names) + ". "
              "Peak RSS is each whole process's (os.wait4), loading included; posttrain's also holds its sampler copy "
              "for the held-out task evaluation.",
              "TRL: " + "; ".join(f"{trl[n]['attention']} attention, {trl[n]['weights']} weights, gradient "
                                  f"checkpointing {trl[n]['gradient_checkpointing']}, precompute_ref_log_probs "
                                  f"{trl[n]['precompute_ref_log_probs']}, {trl[n]['pairs_with_other_tokens']} of "
                                  f"{trl[n]['pairs_checked']} pairs tokenized differently from posttrain"
                                  for n in names) + f". Allocator: {trl[best]['allocator']} for both systems.",
              "Environment: " + ", ".join(f"{k} {v}" for k, v in results["environment"].items()) + "."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=20, help="measured steps")
    parser.add_argument("--warmup", type=int, default=2, help="steps before the measured ones")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per step (examples/dpo.yaml's)")
    parser.add_argument("--max-length", type=int, default=1024, help="prompt + completion tokens at most")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", help="a preference JSONL ({prompt, chosen, rejected}) instead of the example's")
    parser.add_argument("--only", choices=["posttrain", *TRL_ROWS], action="append", help="run only these rows")
    parser.add_argument("--set", action="append", default=[], help="extra posttrain override (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, 1 warm-up + 2 steps of 4 pairs")
    parser.add_argument("--work-dir", default=str(ROOT / "bench_out" / "dpo_vs_trl"))
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--worker", choices=sorted(TRL_ROWS), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--pairs-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.steps, args.warmup, args.batch_size = "tiny-random", 2, 1, 4
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--steps must be >= 1, --warmup >= 0, --batch-size >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(worker_trl(args, TRL_ROWS[args.worker])))
        return 0
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        raise SystemExit("TRL is not installed: pip install -e '.[bench]'")
    from vs_trl import environment

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    pairs = load_train_pairs(args)
    needed = args.batch_size * (args.steps + args.warmup)
    if needed > len(pairs):
        print(f"[dpo_vs_trl] note: {needed} pairs are drawn from {len(pairs)}; later epochs reuse pairs (posttrain "
              "then reads their cached reference log-probs)", flush=True)
    pairs_file = work / "pairs.jsonl"
    write_pairs(pairs, pairs_file)
    results = {"settings": settings(args), "pairs": len(pairs), "pairs_source": args.pairs or "examples/dpo.yaml",
               "environment": environment()}
    for name in args.only or ["posttrain", "trl_eager", "trl_sdpa"]:
        if name == "posttrain":
            results[name] = run_posttrain(args, pairs_file, work, len(pairs))
        else:
            results[name] = run_trl(args, name, pairs_file, work)
        results[name]["last_loss"] = results[name]["losses"][-1]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if "posttrain" in results and any(n in results for n in TRL_ROWS):
        results["table"] = table(results)
        (out / "dpo_vs_trl.md").write_text(results["table"])
        print(results["table"])
    (out / "dpo_vs_trl.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

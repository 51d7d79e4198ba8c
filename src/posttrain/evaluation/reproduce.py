"""Reproductions: a paper's claim tested as a named experiment (arms x seeds x evaluation) with a
decision rule, and its results as a Markdown table and JSON with intervals over seeds.

An experiment is declared as data, one YAML file per experiment (``reproductions/NAME.yaml``)::

    name: grpo_pass1
    claim: GRPO raises pass@1 on held-out problems
    paper: {title: "DeepSeekMath ...", arxiv: "2402.03300", catalog: null}
    setting: SmolLM2-135M-Instruct, 20 steps of 8 prompts x 8 completions, 32 new tokens
    command: rl                               # the trainer of every arm: rl (default) or dpo
    config: ../examples/arithmetic.yaml       # base config of every arm (relative to this file)
    overrides: [trainer.steps=20]             # applied to every arm, before the arm's own
    arms:
      grpo: {}                                # or {config: ..., overrides: [...]}
    seeds: [0, 1, 2]                          # at least 3
    evaluate:                                 # optional: `posttrain eval` of each run
      final: {model: run, n: 32, problems: 100}    # -> RUN_DIR/eval_final.json (arms: [..] limits it)
    metrics:                                  # accuracy_before / accuracy_after are built in
      pass32: {file: eval_final.json, key: pass_at_k.32}
    tests:                                    # the first is the claim's verdict
      - {name: "pass@1 rises", higher: grpo.accuracy_after, than: grpo.accuracy_before}
    missing: []                               # what posttrain lacks to run it (blocks a run)

Decision rule of a test (``higher`` claimed above ``than``, paired by seed): with the per-seed
differences d_s = higher_s - than_s, the 95% percentile bootstrap interval of mean_s d_s decides:
**reproduced** if it lies above 0, **not reproduced** if it lies below 0, **inconclusive**
otherwise. With fewer than 3 paired seeds there is no verdict on a point estimate: the verdict is
"inconclusive (n seeds)". Intervals follow Agarwal et al., "Deep Reinforcement Learning at the
Edge of the Statistical Precipice" (arXiv:2108.13264), through ``posttrain.evaluation.stats``.

This module reads declarations and finished run directories; running the arms is the CLI's
(``posttrain reproduce``, ``posttrain.cli_reproduce``), so nothing here imports the trainers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import yaml

from posttrain.evaluation.stats import (
    Interval,
    aggregate_mean,
    probability_of_improvement_ci,
    stratified_bootstrap_ci,
)

__all__ = [
    "MIN_SEEDS", "Arm", "EvalSpec", "MetricSpec", "Test", "Experiment", "Decision",
    "load_experiment", "find_experiment", "list_experiments", "run_dir_for", "read_metric", "decide",
    "summarise", "render_markdown", "write_results",
]

MIN_SEEDS = 3
CONF = 0.95
REPS = 10_000  # resamples of the intervals that decide
P_REPS = 2_000  # resamples of P(higher > than), a secondary figure (rliable's default count)
BUILTIN_METRICS = {
    "accuracy_before": {"file": "summary.json", "key": "eval_before.accuracy"},
    "accuracy_after": {"file": "summary.json", "key": "eval_after.accuracy"},
}
ROW_FILES = ("metrics.jsonl", "eval.jsonl")
# Figures an eval_*.json holds only per sample; read_metric derives them from its "problems".
DERIVED_EVAL_KEYS = ("incorrect_length", "correct_length")
METHOD = (f"Per arm: mean over seeds with a {CONF:.0%} percentile bootstrap interval "
          f"(posttrain.evaluation.stats.stratified_bootstrap_ci, statistic aggregate_mean, {REPS:,} resamples, "
          "resampling seed 0; the seed is the unit, one stratum: problems are not resampled, so the interval "
          "covers seed-to-seed variation on this fixed problem set). Per test: the same interval over the "
          "paired per-seed differences (higher - than, same seed); P(higher > than) is "
          f"probability_of_improvement_ci over the two arms' seeds (unpaired, {P_REPS:,} resamples). "
          "Verdict: reproduced if the difference's interval lies above 0, not reproduced if below 0, "
          "inconclusive otherwise; fewer "
          f"than {MIN_SEEDS} paired seeds is inconclusive whatever the numbers. With 3 seeds a percentile "
          "bootstrap cannot reach beyond the seeds' own range and under-covers: read a narrow interval as "
          "'3 seeds agree', not as a precise effect size.")

COMMANDS = ("rl", "dpo")  # `posttrain rl` / `posttrain dpo`: the CLI maps each to its config and trainer
_TOP_KEYS = {"name", "claim", "paper", "setting", "command", "config", "overrides", "arms", "seeds", "evaluate",
             "metrics", "tests", "missing", "notes", "minutes_per_run"}


def _fail(source: Path | str, what: str) -> ValueError:
    return ValueError(f"experiment {source}: {what}")


# ---------------------------------------------------------------------------------------------
# declarations
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    name: str
    config: Optional[Path]  # None: posttrain's defaults
    overrides: tuple[str, ...]  # the experiment's common overrides, then the arm's


@dataclass(frozen=True)
class EvalSpec:
    """``posttrain eval`` of one run: ``model: run`` (its final checkpoint) or ``base`` (the
    config's model.name), ``n`` samples per problem, the first ``problems`` test problems, at
    the run's rollout temperature and with the run's seed; written to RUN_DIR/eval_NAME.json."""

    name: str
    model: str
    n: int
    problems: Optional[int] = None
    arms: Optional[tuple[str, ...]] = None  # None: every arm

    def applies(self, arm: str) -> bool:
        return self.arms is None or arm in self.arms

    @property
    def file(self) -> str:
        return f"eval_{self.name}.json"


@dataclass(frozen=True)
class MetricSpec:
    """One number per run: ``key`` (dotted path) of a JSON file, or the mean of ``key`` over the
    last ``last`` rows (all rows when unset) of metrics.jsonl / eval.jsonl."""

    name: str
    file: str
    key: str
    last: Optional[int] = None

    def describe(self) -> str:
        if self.file in ROW_FILES:
            rows = f"last {self.last} rows" if self.last else "all rows"
            return f"mean of {self.key} over the {rows} of {self.file}"
        return f"{self.file}: {self.key}"


@dataclass(frozen=True)
class Test:
    name: str
    higher: tuple[str, str]  # (arm, metric) claimed to be the larger
    than: tuple[str, str]

    def rule(self) -> str:
        h, t = ".".join(self.higher), ".".join(self.than)
        return (f"reproduced if the {CONF:.0%} interval of mean_s({h} - {t}) lies above 0, not reproduced if it "
                f"lies below 0, inconclusive otherwise (or with < {MIN_SEEDS} seeds)")


@dataclass
class Experiment:
    name: str
    claim: str
    paper: dict[str, Any]
    setting: str
    arms: dict[str, Arm]
    seeds: tuple[int, ...]
    metrics: dict[str, MetricSpec]
    tests: list[Test]
    evaluate: dict[str, EvalSpec] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    notes: str = ""
    minutes_per_run: Optional[float] = None
    command: str = "rl"
    path: Optional[Path] = None

    def order(self, seeds: Sequence[int]) -> list[tuple[str, int]]:
        """(arm, seed) in seed-major order: whatever slows the machine for a while spreads over
        the arms instead of landing on one."""
        return [(arm, seed) for seed in seeds for arm in self.arms]

    def used_metrics(self) -> list[tuple[str, str]]:
        """(arm, metric) pairs the tests read, in first-use order."""
        out: list[tuple[str, str]] = []
        for t in self.tests:
            for ref in (t.than, t.higher):
                if ref not in out:
                    out.append(ref)
        return out

    def reported_metrics(self) -> list[tuple[str, str]]:
        """The tests' (arm, metric) pairs, then every other declared metric of every arm whose
        runs hold its file (an eval_NAME.json only where that evaluation applies)."""
        out = self.used_metrics()
        evals = {e.file: e for e in self.evaluate.values()}
        for arm in self.arms:
            for name, spec in self.metrics.items():
                applies = spec.file not in evals or evals[spec.file].applies(arm)
                if name not in BUILTIN_METRICS and applies and (arm, name) not in out:
                    out.append((arm, name))
        return out


def _str_list(value: Any, source, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(source, f"{what} must be a list of strings (dotted overrides such as trainer.lr=1e-5)")
    return list(value)


def _int(value: Any, source, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(source, f"{what} must be an integer >= {low}, got {value!r}")
    return value


def _ref(value: Any, arms, metrics, source, what: str) -> tuple[str, str]:
    if not isinstance(value, str) or value.count(".") != 1:
        raise _fail(source, f"{what} must read ARM.METRIC (e.g. grpo.accuracy_after), got {value!r}")
    arm, metric = value.split(".")
    if arm not in arms:
        raise _fail(source, f"{what}: no arm {arm!r} (arms: {', '.join(arms)})")
    if metric not in metrics:
        raise _fail(source, f"{what}: no metric {metric!r} (declared: {', '.join(metrics)})")
    return arm, metric


def _resolve_config(value: Any, base_dir: Path, source, what: str) -> Optional[Path]:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail(source, f"{what} must be a path to a YAML config (relative to the experiment file) or null")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else (base_dir / path).resolve()
    if not path.is_file():
        raise _fail(source, f"{what}: config file {path} does not exist")
    return path


def load_experiment(path: Path | str) -> Experiment:
    """Read and check one declaration; every problem is a ValueError naming the file and key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise _fail(path, f"not valid YAML: {' '.join(str(exc).split())}") from exc
    if not isinstance(data, dict):
        raise _fail(path, "must hold a mapping at the top level")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise _fail(path, f"unknown key(s) {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(_TOP_KEYS))})")
    for key in ("name", "claim", "setting"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise _fail(path, f"{key!r} is required (a non-empty string)")
    name = data["name"]
    if not name.replace("_", "").replace("-", "").isalnum():
        raise _fail(path, f"name {name!r} may hold only letters, digits, '_' and '-' (it names a directory)")
    paper = data.get("paper") or {}
    if not isinstance(paper, dict) or not (paper.get("arxiv") or paper.get("catalog")):
        raise _fail(path, "paper must be a mapping with at least an arxiv id or a catalog id "
                          "(from ../shared/papers/catalog/)")
    command = data.get("command", "rl")
    if command not in COMMANDS:
        raise _fail(path, f"command must be one of {', '.join(COMMANDS)} (the trainer of every arm), got {command!r}")
    base_dir = path.parent
    default_config = _resolve_config(data.get("config"), base_dir, path, "config")
    common = _str_list(data.get("overrides"), path, "overrides")
    arms_in = data.get("arms")
    if not isinstance(arms_in, dict) or not arms_in:
        raise _fail(path, "arms must be a non-empty mapping of arm name -> {config, overrides}")
    arms: dict[str, Arm] = {}
    for arm_name, spec in arms_in.items():
        if not isinstance(arm_name, str) or "." in arm_name or not arm_name.replace("_", "").replace("-", "").isalnum():
            raise _fail(path, f"arm name {arm_name!r} may hold only letters, digits, '_' and '-'")
        spec = spec or {}
        if not isinstance(spec, dict) or set(spec) - {"config", "overrides"}:
            raise _fail(path, f"arm {arm_name!r} must be a mapping with only 'config' and 'overrides'")
        config = _resolve_config(spec["config"], base_dir, path, f"arms.{arm_name}.config") if "config" in spec \
            else default_config
        arms[arm_name] = Arm(arm_name, config, tuple(common + _str_list(spec.get("overrides"), path,
                                                                        f"arms.{arm_name}.overrides")))
    seeds = data.get("seeds", list(range(MIN_SEEDS)))
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise _fail(path, "seeds must be a list of integers >= 0")
    if len(set(seeds)) != len(seeds) or len(seeds) < MIN_SEEDS:
        raise _fail(path, f"seeds must be at least {MIN_SEEDS} distinct integers (a verdict needs {MIN_SEEDS}), "
                          f"got {seeds}")
    evaluate: dict[str, EvalSpec] = {}
    for ev_name, spec in (data.get("evaluate") or {}).items():
        if not isinstance(spec, dict) or set(spec) - {"model", "n", "problems", "arms"}:
            raise _fail(path, f"evaluate.{ev_name} must be a mapping with model (run|base), n, problems and arms")
        if spec.get("model") not in ("run", "base"):
            raise _fail(path, f"evaluate.{ev_name}.model must be 'run' (the trained checkpoint) or 'base' "
                              f"(the config's model.name), got {spec.get('model')!r}")
        problems, ev_arms = spec.get("problems"), spec.get("arms")
        if ev_arms is not None and (not isinstance(ev_arms, list) or not ev_arms or set(ev_arms) - set(arms)):
            raise _fail(path, f"evaluate.{ev_name}.arms must be a non-empty list of declared arms "
                              f"({', '.join(arms)}), got {ev_arms!r}")
        n = _int(spec.get("n"), path, f"evaluate.{ev_name}.n", 1)
        if problems is not None:
            _int(problems, path, f"evaluate.{ev_name}.problems", 1)
        evaluate[ev_name] = EvalSpec(str(ev_name), spec["model"], n, problems,
                                     None if ev_arms is None else tuple(ev_arms))
    metrics: dict[str, MetricSpec] = {}
    for m_name, spec in {**BUILTIN_METRICS, **(data.get("metrics") or {})}.items():
        if not isinstance(spec, dict) or set(spec) - {"file", "key", "last"} or not isinstance(spec.get("key"), str):
            raise _fail(path, f"metrics.{m_name} must be a mapping with file, key (and last for .jsonl files)")
        file = spec.get("file")
        known = {"summary.json", *ROW_FILES, *(e.file for e in evaluate.values())}
        if file not in known:
            raise _fail(path, f"metrics.{m_name}.file {file!r} is none of the files a run will hold: "
                              f"{', '.join(sorted(known))} (eval_NAME.json files come from the evaluate section)")
        last = spec.get("last")
        if last is not None:
            if file not in ROW_FILES:
                raise _fail(path, f"metrics.{m_name}.last applies to {' / '.join(ROW_FILES)} only")
            _int(last, path, f"metrics.{m_name}.last", 1)
        metrics[m_name] = MetricSpec(m_name, file, spec["key"], last)
    tests_in = data.get("tests")
    if not isinstance(tests_in, list) or not tests_in:
        raise _fail(path, "tests must be a non-empty list of {name, higher: ARM.METRIC, than: ARM.METRIC}")
    tests = []
    for i, t in enumerate(tests_in):
        if not isinstance(t, dict) or set(t) != {"name", "higher", "than"}:
            raise _fail(path, f"tests[{i}] must have exactly name, higher and than")
        test = Test(str(t["name"]), _ref(t["higher"], arms, metrics, path, f"tests[{i}].higher"),
                    _ref(t["than"], arms, metrics, path, f"tests[{i}].than"))
        if test.higher == test.than:
            raise _fail(path, f"tests[{i}] compares {'.'.join(test.higher)} with itself")
        for arm, metric in (test.higher, test.than):
            ev = next((e for e in evaluate.values() if e.file == metrics[metric].file), None)
            if ev is not None and not ev.applies(arm):
                raise _fail(path, f"tests[{i}] reads {arm}.{metric} from {ev.file}, but evaluate.{ev.name} covers "
                                  f"only {', '.join(ev.arms)}")
        tests.append(test)
    minutes = data.get("minutes_per_run")
    if minutes is not None and (not isinstance(minutes, (int, float)) or isinstance(minutes, bool) or minutes <= 0):
        raise _fail(path, f"minutes_per_run must be a positive number, got {minutes!r}")
    return Experiment(name=name, claim=data["claim"].strip(), paper=dict(paper), setting=data["setting"].strip(),
                      arms=arms, seeds=tuple(seeds), metrics=metrics, tests=tests, evaluate=evaluate,
                      missing=_str_list(data.get("missing"), path, "missing"),
                      notes=str(data.get("notes") or "").strip(),
                      minutes_per_run=minutes, command=command, path=path)


def list_experiments(dirs: Sequence[Path]) -> list[Path]:
    """Declaration files in ``dirs`` (the first directory wins on a name found twice)."""
    seen: dict[str, Path] = {}
    for d in dirs:
        for p in sorted(Path(d).glob("*.yaml")) if Path(d).is_dir() else []:
            seen.setdefault(p.stem, p)
    return list(seen.values())


def find_experiment(name: str, dirs: Sequence[Path]) -> Path:
    """``name`` as a path to a YAML file, else ``DIR/name.yaml`` in the first of ``dirs`` holding it."""
    p = Path(name).expanduser()
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    for d in dirs:
        if (Path(d) / f"{name}.yaml").is_file():
            return Path(d) / f"{name}.yaml"
    known = ", ".join(q.stem for q in list_experiments(dirs)) or "none"
    raise ValueError(f"no experiment {name!r} in {', '.join(str(d) for d in dirs)} (declared: {known}); "
                     "give a name from `posttrain reproduce --list` or a path to a YAML file")


def run_dir_for(runs: Path, arm: str, seed: int) -> Path:
    return Path(runs) / f"{arm}_seed{seed}"


# ---------------------------------------------------------------------------------------------
# reading runs
# ---------------------------------------------------------------------------------------------


def _dotted(obj: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return KeyError
        obj = obj[part]
    return obj


def _derived(data: dict, key: str, where: Path) -> float:
    """Mean generated length of the incorrect (or correct) samples of an eval_*.json."""
    if not data.get("problems"):
        raise ValueError(f"{where} has no per-sample 'problems' to derive {key} from")
    want = key == "correct_length"
    lengths = [n for p in data["problems"] for f, n in zip(p.get("flags", []), p.get("lengths", [])) if bool(f) == want]
    return float(np.mean(lengths)) if lengths else math.nan  # nan: no sample of that kind (left out of the figures)


def read_metric(run_dir: Path, spec: MetricSpec) -> Optional[float]:
    """The metric of one run; None when its file does not exist yet. A file that exists without
    the key is a ValueError (the declaration names a key the run does not write)."""
    where = Path(run_dir) / spec.file
    if not where.is_file():
        return None
    if spec.file in ROW_FILES:
        rows = [json.loads(line) for line in where.read_text(encoding="utf-8").splitlines() if line.strip()]
        values = [r[spec.key] for r in rows if isinstance(r.get(spec.key), (int, float))]
        if not values:
            raise ValueError(f"{where}: no row has {spec.key!r} (metric {spec.name}); check the key")
        return float(np.mean(values[-spec.last:] if spec.last else values))
    data = json.loads(where.read_text(encoding="utf-8"))
    if spec.key in DERIVED_EVAL_KEYS and spec.file.startswith("eval_"):
        return _derived(data, spec.key, where)
    value = _dotted(data, spec.key)
    if value is KeyError:
        raise ValueError(f"{where} has no {spec.key!r} (metric {spec.name}); check the key")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{where}: {spec.key!r} is {type(value).__name__}, not a number (metric {spec.name}); "
                         "name a key that holds one number")
    return None if value is None else float(value)


# ---------------------------------------------------------------------------------------------
# statistics and verdicts
# ---------------------------------------------------------------------------------------------


@dataclass
class Decision:
    n: int  # paired seeds
    verdict: str
    diff: Optional[Interval]  # mean over seeds of higher - than, with its interval
    p_improvement: Optional[Interval]  # P(higher > than)


def seed_interval(values: Sequence[float]) -> Interval:
    """Mean over seeds with the percentile bootstrap interval over seeds."""
    return stratified_bootstrap_ci(np.asarray(values, dtype=np.float64), aggregate_mean, reps=REPS, conf=CONF, seed=0)


def decide(higher: Sequence[float], than: Sequence[float]) -> Decision:
    """The verdict on "higher > than" from values paired by seed (same length, same order)."""
    if len(higher) != len(than):
        raise ValueError(f"paired values need equal lengths, got {len(higher)} and {len(than)}")
    n = len(higher)
    if n == 0:
        return Decision(0, "inconclusive (0 seeds)", None, None)
    diff = seed_interval(np.asarray(higher, dtype=np.float64) - np.asarray(than, dtype=np.float64))
    p_imp = probability_of_improvement_ci(higher, than, reps=P_REPS, conf=CONF, seed=0)
    if n < MIN_SEEDS:
        verdict = f"inconclusive ({n} seed{'s' * (n != 1)})"
    elif diff.low > 0:
        verdict = "reproduced"
    elif diff.high < 0:
        verdict = "not reproduced"
    else:
        verdict = "inconclusive"
    return Decision(n, verdict, diff, p_imp)


def _iv(iv: Optional[Interval]) -> Optional[dict]:
    return None if iv is None else {"point": float(iv.point), "low": float(iv.low), "high": float(iv.high)}


def summarise(exp: Experiment, runs: Path, seeds: Sequence[int]) -> dict[str, Any]:
    """Per-arm figures and every test's decision from the finished runs under ``runs``."""
    runs = Path(runs)
    values: dict[tuple[str, str], dict[int, float]] = {}
    missing: list[str] = []
    for arm, metric in exp.reported_metrics():
        got: dict[int, float] = {}
        for seed in seeds:
            run = run_dir_for(runs, arm, seed)
            if not (run / "summary.json").is_file():
                missing.append(f"{run.name}: not finished")
                continue
            v = read_metric(run, exp.metrics[metric])
            if v is None or not math.isfinite(v):
                missing.append(f"{run.name}: {metric} ({exp.metrics[metric].file}) "
                               f"{'missing' if v is None else 'undefined (no samples of that kind)'}")
                continue
            got[seed] = v
        values[(arm, metric)] = got
    arms_out = []
    for (arm, metric), got in values.items():
        iv = seed_interval(list(got.values())) if got else None
        arms_out.append({"arm": arm, "metric": metric, "describe": exp.metrics[metric].describe(),
                         "seeds": {str(s): v for s, v in got.items()}, "mean": _iv(iv)})
    tests_out = []
    for i, t in enumerate(exp.tests):
        h, th = values[t.higher], values[t.than]
        paired = [s for s in seeds if s in h and s in th]
        d = decide([h[s] for s in paired], [th[s] for s in paired])
        tests_out.append({"name": t.name, "primary": i == 0, "higher": ".".join(t.higher), "than": ".".join(t.than),
                          "rule": t.rule(), "seeds": paired, "difference": _iv(d.diff),
                          "p_improvement": _iv(d.p_improvement), "verdict": d.verdict})
    return {
        "name": exp.name, "claim": exp.claim, "paper": exp.paper, "setting": exp.setting,
        "resolved_setting": _resolved_setting(runs, exp, seeds), "seeds": list(seeds),
        "arms": arms_out, "tests": tests_out, "verdict": tests_out[0]["verdict"],
        "missing_runs": sorted(set(missing)), "missing_features": exp.missing, "notes": exp.notes,
        "method": METHOD, "declaration": str(exp.path) if exp.path else None,
    }


def _resolved_setting(runs: Path, exp: Experiment, seeds: Sequence[int]) -> Optional[str]:
    """What the first finished run actually used (read from its config.yaml)."""
    for arm, seed in exp.order(seeds):
        cfg_path = run_dir_for(runs, arm, seed) / "config.yaml"
        if (cfg_path.parent / "summary.json").is_file() and cfg_path.is_file():
            c = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}

            def g(*keys: str) -> Any:
                return _dotted(c, ".".join(keys))
            return (f"posttrain {exp.command}, model {g('model', 'name')}, task {g('task', 'name')}, "
                    f"{g('trainer', 'steps')} steps of {g('rollout', 'num_prompts')} prompts x "
                    f"{g('rollout', 'num_completions')} completions, "
                    f"{g('rollout', 'max_new_tokens')} new tokens, {g('trainer', 'eval_problems')} held-out problems "
                    f"at temperature {g('trainer', 'eval_temperature')} (from {cfg_path.parent.name}/config.yaml)")
    return None


def _fmt(iv: Optional[dict], signed: bool = False) -> str:
    if iv is None:
        return "—"
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(iv['point'])} [{f.format(iv['low'])}, {f.format(iv['high'])}]"


def render_markdown(s: dict[str, Any], report_name: Optional[str] = "report.html") -> str:
    p = s["paper"]
    paper = ", ".join(x for x in (p.get("title"), p.get("catalog") and f"catalog {p['catalog']}",
                                  p.get("arxiv") and f"arXiv:{p['arxiv']}") if x)
    lines = [f"# Reproduction `{s['name']}`: {s['claim']}", "",
             f"**Verdict: {s['verdict']}.** Paper: {paper}.", "", f"Setting: {s['setting']}"]
    if s.get("resolved_setting"):
        lines += ["", f"As run: {s['resolved_setting']}; seeds {', '.join(map(str, s['seeds']))}."]
    lines += ["", "| test | difference (higher - than), mean [95% CI] | P(higher > than) [95% CI] | seeds | verdict |",
              "|---|---:|---:|---:|---|"]
    for t in s["tests"]:
        name = f"**{t['name']}**" if t["primary"] else t["name"]
        lines.append(f"| {name}: {t['higher']} > {t['than']} | {_fmt(t['difference'], True)} | "
                     f"{_fmt(t['p_improvement'])} | {len(t['seeds'])} | {t['verdict']} |")
    lines += ["", "| arm | metric | mean [95% CI] | per seed | from |", "|---|---|---:|---|---|"]
    for a in s["arms"]:
        per_seed = ", ".join(f"{k}: {v:.3f}" for k, v in a["seeds"].items()) or "—"
        lines.append(f"| {a['arm']} | {a['metric']} | {_fmt(a['mean'])} | {per_seed} | {a['describe']} |")
    lines += ["", f"Decision rule (first test decides the claim): {s['tests'][0]['rule']}.", "",
              f"Method: {s['method']}"]
    if s["missing_features"]:
        lines += ["", "Missing in posttrain (the experiment cannot run as declared until these land):"]
        lines += [f"- {m}" for m in s["missing_features"]]
    if s["missing_runs"]:
        lines += ["", f"Not in the figures ({len(s['missing_runs'])}): " + "; ".join(s["missing_runs"])]
    if s.get("notes"):
        lines += ["", f"Notes: {' '.join(s['notes'].split())}"]
    if report_name:
        lines += ["", f"Figures of every run: [{report_name}]({report_name})."]
    return "\n".join(lines) + "\n"


def write_results(s: dict[str, Any], out_dir: Path, report_name: Optional[str] = "report.html") -> tuple[Path, Path]:
    """``NAME.md`` and ``NAME.json`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{s['name']}.md", out_dir / f"{s['name']}.json"
    md.write_text(render_markdown(s, report_name), encoding="utf-8")
    js.write_text(json.dumps(s, indent=1) + "\n", encoding="utf-8")
    return md, js

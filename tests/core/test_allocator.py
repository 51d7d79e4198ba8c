import os
import subprocess
import sys

import pytest

from posttrain.allocator import find_tcmalloc, preload_env

PROBE = (
    "import os; from posttrain.allocator import reexec_with_tcmalloc; reexec_with_tcmalloc(); "
    "maps = open('/proc/self/maps').read(); print('tcmalloc' in maps, os.environ.get('POSTTRAIN_ALLOCATOR', ''))"
)


def run_probe(**env):
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "POSTTRAIN_ALLOCATOR")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    return out.stdout.split()


def test_preload_env_prepends_once():
    assert preload_env({}, "/lib/a.so")["LD_PRELOAD"] == "/lib/a.so"
    assert preload_env({"LD_PRELOAD": "/lib/b.so"}, "/lib/a.so")["LD_PRELOAD"] == "/lib/a.so:/lib/b.so"
    assert preload_env({"LD_PRELOAD": "/lib/a.so"}, "/lib/a.so")["LD_PRELOAD"] == "/lib/a.so"


@pytest.mark.skipif(sys.platform != "linux" or find_tcmalloc() is None, reason="tcmalloc is not installed here")
def test_reexec_loads_tcmalloc_once_and_can_be_turned_off():
    loaded, marker = run_probe()
    assert loaded == "True" and marker.startswith("tcmalloc:")
    assert run_probe(POSTTRAIN_ALLOCATOR="system") == ["False", "system"]


def test_an_allocator_the_user_preloaded_is_kept(tmp_path):
    # a preloaded jemalloc (here: a name only; the loader ignores a missing preload with a warning)
    fake = str(tmp_path / "libjemalloc.so.2")
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "POSTTRAIN_ALLOCATOR")}
    out = subprocess.run([sys.executable, "-c", "import os; from posttrain.allocator import reexec_with_tcmalloc, "
                          "active_allocator; reexec_with_tcmalloc(); print(active_allocator(), os.environ['LD_PRELOAD'])"],
                         env={**clean, "LD_PRELOAD": fake}, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["jemalloc", fake]

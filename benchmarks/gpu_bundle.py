"""Install the packages a GPU machine lacks from a carried bundle (benchmarks/gpu_prepare.sh builds it).

The GPU machine has no network. gpu_prepare.sh installs TRL and its dependencies for that machine's
Python into a staging folder and packs it as ``gpu_wheels/trl-py312.tar.xz`` with a manifest
(``name==version`` per line); pyarrow is stripped to fit the carry limit, so it cannot travel as a
wheel. This script compares the manifest with what the running Python has, and copies in only the
distributions that are missing or older than the carried ones (an older one is first removed with
pip), into the folder where transformers is installed. That folder matters: dill, which datasets
hashes with, pickles modules from outside the interpreter's prefix by value, and fails on pyarrow's
types when pyarrow sits on PYTHONPATH.

    python benchmarks/gpu_bundle.py gpu_wheels/trl-py312.tar.xz gpu_wheels/trl-py312.txt
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def dist_infos(folder: Path) -> dict[str, tuple[str, Path]]:
    """{distribution name: (version, its *.dist-info folder)} among installed files (``pip install --target``)."""
    out = {}
    for info in sorted(Path(folder).glob("*.dist-info")):
        name, ver = info.name.removesuffix(".dist-info").rsplit("-", 1)
        out[name] = (ver, info)
    return out


def write_manifest(folder: Path) -> str:
    """The manifest of the distributions installed in ``folder``: ``name==version`` per line."""
    return "".join(f"{name}=={ver}\n" for name, (ver, _) in dist_infos(folder).items())


def read_manifest(path: Path) -> dict[str, str]:
    """``name==version`` lines -> {name: version}; a line in another form is an error, not skipped."""
    pins = {}
    for line in Path(path).read_text().split():
        name, sep, ver = line.partition("==")
        if not sep or not name or not ver:
            raise ValueError(f"{path}: {line!r} is not name==version; rebuild it with benchmarks/gpu_prepare.sh")
        pins[name] = ver
    return pins


def needed(pins: dict[str, str], installed=None) -> dict[str, str | None]:
    """The carried distributions to install: {name: the installed version, None when absent}. One that
    is present at the carried version or newer is kept (the machine's own build is the one it was
    tested with). ``installed(name)`` returns a version or raises PackageNotFoundError."""
    from packaging.version import Version

    installed = installed or version
    out = {}
    for name, ver in pins.items():
        try:
            have = installed(name)
        except PackageNotFoundError:
            out[name] = None
            continue
        if Version(have) < Version(ver):
            out[name] = have
    return out


def top_level(dist_info: Path) -> set[str]:
    """The top-level files and folders a distribution installed, from its RECORD (scripts, recorded
    as ``../../bin/...``, are left out: nothing here runs them)."""
    names = set()
    for line in (dist_info / "RECORD").read_text().splitlines():
        path = line.split(",", 1)[0]
        if path and not path.startswith(".."):
            names.add(path.split("/", 1)[0])
    return names


def install(bundle: Path, names: list[str], site: Path) -> list[str]:
    """Copy the distributions ``names`` (and only those) from the tarball ``bundle`` into ``site``.
    Returns the top-level entries copied. A name the bundle lacks is an error before anything is copied."""
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(bundle) as tar:
            tar.extractall(tmp, filter="data")
        infos = {name: info for name, (_, info) in dist_infos(Path(tmp)).items()}
        absent = [n for n in names if n not in infos]
        if absent:
            raise ValueError(f"{bundle} has no {', '.join(absent)}; rebuild it with benchmarks/gpu_prepare.sh")
        copied = []
        for name in names:
            for entry in sorted(top_level(infos[name]) | {infos[name].name}):
                src, dst = Path(tmp) / entry, site / entry
                if src.is_dir():
                    shutil.copytree(src, dst, dirs_exist_ok=True)
                elif src.exists():  # RECORD also lists what gpu_prepare.sh stripped
                    shutil.copy2(src, dst)
                else:
                    continue
                copied.append(entry)
        return copied


def main(argv: list[str]) -> int:
    bundle, manifest = Path(argv[0]), Path(argv[1])
    import transformers  # the GPU machine's packages live where transformers does

    site = Path(transformers.__file__).resolve().parents[1]
    todo = needed(read_manifest(manifest))
    if not todo:
        print("[gpu_bundle] every carried distribution is present at its version or newer: nothing to install")
        return 0
    for name, have in todo.items():
        print(f"[gpu_bundle] {name}: {'absent' if have is None else f'{have} is older'} -> installing the carried one")
    older = [name for name, have in todo.items() if have is not None]
    if older:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *older], check=True)
    copied = install(bundle, list(todo), site)
    print(f"[gpu_bundle] copied {len(copied)} entries into {site}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

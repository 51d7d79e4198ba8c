"""benchmarks/gpu_bundle.py: which carried distributions a GPU machine gets, and that only those are copied.

The bundle here is built by hand in the layout gpu_prepare.sh writes (``pip install --target`` output:
package folders, single-file modules, ``*.dist-info`` with a RECORD), with one file RECORD lists but the
stripping removed, and a console script recorded outside the folder.
"""

import subprocess
import sys
import tarfile
from importlib.metadata import PackageNotFoundError
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_bundle  # noqa: E402


def make_bundle(tmp_path: Path) -> Path:
    stage = tmp_path / "stage"
    (stage / "alpha").mkdir(parents=True)
    (stage / "alpha" / "__init__.py").write_text("VALUE = 7\n")
    info = stage / "alpha-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Name: alpha\nVersion: 1.0\n")
    (info / "RECORD").write_text("alpha/__init__.py,,\nalpha/stripped.so,,\nalpha-1.0.dist-info/METADATA,,\n"
                                 "alpha-1.0.dist-info/RECORD,,\n../../bin/alpha,,\n")
    (stage / "beta_mod.py").write_text("NAME = 'beta'\n")
    info = stage / "beta_mod-2.0.dist-info"
    info.mkdir()
    (info / "RECORD").write_text("beta_mod.py,,\nbeta_mod-2.0.dist-info/RECORD,,\n")
    bundle = tmp_path / "bundle.tar.xz"
    with tarfile.open(bundle, "w:xz") as tar:
        for path in sorted(stage.iterdir()):
            tar.add(path, arcname=path.name)
    return bundle


def fake_installed(versions: dict):
    def lookup(name):
        if name not in versions:
            raise PackageNotFoundError(name)
        return versions[name]
    return lookup


def test_needed_takes_the_absent_and_the_older_and_keeps_the_same_or_newer():
    pins = {"alpha": "1.0", "beta_mod": "2.0", "gamma": "3.1.1", "delta": "0.4.1"}
    have = fake_installed({"beta_mod": "2.0", "gamma": "3.0.9", "delta": "0.10.0"})
    # 3.0.9 < 3.1.1 (older: reinstalled); 0.10.0 > 0.4.1 as versions, though not as strings (kept)
    assert gpu_bundle.needed(pins, have) == {"alpha": None, "gamma": "3.0.9"}
    assert gpu_bundle.needed({"alpha": "1.0"}, fake_installed({"alpha": "1.0.post1"})) == {}


def test_install_copies_only_the_named_distributions_and_they_import(tmp_path):
    bundle, site = make_bundle(tmp_path), tmp_path / "site"
    site.mkdir()
    copied = gpu_bundle.install(bundle, ["alpha"], site)
    assert copied == ["alpha", "alpha-1.0.dist-info"]  # not the stripped file's, not the script's
    assert sorted(p.name for p in site.iterdir()) == ["alpha", "alpha-1.0.dist-info"]
    out = subprocess.run([sys.executable, "-c", "import alpha; print(alpha.VALUE)"], env={"PYTHONPATH": str(site)},
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "7", out.stderr
    assert gpu_bundle.install(bundle, ["beta_mod"], site) == ["beta_mod-2.0.dist-info", "beta_mod.py"]
    assert (site / "beta_mod.py").read_text() == "NAME = 'beta'\n"


def test_a_name_the_bundle_lacks_fails_before_anything_is_copied(tmp_path):
    bundle, site = make_bundle(tmp_path), tmp_path / "site"
    site.mkdir()
    with pytest.raises(ValueError, match="has no gamma; rebuild it"):
        gpu_bundle.install(bundle, ["alpha", "gamma"], site)
    assert list(site.iterdir()) == []


def test_the_manifest_written_from_a_folder_reads_back(tmp_path):
    stage = tmp_path / "stage"
    for info in ("python_dateutil-2.9.0.post0.dist-info", "trl-1.16.0.dist-info"):
        (stage / info).mkdir(parents=True)
    (stage / "trl").mkdir()  # a package folder is not a distribution
    text = gpu_bundle.write_manifest(stage)
    assert text == "python_dateutil==2.9.0.post0\ntrl==1.16.0\n"
    (tmp_path / "m.txt").write_text(text)
    assert gpu_bundle.read_manifest(tmp_path / "m.txt") == {"python_dateutil": "2.9.0.post0", "trl": "1.16.0"}


def test_a_malformed_manifest_line_names_itself(tmp_path):
    manifest = tmp_path / "m.txt"
    manifest.write_text("trl==1.16.0\npyarrow>=24\n")
    with pytest.raises(ValueError, match=r"'pyarrow>=24' is not name==version"):
        gpu_bundle.read_manifest(manifest)
    manifest.write_text("trl==1.16.0\nxxhash==4.1.0\n")
    assert gpu_bundle.read_manifest(manifest) == {"trl": "1.16.0", "xxhash": "4.1.0"}

"""What a non-editable install gets: pyproject.toml's dependency floors, licence metadata and package-data, and the
sdist (and the wheel built from it), checked against what the package uses and opens at runtime."""

import fnmatch
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "unified_lora"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _floor(dist: str) -> tuple[int, ...]:
    for req in PYPROJECT["project"]["dependencies"]:
        m = re.fullmatch(rf"{re.escape(dist)}\s*>=\s*([\d.]+)\b.*", req)
        if m:
            return tuple(int(x) for x in m.group(1).split("."))
    raise AssertionError(f"pyproject.toml: no '{dist}>=' floor in [project] dependencies")


# (distribution, first version that has it, file that uses it, the use in that file, what it is)
VERSIONED_APIS = [
    ("torch", (2, 4), "layer.py", "torch.get_autocast_dtype(dev)", "the device-type form of get_autocast_dtype"),
    ("transformers", (4, 45), "callbacks.py", "def on_pre_optimizer_step(",
     "TrainerCallback.on_pre_optimizer_step: an older Trainer never calls it, and the controller never steps"),
    ("peft", (0, 14), "peft_io.py", "from peft.utils.other import get_pattern_key", "peft.utils.other.get_pattern_key"),
    ("peft", (0, 15), "peft_io.py", "from peft.utils.other import AuxiliaryTrainingWrapper",
     "peft.utils.other.AuxiliaryTrainingWrapper (export_peft_adapter imports it)"),
]


@pytest.mark.parametrize("dist,first,file,use,what", VERSIONED_APIS,
                         ids=[f"{a[0]}-{a[3][:40]}" for a in VERSIONED_APIS])
def test_dependency_floor_has_each_api_the_package_uses(dist, first, file, use, what):
    assert use in (PACKAGE / file).read_text(encoding="utf-8"), f"{file} no longer uses {use!r}: update this table"
    assert _floor(dist) >= first, f"{dist}>={'.'.join(map(str, _floor(dist)))} installs versions without {what}"


def test_licence_metadata_is_an_spdx_string_with_its_file():
    # `license = {text = ...}` is deprecated in setuptools, which warns that builds using it are unsupported from
    # 2027-02-18
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    files = PYPROJECT["project"]["license-files"]
    assert files and all((ROOT / f).is_file() for f in files)
    assert "Apache License" in (ROOT / "LICENSE").read_text(encoding="utf-8")
    setuptools_req = next(r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools"))
    floor = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", setuptools_req).group(1).split("."))
    assert floor >= (77,), "the SPDX license string and license-files need setuptools >= 77"


def _package_files() -> list[str]:
    """Every file the package has besides its modules, relative to the package folder."""
    return sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts)


def test_package_data_globs_cover_every_file_the_package_opens():
    globs = PYPROJECT["tool"]["setuptools"]["package-data"]["unified_lora"]
    files = _package_files()
    for must in ("data/glue/MRPC/train.tsv", "data/glue/MRPC/dev.tsv", "data/ATTRIBUTION.md",
                 "csrc/mirror_fused.cpp", "csrc/nested_path.cpp"):
        assert must in files
    missing = [f for f in files if not any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs)]
    assert not missing, f"not in [tool.setuptools.package-data]: a non-editable install would lack {missing}"


@pytest.mark.slow
def test_sdist_and_the_wheel_built_from_it_carry_the_package_and_its_licences(tmp_path):
    pytest.importorskip("setuptools", minversion="77")  # the build-system floor; the [test] extra brings it
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    src = tmp_path / "src_tree"
    for rel in listed.stdout.splitlines():
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    out = tmp_path / "dist"
    build = ("import sys; from setuptools import build_meta as b; "
             "print(getattr(b, sys.argv[1])(sys.argv[2]))")
    r = subprocess.run([sys.executable, "-c", build, "build_sdist", str(out)], cwd=src, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    sdist = out / r.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert {"LICENSE", "README.md", "pyproject.toml", "constraints.txt"} <= names
    assert {f"src/unified_lora/{f}" for f in _package_files()} <= names
    tests = {n for n in names if n.startswith("tests/")}
    # tests shipped without conftest.py (its fixtures) fail at collection
    assert not tests or "tests/conftest.py" in tests, f"sdist ships {sorted(tests)[:3]} without tests/conftest.py"

    r = subprocess.run([sys.executable, "-c", build, "build_wheel", str(out)], cwd=tmp_path / "unpacked" / top,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    wheel = zipfile.ZipFile(out / r.stdout.strip().splitlines()[-1]).namelist()
    assert {f"unified_lora/{f}" for f in _package_files()} <= set(wheel)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in wheel)
    modules = {p.relative_to(PACKAGE.parent).as_posix() for p in PACKAGE.rglob("*.py")}
    assert modules <= set(wheel)

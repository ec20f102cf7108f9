"""The pure package builds offline from pyproject.toml, and the wheel holds what an install needs.

As on a GPU machine without network: pip with no index and no build isolation (the installed
setuptools builds), GESSL_EXT_BUILD_CUDA=0, from a copy of the tree (so the build leaves no
build/ or *.egg-info in the checkout). Takes a few seconds.
"""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """(zipfile of the built wheel, source copy) for a `pip wheel --no-index --no-build-isolation` of the tree."""
    folder = tmp_path_factory.mktemp("packaging")
    source = folder / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("gessl_ext", "kernels", "csrc"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               GESSL_EXT_BUILD_CUDA="0")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
                           "-w", str(folder / "dist"), str(source)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"offline wheel build failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    (built,) = (folder / "dist").glob("gessl_ext-*.whl")
    with zipfile.ZipFile(built) as archive:
        yield archive, source


def test_wheel_holds_every_package_and_the_triton_kernels(wheel):
    archive, source = wheel
    names = set(archive.namelist())
    packages = {path.parent.relative_to(source).as_posix()
                for path in (source / "gessl_ext").rglob("__init__.py")}
    for package in sorted(packages):  # a subpackage added to gessl_ext/ but not to pyproject.toml fails here
        assert f"{package}/__init__.py" in names, f"{package} is missing from the wheel (pyproject.toml packages)"
    for path in (source / "kernels").glob("*.py"):
        assert f"gessl_ext/kernels/{path.name}" in names
    assert "gessl_ext/kernels/softmax_kl.py" in names
    assert not any(name.startswith(("kernels/", "csrc/", "tests/", "bench/")) for name in names), sorted(names)
    assert not any(name.endswith((".so", ".pyd")) for name in names), "GESSL_EXT_BUILD_CUDA=0 built an extension"


def test_wheel_metadata_declares_dependencies_extras_and_entry_points(wheel):
    archive, source = wheel
    dist_info = next(name.split("/")[0] for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
    metadata = archive.read(f"{dist_info}/METADATA").decode()
    assert "Name: gessl_ext" in metadata or "Name: gessl-ext" in metadata
    assert "Requires-Dist: torch>=2.4" in metadata
    for extra in ("train", "test", "cuda"):
        assert f"Provides-Extra: {extra}" in metadata
    entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    assert "gessl-train = gessl_ext.train.cli:train_main" in entry_points
    assert "gessl-compare = gessl_ext.train.cli:compare_main" in entry_points
    cli = (source / "gessl_ext" / "train" / "cli.py").read_text()
    assert "\ndef train_main(" in cli and "\ndef compare_main(" in cli  # the entry points name real functions
    top_level = {name.split("/")[0] for name in archive.namelist()}
    assert top_level == {"gessl_ext", dist_info}, top_level

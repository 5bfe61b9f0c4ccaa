"""The sdist and the wheel as an index would get them: built, checked by twine, and complete. No server."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from .conftest import DRIVER, ROOT

# tomllib is Python >= 3.11's; the package supports 3.10 (where this module used to fail to import).
tomllib = pytest.importorskip("tomllib", reason="needs Python 3.11+ (tomllib)")

pytest.importorskip("build", reason="needs the build frontend (requirements-dev.txt)")
pytest.importorskip("hatchling", reason="needs the build backend, built without isolation (requirements-dev.txt)")
pytest.importorskip("twine", reason="needs twine (requirements-dev.txt)")

#: Building does not depend on the database driver: once per Django leg is enough (CI time budget).
ONCE_PER_LEG = "psycopg"
pytestmark = pytest.mark.skipif(
    DRIVER != ONCE_PER_LEG and os.environ.get("FRESHCONN_ALL_DRIVERS") != "1",
    reason=f"driver-independent: runs with FRESHCONN_TEST_DRIVER={ONCE_PER_LEG} (or FRESHCONN_ALL_DRIVERS=1)",
)


def source_version() -> str:
    """``__version__`` as written in src/freshconn/__init__.py, the one place the version lives."""
    tree = ast.parse((ROOT / "src" / "freshconn" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            value = ast.literal_eval(node.value)
            assert isinstance(value, str)
            return value
    raise AssertionError("no __version__ in src/freshconn/__init__.py")


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # The default build makes the sdist, then the wheel from the unpacked sdist: a file missing from
    # the sdist breaks the wheel. No isolation: the backend comes from the venv, no index is asked.
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def artifacts(dist: Path) -> tuple[Path, Path]:
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    return sdist, wheel


def test_twine_check_strict(dist: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, artifacts(dist))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_version_is_the_source_version(dist: Path) -> None:
    version = source_version()
    sdist, wheel = artifacts(dist)
    assert sdist.name == f"django_freshconn-{version}.tar.gz"
    assert wheel.name == f"django_freshconn-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        metadata = zf.read(f"django_freshconn-{version}.dist-info/METADATA").decode()
    assert f"\nVersion: {version}\n" in metadata
    with tarfile.open(sdist) as tf:
        pkg_info = tf.extractfile(f"django_freshconn-{version}/PKG-INFO")
        assert pkg_info is not None
        assert f"\nVersion: {version}\n" in pkg_info.read().decode()


def test_license_and_py_typed_in_both(dist: Path) -> None:
    version = source_version()
    sdist, wheel = artifacts(dist)
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "freshconn/py.typed" in names
        assert zf.read(f"django_freshconn-{version}.dist-info/licenses/LICENSE").decode() == license_text
        metadata = zf.read(f"django_freshconn-{version}.dist-info/METADATA").decode()
    assert "\nLicense-Expression: MIT\n" in metadata
    assert "\nLicense-File: LICENSE\n" in metadata
    with tarfile.open(sdist) as tf:
        names = set(tf.getnames())
        top = f"django_freshconn-{version}"
        assert f"{top}/src/freshconn/py.typed" in names
        assert f"{top}/LICENSE" in names
        assert not [n for n in names if n.endswith(".log")], "stray logs in the sdist"


def test_classifiers_are_known() -> None:
    trove_classifiers = pytest.importorskip("trove_classifiers")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    classifiers = project["classifiers"]
    assert [c for c in classifiers if c not in trove_classifiers.classifiers] == []
    # PEP 639: the SPDX expression replaces license classifiers (setuptools >= 77 refuses both).
    assert project["license"] == "MIT"
    assert not [c for c in classifiers if c.startswith("License ::")]


def test_changelog_dates_the_version() -> None:
    """The CHANGELOG has an Unreleased section first, then a dated section for ``__version__``."""
    headings = re.findall(r"^## (.+)$", (ROOT / "CHANGELOG.md").read_text(), flags=re.MULTILINE)
    assert headings[0] == "Unreleased"
    version = source_version()
    dated = [h for h in headings[1:] if re.fullmatch(rf"{re.escape(version)} — \d{{4}}-\d{{2}}-\d{{2}}", h)]
    assert dated == [headings[1]], f"no dated '## {version} — YYYY-MM-DD' section right after Unreleased: {headings}"

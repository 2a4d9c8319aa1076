"""What gets published: the distribution's name, license, version, extras and files.

The metadata checks read ``pyproject.toml`` (fast). The build test (slow) builds
the sdist and the wheel from a copy of the checkout with ``python -m build`` and
checks what they hold: the wheel ships the ``scoping`` package (with
``py.typed``) and nothing else, and its ``python -m scoping --version`` prints
the single-sourced version.
"""

from __future__ import annotations

import email.parser
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tarfile
import typing as t
import zipfile
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

import scoping

ROOT = Path(__file__).resolve().parent.parent
NAME = "sqlalchemy-scoping"

#: Every tool that the suite and CI use; .ci/run installs the `dev` group.
CI_TOOLS = frozenset(
    {
        "celery",
        "locust",
        "uvicorn",
        "httpx",
        "asyncpg",
        "psycopg",
        "hypothesis",
        "fastapi",
        "starlette",
        "flask-sqlalchemy",
        "mkdocs",
        "pytest",
        "mypy",
        "ruff",
        "rich",
        "psutil",
        "py-spy",
        "gevent",
        "psycopg2-binary",
        "psycogreen",
        "pyyaml",
        "flask",
        "gunicorn",
        "types-psycopg2",
        "types-pyyaml",
        "build",
    }
)

#: Extras are for users of the library; these belong in dependency groups.
CONTRIBUTOR_TOOLS = frozenset(
    {
        "pytest",
        "mypy",
        "ruff",
        "hypothesis",
        "mkdocs",
        "locust",
        "py-spy",
        "rich",
        "psutil",
        "build",
    }
)


def _pyproject() -> dict[str, t.Any]:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        return tomllib.load(fh)


def _project() -> dict[str, t.Any]:
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    return project


def _requirement_name(req: str) -> str:
    m = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req)
    assert m, req
    return re.sub(r"[-_.]+", "-", m.group(0)).lower()


def _group(groups: dict[str, list[t.Any]], name: str) -> list[str]:
    """A dependency group's requirements with include-group resolved (PEP 735)."""
    out: list[str] = []
    for item in groups[name]:
        if isinstance(item, dict):
            out += _group(groups, str(item["include-group"]))
        else:
            out.append(str(item))
    return out


def test_name_license_and_single_version_source() -> None:
    project = _project()
    assert project["name"] == NAME
    assert project["license"] == "MIT"  # an SPDX expression (PEP 639), not a table
    assert project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")
    # One version source: scoping.__version__, read by the build backend.
    assert "version" not in project
    assert project["dynamic"] == ["version"]
    dynamic = _pyproject()["tool"]["setuptools"]["dynamic"]
    assert dynamic == {"version": {"attr": "scoping.__version__"}}
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc)?\d*", scoping.__version__)
    requires = _pyproject()["build-system"]["requires"]
    assert requires == ["setuptools>=77"]  # 77: PEP 639 license expressions


def test_classifiers_urls_and_keywords() -> None:
    project = _project()
    classifiers = project["classifiers"]
    assert isinstance(classifiers, list)
    assert "Typing :: Typed" in classifiers
    assert any(c.startswith("Development Status ::") for c in classifiers)
    assert "Framework :: Flask" not in classifiers
    # PEP 639: no License classifier beside a license expression.
    assert not [c for c in classifiers if c.startswith("License ::")]
    minimum = int(str(project["requires-python"]).removeprefix(">=3."))
    versions = sorted(
        int(c.rsplit(".", 1)[1])
        for c in classifiers
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    )
    assert versions[0] == minimum
    assert versions == list(range(minimum, versions[-1] + 1))
    assert set(project["urls"]) >= {"Homepage", "Source", "Changelog"}
    assert "sqlalchemy" in project["keywords"]


def test_extras_are_for_library_users_only() -> None:
    extras = _project()["optional-dependencies"]
    assert isinstance(extras, dict)
    assert set(extras) == {"gevent", "postgres", "asyncio", "celery"}
    for name, reqs in extras.items():
        names = {_requirement_name(r) for r in reqs}
        assert not names & CONTRIBUTOR_TOOLS, f"extra {name!r} carries contributor tools"


def test_dev_group_holds_every_tool_with_a_lower_bound() -> None:
    groups = _pyproject()["dependency-groups"]
    assert isinstance(groups, dict)
    assert {"stress", "test", "lint", "docs", "dev"} <= set(groups)
    dev = _group(groups, "dev")
    names = {_requirement_name(r) for r in dev}
    assert names >= CI_TOOLS, f"missing from the dev group: {sorted(CI_TOOLS - names)}"
    unbounded = [r for r in dev if ">=" not in r]
    assert not unbounded, f"pin a lower bound: {unbounded}"


def test_ci_runs_the_readme_command_the_slow_tests_and_the_checks() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "python -m pip install -e . --group dev && python -m pytest " in readme
    for step in (
        '--upgrade "pip>=25.1"',  # --group needs pip 25.1; Python 3.11 ships 23.2
        "-e . --group dev",
        "ruff check .",
        "ruff format --check .",
        "mypy",
        "mkdocs build --strict",
        "python -m pytest)",  # the README's command, as is
        "python -m pytest -m slow",
        '"sqlalchemy>=2.1,<2.2"',
        '"sqlalchemy>=2.0,<2.1"',
        "SCOPING_PROPERTY_EXAMPLES=${SCOPING_PROPERTY_EXAMPLES:-500}",
        '"$rc" -eq 5',  # an empty selection is not a failure
    ):
        assert step in ci, step
    files = _pyproject()["tool"]["mypy"]["files"]
    assert files == ["scoping", "stress"]


def test_version_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "scoping", "--version"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{NAME} {scoping.__version__}\n"


def _copy_checkout(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(
        ".git",
        ".venv",
        ".ci-venv*",
        "*.egg-info",
        "__pycache__",
        "build",
        "dist",
        "site",
        ".mypy_cache",
        ".ruff_cache",
        ".pytest_cache",
        ".hypothesis",
    )
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def _build(src: Path, out: Path) -> tuple[Path, Path]:
    cmd = [sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out)]
    try:
        setuptools = tuple(int(p) for p in importlib.metadata.version("setuptools").split(".")[:1])
    except importlib.metadata.PackageNotFoundError:
        setuptools = (0,)
    if setuptools >= (77,):
        cmd.append("--no-isolation")  # no index needed
    proc = subprocess.run(cmd, cwd=src, capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return wheel, sdist


@pytest.mark.slow
def test_wheel_and_sdist(tmp_path: Path) -> None:
    wheel, sdist = _build(_copy_checkout(tmp_path / "src"), tmp_path / "dist")
    version = scoping.__version__
    assert wheel.name == f"sqlalchemy_scoping-{version}-py3-none-any.whl"
    assert sdist.name == f"sqlalchemy_scoping-{version}.tar.gz"

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = f"sqlalchemy_scoping-{version}.dist-info"
        metadata = email.parser.Parser().parsestr(zf.read(f"{info}/METADATA").decode())
        zf.extractall(tmp_path / "installed")
    outside = [n for n in names if not n.startswith(("scoping/", f"{info}/"))]
    assert outside == [], "the wheel ships only the scoping package"
    assert "scoping/py.typed" in names
    assert f"{info}/licenses/LICENSE" in names
    assert not [n for n in names if n.startswith(("stress/", "tests/"))]
    assert metadata["Name"] == NAME
    assert metadata["Version"] == version
    assert metadata["License-Expression"] == "MIT"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert sorted(metadata.get_all("Provides-Extra") or []) == [
        "asyncio",
        "celery",
        "gevent",
        "postgres",
    ]

    # The unpacked wheel answers --version from its own metadata.
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import scoping, sys; print(scoping.__file__); sys.argv[1:] = ['--version'];"
            "import runpy; runpy.run_module('scoping', run_name='__main__')",
        ],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "installed"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    assert Path(first).is_relative_to(tmp_path / "installed")
    assert second == f"{NAME} {version}"

    with tarfile.open(sdist) as tf:
        members = {m.name.split("/", 1)[1] for m in tf.getmembers() if "/" in m.name}
    for path in (
        "LICENSE",
        "README.md",
        "CHANGELOG.md",
        "pyproject.toml",
        "scoping/py.typed",
        "tests/conftest.py",
        "mkdocs.yml",
    ):
        assert path in members, f"{path} is missing from the sdist"

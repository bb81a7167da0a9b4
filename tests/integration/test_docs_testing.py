"""docs/testing.md runs as written: its ``ini`` block becomes a project's
pytest.ini and every ``python`` block (each names its file on its first line)
a test file of that project, run by a separate pytest.

The last test is the issue's "done means": the same files pass in a fresh
virtualenv into which qmpjobd was installed by ``pip install`` (a real,
non-editable build), with the plugin found through its ``pytest11`` entry point
and the schema read from the installed package data. Its dependencies (pytest,
pytest-asyncio, qemu.qmp, jsonschema, uvloop) come from this repository's
virtualenv through a directory of links that leaves out qmpjobd's own editable
install, so no network and no second copy of them is needed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.support.daemons import REPO

DOC = REPO / "docs" / "testing.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.S | re.M)
FILE_HEADER = re.compile(r"# (test_\w+\.py)\n")
PLUGIN_ARGS = ["-p", "pytest_asyncio.plugin", "-p", "qmpjobd.testing.pytest_plugin"]


def code_blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(DOC.read_text()) if lang == language]


def doc_test_files() -> dict[str, str]:
    files = {}
    for body in code_blocks("python"):
        header = FILE_HEADER.match(body)
        assert header, f"a python block of docs/testing.md names no file:\n{body[:200]}"
        assert header.group(1) not in files, f"two blocks are {header.group(1)}"
        files[header.group(1)] = body
    return files


def write_project(directory: Path) -> int:
    """The doc's project in ``directory``; returns how many tests it has."""
    (ini,) = [body for body in code_blocks("ini") if body.startswith("[pytest]")]
    (directory / "pytest.ini").write_text(ini)
    tests = 0
    for name, body in doc_test_files().items():
        (directory / name).write_text(body)
        tests += len(re.findall(r"^(?:async )?def test_", body, re.M))
    return tests


def passed(output: str) -> int:
    found = re.search(r"(\d+) passed", output)
    return int(found.group(1)) if found else 0


def clean_env() -> dict[str, str]:
    env = dict(os.environ)
    # The suite's conftest sets this; a user's project starts without it.
    env.pop("QMPJOBD_QEMU_VERSION", None)
    env.pop("PYTHONPATH", None)
    return env


def test_the_doc_has_an_example_of_every_control() -> None:
    text = "\n".join(doc_test_files().values())
    controls = ["x-qmpjobd-job-fault", "x-qmpjobd-fault-query", "x-qmpjobd-job-hold",
                "x-qmpjobd-job-release", "x-qmpjobd-job-ready-lost", "x-qmpjobd-reply-delay",
                "x-qmpjobd-disconnect", "x-qmpjobd-clock-step", "x-qmpjobd-clock-query"]
    missing = [control for control in controls if f'"{control}"' not in text]
    assert missing == []
    for phase in ("run", "prepare", "commit"):
        assert f'"phase": "{phase}"' in text


def test_the_docs_examples_pass(tmp_path: Path) -> None:
    tests = write_project(tmp_path)
    env = clean_env()
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             *PLUGIN_ARGS], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert passed(result.stdout) == tests > 10


def copy_project(destination: Path) -> Path:
    """What ``pip install /work/main`` builds from, copied so that the build's
    ``build/`` and ``*.egg-info`` never land in the shared working tree."""
    source = destination / "qmpjobd-src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    # symlinks=True: qmpjobd/schema is a link to ../schema, as in the repository.
    for name in ("qmpjobd", "schema"):
        shutil.copytree(REPO / name, source / name, symlinks=True, ignore=ignore)
    return source


def dependency_links(destination: Path) -> Path:
    """This virtualenv's packages, minus qmpjobd itself, as a directory of links."""
    links = destination / "deps"
    links.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        name = entry.name
        if name.startswith(("qmpjobd", "__editable__")) or name.endswith(".pth") or name == "__pycache__":
            continue
        (links / name).symlink_to(entry)
    return links


def test_a_fresh_install_runs_the_docs_examples(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    (purelib / "qmpjobd-test-deps.pth").write_text(f"{dependency_links(tmp_path)}\n")
    env = clean_env()
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q",
                              str(copy_project(tmp_path))], env=env, capture_output=True,
                             text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    installed = purelib / "qmpjobd"
    assert (installed / "schema" / "qapi-schema.json").is_file()
    assert not (installed / "schema").is_symlink()

    project = tmp_path / "project"
    project.mkdir()
    tests = write_project(project)
    # Not -q: the header lists the plugins that came in through entry points.
    result = subprocess.run([str(python), "-m", "pytest", "-p", "no:cacheprovider",
                             "--trace-config"], cwd=project, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert passed(result.stdout) == tests
    # The plugin came in through the entry point, from the installed copy.
    plugin = installed / "testing" / "pytest_plugin.py"
    assert re.search(rf"\bqmpjobd-\S+ at {re.escape(str(plugin))}", result.stdout), \
        [line for line in result.stdout.splitlines() if "qmpjobd" in line][:5]
    assert "PytestAssertRewriteWarning" not in result.stdout

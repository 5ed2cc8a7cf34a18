"""Docs that cannot drift: every command has help text and a place in the README."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import click

from imsearch.cli import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def commands(group: click.Group, prefix: str = ""):
    for name, cmd in group.commands.items():
        yield prefix + name, cmd
        if isinstance(cmd, click.Group):
            yield from commands(cmd, prefix + name + " ")


def test_every_command_and_option_has_help():
    for name, cmd in commands(cli):
        assert cmd.help, f"imsearch {name} has no help text"
        for param in cmd.params:
            if isinstance(param, click.Option):
                assert param.help, f"imsearch {name} {param.opts[0]} has no help text"


def test_every_command_is_in_the_readme():
    for name, cmd in commands(cli):
        if isinstance(cmd, click.Group):
            continue
        assert re.search(rf"imsearch {re.escape(name)}\b", README), f"README does not show `imsearch {name}`"


def test_examples_show_paths_a_reader_could_have_not_the_machine_they_were_made_on():
    docs = [README, *(p.read_text() for p in (ROOT / "docs").glob("*.md"))]
    for text in docs:
        assert not re.findall(r"(?<![\w.~-])/(?:work|root|tmp)/\S*", text)


def test_every_package_is_installed_and_in_the_readmes_layout():
    """A package missing from pyproject.toml works in a checkout and is absent from a wheel: both lists must
    name every folder of imsearch/ that is a package, and the README's layout each of them."""
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "imsearch").rglob("__init__.py")}
    assert folders <= declared, folders - declared
    layout = README.split("## Layout", 1)[1].split("\n## ", 1)[0]
    for package in folders - {"imsearch"}:
        assert f"  {package.split('.')[-1]}/" in layout, package


def test_the_oldest_python_is_the_same_for_pip_ruff_mypy_setup_and_the_readme():
    """tomllib (here) and the typing the package uses need 3.11: every place that names a version says so."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    oldest = project["project"]["requires-python"].removeprefix(">=")
    assert oldest == "3.11"
    assert project["tool"]["ruff"]["target-version"] == "py" + oldest.replace(".", "")
    assert project["tool"]["mypy"]["python_version"] == oldest
    assert f"\nMIN_PYTHON={oldest}\n" in (ROOT / "scripts" / "setup").read_text()
    assert f"(Python ≥ {oldest})" in README


def test_setup_refuses_an_older_python_with_one_clear_line(tmp_path):
    older = tmp_path / "python3.10"  # answers as Python 3.10 does to the check: exit 1, and its version
    older.write_text('#!/bin/sh\nif [ "$1" = -V ]; then echo "Python 3.10.13"; exit 0; fi\nexit 1\n')
    older.chmod(0o755)
    done = subprocess.run([str(ROOT / "scripts" / "setup")], env={"PYTHON": str(older), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr == (f"scripts/setup: imsearch needs Python 3.11 or newer; {older} is Python 3.10.13 "
                           "(set PYTHON=/path/to/python3.11)\n")

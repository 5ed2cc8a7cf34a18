"""Docs that cannot drift: every command has help text and a place in the README."""

from __future__ import annotations

import re
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
    import tomllib

    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "imsearch").rglob("__init__.py")}
    assert folders <= declared, folders - declared
    layout = README.split("## Layout", 1)[1].split("\n## ", 1)[0]
    for package in folders - {"imsearch"}:
        assert f"  {package.split('.')[-1]}/" in layout, package

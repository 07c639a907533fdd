"""What a record says about the code that made it: memexp's version, and its own commit only.

The commit is memexp's when memexp runs from a git checkout of itself, and None for an
installed copy, whatever repository it is installed in or the user stands in.
"""

from __future__ import annotations

import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest

import memexp
from memexp.environment import PACKAGE_FILE, describe_environment, git_commit


def git(root: Path, *args: str) -> str:
    identity = ["-c", "user.name=memexp", "-c", "user.email=memexp@example.invalid"]
    command = ["git", *identity, "-c", "commit.gpgsign=false", *args]
    return subprocess.run(
        command, cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()


def repository(root: Path, *files: str) -> Path:
    """A git work tree at `root` holding `files`, committed."""
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "--quiet")
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"# {name}\n")
    git(root, "add", "--all")
    git(root, "commit", "--quiet", "-m", "files")
    return root


def test_the_version_is_the_installed_distributions() -> None:
    assert memexp.__version__ == version("memexp")
    assert describe_environment("cpu")["memexp_version"] == memexp.__version__


def test_a_checkout_of_memexp_records_its_commit(tmp_path: Path) -> None:
    checkout = repository(tmp_path / "memexp", PACKAGE_FILE, "README.md")
    head = git(checkout, "rev-parse", "HEAD")
    assert git_commit(checkout) == head
    (checkout / PACKAGE_FILE).write_text("# changed\n")
    assert git_commit(checkout) == head + "+dirty"


def test_an_install_inside_another_repository_records_no_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = repository(tmp_path / "project", "notes.md", f"venv/site-packages/{PACKAGE_FILE}")
    monkeypatch.chdir(project)
    assert git_commit(project / "venv" / "site-packages") is None


def test_a_repository_that_does_not_hold_memexp_records_no_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = repository(tmp_path / "other", "notes.md")
    (other / PACKAGE_FILE).parent.mkdir()
    (other / PACKAGE_FILE).write_text("# untracked\n")
    monkeypatch.chdir(other)
    assert git_commit(other) is None


def test_a_folder_outside_git_records_no_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(repository(tmp_path / "where_the_user_stands", "notes.md"))
    site = tmp_path / "site-packages"
    (site / PACKAGE_FILE).parent.mkdir(parents=True)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert git_commit(site) is None

"""Where a job ran: enough to tell whether two results can be compared."""

from __future__ import annotations

import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch

import memexp

# The folder that holds the `memexp` package: a checkout's top, or an install's site-packages.
PACKAGE_PARENT = Path(__file__).resolve().parent.parent
PACKAGE_FILE = "memexp/__init__.py"  # what a checkout of memexp tracks


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()


def git_commit(package_parent: Path = PACKAGE_PARENT) -> str | None:
    """memexp's own commit (with a `+dirty` mark) when it runs from a git checkout of itself.

    That is: `package_parent` is the top of a git work tree that tracks the package. An
    installed copy inside some other repository (a venv in a project, the folder a user stands
    in) has no commit of its own: None, never the other repository's commit.
    """
    try:
        top = Path(_git(package_parent, "rev-parse", "--show-toplevel")).resolve()
        if top != package_parent.resolve():
            return None
        _git(package_parent, "ls-files", "--error-unmatch", PACKAGE_FILE)
        commit = _git(package_parent, "rev-parse", "HEAD")
        dirty = _git(package_parent, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def describe_environment(device: str) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device_name": device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "memexp_version": memexp.__version__,
        "git_commit": git_commit(),
    }

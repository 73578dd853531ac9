"""The command that started this process, for hints that the user can run as printed."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

PROGRAM = "study"


def _shortest_path(path: Path) -> str:
    """Return `path` relative to the working directory when it lies below it,
    else relative to the home directory as ~/..., else absolute."""
    # Symbolic links are kept: a virtualenv's python is a link to the base
    # interpreter, which would run without the virtualenv's packages.
    absolute = Path(os.path.abspath(path))
    for base, prefix in ((Path.cwd(), ""), (Path.home(), "~/")):
        try:
            relative = absolute.relative_to(os.path.abspath(base))
        except ValueError:
            continue
        text = prefix + str(relative)
        # A bare name would be looked up on PATH, so a file in the working
        # directory keeps its ./ prefix.
        if not prefix and "/" not in text:
            text = f"./{text}"
        return text
    return str(absolute)


def _on_path_as(name: str, path: Path) -> bool:
    """Return whether `name` on PATH is the file at `path`."""
    found = shutil.which(name)
    if found is None:
        return False
    try:
        return os.path.samefile(found, path)
    except OSError:
        return False


def command_name(argv0: str | None = None) -> str:
    """Return the shell words that run the `study` command the way this process ran.

    A `study` script started by path (such as .venv/bin/study, outside an
    activated virtualenv) is named by that path, shortened where possible,
    and `python -m study.cli` by the interpreter's path. Plain `study` is
    returned where PATH finds the same script.
    """
    argv0 = sys.argv[0] if argv0 is None else argv0
    path = Path(argv0)
    if path.name == PROGRAM and "/" in argv0:
        if _on_path_as(PROGRAM, path):
            return PROGRAM
        return shlex.quote(_shortest_path(path))
    if path.name == "cli.py" and path.parent.name == "study":
        python = Path(sys.executable)
        interpreter = (
            python.name if _on_path_as(python.name, python) else _shortest_path(python)
        )
        return f"{shlex.quote(interpreter)} -m study.cli"
    return PROGRAM

"""The one exception type for mistakes a user can make (bad file, bad value, missing GPU ...).

The entry point prints it as a single line; anything else is a bug and keeps its traceback.
"""

import os
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input or environment, worded so the message alone says what to fix."""


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (library errors often span many)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def log_tail(path: Path, size: int = 8192) -> list[str]:
    """The lines in the last `size` bytes of a log (a child process's), [] if it cannot be read:
    where its `error:` line or traceback ends up."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode("utf-8", errors="replace").strip().splitlines()
    except OSError:
        return []

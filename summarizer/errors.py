"""The one exception type for mistakes a user can make (bad file, bad value, missing GPU ...).

The entry point prints it as a single line; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input or environment, worded so the message alone says what to fix."""


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (library errors often span many)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__

"""The one exception type for mistakes a user can make (bad file, bad value, missing GPU ...).

The entry point prints it as a single line; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input or environment, worded so the message alone says what to fix."""

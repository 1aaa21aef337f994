"""The one exception type for bad user input.

Every message names the problem and the fix, so that the CLI can print it without a traceback.
"""


class InputError(ValueError):
    """Bad input from a user: a file, a column, a key, a split, a config value."""

"""User-facing errors: one line, naming the culprit; the CLI prints them without a traceback."""


class TmpqError(Exception):
    """An error caused by user input (a path, a config value, a file) rather than a bug in tmpq."""

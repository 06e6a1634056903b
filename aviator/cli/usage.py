"""The CLI's own error: a user mistake reported in one line, without a traceback."""


class UsageError(Exception):
    """A user mistake the CLI reports in one line (``aviator <command>: <message>``, exit 2)."""

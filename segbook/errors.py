"""Errors meant for the user: the CLI prints their message (no traceback) and exits non-zero."""


class SegbookError(Exception):
    """A problem the user can fix; the message says what and where."""

"""The project's own error type: one clear line for the user, no traceback unless --debug."""


class QexportError(Exception):
    """A user-facing error: the message names the thing that is wrong and how to fix it."""

"""The base class of every mistake a user can make.

Each package raises its own subclass (``SimCLRError``, ``IndexStoreError``, ``RetrievalError``);
the CLI, the web app and ``app.py`` catch :class:`UserError` alone and show its message as one
line. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A bad file, option or request; the message names the problem and, where possible, the fix."""


def first_line(exc: BaseException, default: str = "no details") -> str:
    """The first non-empty line of an exception's message (``default`` when it has none)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return default


def last_line(exc: BaseException, default: str = "no details") -> str:
    """The last non-empty line of an exception's message (``default`` when it has none)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else default

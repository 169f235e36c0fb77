class TDRewardError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

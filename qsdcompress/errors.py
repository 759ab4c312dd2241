"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class QsdError(Exception):
    """A problem with the user's input (file, option, data) that a message can explain."""


def one_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when it has none), for error texts."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:limit]

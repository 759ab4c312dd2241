"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2
(with ``--json``: ``{"error": ..., "hint": ...}`` on stdout)."""
from __future__ import annotations

import re

#: how a message's advice starts: "...; pass --data", "... (run `qsdcompress convert` first)"
_HINT = re.compile(r"(?:;|:|\(|,)\s*((?:did you mean|pass|use|run|train|omit|give|choose|try|install|set|"
                   r"convert|rerun|add|drop|see)\b.*)$", re.IGNORECASE)


class QsdError(Exception):
    """A problem with the user's input (file, option, data) that a message can explain; ``hint``
    says what to do (else it is read off the message's tail)."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


def error_and_hint(e: BaseException) -> tuple[str, str | None]:
    """A message split into what went wrong and what to do about it (None when it says nothing)."""
    msg = str(e).strip()
    hint = getattr(e, "hint", None)
    if hint:
        return msg, hint
    m = _HINT.search(msg)
    if m is None:
        return msg, None
    hint = m.group(1)
    if hint.endswith(")") and hint.count(")") > hint.count("("):
        hint = hint[:-1]
    return msg[: m.start()].rstrip(" ;:,("), hint


def one_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when it has none), for error texts."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:limit]

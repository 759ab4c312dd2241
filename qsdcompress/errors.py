"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class QsdError(Exception):
    """A problem with the user's input (file, option, data) that a message can explain."""

"""The project's exception type: the CLI prints its message as one line and exits with code 1."""


class LoraDBError(Exception):
    """A problem the user can fix: the message names what is wrong and how to fix it."""

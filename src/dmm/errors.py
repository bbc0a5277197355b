"""Errors that the command line turns into one line and exit status 2."""


class DMMError(ValueError):
    """Bad input from the user: a message naming what is wrong and where."""

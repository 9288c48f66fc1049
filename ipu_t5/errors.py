"""The one exception type that reaches the user as a single line instead of a traceback."""


class UserError(Exception):
    """Bad input from the user: the message names the bad value and the fix.

    The CLI prints it as one line and exits non-zero; library callers can catch it.
    """

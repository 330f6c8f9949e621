"""Errors that carry a message for the user.

A :class:`UserError` is bad input: the command line prints its one-line message (which names the
problem and the fix) and exits with status 2, without a traceback. Anything else that escapes is a
bug in pyro-lvm and exits with status 1.
"""


class UserError(Exception):
    """Bad input from the user; ``str(err)`` is one line naming the problem and the fix."""

    exit_status = 2

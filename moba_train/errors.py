"""The one kind of error a user can fix: bad input (config, data, checkpoint, command line).

Its message names the problem and the fix; `moba-train` prints it on one line, without a traceback,
and exits 1. Everything else is a bug or a failure of the machine and keeps its traceback.
"""


class UserError(ValueError):
    """A problem with what the user gave; the message says where and how to fix it."""

"""The error type for problems the user caused and can fix.

Command lines print such an error as one line on stderr and exit non-zero, with no traceback.
Anything else that goes wrong is a bug and still raises.
"""


class UserError(Exception):
    """Bad input, bad flags or a bad environment; the message is shown to the user as is."""

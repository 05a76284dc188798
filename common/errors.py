"""The error type for problems the user caused and can fix, and how an error becomes one line.

Command lines print such an error as one line on stderr and exit non-zero, with no traceback
(`common.cli.run_command`). Anything else that goes wrong is a bug and still raises.
"""


class UserError(Exception):
    """Bad input, bad flags or a bad environment; the message is shown to the user as is."""


def first_line(error: BaseException) -> str:
    """An exception as one short line for the user (hostile files make long, multi-line messages)."""
    text = str(error).strip()
    return (text.splitlines()[0][:300] if text else type(error).__name__)

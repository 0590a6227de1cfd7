"""The one exception type a user should ever see from the studies.

Raised for bad input (missing or corrupt files, impossible grids, unknown options). The CLIs catch it, print
its message on one line prefixed with "error:", and exit with status 2 before Ray starts or any result is written.
"""


class StudyError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it."""

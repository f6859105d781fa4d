"""The one exception type for user mistakes; the CLI prints it on one line and exits 2."""


class GptError(Exception):
    """A problem the user can fix: the message names the problem and the fix."""

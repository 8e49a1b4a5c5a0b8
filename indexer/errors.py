"""One exception type for everything the user can fix; the CLI prints it as one line."""


class LoupeError(Exception):
    """A problem the user caused or can fix (bad path, missing model, wrong device...).

    The message is complete and self-explanatory: the CLI prints it as a single line
    and exits non-zero, with no traceback.
    """

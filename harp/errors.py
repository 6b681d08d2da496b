"""The one exception type for bad user input: the CLI turns it into one line on stderr and exit 2."""


class HarpError(Exception):
    """A user-facing error (bad argument, missing data, invalid checkpoint)."""

"""The one exception type bitsmith raises for bad input; the CLI turns it into one line and exit code 2."""


class BitsmithError(ValueError):
    """Bad input or an impossible request. The message names what is wrong and how to fix it."""

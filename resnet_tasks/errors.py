"""User-facing errors: problems with the user's input that the CLI reports without a traceback."""


class UserError(Exception):
    """A problem the user can fix (a missing file, a bad key, an incompatible checkpoint).

    The message names the file or key and says what to do; the CLI prints it alone and exits 2.
    """

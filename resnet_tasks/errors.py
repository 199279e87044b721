"""User-facing errors: problems with the user's input that the CLI reports without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (a missing file, a bad key, an incompatible checkpoint).

    The message names the file or key and says what to do; the CLI prints it alone and exits 2.
    """

    # The most recent UserError created in this process. jsonargparse re-wraps exceptions raised while it
    # instantiates the model and data classes into a generic ValueError; the CLI uses this to recover ours.
    last: UserError | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        UserError.last = self


def find_user_error(error: BaseException) -> UserError | None:
    """The UserError behind `error`: itself, one in its cause/context chain, or one quoted in its message."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, UserError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    last = UserError.last
    if last is not None and str(last) and str(last) in str(error).replace("\\'", "'"):
        return last
    return None


def user_message(error: BaseException) -> str:
    """The user-facing text of a UserError, also when it was re-raised from a DataLoader worker."""
    text = str(error)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split("UserError: ", 1)[-1]
    return text

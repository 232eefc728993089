"""Errors a user can cause and fix.

Library code raises :class:`UserError` with a message that names the file, line or
field at fault and says what to do. The CLI prints it on one line and exits with
status 2; anything else is a bug and may show a traceback.
"""


class UserError(Exception):
    """A problem in the user's input (file, flag, model, disk), not in lowrank."""

    def __init__(self, message: str):
        # One line only: the CLI prints this as is.
        super().__init__(" ".join(str(message).split()))

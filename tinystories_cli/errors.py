"""The one exception type for mistakes a user can make.

Library code raises `UserError(what, fix)`; the CLI prints it as one red line and exits 2.
Anything else that escapes is a bug and gets a traceback hint instead.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: bad flag, missing file, invalid config.

    >>> str(UserError("no such file: a.txt", "run `tslm download tinystories` first"))
    'no such file: a.txt (run `tslm download tinystories` first)'
    """

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(f"{what} ({fix})" if fix else what)

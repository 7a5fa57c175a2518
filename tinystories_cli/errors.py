"""The exception type for mistakes a user can make.

`UserError(what, fix)` is a `ValueError` that also says how to fix it. Library code raises plain
`ValueError`s (or a `UserError` where it knows the fix) in plain words, never naming CLI flags: it names
the parameter in backticks (`UserError("`out` exists", "pass `force` to overwrite it")`). The CLI shows
each backticked parameter as its flag (`cli/common.to_flags`) and prints any of them as one red line,
exit 2. Anything else that escapes is a bug and gets a traceback hint instead.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem the user can fix: bad flag, missing file, invalid config.

    >>> str(UserError("no such file: a.txt", "run `tslm download tinystories` first"))
    'no such file: a.txt (run `tslm download tinystories` first)'
    """

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(f"{what} ({fix})" if fix else what)

"""The one exception type users see.

Every problem a user can fix (a bad file, a bad flag, a missing model) is raised as a
`MinillamaError` whose message is one line saying what is wrong and what to do. The CLI
prints that line and exits with code 2; it never shows a traceback for these.
"""


class MinillamaError(ValueError):
    """A user-facing error: one line, says what is wrong and what to do."""

"""The one exception type users see.

Every problem a user can fix (a bad file, a bad flag, a missing model) is raised as a
`MinillamaError` whose message is one line saying what is wrong and what to do. The CLI
prints that line and exits with code 2; it never shows a traceback for these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class MinillamaError(ValueError):
    """A user-facing error: one line, says what is wrong and what to do."""


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON file that must hold an object (config.json, tokenizer_config.json, ...): a one-line error if not.

    Regular files only, size-limited, and every hostile-JSON failure is one line: see `minillama.files`.
    """
    from minillama.files import read_json_object as read  # files imports this module: import here

    return read(path)

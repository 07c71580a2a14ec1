"""The one exception type users see.

Every problem a user can fix (a bad file, a bad flag, a missing model) is raised as a
`MinillamaError` whose message is one line saying what is wrong and what to do. The CLI
prints that line and exits with code 2; it never shows a traceback for these.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MinillamaError(ValueError):
    """A user-facing error: one line, says what is wrong and what to do."""


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON file that must hold an object (config.json, tokenizer_config.json, ...): a one-line error if not."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MinillamaError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MinillamaError(f"{path}: not valid JSON ({' '.join(str(e).split())}); re-download or fix the file"
                             ) from None
    if not isinstance(data, dict):
        raise MinillamaError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data

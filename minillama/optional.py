"""Optional dependencies (transformers for `diff` and `bench`, matplotlib for plots, llama-cpp-python for the
bench's llama.cpp side): checked before any work.

The runtime never needs them. A tool that does checks first, so a user who lacks one gets a single line
naming the extra to install instead of a traceback after minutes of loading.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from minillama.errors import MinillamaError

# module -> the pip extra of minillama that installs it
EXTRAS = {"transformers": "reference", "accelerate": "reference", "matplotlib": "plot"}
# module -> the pip package that installs it, where the names differ and no extra does
PACKAGES = {"llama_cpp": "llama-cpp-python"}


def installed(module: str) -> bool:
    """Whether `module` can be imported, found without importing it (transformers takes seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[module] is None (import blocked)
        return False


def require(module: str, purpose: str) -> None:
    """Raise a one-line MinillamaError naming the extra when `module` is missing; `purpose` says who needs it."""
    if not installed(module):
        extra = EXTRAS.get(module)
        how = f"pip install 'minillama[{extra}]'" if extra else f"pip install {PACKAGES.get(module, module)}"
        raise MinillamaError(f"{purpose} needs {module}, which is not installed: {how}")


def pyplot(purpose: str = "--plot") -> Any:
    """matplotlib.pyplot with the file-only Agg backend (no display needed), or a one-line error."""
    require("matplotlib", purpose)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

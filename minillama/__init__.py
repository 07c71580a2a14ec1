"""minillama: a from-scratch, readable Llama decoder that loads Hugging Face checkpoints and chats.

    model = minillama.load_model("path/to/model")          # or minillama.resolve_model("org/name")
    tokenizer = minillama.load_tokenizer("path/to/model")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}], tokenize=True)
    for token in minillama.generate(model, ids, max_new_tokens=50):
        ...

The names below are imported on first use (PEP 562), not by `import minillama`: most of them need torch,
which takes seconds to import, and `minillama --help` (whose code lives in minillama.cli, so runs this file
first) should not wait for it.
"""

import importlib
import importlib.util
import sys
import types

# Each public name and the module that defines it.
_EXPORTS = {
    "capture": "minillama.capture",
    "load_model": "minillama.checkpoint",
    "LlamaConfig": "minillama.config",
    "diff_against_transformers": "minillama.diff", "first_divergence": "minillama.diff",
    "dump_activations": "minillama.dump",
    "Engine": "minillama.engine", "Request": "minillama.engine", "generate_many": "minillama.engine",
    "MinillamaError": "minillama.errors",
    "GenerationConfig": "minillama.generation", "generate": "minillama.generation",
    "resolve_model": "minillama.hub",
    "intervene": "minillama.intervene", "patching": "minillama.intervene", "steer": "minillama.intervene",
    "KVCache": "minillama.kv_cache",
    "format_lens": "minillama.lens", "logit_lens": "minillama.lens",
    "LlamaForCausalLM": "minillama.model",
    "inspect_model": "minillama.model_info",
    "ChatPipeline": "minillama.pipeline", "pipeline": "minillama.pipeline",
    "Tokenizer": "minillama.tokenizer", "load_tokenizer": "minillama.tokenizer",
}

__all__ = ["ChatPipeline", "Engine", "GenerationConfig", "KVCache", "LlamaConfig", "LlamaForCausalLM", "MinillamaError",
           "Tokenizer", "capture", "diff_against_transformers", "dump_activations", "first_divergence",
           "format_lens", "generate", "inspect_model", "intervene", "load_model", "load_tokenizer", "logit_lens",
           "patching", "pipeline", "Request", "resolve_model", "steer", "generate_many"]


def __getattr__(name: str):
    """A public name, imported now and kept; or a submodule (`minillama.generation` after a bare `import
    minillama`, which worked while this file imported everything)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # the import system sets the attribute itself
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Three functions share their module's name: `minillama.capture`, `.intervene` and `.pipeline` are the
    functions, while `import minillama.pipeline` still loads the module `minillama/pipeline.py`. Once a
    submodule has run, the import system sets it as an attribute of its package, which would shadow the
    function of that name; this refuses exactly that, so the name goes on meaning the function
    (`__getattr__` fetches it from the module in `sys.modules`)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package  # the documented way to customize a module's setattr (Python data model)

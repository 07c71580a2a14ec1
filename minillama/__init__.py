"""minillama: a from-scratch, readable Llama decoder that loads Hugging Face checkpoints and chats.

    model = minillama.load_model("path/to/model")          # or minillama.resolve_model("org/name")
    tokenizer = minillama.load_tokenizer("path/to/model")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}], tokenize=True)
    for token in minillama.generate(model, ids, max_new_tokens=50):
        ...
"""

from minillama.capture import capture
from minillama.checkpoint import load_model
from minillama.config import LlamaConfig
from minillama.diff import diff_against_transformers, first_divergence
from minillama.dump import dump_activations
from minillama.engine import Engine, Request, generate_many
from minillama.errors import MinillamaError
from minillama.generation import GenerationConfig, generate
from minillama.hub import resolve_model
from minillama.intervene import intervene as intervene  # noqa: PLC0414  (the function, like pipeline below)
from minillama.intervene import patching, steer
from minillama.kv_cache import KVCache
from minillama.lens import format_lens, logit_lens
from minillama.model import LlamaForCausalLM
from minillama.model_info import inspect_model
from minillama.pipeline import ChatPipeline
from minillama.pipeline import pipeline as pipeline  # noqa: PLC0414  (the function; the module stays importable)
from minillama.tokenizer import Tokenizer, load_tokenizer

__all__ = ["ChatPipeline", "Engine", "GenerationConfig", "KVCache", "LlamaConfig", "LlamaForCausalLM", "MinillamaError",
           "Tokenizer", "capture", "diff_against_transformers", "dump_activations", "first_divergence",
           "format_lens", "generate", "inspect_model", "intervene", "load_model", "load_tokenizer", "logit_lens",
           "patching", "pipeline", "Request", "resolve_model", "steer", "generate_many"]

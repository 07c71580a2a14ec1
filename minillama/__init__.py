"""minillama: a from-scratch, readable Llama decoder that loads Hugging Face checkpoints and chats."""

from minillama.capture import capture
from minillama.checkpoint import load_model
from minillama.config import LlamaConfig
from minillama.errors import MinillamaError
from minillama.kv_cache import KVCache
from minillama.model import LlamaForCausalLM

__all__ = ["capture", "LlamaConfig", "LlamaForCausalLM", "KVCache", "MinillamaError", "load_model"]

"""The whole walkthrough in one call: chat messages in, the assistant's reply out.

    pipe = minillama.pipeline("path/to/Llama-3.2-1B-Instruct")
    pipe([{"role": "user", "content": "Hi!"}])                 # -> "Hello! How can I help?"
    for piece in pipe.stream(messages, temperature=0.2):      # the same reply, as it is made
        print(piece, end="", flush=True)

Each step is one visible line in `stream`: messages -> chat template -> token ids -> `generate`
(prefill, then decode through the KV cache, sampling each token) -> streaming detokenizer -> text.
Like transformers' `pipeline("text-generation")`, but returning just the reply. Called the transformers way,
it answers the transformers way too, so the usual walkthrough lines run unchanged:

    pipe = minillama.pipeline("text-generation", model="path/to/Llama-3.2-1B-Instruct", torch_dtype=torch.bfloat16,
                              device_map="auto")
    outputs = pipe(messages, max_new_tokens=256)
    outputs[0]["generated_text"][-1]["content"]                # the reply; [:-1] are the messages
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from minillama.checkpoint import load_model
from minillama.errors import MinillamaError
from minillama.generation import Generation, GenerationConfig, generate
from minillama.hub import resolve_model
from minillama.sampling import make_generator
from minillama.tokenizer import load_tokenizer

Messages = Sequence[Mapping[str, Any]]


class ChatPipeline:
    """A model, its tokenizer and its generation defaults, ready to answer a chat.

    generation_config: the defaults (usually `GenerationConfig.from_model_dir`); each call may override
                       single fields (`pipe(messages, max_new_tokens=50, temperature=0.7)`).
    seed:              makes sampling reproducible across a session; None draws fresh randomness.
    last_generation:   the `Generation` of the latest reply: `.stop_reason` ("eos", "length",
                       "stop_string") and `.tokens` say how it ended.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, generation_config: GenerationConfig | None = None,
                 seed: int | None = None, transformers_output: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.transformers_output = transformers_output  # answer [{"generated_text": [...messages, reply]}]
        self.generation_config = generation_config or GenerationConfig()
        self.generator = make_generator(model.device, seed)
        self.last_generation: Generation | None = None

    def __call__(self, messages: Messages | str, chat_template_kwargs: dict[str, Any] | None = None,
                 return_full_text: bool = True, **overrides: Any) -> str | list[dict[str, Any]]:
        """The assistant's reply to `messages` (a list of {"role", "content"} dicts, or one user message).

        With `transformers_output` (a pipeline made as `pipeline("text-generation", model=...)`), transformers'
        shape: `[{"generated_text": [*messages, {"role": "assistant", "content": reply}]}]`, or with
        `return_full_text=False`, `[{"generated_text": reply}]`."""
        reply = "".join(self.stream(messages, chat_template_kwargs, **overrides))
        if not self.transformers_output:
            return reply
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        answer = [*messages, {"role": "assistant", "content": reply}] if return_full_text else reply
        return [{"generated_text": answer}]

    def stream(self, messages: Messages | str, chat_template_kwargs: dict[str, Any] | None = None,
               **overrides: Any) -> Iterator[str]:
        """The reply as text pieces, each yielded as soon as its tokens are made.

        chat_template_kwargs reach the template (e.g. {"date_string": "26 Jul 2024"}); overrides
        replace generation settings for this reply only. Errors (bad settings, a prompt longer than
        the context) are raised here, before the first piece.
        """
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        prompt_ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        **(chat_template_kwargs or {}))
        config = self.generation_config.updated(**overrides).ending_turns(self.tokenizer)
        generation = generate(self.model, prompt_ids, config, generator=self.generator, tokenizer=self.tokenizer)
        self.last_generation = generation
        return self._pieces(generation)

    def _pieces(self, generation: Generation) -> Iterator[str]:
        # A separate generator, so that `stream` itself checks everything when called, not at the first piece.
        decoder = self.tokenizer.stream_decoder(skip_special_tokens=True)
        for token_id in generation:
            piece = decoder.push(token_id)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail


def pipeline(model_dir: str | Path, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None, seed: int | None = None, *, model: str | Path | None = None,
             torch_dtype: str | torch.dtype | None = None, device_map: str | None = None) -> ChatPipeline:
    """Load a model directory (weights, tokenizer, generation_config.json) into a `ChatPipeline`.

    transformers' spelling works too: `pipeline("text-generation", model=DIR, torch_dtype=..., device_map="auto")`
    gives a pipeline that answers in transformers' shape (`ChatPipeline.__call__`); "auto" means the default."""
    if str(model_dir) == "text-generation":
        if model is None:
            raise MinillamaError('pipeline("text-generation", ...) needs model=, a model directory or hub id')
        model_dir, transformers_output = resolve_model(model), True
        dtype = dtype if torch_dtype in (None, "auto") else torch_dtype
        device = device if device_map in (None, "auto") else device_map
    elif model is not None:
        raise MinillamaError(f"pipeline({str(model_dir)!r}, model=...): the first argument is a model directory, "
                             'or "text-generation" with model=')
    else:
        transformers_output = False
    model_dir = Path(model_dir)
    loaded = load_model(model_dir, device=device, dtype=dtype, pack=True)  # packed: CPU float32 only, faster decode
    tokenizer = load_tokenizer(model_dir)
    return ChatPipeline(loaded, tokenizer, GenerationConfig.from_model_dir(model_dir), seed=seed,
                        transformers_output=transformers_output)

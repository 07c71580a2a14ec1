"""`minillama serve [MODEL]`: an OpenAI-compatible server with a chat page, many users batched through one model.

    minillama serve                                  # the default model, http://127.0.0.1:8000 (loopback only)
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}]}'

Endpoints: POST /v1/chat/completions, /v1/completions, /tokenize, /detokenize; GET /v1/models, /health,
/metrics (Prometheus), / (the chat page). Each of --slots requests has its own --ctx tokens of KV cache (the
start-up line prints the arithmetic); requests past --max-queue waiting get 429. Needs
`pip install 'minillama[serve]'`.
"""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path

from minillama.cli.common import add_model_args, eprint
from minillama.errors import MinillamaError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible server and chat page", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                                                       "only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--slots", type=int, default=4, help="requests decoded together, each with its own KV cache "
                                                        "(default: 4)")
    p.add_argument("--ctx", type=int, help="tokens per slot, prompt and reply (default: the model's context, at "
                                           "most 2048)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; more get 429 "
                                                             "(default: 64)")
    p.add_argument("--chunk-size", type=int, default=256, help="prompt tokens prefilled per step (default: 256)")
    p.add_argument("--api-key", action="append", help="require 'Authorization: Bearer KEY' (repeatable)")
    p.add_argument("--api-key-file", type=Path, help="a file with one API key per line")
    p.add_argument("--max-body", type=int, default=4 * 2**20, help="largest request body in bytes (default: 4 MiB)")
    p.set_defaults(func=run)


def api_keys(args: argparse.Namespace) -> list[str]:
    keys = list(args.api_key or [])
    if args.api_key_file is not None:
        try:
            keys += [line.strip() for line in args.api_key_file.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise MinillamaError(f"cannot read --api-key-file {args.api_key_file}: {e}") from None
        if not keys:
            raise MinillamaError(f"--api-key-file {args.api_key_file} holds no key")
    if any(not k.isprintable() or " " in k for k in keys):
        raise MinillamaError("an API key must be printable, without spaces")
    return keys


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before the model loads."""
    from minillama.optional import require

    for module, package in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("prometheus_client", "prometheus")):
        try:
            require(module, "minillama serve")
        except MinillamaError:
            raise MinillamaError(f"minillama serve needs {package}, which is not installed: "
                                 "pip install 'minillama[serve]'") from None
    for name, low in (("slots", 1), ("max_queue", 0), ("chunk_size", 1), ("max_body", 1024)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise MinillamaError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    if args.ctx is not None and args.ctx < 2:
        raise MinillamaError(f"--ctx must be at least 2 tokens, got {args.ctx}")
    if not 0 < args.port < 65536:
        raise MinillamaError(f"--port must be in 1..65535, got {args.port}")


def load_engine(args: argparse.Namespace, model_name: str):
    """Load model and tokenizer and make the engine (not started); says what it loaded."""
    import torch

    from minillama.checkpoint import load_model, resolve_device
    from minillama.cli.chat import weights_in_words
    from minillama.cli.common import quantize_args, resolve_model_arg, runs_default_quantized, tensor_parallel
    from minillama.config import LlamaConfig
    from minillama.engine import Engine
    from minillama.tokenizer import load_tokenizer

    device = resolve_device(args.device)
    path = resolve_model_arg(args, quantized=runs_default_quantized(args, device))
    context = LlamaConfig.from_file(path).max_position_embeddings
    ctx = args.ctx or min(context, 2048)
    if ctx > context:
        raise MinillamaError(f"--ctx {ctx} is longer than the model's context of {context} tokens")
    tokenizer = load_tokenizer(path)
    if tokenizer.chat_template_source is None:
        eprint(f"minillama serve: {path} has no chat template: /v1/chat/completions will refuse, "
               "/v1/completions works")
    model = load_model(path, device=device, dtype=args.dtype, pack=True, tp=tensor_parallel(), **quantize_args(args))
    engine = Engine(model, tokenizer, slots=args.slots, max_seq_len=ctx, chunk_size=args.chunk_size,
                    max_waiting=args.max_queue)
    weights = weights_in_words(model) or str(model.dtype).replace("torch.", "")  # the chat banner's words
    where = f"{device}, {torch.get_num_threads()} threads" + (", tensor parallel" if tensor_parallel() else "")
    eprint(f"minillama serve: model {model_name} ({path}); weights {weights} on {where}")
    eprint(f"minillama serve: {engine.memory_line()}" + (" on each rank" if tensor_parallel() else ""))
    return engine, tokenizer


def run(args: argparse.Namespace) -> int:
    check_args(args)
    keys = api_keys(args)
    name = Path(args.model).name if os.path.isdir(args.model) else str(args.model)
    from minillama import tp

    if tp.rank() != 0:  # under torchrun: rank 0 serves HTTP and schedules; the other ranks run its steps
        engine, _ = load_engine(args, name)
        engine.follow()
        return 0
    import uvicorn

    from minillama.server import ServerState, create_app

    state = ServerState(model_name=name, api_keys=keys, max_body=args.max_body)
    server = uvicorn.Server(uvicorn.Config(create_app(state), host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=3))
    failed: list[str] = []

    def loader() -> None:
        try:
            engine, state.tokenizer = load_engine(args, name)
            state.engine = engine.start()
            eprint(f"minillama serve: ready at http://{args.host}:{args.port} (chat page at /, API at /v1"
                   + (", API key required" if keys else "") + ")")
        except MinillamaError as e:
            failed.append(str(e))
            server.should_exit = True
        except Exception as e:  # a bug: keep its traceback, and stop the server rather than serve 503 forever
            failed.append(f"{type(e).__name__}: {e}")
            server.should_exit = True
            raise

    eprint(f"minillama serve: loading {args.model}; http://{args.host}:{args.port}/health says 503 until ready")
    threading.Thread(target=loader, name="minillama-loader", daemon=True).start()
    try:
        server.run()
    finally:
        if state.engine is not None:
            state.engine.stop()
    if failed:
        raise MinillamaError(failed[0])
    if not server.started:
        raise MinillamaError(f"cannot listen on {args.host}:{args.port} (in use, or not an address of this "
                             "machine); choose another --port or --host")
    return 0

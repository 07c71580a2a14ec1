"""Arguments and loading shared by the subcommands that run a model."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from minillama.errors import MinillamaError
from minillama.hub import DEFAULT_MODEL

if TYPE_CHECKING:  # torch is imported where a command runs, so --help and usage errors do not wait for it
    import torch


def add_model_args(p: argparse.ArgumentParser, dtype: str | None = None) -> None:
    """MODEL (optional: a directory, a hub id org/name, or the default model's name), --device, --dtype, --offline.

    Every subcommand gets the same names and defaults; `dtype` overrides only the dtype's default
    (diff compares in float32, where the reference is exact).
    """
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL",
                   help=f"model directory, hub id (org/name) or {DEFAULT_MODEL!r} (the default)")
    p.add_argument("--device", help="cpu, cuda, cuda:N, mps (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=dtype, help="float32, bfloat16, float16 (default: "
                   + (dtype or "the checkpoint's on a GPU, float32 on CPU") + ")")
    p.add_argument("--offline", action="store_true", help="use only files already downloaded (also HF_HUB_OFFLINE=1)")
    p.add_argument("--quantize", choices=["int8", "int4", "none"],
                   help="int8 / int4: weight-only quantization as the model loads (CPU; docs/quantization.md); "
                        "none: float weights, dequantizing a quantized model. Default: the weights as stored; "
                        "a --dtype without --quantize also gives float weights")
    p.add_argument("--group-size", type=int, help="int4 group size: 32 (default), 64 or 128; for int8, one scale "
                                                  "per group instead of one per output channel")
    p.add_argument("--threads", "-t", type=int, help="CPU threads for torch's kernels (default: one per core that "
                                                     "is idle at start, so a busy machine does not stall every step)")
    add_tp_arg(p)


def quantize_args(args: argparse.Namespace) -> dict:
    """load_model's quantize and group_size: --quantize as given; otherwise a --dtype (given, or diff's float32
    default) means float weights, and nothing means the weights as stored."""
    quantize = args.quantize or ("none" if args.dtype else None)
    return {"quantize": quantize, "group_size": args.group_size}


def runs_default_quantized(args: argparse.Namespace, device: torch.device) -> bool:
    """Whether chat and generate run the default model on its own 4-bit (Q4_1) weights: on a CPU, unless --dtype
    or --quantize asks for other weights. Elsewhere (a GPU, torchrun) it runs dequantized to float32."""
    return quantize_args(args)["quantize"] is None and device.type == "cpu" and not tensor_parallel()


def add_tp_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, metavar="N", help="tensor parallelism over N processes: launch with "
                   "torchrun --nproc-per-node N -m minillama ... (under torchrun it is on without this flag)")


def add_prompt_args(p: argparse.ArgumentParser, chat: bool = True, required: bool = True) -> None:
    """--prompt, and --chat / --raw: the prompt as a user message through the chat template, or as plain text.

    `chat` is this tool's default; `required` prompts may also come on stdin (`read_prompt`).
    """
    stdin = " (or pipe it on stdin)" if required else ""
    p.add_argument("--prompt", "-p", help="the text to run through the model" + stdin)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--chat", action="store_true", help="render the prompt as a user message through the chat "
                   "template" + (" (the default)" if chat else ""))
    g.add_argument("--raw", action="store_true", help="the prompt as plain text, without the chat template"
                   + ("" if chat else " (the default)"))
    p.set_defaults(chat_by_default=chat)


def use_raw(args: argparse.Namespace) -> bool:
    """Whether the prompt is plain text: --raw, or no --chat where this tool defaults to plain text."""
    return args.raw or (not args.chat and not args.chat_by_default)


PROMPT_LIMIT = 16 * 1024**2  # bytes of prompt read from stdin: far more than any context holds


def read_stdin_prompt() -> str:
    """The prompt from stdin, at most PROMPT_LIMIT bytes; bytes that are not UTF-8 become U+FFFD."""
    stream = getattr(sys.stdin, "buffer", None)  # a replaced sys.stdin (tests, notebooks) may be text only
    data = stream.read(PROMPT_LIMIT + 1) if stream is not None else sys.stdin.read(PROMPT_LIMIT + 1)
    if len(data) > PROMPT_LIMIT:
        raise MinillamaError(f"the prompt on stdin is longer than {PROMPT_LIMIT:,} bytes; is it text?")
    return data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data


def read_prompt(args: argparse.Namespace) -> str:
    """--prompt, else stdin when it is piped ("-" reads stdin too); an empty prompt is an error."""
    prompt = args.prompt
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        # `echo X |` ends the text with a newline that `--prompt X` lacks: drop one, as ollama does
        prompt = read_stdin_prompt().removesuffix("\n").removesuffix("\r")
    if prompt is None:
        raise MinillamaError("no prompt: pass --prompt TEXT or pipe the text on stdin")
    if not prompt.strip():
        raise MinillamaError("the prompt is empty; pass --prompt TEXT")
    return prompt


def resolve_model_arg(args: argparse.Namespace, quantized: bool = False) -> Path:
    """The local directory for the MODEL argument (downloading or converting it if needed); `quantized`: the
    default model's 4-bit form (see `runs_default_quantized`).

    A name that is neither a directory nor a hub id gets a "did you mean" for a near miss.
    """
    from minillama.hub import resolve_model

    try:
        return resolve_model(args.model, offline=getattr(args, "offline", False), quantized=quantized)
    except MinillamaError as e:
        guess = near_miss(str(args.model))
        if guess is None:
            raise
        raise MinillamaError(f"{e}; did you mean {guess}?") from None


def near_miss(name: str) -> str | None:
    """The default model's name, or a directory next to `name`, that `name` looks like a typo of (difflib)."""
    import difflib

    path = Path(name).expanduser()
    if path.exists():
        return None
    candidates = {DEFAULT_MODEL: DEFAULT_MODEL}  # lower-cased name -> what to suggest
    parent = path.parent
    if parent.is_dir():
        try:
            siblings = [p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")][:1000]
        except OSError:
            siblings = []
        typed_parent = str(Path(name).parent) != "."  # suggest the path the way it was typed
        candidates.update({p.name.lower(): str(Path(name).parent / p.name) if typed_parent else p.name
                           for p in siblings})
    match = difflib.get_close_matches(path.name.lower(), list(candidates), n=1, cutoff=0.8)
    guess = candidates[match[0]] if match else None
    return None if guess == name else guess  # the name asked for (the default's, unavailable offline) is no typo


def prompt_input_ids(path: Path, prompt: str, raw: bool, vocab_size: int) -> tuple[str, torch.Tensor]:
    """The prompt as the model sees it (chat template unless `raw`) and its ids (1, T)."""
    import torch

    from minillama.model_info import prompt_ids
    from minillama.tokenizer import load_tokenizer

    text, ids = prompt_ids(load_tokenizer(path), prompt, raw, vocab_size)
    return text, torch.tensor([ids])


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Sampling flags; anything left out comes from the model's generation_config.json, or from the chat
    defaults (minillama.chat.CHAT_SAMPLING) when that file sets no sampling."""
    g = p.add_argument_group(
        "sampling", "Defaults: the model's generation_config.json; what it leaves out, llama.cpp's defaults "
        "(temperature 0.8, top-k 40, top-p 0.95, min-p 0.05) and minillama's measured repeat penalty 1.15, which "
        "spares end-of-turn tokens (docs/defaults.md). The chat's banner shows every value and where it came from "
        "(flag, model file, default).")
    g.add_argument("--temperature", "--temp", type=float, help="0 means greedy (default: the model file's, else 0.8)")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens (0: off; default: the model file's, "
                                             "else 40)")
    g.add_argument("--top-p", type=float, help="keep the smallest set reaching probability p (1: off; default: "
                                               "the model file's, else 0.95)")
    g.add_argument("--min-p", type=float, help="drop tokens below min_p x the top probability (0: off; default: "
                                               "the model file's, else 0.05)")
    g.add_argument("--repetition-penalty", "--repeat-penalty", type=float,
                   help="> 1 discourages tokens already in the conversation, end-of-turn tokens excepted (1: off; "
                        "default: the model file's, else 1.15)")
    g.add_argument("--max-new-tokens", "-n", type=int, help="the most tokens in one reply (default: the model "
                                                            "file's, at most 4096, else 256)")
    g.add_argument("--seed", type=int, help="seed for reproducible sampling")
    g.add_argument("--greedy", action="store_true", help="always take the most likely token")
    g.add_argument("--prompt-lookup", type=int, metavar="K",
                   help="prompt-lookup decoding: each forward also checks up to K draft tokens copied from earlier "
                        "in the conversation; the same tokens, fewer forwards where the reply repeats the prompt "
                        "(eager engine; 0: off, the default; docs/benchmarks.md)")
    add_engine_args(g)


def add_engine_args(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--engine and --no-compile: how the decode steps run (generation.py's engines)."""
    p.add_argument("--engine", choices=["eager", "compiled"],
                   help="eager: model.forward step by step (on CPU float32 with oneDNN-packed weights); "
                        "compiled: the decode step under torch.compile (CUDA graphs on a GPU). "
                        "Default: compiled on a GPU, eager elsewhere. Both give the same tokens")
    p.add_argument("--no-compile", action="store_true",
                   help="the same as --engine eager: no compile wait at the start on a GPU, slower decoding")


def add_steer_args(p: argparse.ArgumentParser) -> None:
    """--steer NAME=FILE.safetensors[:SCALE]: a vector added to an activation on every token (intervene.py)."""
    p.add_argument("--steer", action="append", metavar="NAME=FILE[:SCALE]",
                   help="add SCALE (default 1) x the vector in FILE.safetensors to the activation NAME (names as in "
                        "minillama dump, e.g. model.layers.4.resid_post) on every token; repeatable; eager engine")


def engine_choice(args: argparse.Namespace, device: torch.device, rope_type: str | None) -> str:
    """The engine the flags ask for, or the default for this device and model."""
    if getattr(args, "prompt_lookup", None):  # 1 + K tokens per forward: the compiled step takes one
        if getattr(args, "engine", None) == "compiled":
            raise MinillamaError("--prompt-lookup runs on the eager engine; drop --engine compiled")
        return "eager"
    if getattr(args, "steer", None):  # hooks run on the eager engine only (the compiled one refuses them)
        if getattr(args, "engine", None) == "compiled":
            raise MinillamaError("--steer runs on the eager engine; drop --engine compiled")
        return "eager"
    if getattr(args, "no_compile", False):
        if getattr(args, "engine", None) == "compiled":
            raise MinillamaError("--no-compile contradicts --engine compiled; give one of them")
        return "eager"
    if getattr(args, "engine", None):
        return args.engine
    if device.type == "cuda":
        return "compiled" if rope_type != "dynamic" else "eager"
    return None  # a CPU: decided once the weights are loaded (default_engine)


def default_engine(args: argparse.Namespace, model: torch.nn.Module) -> str:
    """The CPU default: a chat on weights that minillama's int8 kernels run (the default model's Q4_1) takes
    the ahead-of-time compiled step (aot.py: built once in the background, then loaded from disk), and so does
    `generate` once a chat has built it (a one-shot run does not wait for a build); float weights run eagerly
    on oneDNN-packed matrices, which the compiled step was not faster than."""
    from minillama import aot
    from minillama.chat import default_context

    if not aot.default_applies(model):
        return "eager"
    return "compiled" if args.command == "chat" or aot.is_built(model, default_context(model)[0]) else "eager"


def sampling_overrides(args: argparse.Namespace) -> dict:
    """The sampling flags the user gave, as GenerationConfig fields (None: keep the model's default)."""
    overrides = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                     repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                     prompt_lookup_num_tokens=getattr(args, "prompt_lookup", None))
    if args.greedy:
        overrides["do_sample"] = False
    elif args.temperature is not None and args.temperature > 0:
        overrides["do_sample"] = True  # asking for a temperature means asking to sample
    return overrides


def check_sampling_flags(args: argparse.Namespace) -> None:
    """The sampling flags' values checked before anything loads, with messages that name the flag."""
    from minillama.lookup import check_prompt_lookup
    from minillama.sampling import check_sampling_args

    check_prompt_lookup(getattr(args, "prompt_lookup", None), "--prompt-lookup")
    values = {k: v for k, v in sampling_overrides(args).items() if k not in ("do_sample", "prompt_lookup_num_tokens")}
    try:
        check_sampling_args(**values)
    except MinillamaError as e:
        field = next((k for k in values if str(e).startswith(k + " ")), None)
        if field is None:
            raise
        raise MinillamaError("--" + field.replace("_", "-") + str(e)[len(field):]) from None


@dataclass
class Loaded:
    path: Path
    model: torch.nn.Module
    tokenizer: object
    generation_config: object
    load_seconds: float
    engine: str  # "eager" or "compiled"
    sampling_sources: dict[str, str]  # setting -> where its value came from (minillama.chat.FROM_*)
    load_args: dict  # load_model's arguments that gave `model` (a background build loads it again)


def load_all(args: argparse.Namespace) -> Loaded:
    """Resolve MODEL, then load model, tokenizer and generation defaults (with the user's overrides).

    Settings are checked before the weights are read, so a bad flag fails fast.
    """
    import time

    from minillama.chat import FROM_CAPPED, chat_generation_config
    from minillama.checkpoint import load_model, resolve_device
    from minillama.generation import GenerationConfig
    from minillama.config import LlamaConfig
    from minillama.sampling import check_seed
    from minillama.tokenizer import load_tokenizer

    check_sampling_flags(args)
    device = resolve_device(args.device)
    if getattr(args, "seed", None) is not None:
        check_seed(args.seed)
    path = resolve_model_arg(args, quantized=runs_default_quantized(args, device))
    engine = engine_choice(args, device, LlamaConfig.from_file(path).rope_type)
    generation_config, sources = chat_generation_config(path, sampling_overrides(args))
    if sources["max_new_tokens"] == FROM_CAPPED:
        asked = GenerationConfig.from_model_dir(path).max_new_tokens
        eprint(f"minillama: the model's generation_config.json asks for max_new_tokens {asked:,}; using "
               f"{generation_config.max_new_tokens:,} (--max-new-tokens N gives more)")
    tokenizer = load_tokenizer(path)
    start = time.perf_counter()
    # The eager engine on a CPU runs fastest on oneDNN-packed weights (the compiled one needs plain ones).
    load_args = dict(path=str(path), device=str(device), dtype=args.dtype, **quantize_args(args))
    model = load_model(**load_args, pack=engine != "compiled", tp=tensor_parallel())  # packing: float32 on a CPU
    seconds = time.perf_counter() - start
    if engine is None:
        engine = default_engine(args, model)
    return Loaded(path, model, tokenizer, generation_config, seconds, engine, sources, load_args)


def eprint(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


# ---- Tensor parallelism under torchrun -----------------------------------------------------------------

TP_COMMANDS = ("chat", "generate", "dump", "bench", "serve")


def tensor_parallel() -> bool:
    """Whether this process is one rank of a torchrun launch (and so loads its shard of the model)."""
    return "WORLD_SIZE" in os.environ


@contextlib.contextmanager
def tensor_parallel_session(args: argparse.Namespace):
    """Run a subcommand as one rank of a torchrun launch, or plainly without torchrun.

    Under torchrun (WORLD_SIZE set) every rank joins the process group (`tp.init`), agrees on one sampling
    seed, and reads its input lines from rank 0; only rank 0 prints. A rank's error is one line naming the
    rank; a collective that fails because another rank died (or the MINILLAMA_TP_TIMEOUT ran out) too.
    """
    world, asked = os.environ.get("WORLD_SIZE"), getattr(args, "tp", None)
    if world is None:
        if asked not in (None, 1):
            raise MinillamaError(f"--tp {asked} needs {asked} processes: launch with torchrun --nproc-per-node "
                                 f"{asked} -m minillama {args.command} ...")
        yield
        return
    if asked is not None and asked != int(world):
        raise MinillamaError(f"--tp {asked}, but torchrun started {world} processes (WORLD_SIZE); give one number")
    if args.command not in TP_COMMANDS:
        raise MinillamaError(f"minillama {args.command} does not run tensor-parallel; run it without torchrun "
                             f"(tensor-parallel commands: {', '.join(TP_COMMANDS)})")
    from minillama import tp

    tp.init()
    rank = tp.rank()
    saved = sys.stdin, sys.stdout, sys.stderr
    try:
        if getattr(args, "seed", 0) is None:
            args.seed = tp.common_seed()  # every rank must draw the same tokens
        sys.stdin = SharedStdin(sys.stdin, rank)
        if rank != 0:
            sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115  (closed with the process)
        yield
    except MinillamaError as e:
        raise MinillamaError(f"rank {rank}: {e}" if rank else str(e)) from None
    except Exception as e:
        if not tp.lost_rank(e):
            raise
        raise MinillamaError(f"rank {rank}: lost contact with another rank (it exited, or hung past "
                             f"MINILLAMA_TP_TIMEOUT): {tp.lost_rank_reason(e)}") from None
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
    tp.shutdown()


class SharedStdin:
    """stdin for every rank: rank 0 reads, the others receive the same text (a chat's input lines).

    It travels over a gloo group of its own with a long timeout, since a person may take a while to type."""

    def __init__(self, real, rank: int):
        import datetime

        import torch.distributed as dist

        self.real, self.rank, self.dist = real, rank, dist
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
        self.tty = self._shared(lambda: real.isatty())

    def _shared(self, read):
        box = [read() if self.rank == 0 else None]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def isatty(self) -> bool:
        return self.tty

    def readline(self, size: int = -1) -> str:
        return self._shared(lambda: self.real.readline(size))

    def read(self, size: int = -1) -> str:
        return self._shared(lambda: self.real.read(size))

    def reconfigure(self, **options) -> None:  # the chat's errors="replace" applies to the stdin rank 0 reads
        if self.rank == 0 and hasattr(self.real, "reconfigure"):
            self.real.reconfigure(**options)

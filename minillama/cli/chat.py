"""`minillama chat [MODEL]`: a streaming chat in the terminal.

At a terminal: a prompt with line editing, in-chat commands, `\"\"\"` for multi-line messages, a pasted
block of lines sent as one message (bracketed paste), Ctrl-C to stop a reply (twice at the prompt, or
Ctrl-D, exits) and a stats line after each reply saying why it ended. With stdin not a terminal (a pipe, a
file) each input line is one message and only the replies are printed on stdout, for scripting; stats
and notices go to stderr.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
import time
from pathlib import Path

from minillama.cli.common import add_model_args, add_sampling_args, add_steer_args, eprint, load_all
from minillama.errors import MinillamaError
from minillama.files import parse_json, read_bytes, read_json

TRANSCRIPT_FORMAT = "minillama-chat/1"
MAX_LINE_CHARS = 16 * 1024**2  # one input line from a pipe; a terminal's lines are far shorter
TRANSCRIPT_LIMIT = 8 * 1024**2  # bytes of a saved chat: a whole 128K-token context is ~0.5 MB of text
MAX_TRANSCRIPT_MESSAGES = 100_000  # a message takes at least ~5 tokens of template: more fit no context

HELP = """commands:
  /help          this list
  /clear         forget the conversation (keeps the system prompt)
  /drop [N]      forget the N oldest turns, default 1 (keeps the system prompt): room when the context is full
  /system TEXT   set the system prompt (no TEXT: remove it)
  /save FILE     save the conversation and settings as JSON
  /load FILE     continue a saved conversation
  /exit          leave (also /bye, /quit, Ctrl-D)
  \"\"\"            start or end a multi-line message (a pasted block of lines is one message too)
Ctrl-C stops a reply (pressing it twice does not exit); Ctrl-C twice at the prompt, or Ctrl-D, exits."""

# After a Ctrl-C stopped a reply, a Ctrl-C this soon at the prompt is the same impatient press, not a wish to exit.
GRACE_SECONDS = 1.0
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"  # what a terminal in bracketed-paste mode wraps a paste in


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_sampling_args(p)
    add_steer_args(p)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--context", type=int, help="most tokens the conversation may hold (default: the model's, "
                                               "at most 8192, and at most what a quarter of the free memory holds)")
    p.add_argument("--load", metavar="FILE", help="continue a conversation saved with /save")
    p.add_argument("--drop-oldest", action="store_true",
                   help="when the context is full, forget the oldest turns (not the system prompt) to make room, "
                        "with a notice; without it, the chat says so and /drop does it on request")
    p.add_argument("--no-stats", action="store_true", help="no stats line after replies")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from minillama.chat import ChatSession, describe_sampling
    from minillama.intervene import steering

    if args.context is not None and args.context < 2:
        raise MinillamaError(f"--context must be at least 2 tokens, got {args.context}")
    reconfigure_stdin()
    system = clean_text(args.system) if args.system else args.system
    loaded = load_all(args)
    if loaded.tokenizer.chat_template_source is None:
        raise MinillamaError(f"{loaded.path} has no chat template, so it cannot chat; "
                             "use minillama generate --raw to continue plain text")
    session = ChatSession(loaded.model, loaded.tokenizer, loaded.generation_config, system=system,
                          seed=args.seed, context=args.context, engine=loaded.engine, load_args=loaded.load_args)
    if session.context_note:
        eprint(f"minillama: {session.context_note}")
    if args.load:
        session.load_transcript(read_transcript(args.load))
        eprint(f"[loaded {len(session.messages)} messages from {args.load}]")
    if getattr(session.engine, "builder", None) is not None:  # a CPU: the step compiled ahead of time (aot.py)
        eprint("minillama: compiling the decode step in the background, once for this model and context (about "
               "a minute on 2 cores); replies run eagerly until it is ready (--engine eager skips it)")
    elif loaded.engine == "compiled" and not getattr(session.engine, "ready", False):  # compile now, not mid-reply
        eprint("minillama: compiling the decode step (once per session; it can take a minute; "
               "--no-compile skips it)...")
        session.engine.warmup()
    interactive = sys.stdin.isatty()
    manual_paste = interactive and setup_line_editing()
    if interactive:
        weights = weights_in_words(loaded.model)
        eprint(f"minillama chat: {loaded.path} on {loaded.model.device} ({str(loaded.model.dtype)[6:]}"
               f"{'; weights: ' + weights if weights else ''}), loaded in {loaded.load_seconds:.1f} s; "
               f"context {session.context} tokens")
        eprint(f"sampling: {describe_sampling(session.config, loaded.sampling_sources)}")
        eprint(f"chat template: {loaded.tokenizer.chat_template_source}. Type /help for commands.")
    repl = Repl(session, interactive, stats=not args.no_stats, model_name=str(args.model),
                drop_oldest=args.drop_oldest)
    try:
        if manual_paste:
            print("\x1b[?2004h", end="", flush=True)  # ask the terminal to mark pastes
        with steering(loaded.model, args.steer):
            return repl.loop()
    finally:
        if manual_paste:
            print("\x1b[?2004l", end="", flush=True)
        if getattr(session.engine, "builder", None) is not None and not session.engine.poll() \
                and session.engine.builder is not None:  # the chat ended before the build did
            session.engine.stop_builder()
            eprint("minillama: the compiled decode step was not finished, so the next chat builds it again "
                   "(a chat of a minute or more finishes it)")


def weights_in_words(model) -> str:
    """'210 matrices int4 (4-bit integers, a scale and offset per 32 weights), 2 int8 (...)'; '' for float weights."""
    from collections import Counter

    from minillama import quant
    from minillama.model_info import format_in_words

    counts = Counter(quant.formats(model).values()).most_common()
    return ", ".join(f"{n}{' matrices' if i == 0 else ''} {format_in_words(fmt)}" for i, (fmt, n) in enumerate(counts))


def setup_line_editing() -> bool:
    """Line editing and history for input(), with bracketed paste: a pasted block of lines arrives as one
    message. GNU readline does it itself once asked (Python turns it off); without readline the terminal's
    markers reach us and `Repl.read` joins the lines between them. Returns whether that is our job."""
    try:
        import readline
    except ImportError:
        return True
    if "libedit" in (readline.__doc__ or ""):
        return False  # editline would show the markers as typed text: leave bracketed paste off
    readline.parse_and_bind("set enable-bracketed-paste on")
    return False


def read_transcript(path: str) -> dict:
    """A saved chat (regular file, size-limited, any JSON problem one line), lone surrogates replaced.

    Its size and its number of messages are bounded before it is parsed: a transcript of 10**6 messages took
    5 GB to load. (What a message may hold is bounded by the context: `ChatSession.load_transcript`.)"""
    path = Path(path).expanduser()
    raw = read_bytes(path, TRANSCRIPT_LIMIT, "transcript")
    fix = "is it a conversation saved with /save?"
    if raw.count(b'"role"') > MAX_TRANSCRIPT_MESSAGES:
        raise MinillamaError(f"{path}: more than {MAX_TRANSCRIPT_MESSAGES:,} messages, more than any context "
                             f"holds; {fix}")
    data = parse_json(raw, str(path), fix)
    if not isinstance(data, dict):
        raise MinillamaError(f"{path}: expected a JSON object, got {type(data).__name__}; {fix}")
    messages = data.get("messages")
    if isinstance(messages, list) and len(messages) > MAX_TRANSCRIPT_MESSAGES:  # "role" written with escapes
        raise MinillamaError(f"{path}: {len(messages):,} messages, more than any context holds; {fix}")
    return json.loads(clean_text(json.dumps(data, ensure_ascii=False)))


def reconfigure_stdin() -> None:
    """Bytes that are not UTF-8 (a stray Latin-1 paste, a binary file on stdin) become U+FFFD instead of
    an exception that would end the chat."""
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")


def clean_text(text: str) -> str:
    """Lone surrogates (from undecodable bytes in argv or a surrogateescape stdin) cannot be encoded to
    UTF-8 for the tokenizer or a saved transcript: replace each with U+FFFD."""
    return re.sub("[\ud800-\udfff]", "\ufffd", text)


def check_save_target(path: Path) -> None:
    """/save replaces a file only when it is a transcript already (saving again under the same name)."""
    if path.exists() and not path.is_dir():
        try:
            is_transcript = read_json(path).get("format") == TRANSCRIPT_FORMAT
        except (MinillamaError, AttributeError):
            is_transcript = False
        if not is_transcript:
            raise MinillamaError(f"{path} exists and is not a minillama transcript; choose another name "
                                 "(or delete it first)")


class ReplyInterrupts:
    """Ctrl-C during a reply: the first press stops it (KeyboardInterrupt in the decode loop); presses after
    that, until the reply is wrapped up, are ignored, so an impatient second press cannot exit the chat or
    land in the middle of saving the partial reply."""

    def __enter__(self) -> ReplyInterrupts:
        self.pressed_at: float | None = None
        self.previous = None
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        if self.pressed_at is None:
            self.pressed_at = time.monotonic()
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


# `Repl` is longer than minillama's usual ~150-line class: reading input, the in-chat commands and the reply
# share one piece of terminal state (when Ctrl-C last stopped a reply, paste mode), which is clearer kept in
# one place than passed between several objects. (Not in the module docstring: that is `chat --help`.)
class Repl:
    def __init__(self, session, interactive: bool, stats: bool, model_name: str, drop_oldest: bool = False):
        self.session, self.interactive, self.stats, self.model_name = session, interactive, stats, model_name
        self.replies = 0  # replies printed so far (piped ones are separated by a blank line)
        self.drop_oldest = drop_oldest  # make room by forgetting the oldest turns, with a notice
        self.interrupted_last = False  # a Ctrl-C at the prompt just happened: the next one exits
        self.kept = [dict(m) for m in session.messages]  # the messages as last saved or loaded
        self.reply_stopped_at = -GRACE_SECONDS  # when a Ctrl-C last stopped a reply (time.monotonic)

    def read(self, prompt: str) -> str | None:
        """One line of input (or one pasted block of lines); None at end of input."""
        try:
            line = input(prompt) if self.interactive else sys.stdin.readline(MAX_LINE_CHARS)
        except EOFError:
            return None
        if not self.interactive:
            if line == "":
                return None
            if len(line) >= MAX_LINE_CHARS and not line.endswith("\n"):
                raise MinillamaError(f"an input line is longer than {MAX_LINE_CHARS:,} characters; is stdin text?")
            return clean_text(line.rstrip("\n"))
        if PASTE_START in line:  # no readline: the terminal sent the paste's lines one by one, marked
            lines = [line]
            while PASTE_END not in lines[-1]:
                try:
                    lines.append(input())
                except EOFError:
                    break
            line = "\n".join(lines).replace(PASTE_START, "").replace(PASTE_END, "")
        return clean_text(line)

    def read_message(self) -> str | None:
        """A message: one line, a pasted block, or a block between lines starting and ending with three
        double quotes."""
        line = self.read(">>> " if self.interactive else "")
        if line is None or "\n" in line or not line.lstrip().startswith('"""'):
            return line
        first = line.lstrip()[3:]
        if first.rstrip().endswith('"""'):  # """one line"""
            return first.rstrip()[:-3]
        lines = [first] if first else []
        while True:
            line = self.read("... " if self.interactive else "")
            if line is None:
                return "\n".join(lines)
            if line.rstrip().endswith('"""'):
                lines.append(line.rstrip()[:-3])
                return "\n".join(lines).rstrip("\n")
            lines.append(line)

    def loop(self) -> int:
        while True:
            try:
                message = self.read_message()
            except KeyboardInterrupt:
                if not self.interactive:
                    print(file=sys.stderr)
                    return 0
                print(file=sys.stderr)
                if time.monotonic() - self.reply_stopped_at < GRACE_SECONDS:
                    continue  # the press that stopped the reply, repeated: not a request to exit
                if self.interrupted_last:
                    return 0
                self.interrupted_last = True
                unsaved = self.session.messages and self.session.messages != self.kept
                eprint("(the conversation is not saved: /save FILE keeps it. Ctrl-C again or Ctrl-D to exit)"
                       if unsaved else "(Ctrl-C again or Ctrl-D to exit)")
                continue
            if message is None:
                if self.interactive:
                    print()
                return 0
            self.interrupted_last = False
            if not message.strip():
                continue
            if message.startswith("/") and not message.startswith("//") and "\n" not in message:
                if self.command(message) == "exit":
                    return 0
                continue
            with ReplyInterrupts() as interrupts:
                try:
                    self.reply(message[1:] if message.startswith("//") else message)
                except KeyboardInterrupt:
                    print(flush=True)  # pressed as the reply ended, while its stats were printed
            if interrupts.pressed_at is not None:
                self.reply_stopped_at = interrupts.pressed_at

    def reply(self, message: str) -> None:
        from minillama.chat import ContextFull

        session = self.session
        n_messages = len(session.messages)
        session.last_stats = None  # a Ctrl-C before the reply starts leaves no stats to show
        try:
            if self.drop_oldest:
                self.make_room(message)
            # Piped, a blank line between replies: a reply may hold newlines of its own, so one is no separator.
            separator = "\n" if not self.interactive and self.replies else ""
            for piece in session.send(message):
                print(separator + piece, end="", flush=True)
                separator = ""
            self.replies += 1
        except ContextFull as e:
            eprint(f"{'message too long' if e.alone else 'context full'}: {e}")
            return
        except MinillamaError as e:  # a template or tokenizer problem: say so, keep the conversation
            if len(session.messages) == n_messages + 1:  # the message went in but no reply came: take it back
                del session.messages[n_messages:]
            eprint(f"could not send: {e}")
            return
        except KeyboardInterrupt:
            print(flush=True)
            if not self.stats:
                eprint("[reply stopped]")
        else:
            print(flush=True)
        st = session.last_stats
        if st is not None and st.stop_reason == "context":
            then = ("the oldest turns will make room for the next message" if self.drop_oldest
                    else "/drop [N] forgets the N oldest turns (the system prompt stays), /clear starts over")
            eprint(f"context full: the reply reached the end of the {session.context}-token context; {then}")
        if self.stats and st is not None and (self.interactive or st.generated_tokens):
            eprint(st.line())
        news = getattr(session.engine, "news", None)  # a background build of the compiled step has ended
        if news is not None and (note := news()):
            eprint(f"minillama: {note}")

    def make_room(self, message: str) -> None:
        """--drop-oldest: forget the oldest turns the new message needs room for, and say so."""
        dropped = self.session.make_room(message)
        if dropped:
            eprint(f"[context full: dropped the {plural(dropped, 'oldest turn')} to make room; "
                   "the system prompt stays]")

    def command(self, line: str) -> str | None:
        from minillama.chat import write_json_atomic

        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        session = self.session
        if name in ("/exit", "/quit", "/bye"):
            return "exit"
        if name in ("/help", "/?"):
            eprint(HELP)
        elif name == "/clear":
            session.clear()
            eprint("[conversation cleared]")
        elif name == "/drop":
            self.drop(arg)
        elif name == "/system":
            session.set_system(arg)
            eprint(f"[system prompt {'set' if arg else 'removed'}]")
        elif name == "/save":
            if not arg:
                eprint("usage: /save FILE")
                return None
            try:
                check_save_target(Path(arg).expanduser())
                path = write_json_atomic(arg, session.transcript(model=self.model_name))
            except (MinillamaError, OSError, ValueError) as e:  # ValueError: a NUL in the name
                eprint(f"could not save: {' '.join(str(e).split())}")
                return None
            eprint(f"[saved {len(session.messages)} messages to {path}]")
            self.kept = [dict(m) for m in session.messages]
        elif name == "/load":
            if not arg:
                eprint("usage: /load FILE")
                return None
            try:
                session.load_transcript(read_transcript(arg))
            except MinillamaError as e:
                eprint(f"could not load: {e}")
                return None
            eprint(f"[loaded {len(session.messages)} messages from {arg}]")
            self.kept = [dict(m) for m in session.messages]
        else:
            eprint(f"unknown command {name}; /help lists them (start a message with // to send a literal /)")
        return None

    def drop(self, arg: str) -> None:
        """/drop [N]: forget the N oldest turns (default 1), keeping the system prompt."""
        if not (arg or "1").isdigit() or int(arg or "1") < 1:
            eprint("usage: /drop [N]  (forget the N oldest turns; default 1)")
            return
        session = self.session
        dropped = session.drop_oldest(int(arg or "1"))
        if not dropped:
            eprint("[nothing to drop: the conversation is empty]")
            return
        eprint(f"[dropped the {plural(dropped, 'oldest turn')}; the conversation now holds "
               f"{len(session.prompt_ids())}/{session.context} tokens]")


def plural(n: int, noun: str) -> str:
    return noun if n == 1 else f"{n} {noun}s"

"""Reading the files a model directory or a user hands us, and writing output next to theirs, safely.

Everything read here may come from a stranger: a FIFO that never sends a byte, `/dev/zero`, a JSON file
nested 100,000 levels deep or holding a 10,000-digit integer. So:
- `read_bytes` reads regular files only (a FIFO, a device or a socket is refused without blocking), and at
  most `limit` bytes: the size is checked on the open descriptor before anything is read.
- `parse_json` turns every way `json` can fail (syntax, recursion, the 4,300-digit integer limit, memory)
  into one `MinillamaError` line naming the file; `read_json_object` does both for `config.json` & co.
- `check_output_file` / `partial_path` / `remove_stale_partials` are the output side: refuse impossible
  targets before the slow part, never clobber a user's file with a temporary, clean up after killed runs.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from minillama.errors import MinillamaError

# Size limits for what we read; each is far above any real file of its kind.
JSON_LIMIT = 64 * 1024**2  # config.json, tokenizer_config.json, shard index, transcripts (~10 KB .. 2 MB real)
TOKENIZER_LIMIT = 512 * 1024**2  # tokenizer.json (Llama 3: 9 MB, Gemma 3: 33 MB)
TEMPLATE_FILE_LIMIT = 4 * 1024**2  # a chat_template.jinja (real ones: 1-20 KB; the template checks its own size)


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def read_bytes(path: str | Path, limit: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes; a one-line error for anything else.

    Opened with O_NONBLOCK so that opening a FIFO returns at once, then checked with fstat on the open
    descriptor (no race between the check and the read), then read to exactly its size plus one byte.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise MinillamaError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise MinillamaError(f"{path}: cannot open this {what} ({one_line(e)})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file (a FIFO, device or socket)"
            raise MinillamaError(f"{path}: is {kind}; give a regular {what}")
        if info.st_size > limit:
            raise MinillamaError(f"{path}: {info.st_size:,} bytes is more than any real {what} "
                                 f"(limit {limit:,}); refusing to read it")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise MinillamaError(f"{path}: cannot read this {what} ({one_line(e)})") from None
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew while we read it
        raise MinillamaError(f"{path}: more than {limit:,} bytes; refusing to read it")
    return data


def read_text(path: str | Path, limit: int, what: str = "file") -> str:
    """`read_bytes` decoded as UTF-8, with a one-line error for invalid bytes."""
    try:
        return read_bytes(path, limit, what).decode("utf-8")
    except UnicodeDecodeError as e:
        raise MinillamaError(f"{path}: not UTF-8 text ({one_line(e)})") from None


def parse_json(text: str | bytes, source: str, fix: str = "re-download or fix the file") -> Any:
    """json.loads with every failure mode of hostile input as one line naming `source`, ending with `fix`."""
    try:
        return json.loads(text)
    except RecursionError:
        raise MinillamaError(f"{source}: JSON nested too deeply to be a real file; {fix}") from None
    except MemoryError:
        raise MinillamaError(f"{source}: JSON too large to parse; {fix}") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, and the 4,300-digit integer limit
        raise MinillamaError(f"{source}: not valid JSON ({one_line(e)[:200]}); {fix}") from None


def read_json(path: str | Path, limit: int = JSON_LIMIT, what: str = "JSON file") -> Any:
    path = Path(path)
    return parse_json(read_bytes(path, limit, what), str(path))


def read_json_object(path: str | Path, limit: int = JSON_LIMIT) -> dict[str, Any]:
    """A JSON file that must hold an object (config.json, tokenizer_config.json, ...): a one-line error if not."""
    data = read_json(path, limit)
    if not isinstance(data, dict):
        raise MinillamaError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# ---- Output paths ---------------------------------------------------------------------------------

def check_output_file(path: str | Path, force: bool = False) -> Path:
    """A file we are about to write: its folder must exist, it must not be a directory, and an existing
    file is replaced only with `force`. Checked before any slow work, so a typo fails in a second."""
    path = Path(path).expanduser()
    if "\0" in str(path):
        raise MinillamaError(f"{str(path)!r}: a file name cannot contain a NUL character")
    parent = path.parent
    if not parent.is_dir():
        raise MinillamaError(f"{parent}: no such directory; create it first or choose another path")
    if path.is_dir():
        raise MinillamaError(f"{path}: is a directory; give a file name")
    if (path.exists() or path.is_symlink()) and not force:
        raise MinillamaError(f"{path} exists; pass --force to overwrite it")
    if not os.access(parent, os.W_OK):
        raise MinillamaError(f"{parent}: not writable; choose another path")
    try:  # a folder root may "write" that refuses files all the same (/proc, /sys): try it
        os.unlink(partial_path(path))
    except OSError as e:
        raise MinillamaError(f"{parent}: cannot create files there ({e.strerror}); choose another path") from None
    return path


def partial_path(path: str | Path) -> Path:
    """A fresh, unused temporary file beside `path` (renamed over it when complete): never a fixed name
    such as `X.partial`, which could be a file of the user's that a failure would then delete."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:  # mkstemp makes it 0600; the finished file gets what any new file gets (0644 under umask 022)
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    return Path(tmp)


def current_umask() -> int:
    """The process's umask (reading it means setting it: put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _lock_nonblocking(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): never treat another run's folder as abandoned
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def locked_temp_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A new temporary directory in `parent`, flock-ed for as long as this process works in it.

    The lock dies with the process, even under SIGKILL, so `remove_stale_dirs` can tell a folder left by
    a killed run (unlocked) from one another run is still writing (locked). Removing the folder on
    failure is the caller's choice.
    """
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        _lock_nonblocking(fd)
        yield tmp
    finally:
        os.close(fd)


def remove_stale_dirs(parent: Path, prefix: str, min_age_s: float = 10.0) -> list[Path]:
    """Delete the folders `parent/prefix*` that no live process holds (see `locked_temp_dir`); returns them.

    Folders younger than `min_age_s` are left alone: their creator may not have taken its lock yet.
    """
    removed = []
    try:
        candidates = [p for p in parent.glob(glob.escape(prefix) + "*") if p.is_dir() and not p.is_symlink()]
    except OSError:
        return removed
    for folder in candidates:
        try:
            if time.time() - folder.stat().st_mtime < min_age_s:
                continue
            fd = os.open(folder, os.O_RDONLY)
        except OSError:
            continue
        try:
            if _lock_nonblocking(fd):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def file_lock(path: Path, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if needed), printing `waiting` if another process has it.
    Where flock does not exist, nothing is locked (the rename-into-place still keeps results whole)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _lock_nonblocking(fd):
            if waiting:
                print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)

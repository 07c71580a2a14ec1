"""Run `minillama` (or a Python snippet) in a child process with an address-space limit and a timeout.

A hostile file must give the one-line error (exit 2) in bounded time and memory. The limit is set with
RLIMIT_AS in the child before it starts, so a case that would grow without bound dies with MemoryError
(a traceback, exit 1) instead of taking the machine; the child prints its own peak resident memory at exit.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

LIMIT_BYTES = 3 * 1024**3  # CPU torch plus minillama need ~0.7 GB of address space; a tiny model, a bit more

# The child's own peak: VmHWM (ru_maxrss survives exec, so it would report the test process's size at the fork)
_DRIVER = """
import atexit, resource, runpy, sys
def peak_kb():
    try:
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
atexit.register(lambda: print(f"PEAK_RSS_KB {peak_kb()}", file=sys.stderr))
if sys.argv[1] == "-c":
    code = sys.argv[2]; sys.argv = sys.argv[2:]; exec(compile(code, "<case>", "exec"), {"__name__": "__main__"})
else:
    sys.argv = ["minillama", *sys.argv[1:]]; runpy.run_module("minillama", run_name="__main__")
"""


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str  # without the PEAK_RSS_KB line
    seconds: float
    peak_mb: float

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("minillama: error:")]

    def assert_one_line_error(self, *fragments: str) -> str:
        """Exit 2, no traceback, exactly one `minillama: error:` line holding every fragment; returns it."""
        assert self.returncode == 2, f"exit {self.returncode}: {self.stderr[-2000:]}"
        assert "Traceback" not in self.stderr and "panicked" not in self.stderr, self.stderr[-2000:]
        assert len(self.error_lines) == 1, self.stderr[-2000:]
        line = self.error_lines[0]
        for fragment in fragments:
            assert fragment in line, line
        return line


def _limit(nbytes: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (nbytes, nbytes))
    return preexec


def run(*args: str, stdin: bytes | str | None = None, timeout: float = 60, limit: int = LIMIT_BYTES,
        env: dict | None = None) -> Result:
    """`minillama ARGS` (or `-c CODE ARGS...`), bounded; a timeout fails the test with what it printed."""
    data = stdin.encode() if isinstance(stdin, str) else stdin
    start = time.perf_counter()
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    try:
        p = subprocess.run([sys.executable, "-c", _DRIVER, *args], input=data if data is not None else b"",
                           capture_output=True, timeout=timeout, preexec_fn=_limit(limit), env=environment)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"did not finish within {timeout} s: {(e.stderr or b'')[-2000:]!r}") from None
    seconds = time.perf_counter() - start
    err = p.stderr.decode("utf-8", "replace")
    peak = [line for line in err.splitlines() if line.startswith("PEAK_RSS_KB ")]
    err = "\n".join(line for line in err.splitlines() if not line.startswith("PEAK_RSS_KB "))
    peak_mb = int(peak[-1].split()[1]) / 1024 if peak else float("nan")
    return Result(p.returncode, p.stdout.decode("utf-8", "replace"), err, seconds, peak_mb)

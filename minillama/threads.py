"""How many CPU threads torch uses: by default the cores that are idle when minillama starts, not all of them.

With two threads on two cores and one other busy program, every OpenMP parallel region (hundreds per token)
waits for the thread the OS gave to that program: decode fell 5x (17.4 -> 3.5 tok/s) where one thread lost 1.5x
(14.7 -> 9.8; docs/DEVELOPING.md). So unless `--threads N` says otherwise, minillama samples how busy the cores
are for a moment at start and uses as many threads as there are idle cores (at least one). The count is chosen
once: a machine that gets busy later keeps the count it started with.
"""

from __future__ import annotations

import os
import time


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies over all CPUs from /proc/stat (Linux), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return idle, sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def idle_cores(sample_s: float = 0.1) -> float | None:
    """How many cores were idle over the next `sample_s` seconds (this process sleeps meanwhile), or None."""
    before = _cpu_times()
    time.sleep(sample_s)
    after = _cpu_times()
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (os.cpu_count() or 1) * (after[0] - before[0]) / (after[1] - before[1])


def default_threads(idle: float | None = None) -> int:
    """Threads for torch: the usable cores that are idle now (rounded, at least 1); all of them when this
    cannot be measured."""
    cores = usable_cores()
    idle = idle_cores() if idle is None else idle
    if idle is None:
        return cores
    return max(1, min(cores, int(idle + 0.5)))

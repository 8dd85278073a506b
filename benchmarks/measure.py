"""How every benchmark here (and tools/cpp_cpu.py) measures: one case per fresh subprocess, peak
memory of what runs between `PeakMemory.start()` and `.extra()`, and median wall time.

- A case runs in a fresh subprocess (`run_child`) so that one that runs out of memory or crashes
  costs only its own row, and its memory is not mixed with an earlier case's.
- CPU peak memory is the rise of the process's peak resident set (VmHWM, reset to the current
  resident set with /proc/self/clear_refs) over its level at `start()`. Children run under
  MALLOC_ENV so that glibc returns every freed block above 64 KiB to the system: otherwise freed
  scratch stays in its arenas and a later call that reuses it would not show in the resident set.
- CUDA peak memory is torch.cuda.max_memory_allocated over torch.cuda.memory_allocated at `start()`.
- Times are medians of repeated calls (the device synchronised around each call on CUDA).

Linux only (/proc); torch is imported only by what needs it.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

# Every allocation above 64 KiB goes back to the system when freed (see above).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def status_kib(field: str, pid="self") -> int:
    """A memory field of a process from /proc/<pid>/status (VmRSS: now, VmHWM: peak), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def reset_peak_rss() -> int:
    """Reset this process's peak resident set to its current one (Linux clear_refs); that, in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_kib("VmRSS")


class PeakMemory:
    """Peak memory above a base: `start()` sets the base (and resets the peak), `extra()` is the
    peak since then minus the base, in bytes."""

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")
        self.base = 0

    def start(self) -> int:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = reset_peak_rss() * 1024
        return self.base

    def extra(self) -> int:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return status_kib("VmHWM") * 1024 - self.base


def synchronize(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def median_seconds(fn, repeats: int, cuda: bool = False, setup=None, seconds: float | None = None) -> float:
    """Median wall time of fn(setup()) over `repeats` calls (fn() without setup); setup is not timed.
    With `seconds`, repeating stops after that long once three calls are in."""
    samples = []
    deadline = None if seconds is None else time.perf_counter() + seconds
    while len(samples) < repeats and (deadline is None or len(samples) < 3 or time.perf_counter() < deadline):
        arg = setup() if setup is not None else None
        synchronize(cuda)
        start = time.perf_counter()
        fn() if setup is None else fn(arg)
        synchronize(cuda)
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def run_child(command, timeout: float | None = None, env=None, cwd=None) -> dict:
    """Run one case in a fresh process; its result is the last stdout line that starts with '{'.
    A failure becomes {'status': 'OOM: ...' / 'failed: ...' / 'timeout > ...', 'stderr': its tail}."""
    try:
        child = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired:
        return dict(status=f"timeout > {timeout}s", stderr="")
    lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
    if child.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (child.stderr.strip().splitlines() or [f"exit {child.returncode}"])[-1]
    kind = "OOM: " if "out of memory" in child.stderr.lower() else "failed: "
    return dict(status=kind + tail[:120], stderr=child.stderr[-2000:])

"""Shared bits of the benchmarks: machine description, timers that survive a shared CPU, peak memory.

On a machine shared with other jobs, wall-clock time measures the share of the CPU a process got
as much as the work it did. With one torch thread, the process's CPU time (``time.process_time``)
counts only the cycles the work took, so the benchmarks report both and take their ratios from
CPU time on the CPU (and from synchronised wall time on a GPU).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch


def machine() -> str:
    """One line: CPU model, cores available, load average, torch version and threads, GPU if any."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {cores} cores, load average {load}; {gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s)")


def setup(threads: int | None, device: str = "cpu") -> None:
    """Threads: the given count, else sith's rule (``sith.engine.threads``)."""
    from sith.engine.threads import configure_threads

    if threads is not None:
        torch.set_num_threads(threads)
    else:
        configure_threads()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: no CUDA device here")


def sync(device: str | torch.device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Timing:
    wall: float = 0.0
    cpu: float = 0.0

    def __iadd__(self, other: Timing) -> Timing:
        self.wall += other.wall
        self.cpu += other.cpu
        return self

    def best(self, device: str | torch.device = "cpu") -> float:
        """The figure ratios are taken from: CPU seconds on the CPU, wall seconds on a GPU."""
        return self.wall if str(device).startswith("cuda") else self.cpu


def timed(fn: Callable[[], object], device: str | torch.device = "cpu") -> tuple[object, Timing]:
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return out, Timing(time.perf_counter() - w0, time.process_time() - c0)


@dataclass
class Stopwatch:
    """Named phases, each accumulating wall and CPU time."""

    phases: dict[str, Timing] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str, device: str | torch.device = "cpu"):
        sync(device)
        w0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            sync(device)
            t = self.phases.setdefault(name, Timing())
            t += Timing(time.perf_counter() - w0, time.process_time() - c0)


def peak_rss_mb() -> float:
    """Peak resident set of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm", encoding="utf-8") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


class ChildFailed(RuntimeError):
    """A benchmark child process exited non-zero (the message ends with its stderr)."""


def run_child(script: str | os.PathLike, args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``script --child ARGS`` in a fresh interpreter and return the JSON object it prints last.

    A fresh process per measurement keeps caches, memos and peak RSS from leaking between runs.
    """
    done = subprocess.run([sys.executable, str(script), "--child", *args], capture_output=True, text=True,
                          check=False, env=dict(os.environ) if env is None else env)
    if done.returncode != 0:
        raise ChildFailed(f"child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(text: str, record: bool) -> None:
    """Print a benchmark's Markdown section; with ``record``, also append it to benchmarks/RESULTS.md."""
    print(text)
    if record:
        with (Path(__file__).resolve().parent / "RESULTS.md").open("a") as f:
            f.write("\n" + text)

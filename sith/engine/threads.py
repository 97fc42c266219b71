"""How many torch threads a sith process uses, chosen on purpose rather than left at "all cores".

torch's CPU kernels run on an OpenMP team that meets at a barrier after every parallel region.
When a team member has no core of its own (another job holds it), every barrier waits for the
scheduler to run it again: on a shared 2-core machine a dense SVD with 2 threads was measured 10×
slower than with 1. So the rule is "one thread per idle core, at least one":

1. ``SITH_THREADS`` (a positive integer) wins; ``SITH_THREADS=auto`` forces the rule below.
2. Otherwise an explicit ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` is respected (torch has
   already read it).
3. Otherwise: ``round(cores − load)`` clamped to [1, cores], where ``cores`` is the CPU affinity
   set of this process and ``load`` the 1-minute load average (other runnable jobs), divided by
   ``processes`` when one caller starts several torch processes (worker pools).

Entry points (the ``sith`` CLI, the benchmarks, worker processes) call ``configure_threads()``
once at start-up; library code never changes the thread count behind a caller's back.
"""

from __future__ import annotations

import os

import torch

from sith.engine.errors import InvalidInput

ENV = "SITH_THREADS"


def available_cores() -> int:
    """CPUs this process may run on (affinity, cgroup-pinned containers), not the host's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def auto_threads(cores: int | None = None, load: float | None = None, processes: int = 1) -> int:
    """One thread per idle core (rule 3 of the module docstring), at least one."""
    cores = available_cores() if cores is None else cores
    load = load_average() if load is None else load
    if processes < 1:
        raise InvalidInput("processes", f"must be at least 1, got {processes}")
    idle = int(cores - max(0.0, load) + 0.5)
    return max(1, min(cores, idle) // processes)


def choose_threads(environ: dict[str, str] | None = None, cores: int | None = None,
                   load: float | None = None, processes: int = 1) -> int | None:
    """The thread count the rule picks, or None when an explicit OMP/MKL setting should stand."""
    env = os.environ if environ is None else environ
    value = env.get(ENV, "").strip().lower()
    if value and value != "auto":
        try:
            threads = int(value)
        except ValueError:
            threads = 0
        if threads < 1:
            raise InvalidInput(ENV, f"expected a positive integer or 'auto', got {env[ENV]!r}")
        return threads
    if not value and (env.get("OMP_NUM_THREADS") or env.get("MKL_NUM_THREADS")):
        return None
    return auto_threads(cores, load, processes)


def configure_threads(processes: int = 1) -> int:
    """Apply ``choose_threads`` to torch (intra-op pool) and return the count in effect."""
    threads = choose_threads(processes=processes)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return torch.get_num_threads()

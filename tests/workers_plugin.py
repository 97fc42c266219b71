"""Job kinds for the worker tests, imported by test workers via ``--plugin workers_plugin``.

They exercise the queue, the cache and failure handling without the engine, and leave evidence in
files (the test's tmp dir) because Redis itself may be flushed or killed during a test.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from sith_workers.handlers import JobContext, register


def _append(path: str, line: str) -> None:
    with open(path, "a") as handle:           # O_APPEND: whole lines, even from several processes
        handle.write(line + "\n")


def _compute(payload: dict):
    def compute() -> bytes:
        _append(payload["log"], f"compute {payload['key']} {os.getpid()}")
        time.sleep(payload.get("compute_s", 0.0))
        return payload["key"].encode() * 3
    return compute


@register("test.count")
def count(ctx: JobContext, payload: dict) -> dict:
    """get_or_compute one cache key; each real computation appends a line to ``log``."""
    ctx.step(0.0, "start")
    value = ctx.cache.get_or_compute(payload["key"], _compute(payload))
    return {"value": value.decode(), "pid": os.getpid()}


@register("test.steps")
def steps(ctx: JobContext, payload: dict) -> dict:
    """Log the start, compute a cache key, optionally wait for a ``go`` file, run ``steps`` steps of
    ``step_s`` seconds, compute the key again (after a flush that is a recomputation)."""
    _append(payload["log"], f"start {os.getpid()} {ctx.job.attempts}")
    ctx.cache.get_or_compute(payload["key"], _compute(payload))
    if "go" in payload:
        ctx.step(0.1, "waiting")
        while not Path(payload["go"]).exists():
            ctx.check()
            time.sleep(0.05)
    n = payload.get("steps", 1)
    for i in range(n):
        ctx.step(i / n, f"step {i}")
        time.sleep(payload.get("step_s", 0.0))
    value = ctx.cache.get_or_compute(payload["key"], _compute(payload))
    return {"pid": os.getpid(), "value": value.decode()}

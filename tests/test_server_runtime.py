"""The server's edited-model runtime: built once per edit under concurrency, kept by memory size."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from sith_server.runtime import ModelRuntime, model_bytes


class Loaded:
    """What ``ModelRuntime.edited`` keeps: an object with a ``model`` (a real torch module)."""

    def __init__(self, floats: int) -> None:
        self.model = torch.nn.Linear(floats, 1, bias=False)


def test_concurrent_first_calls_build_the_edited_model_once():
    runtime = ModelRuntime(edited_bytes=1 << 30)
    builds = []
    gate = threading.Event()

    def build():
        builds.append(threading.get_ident())
        gate.wait(5)                        # every other caller arrives while this build runs
        return Loaded(16)

    results = []
    threads = [threading.Thread(target=lambda: results.append(runtime.edited("e1:sha", build))) for _ in range(16)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    gate.set()
    for t in threads:
        t.join(10)
    assert len(builds) == 1 and len(results) == 16 and len({id(r) for r in results}) == 1


def test_a_failed_build_is_not_cached_and_its_waiters_see_the_error():
    runtime = ModelRuntime(edited_bytes=1 << 30)

    def broken():
        raise OSError("artifact missing")

    with pytest.raises(OSError):
        runtime.edited("e2:sha", broken)
    assert runtime.edited("e2:sha", lambda: Loaded(4)).model.in_features == 4


def test_the_lru_is_sized_by_memory_not_a_count():
    size = model_bytes(Loaded(1000).model)          # 4,000 bytes each
    runtime = ModelRuntime(edited_bytes=3 * size)
    builds: list[str] = []

    def build(key):
        def make():
            builds.append(key)
            return Loaded(1000)
        return make

    for key in ("a", "b", "c", "a", "b", "c"):      # three fit: cycling rebuilds nothing
        runtime.edited(key, build(key))
    assert builds == ["a", "b", "c"] and runtime.edited_in_memory == 3
    runtime.edited("d", build("d"))                 # a fourth evicts the least recently used ("a")
    assert runtime.edited_in_memory == 3
    runtime.edited("b", build("b"))
    runtime.edited("a", build("a"))
    assert builds == ["a", "b", "c", "d", "a"]
    small = ModelRuntime(edited_bytes=size // 2)    # one model larger than the budget is still served
    assert small.edited("x", build("x")).model.in_features == 1000 and small.edited_in_memory == 1
    runtime.forget("d")
    assert runtime.edited_in_memory == 2

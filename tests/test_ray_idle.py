"""Ray Data's executor pauses, rather than spins, while it waits on a slow consumer."""

from __future__ import annotations

import time

import numpy as np

from pipeline.cluster import ray_idle


class CountingSleep:
    monotonic = staticmethod(time.monotonic)

    def __init__(self):
        self.calls = 0

    def sleep(self, s: float) -> None:
        self.calls += 1
        time.sleep(s)


def test_an_idle_executor_sleeps_and_a_busy_one_does_not(ray_local, monkeypatch):
    import ray.data

    clock = CountingSleep()
    monkeypatch.setattr(ray_idle, "time", clock)
    ctx = ray_idle.install()
    ray_idle.install()
    assert ctx.custom_execution_callback_classes.count(ray_idle.IdleBackoff) == 1

    limits = ctx.execution_options.resource_limits
    ctx.execution_options.resource_limits = limits.copy(object_store_memory=2 << 20)
    try:       # 1 MiB blocks against a 2 MiB budget: the executor soon waits on the consumer
        ds = ray.data.range(16, override_num_blocks=16).map_batches(
            lambda b: {"x": np.zeros((len(b["id"]), 1 << 20), np.uint8)})
        rows = 0
        for batch in ds.iter_batches(batch_size=1):
            rows += len(batch["x"])
            time.sleep(0.1)          # a slow consumer
    finally:
        ctx.execution_options.resource_limits = limits
    assert rows == 16
    assert clock.calls >= 3, clock.calls

    busy = CountingSleep()
    monkeypatch.setattr(ray_idle, "time", busy)
    ray_idle.IdleBackoff().on_execution_step(_executor(active=1, queued=2))
    assert busy.calls == 0


class _Queue:
    def __init__(self, num_blocks):
        self.num_blocks = num_blocks


class _Op:
    def __init__(self, active):
        self.active = active

    def num_active_tasks(self):
        return self.active


def _executor(active=0, queued=2, waiting=0):
    state = type("OpState", (), {"output_queue": _Queue(queued), "num_waiting_consumers": waiting})()
    return type("Executor", (), {"_topology": {_Op(active): state}, "_output_node": (None, state),
                                 "_shutdown": False})()


class FakeClock:
    """Sleeps advance a fake clock; ``on_sleep(n)`` runs after the n-th sleep."""

    def __init__(self, on_sleep=lambda n: None):
        self.now, self.calls, self.on_sleep = 0.0, 0, on_sleep

    def monotonic(self):
        return self.now

    def sleep(self, s):
        self.now += s
        self.calls += 1
        self.on_sleep(self.calls)


def test_the_pause_ends_when_the_consumer_takes_or_waits_or_at_the_cap(monkeypatch):
    backoff = ray_idle.IdleBackoff()
    ex = _executor(queued=2)

    def take(n):
        if n == 3:
            ex._output_node[1].output_queue.num_blocks = 1
    clock = FakeClock(take)
    monkeypatch.setattr(ray_idle, "time", clock)
    backoff.on_execution_step(ex)
    assert clock.calls == 3

    ex = _executor(queued=0)

    def wait(n):
        if n == 2:
            ex._output_node[1].num_waiting_consumers = 1
    clock = FakeClock(wait)
    monkeypatch.setattr(ray_idle, "time", clock)
    backoff.on_execution_step(ex)
    assert clock.calls == 2

    clock = FakeClock()                 # nobody consumes: the loop runs again after the cap
    monkeypatch.setattr(ray_idle, "time", clock)
    backoff.on_execution_step(_executor(queued=2))
    assert clock.calls == round(ray_idle.MAX_PAUSE_S / ray_idle.POLL_S)

    clock = FakeClock()                 # a starving consumer: no pause at all
    monkeypatch.setattr(ray_idle, "time", clock)
    backoff.on_execution_step(_executor(queued=0, waiting=1))
    assert clock.calls == 0


def test_a_ray_without_the_private_api_runs_without_the_pause(monkeypatch, caplog):
    import logging

    import ray.data

    monkeypatch.setattr(ray_idle, "IdleBackoff", None)
    monkeypatch.setattr(ray_idle, "_warned", set())
    ctx = ray.data.DataContext()
    with caplog.at_level(logging.WARNING):
        assert ray_idle.install(ctx) is ctx
        ray_idle.install(ctx)
    assert ctx.custom_execution_callback_classes == []
    assert [r.message for r in caplog.records].count(
        "this Ray has no ExecutionCallback API: Ray Data's executor will spin while it waits on its "
        "consumer (more CPU, same results)") == 1

"""Ray Data's executor pauses, rather than spins, while it waits on a slow consumer."""

from __future__ import annotations

import time

import numpy as np

from pipeline import ray_idle


class CountingSleep:
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

    class Op:
        def num_active_tasks(self):
            return 1

    busy = CountingSleep()
    monkeypatch.setattr(ray_idle, "time", busy)
    ray_idle.IdleBackoff().on_execution_step(type("Executor", (), {"_topology": {Op(): None}})())
    assert busy.calls == 0


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

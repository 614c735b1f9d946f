"""Rank 0's MLflow log leaves the training thread: ``log`` never waits on the tracking server,
what is logged is written in order, nothing is lost at the end or on a failure, and a write
that fails reaches the training thread."""

from __future__ import annotations

import threading
import time

import pytest

from workflows.jobs.train_worker import STEP_TAG, _MlflowLog


class FakeClient:
    def __init__(self, delay_s: float = 0.0, fail: bool = False):
        self.batches, self.delay_s, self.fail = [], delay_s, fail
        self.threads = set()

    def log_batch(self, run_id, metrics, tags):
        self.threads.add(threading.get_ident())
        time.sleep(self.delay_s)
        if self.fail:
            raise ConnectionError("tracking server unreachable")
        self.batches.append(([(m.key, m.value, m.step) for m in metrics], {t.key: t.value for t in tags}))


class FakeTracking:
    def __init__(self, client):
        self._client = client

    def client(self):
        return self._client


def test_metrics_are_written_in_order_off_the_training_thread():
    client = FakeClient(delay_s=0.05)
    log = _MlflowLog(FakeTracking(client), "run", every_s=0.0)
    log.log(0, {"loss": 0.0})       # MLflow imported before the clock starts
    log.flush()
    client.batches.clear()
    t0 = time.perf_counter()
    for step in range(1, 11):
        log.log(step, {"loss": 1.0 / step})
    assert time.perf_counter() - t0 < 0.05 * 5         # 10 writes of 50 ms did not wait on the caller
    log.flush()
    written = [m for metrics, _ in client.batches for m in metrics]
    assert written == [("loss", 1.0 / s, s) for s in range(1, 11)]
    assert client.batches[-1][1] == {STEP_TAG: "10"}
    assert threading.get_ident() not in client.threads
    log.close()


def test_close_writes_what_is_pending():
    client = FakeClient()
    log = _MlflowLog(FakeTracking(client), "run", every_s=3600.0)
    log.log(1, {"loss": 2.0})
    log.log(2, {"loss": 1.0})
    assert client.batches == []                          # not handed over yet
    log.close()
    assert [m for metrics, _ in client.batches for m in metrics] == [("loss", 2.0, 1), ("loss", 1.0, 2)]
    assert not log.writer.is_alive()


def test_a_failed_write_reaches_the_training_thread_and_a_failure_still_closes():
    log = _MlflowLog(FakeTracking(FakeClient(fail=True)), "run", every_s=0.0)
    log.log(1, {"loss": 1.0})
    with pytest.raises(RuntimeError, match="logging to MLflow failed: tracking server unreachable"):
        log.flush()
    log.log(2, {"loss": 1.0})
    log.close(quiet=True)                               # training failed: its error is the one raised
    assert not log.writer.is_alive()

"""A pause for Ray Data's streaming executor when it has nothing in flight.

While every operator waits on its consumer (no task running: a training worker still busy with
the batches it has), the executor's scheduling loop skips its ``ray.wait`` and spins. On a
training worker that spin took more CPU than the training step. ``IdleBackoff`` sleeps
``IDLE_SLEEP_S`` in such a loop step, so the executor costs next to nothing while it waits.
The added latency is at most one sleep before the next task is launched.

This leans on two private parts of Ray Data (tested with the Ray of ``constraints.txt``): the
``ExecutionCallback`` class and the executor's ``_topology``. A Ray without them runs every
job as before, without the pause, and says so once in the log.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

IDLE_SLEEP_S = 0.02

try:
    from ray.data._internal.execution.execution_callback import ExecutionCallback
except ImportError:     # a Ray that moved or dropped it
    ExecutionCallback = None

_warned: set[str] = set()


def _warn_once(what: str) -> None:
    if what not in _warned:
        _warned.add(what)
        log.warning("this Ray has no %s: Ray Data's executor will spin while it waits on its "
                    "consumer (more CPU, same results)", what)


if ExecutionCallback is not None:
    class IdleBackoff(ExecutionCallback):
        def on_execution_step(self, executor) -> None:
            topology = getattr(executor, "_topology", None)
            if topology is None:
                _warn_once("StreamingExecutor._topology")
            elif not any(op.num_active_tasks() for op in topology):
                time.sleep(IDLE_SLEEP_S)
else:
    IdleBackoff = None


def install(context=None):
    """Add ``IdleBackoff`` to a DataContext (default: this process's current one) where this
    Ray allows it; returns the context."""
    import ray.data

    context = context or ray.data.DataContext.get_current()
    callbacks = getattr(context, "custom_execution_callback_classes", None)
    if IdleBackoff is None or callbacks is None:
        _warn_once("ExecutionCallback API")
    elif IdleBackoff not in callbacks:
        callbacks.append(IdleBackoff)
    return context

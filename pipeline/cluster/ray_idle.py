"""A pause for Ray Data's streaming executor when it has nothing in flight.

While every operator waits on its consumer (no task running: a training worker still busy with
the batches it has), the executor's scheduling loop skips its ``ray.wait`` and spins. On a
training worker that spin took more CPU than the training step. ``IdleBackoff`` pauses such a
loop step until the consumer takes an output or starts waiting for one (checked every
``POLL_S``, a few attribute reads), or ``MAX_PAUSE_S`` at most: nothing else can give an idle
executor work. A pause of a fixed 20 ms, the first version, still ran the loop 50 times a
second, and its accounting took 12-19% of a 2-worker CPU training step (``benchmarks/RESULTS.md``).

This leans on private parts of Ray Data (tested with the Ray of ``constraints.txt``): the
``ExecutionCallback`` class, the executor's ``_topology`` and ``_output_node``. A Ray without
them runs every job as before, without the pause, and says so once in the log.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

POLL_S = 0.02
MAX_PAUSE_S = 1.0

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
            output = getattr(executor, "_output_node", None)
            if topology is None or output is None:
                _warn_once("StreamingExecutor._topology and ._output_node")
                return
            if any(op.num_active_tasks() for op in topology):
                return
            state = output[1]
            queued = state.output_queue.num_blocks
            deadline = time.monotonic() + MAX_PAUSE_S
            while (state.output_queue.num_blocks >= queued and not state.num_waiting_consumers
                   and not getattr(executor, "_shutdown", False) and time.monotonic() < deadline):
                time.sleep(POLL_S)
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

"""A pause for Ray Data's streaming executor when it has nothing in flight.

While every operator waits on its consumer (no task running: a training worker still busy with
the batches it has), the executor's scheduling loop skips its ``ray.wait`` and spins. On a
training worker that spin took more CPU than the training step. ``IdleBackoff`` sleeps
``IDLE_SLEEP_S`` in such a loop step, so the executor costs next to nothing while it waits.
The added latency is at most one sleep before the next task is launched.
"""

from __future__ import annotations

import time

from ray.data._internal.execution.execution_callback import ExecutionCallback

IDLE_SLEEP_S = 0.02


class IdleBackoff(ExecutionCallback):
    def on_execution_step(self, executor) -> None:
        topology = getattr(executor, "_topology", None)
        if topology and not any(op.num_active_tasks() for op in topology):
            time.sleep(IDLE_SLEEP_S)


def install(context=None):
    """Add ``IdleBackoff`` to a DataContext (default: this process's current one); returns it."""
    import ray.data

    context = context or ray.data.DataContext.get_current()
    if IdleBackoff not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes.append(IdleBackoff)
    return context

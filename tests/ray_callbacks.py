"""Ray Train callbacks the tests share; pickled by value, as Ray workers import nothing from tests."""

from __future__ import annotations

import os
import signal
import sys

import ray.cloudpickle
from ray.train import UserCallback

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class KillRankOneAfterFirstCheckpoint(UserCallback):
    """Runs in the Ray Train controller: SIGKILLs worker 1 right after the first checkpoint."""

    def __init__(self):
        self.killed = False

    def after_report(self, run_context, metrics, checkpoint):
        if checkpoint is not None and not self.killed:
            self.killed = True
            os.kill(metrics[1]["pid"], signal.SIGKILL)

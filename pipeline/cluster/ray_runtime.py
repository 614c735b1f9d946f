"""Connecting to Ray: a cluster given by address, or a local instance sized for a small machine;
the device Ray assigned a worker; and a job's rows watched for a cluster that lost what the job
needs (``watched``)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator

# Local defaults; a cluster's own settings win when its address is given.
_ENV_DEFAULTS = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",  # a 2 s stall per report otherwise
    "RAY_DATA_LOG_LEVEL": "WARNING",  # the stages report progress themselves
}


def local_object_store_bytes() -> int:
    """Object store for a local instance: CIAE_OBJECT_STORE_MB, else 10% of RAM within [256 MiB, 2 GiB]."""
    if "CIAE_OBJECT_STORE_MB" in os.environ:
        return int(os.environ["CIAE_OBJECT_STORE_MB"]) * 2**20
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(min(max(ram // 10, 256 * 2**20), 2 * 2**30))


@contextlib.contextmanager
def connect(address: str | None = None, quiet: bool = True):
    """Use the running Ray (if this process already initialised it), the cluster at ``address``,
    or a new local instance; shut down on exit only what this call started. A job's error
    reaches the caller as its task raised it, told once: not also in Ray Data's log on the
    console."""
    import ray

    for k, v in _ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        yield
        return
    kwargs = {"include_dashboard": False, "log_to_driver": not quiet,
              "logging_level": logging.WARNING if quiet else logging.INFO}
    if address is None:
        kwargs["object_store_memory"] = local_object_store_bytes()
        kwargs["runtime_env"] = {"env_vars": dict(_ENV_DEFAULTS)}
    ray.init(address=address, **kwargs)
    try:
        import ray.data

        from pipeline.cluster import ray_idle
        ray_idle.install()   # this process's Ray Data jobs pause instead of spinning when idle
        # a task's error reaches the driver as raised (an OSError naming its object), not as Ray
        # Data's UserCodeException, which drops it
        ray.data.DataContext.get_current().raise_original_map_exception = True
        if quiet:
            # the stages draw their own progress bars, in images rather than blocks
            ray.data.DataContext.get_current().enable_progress_bars = False
            logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
            # a failed task's error is the job's, raised to its caller (the CLI's one line): not
            # also Ray Data's traceback on the console (its log file keeps it)
            for handler in logging.getLogger("ray.data").handlers:
                if isinstance(handler, logging.StreamHandler):
                    handler.addFilter(_below_error)
        yield
    except BaseException:
        # the job is abandoned: Ray Data's executor, still running when Ray shuts down below,
        # would log tracebacks (and its threads' attempts to start Ray again) after the error
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
        logging.getLogger("ray._private.worker").setLevel(logging.ERROR)
        raise
    finally:
        ray.shutdown()


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


def assigned_device() -> str:
    """The device this process may run a model on. In a Ray task or actor, the GPUs Ray
    assigned it (``ray.get_gpu_ids()``): none means the CPU even on a GPU node, since Ray need
    not hide the node's GPUs from a zero-GPU worker; else the first one, at its position in
    ``CUDA_VISIBLE_DEVICES`` (which Ray sets to the assigned ids, so usually ``cuda:0``).
    Anywhere else (a plain ``mlflow.pyfunc.load_model``, a Ray driver): CUDA when available."""
    import torch

    ray = sys.modules.get("ray")        # a process that never imported Ray is no Ray worker
    if ray is None or not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return "cuda" if torch.cuda.is_available() else "cpu"
    gpus = [str(g) for g in ray.get_gpu_ids()]
    if not gpus:
        return "cpu"
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return f"cuda:{visible.index(gpus[0]) if gpus[0] in visible else int(gpus[0])}"


class ClusterShrank(RuntimeError):
    """A job made no progress for a while on a cluster left with less than it needs (a node
    lost for good): one line saying so, where waiting would hang."""


def watched(rows: Iterable, need: dict[str, float], stall_s: float, what: str, poll_s: float = 2.0) -> Iterator:
    """``rows`` (a Ray Data iterator), read in a thread of its own; ``ClusterShrank`` when none
    has come for ``stall_s`` seconds while the cluster has less of a resource than ``need``
    ({"CPU": n, "GPU": n}) says the job holds. Ray restarts a lost node's actors on the nodes
    left, where they can hold every CPU (the tasks that feed them never start) or wait for GPUs
    that are gone; a job that goes on with less is let be. ``what`` names the job's share."""
    import queue
    import threading

    import ray

    items: queue.Queue = queue.Queue(maxsize=64)
    end = object()

    def read() -> None:
        try:
            for row in rows:
                items.put(row)
            items.put(end)
        except BaseException as e:          # handed to the reader, which raises it
            items.put(e)

    threading.Thread(target=read, daemon=True, name="ciae-rows").start()
    last = time.monotonic()
    while True:
        try:
            item = items.get(timeout=poll_s)
        except queue.Empty:
            waited = time.monotonic() - last
            if waited < stall_s:
                continue
            have = ray.cluster_resources()
            short = {k: v for k, v in need.items() if v and have.get(k, 0) < v}
            if short:
                # the job is abandoned: Ray Data's executor, stopped mid-read when Ray shuts down,
                # would log its traceback after this line
                logging.getLogger("ray.data").setLevel(logging.CRITICAL)
                left = ", ".join(f"{have.get(k, 0):g} {k}s for the {v:g} it needs" for k, v in short.items())
                raise ClusterShrank(f"nothing finished for {waited:.0f} s and the cluster is left with {left} "
                                    f"({what}): a node was lost; run the job again to resume on the nodes "
                                    "there are, or once they are back") from None
            continue
        if item is end:
            return
        if isinstance(item, BaseException):
            raise item
        last = time.monotonic()
        yield item

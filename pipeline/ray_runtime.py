"""Connecting to Ray: a cluster given by address, or a local instance sized for a small machine;
and the device Ray assigned a worker."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

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
    or a new local instance; shut down on exit only what this call started."""
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

        from pipeline import ray_idle

        ray_idle.install()   # this process's Ray Data jobs pause instead of spinning when idle
        if quiet:
            # the stages draw their own progress bars, in images rather than blocks
            ray.data.DataContext.get_current().enable_progress_bars = False
            logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        yield
    finally:
        ray.shutdown()


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

"""What a piece of model code would cost a GPU's host, counted on any device: the operations it
issues and the host syncs among them.

A CUDA kernel launch costs the host a few microseconds whatever the kernel does, and a host sync
(the host waits for the device to catch up) stalls the launch queue, so a step's pace on a GPU
follows these two numbers. :class:`OpCounter` counts them in any run, the CPU's included, where
none of them is visible as time:

* ``ops``: every ATen operation dispatched (views and in-place ones included), by name, and
  every Triton kernel launched (``triton:<kernel>``, one op each: on a GPU a launch costs the
  host as much as an ATen kernel's; counted where triton was imported before the counter was
  entered). The ATen operations the Triton interpreter makes to run a kernel on the CPU are
  not counted: a GPU does not make them;
* ``syncs``: the calls that make a CUDA host wait, each with the line of ours that made it:
  reads of a tensor's values on the host (``item``, ``tolist``, ``cpu``, ``bool()``,
  ``int()``, ``float()``), tensors built from Python data (``torch.tensor``, ``new_tensor``: a
  copy from pageable host memory), copies of a CPU tensor that is not page-locked to another
  device (``to``, ``copy_``: the host first waits for the kernels queued before them; seen on
  any device but the CPU, the meta device's included), and the operations whose output size
  depends on the data
  (``nonzero``, boolean-mask indexing and assignment, ``masked_select``, ``unique``,
  ``bincount``, ``repeat_interleave`` without ``output_size``) or that return a Python value
  (``equal``, ``is_nonzero``, ``_local_scalar_dense``).

A copy to pinned host memory with ``non_blocking=True`` and a CUDA event is not a sync by
itself; the wait on its event is, and code under count makes that wait through ``.cpu()`` or an
equivalent read on the CPU (``ciae.modeling.inference.to_host``).
"""

from __future__ import annotations

import collections
import os
import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Tensor methods and torch functions that read values on the host, or copy Python data to the device
HOST_READS = {"item", "tolist", "cpu", "__bool__", "__int__", "__float__", "__index__"}
# (``numpy`` is not among them: a device tensor reaches numpy only through one of these)
FROM_HOST = {"tensor", "new_tensor"}
# ATen operations whose output size depends on the data, or that return a Python value
DATA_DEPENDENT = {"nonzero", "masked_select", "masked_scatter", "unique", "_unique", "_unique2",
                  "unique_dim", "unique_consecutive", "bincount", "equal", "is_nonzero",
                  "_local_scalar_dense", "histc"}
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_OURS = tuple(os.path.join(_ROOT, p) + os.sep for p in ("ciae", "kernels", "pipeline", "workflows"))
_SELF = os.path.abspath(__file__)


def _site() -> str:
    """file:line of the innermost frame of ours (not this module) on the stack."""
    f = sys._getframe(2)
    while f is not None:
        name = os.path.abspath(f.f_code.co_filename)
        if name.startswith(_OURS) and name != _SELF:
            return f"{os.path.relpath(name, _ROOT)}:{f.f_lineno}"
        f = f.f_back
    return "?"


def _aten_name(func) -> str:
    return func._schema.name.split("::")[-1]


def _bool_index(args) -> bool:
    """Whether an index / index_put call indexes with a boolean mask."""
    indices = args[1] if len(args) > 1 else ()
    return any(t is not None and torch.is_tensor(t) and t.dtype in (torch.bool, torch.uint8) for t in indices)


def _from_pageable(name: str, args, kwargs) -> bool:
    """Whether a ``_to_copy`` / ``copy_`` copies a CPU tensor that is not page-locked to another
    device: the host first waits for every kernel queued before the copy."""
    src, dst = (args[0], kwargs.get("device")) if name == "_to_copy" else (args[1], args[0].device)
    return (torch.is_tensor(src) and src.device.type == "cpu" and dst is not None
            and torch.device(dst).type != "cpu" and not src.is_pinned())


class _Functions(TorchFunctionMode):
    def __init__(self, counter: "OpCounter"):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        kind = "host read" if name in HOST_READS else "from host" if name in FROM_HOST else None
        if kind is None or self.counter._inside:
            return func(*args, **(kwargs or {}))
        self.counter._record(f"{kind}: {name}")
        self.counter._inside += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.counter._inside -= 1


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: "OpCounter"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _aten_name(func)
        c = self.counter
        if c._launches.depth:           # the Triton interpreter's own work
            return func(*args, **kwargs)
        c.ops[name] += 1
        if not c._inside:
            if name in DATA_DEPENDENT:
                c._record(name)
            elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and _bool_index(args):
                c._record(f"boolean mask: {name}")
            elif name in ("_to_copy", "copy_") and _from_pageable(name, args, kwargs):
                c._record("copy from pageable host memory")
            elif name == "repeat_interleave" and kwargs.get("output_size") is None and (
                    len(args) < 3 or args[2] is None) and torch.is_tensor(args[0]) and (
                    len(args) < 2 or torch.is_tensor(args[1])):
                c._record("repeat_interleave without output_size")
        return func(*args, **kwargs)


class OpCounter:
    """``with OpCounter() as c: ...``: ``c.ops`` (Counter of ATen op names), ``c.num_ops``,
    ``c.syncs`` (list of (what, where)), ``c.num_syncs``; ``c.report()`` lists the syncs.
    Counters can be reset (``reset``) between the parts of a run."""

    def __init__(self):
        self.ops: collections.Counter = collections.Counter()
        self.syncs: list[tuple[str, str]] = []
        self._inside = 0
        self._launches = TritonLaunches(lambda name, args: self.ops.update([f"triton:{name}"]))
        self._modes = (_Functions(self), _Dispatch(self))

    def _record(self, what: str) -> None:
        self.syncs.append((what, _site()))

    def reset(self) -> None:
        self.ops.clear()
        self.syncs.clear()

    @property
    def num_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def num_syncs(self) -> int:
        return len(self.syncs)

    def report(self) -> str:
        by = collections.Counter(self.syncs)
        lines = [f"{self.num_ops} ops, {self.num_syncs} host syncs"]
        lines += [f"  {n} x {what} at {where}" for (what, where), n in by.most_common()]
        return "\n".join(lines)

    def __enter__(self) -> "OpCounter":
        for m in self._modes:
            m.__enter__()
        self._launches.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._launches.__exit__(*exc)
        for m in reversed(self._modes):
            m.__exit__(*exc)


class TritonLaunches:
    """``with TritonLaunches(on_launch): ...``: every ``kernel[grid](*args)`` launch in the block
    calls ``on_launch(kernel name, args)`` first; ``depth`` is above 0 while a kernel runs (under
    the interpreter, the ATen ops it makes then are its own work, which a GPU does not issue).
    Triton's ``KernelInterface`` (compiled and interpreted kernels alike) is wrapped on entry and
    restored on exit; where triton was not imported, nothing is."""

    def __init__(self, on_launch):
        self.on_launch = on_launch
        self.depth = 0
        self._cls = None

    def __enter__(self) -> "TritonLaunches":
        self._cls = getattr(sys.modules.get("triton.runtime.jit"), "KernelInterface", None)
        if self._cls is None:
            return self
        self._getitem = original = self._cls.__getitem__

        def wrapped(kernel, grid):
            launch = original(kernel, grid)
            name = getattr(getattr(kernel, "fn", None), "__name__", "kernel")

            def run(*args, **kwargs):
                self.on_launch(name, args)
                self.depth += 1
                try:
                    return launch(*args, **kwargs)
                finally:
                    self.depth -= 1
            return run

        self._cls.__getitem__ = wrapped
        return self

    def __exit__(self, *exc) -> None:
        if self._cls is not None:
            self._cls.__getitem__ = self._getitem
            self._cls = None

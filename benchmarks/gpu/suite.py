"""One GPU suite: every GPU figure of the project from one command on one CUDA device, inside
8 minutes; with ``--smoke``, the same code on tiny inputs on the CPU (Triton under its
interpreter), which the tests run so that the suite keeps working between GPU sessions.

    bash benchmarks/gpu/run.sh OUT              # CUDA machine: installs .whl/, then this script
    bash benchmarks/gpu/run.sh OUT --smoke      # CPU, tiny sizes
    python benchmarks/gpu/suite.py OUT [--smoke] [--sections env,kernels] [--total-s 460]

Sections, in priority order (benchmarks/gpu/README.md lists every figure):

  env           device, driver, CUDA, torch, triton, SMs, memory; the measured ceilings (a large
                device-to-device copy, a bf16 matmul on random data)
  correctness   the Triton kernels against a float64 reference, forward and backward, fp32 and
                bf16 embeddings, COCO-sized and edge-case inputs; pass/fail per case
  kernels       benchmarks/kernels/run.py's table (Triton vs eager twin vs torch.compile), fp32
                and bf16
  train_step    the paper's R50-FPN, shorter side 800, batch 8, bf16 autocast: Triton kernels,
                Triton with the network compiled (inductor), torch kernels: images/s,
                the first step (compiling), peak memory, share of the CIAE loss
  inference     R50-FPN at 800, predict at batch 1 and 8 (bf16 autocast on and off); then fed
                by a DataLoader decoding JPEGs on CPU workers, and the loader alone
  e2e_numerics  Config.small() trained for its schedule on the GPU; held-out PQ vs the CPU band
  tiles         candidate launch configurations per shape class; proposed autotune tables

Each section runs in its own process with its own time budget: it checks the budget between
measurements and stops early (status "partial", the rest listed as skipped); past the budget
its process group is killed (status "timeout"); an exception or a crash is recorded with a
one-line reason (status "failed"). Whatever a section recorded is kept, and the suite goes on.
On the GPU the sections run one at a time; the smoke runs two at once where there are two CPUs
(each is single-threaded there, and its times mean nothing), started in the same order.
OUT/results.json and OUT/results.md are rewritten after every section; OUT/tiles.json holds the
tile measurements and proposal. Ray, MLflow and pycocotools are absent on the device machine,
so importing them fails here too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.data.storage import write_uri  # noqa: E402  (atomic: whatever ends the run, every file under OUT is whole)

BLOCKED = ("ray", "mlflow", "pycocotools")
# name -> (GPU budget s, smoke budget s), in priority (= run) order; None: what is left. GPU
# budgets hold on a cold machine (imports, CUDA context and Triton compiles from scratch; the
# first H200 run, 2026-12-04, took env 5, correctness 28, kernels 26 for fp32 alone, train_step
# 17, inference 55 s, and e2e_numerics trained 289 of 700 steps in its 60 s). The smoke's
# train_step interprets the GroupNorm kernels in its Triton row, about 3 s a step.
SECTIONS = {"env": (20, 60), "correctness": (45, 90), "kernels": (70, 90),
            "train_step": (150, 120), "inference": (70, 90), "e2e_numerics": (80, 90),
            "tiles": (None, 90)}
TOTAL_S = {False: 345, True: 400}     # the whole suite: GPU (6 min with run.sh), smoke
MIN_SECTION_S = 10                    # a section is not started with less than this left
SOFT_MARGIN_S = 5                     # a section plans to end this long before it is killed
FAULT_EXIT = 86                       # a child's exit status after a CUDA fault (see Section.unit)
RESTARTS = 4                          # relaunches of one section after faults
FAULT = re.compile(r"CUDA error|Triton Error \[CUDA\]|illegal (memory )?address|launch failure|"
                   r"device-side assert|misaligned address|AcceleratorError")


class Section:
    """One section's record, rewritten (atomically) to ``path`` after every change, and its
    soft deadline (epoch seconds)."""

    def __init__(self, path: Path, deadline: float, inject_fault: str | None = None):
        self.path, self.deadline, self.inject_fault = path, deadline, inject_fault
        if path.exists():      # relaunched after a fault: what the earlier process recorded stays
            self.entry = json.loads(path.read_text())
            self.entry["status"] = "running"
        else:
            self.entry = {"status": "running", "summary": "", "notes": [], "tables": [],
                          "skipped": [], "done": [], "faults": []}
        self.save()

    def left(self) -> float:
        """Seconds until the soft deadline."""
        return self.deadline - time.time()

    def save(self) -> None:
        write_uri(str(self.path), json.dumps(clean(self.entry), indent=1).encode())

    def set(self, **fields) -> None:
        self.entry.update(fields)
        self.save()

    def note(self, text: str) -> None:
        if text not in self.entry["notes"]:      # a relaunched section notes it again
            self.entry["notes"].append(text)
            self.save()

    def table(self, title: str, columns: list[str], rows: list[list]) -> None:
        """A markdown table for results.md (cells formatted already); it replaces the table of
        the same title, so that a section can show its rows as they come."""
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
        self.lines(title, lines)

    def lines(self, title: str, lines: list[str]) -> None:
        """Markdown lines under a title for results.md (replacing those of the same title)."""
        tables = [t for t in self.entry["tables"] if t["title"] != title]
        self.entry["tables"] = tables + [{"title": title, "lines": lines}]
        self.save()

    def skip(self, what: str) -> None:
        """Record a measurement left out for want of time."""
        self.entry["skipped"].append(what)
        self.save()

    def affords(self, seconds: float, what: str) -> bool:
        """Whether ``seconds`` are left; if not, ``what`` is recorded as skipped."""
        if self.left() >= seconds:
            return True
        self.skip(f"{what} (budget spent)")
        return False

    def error(self, text: str) -> None:
        """Record an error; the section goes on with its other measurements (and ends as
        failed)."""
        self.entry.setdefault("errors", []).append(text)
        self.save()

    def attempt(self, what: str, fn):
        """``fn()``, or None when it raises (recorded with ``error``). A CUDA fault ends the
        section's process (its context is lost), the fault recorded; the suite goes on."""
        try:
            return fn()
        except Exception as exc:
            traceback.print_exc()
            self.error(f"{what}: {one_line(exc)}")
            if FAULT.search(f"{type(exc).__name__}: {exc}"):
                self.entry["faults"].append({"unit": what, "what": what, "error": one_line(exc)})
                self.save()
                sys.stdout.flush()
                os._exit(1)
            return None

    def faulted(self, unit: str) -> bool:
        return any(f["unit"] == unit for f in self.entry["faults"])

    def unit(self, unit: str, what: str, fn):
        """``fn()`` as the measurement ``what`` of ``unit`` (a kernel, a backend), with its
        result recorded under ``what`` so that a relaunched section does not measure it again:
        returns (result, True) when it ran now, (the recorded result, False) when an earlier
        process of this section ran it, (None, False) when it raised or ``unit`` faulted
        earlier. A CUDA fault (its context is lost for the rest of the process) is recorded
        against ``unit`` and ends the process with FAULT_EXIT; the suite starts the section
        again, which skips the unit's remaining measurements and goes on with the others."""
        done = {d["what"]: d["result"] for d in self.entry["done"]}
        if what in done:
            return done[what], False
        if self.faulted(unit):
            self.skip(f"{what} ({unit} faulted earlier)")
            return None, False
        try:
            if self.inject_fault == unit:
                raise RuntimeError("CUDA error: an illegal memory access was encountered "
                                   "(injected by --inject-fault)")
            result = fn()
            sync_device()              # an asynchronous fault surfaces here, in its own unit
        except Exception as exc:
            traceback.print_exc()
            if not FAULT.search(f"{type(exc).__name__}: {exc}"):
                self.error(f"{what}: {one_line(exc)}")
                return None, False
            self.entry["faults"].append({"unit": unit, "what": what, "error": one_line(exc)})
            self.error(f"{what}: CUDA fault, the rest of {unit} skipped: {one_line(exc)}")
            sys.stdout.flush()
            os._exit(FAULT_EXIT)
        self.entry["done"].append({"what": what, "result": result})
        self.save()
        return result, True

    def finish(self) -> None:
        errors = self.entry.get("errors")
        if errors:
            more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
            self.set(status="failed", reason=errors[0] + more)
        else:
            self.set(status="partial" if self.entry["skipped"] else "ok")

    def fail(self, exc: BaseException) -> None:
        self.set(status="failed", reason=one_line(exc), traceback=traceback.format_exc()[-3000:])


def clean(x):
    """JSON-safe: non-finite floats as strings ("nan", "inf"), tuples as lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def sync_device() -> None:
    """Wait for the device's queued work, if torch with CUDA is loaded (so that a fault shows
    where it happened)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# ---- a section's process -------------------------------------------------------------------

def child_main(args) -> int:
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")      # before triton is first imported
    for name in BLOCKED:
        sys.modules[name] = None                              # importing it raises ImportError
    work = Path(args.work)
    sec = Section(work / f"{args.child}.json", args.deadline, args.inject_fault)
    try:
        import sections  # beside this script; torch is imported in the children only
        import tiles

        ctx = sections.Context(smoke=args.smoke, out=Path(args.out), work=work)
        module = tiles if args.child == "tiles" else sections
        getattr(module, f"section_{args.child}")(ctx, sec)
        sec.finish()
        return 0
    except BaseException as exc:     # recorded, whatever it is; the parent goes on
        sec.fail(exc)
        traceback.print_exc()
        return 1


# ---- the suite --------------------------------------------------------------------------------

def run_section(name: str, budget: float, args, work: Path, env: dict) -> dict:
    """Run one section in its own process group, killed at ``budget`` seconds; after a CUDA
    fault (exit status FAULT_EXIT) it is started again in a fresh process, which carries on
    from what the faulted one recorded, while time is left."""
    record = work / f"{name}.json"
    t0 = time.time()
    end = t0 + budget
    cmd = [sys.executable, str(Path(__file__).resolve()), args.out, "--child", name,
           "--work", str(work), "--deadline", str(end - SOFT_MARGIN_S)]
    cmd += ["--smoke"] if args.smoke else []
    cmd += ["--inject-fault", args.inject_fault] if args.inject_fault else []
    print(f"[suite] {name}: budget {budget:.0f} s", flush=True)
    for launch in range(RESTARTS + 1):
        proc = subprocess.Popen(cmd, env=env, process_group=0)
        try:
            rc, killed = proc.wait(timeout=max(end - time.time(), 0.1)), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, killed = proc.wait(), True
        if killed or rc != FAULT_EXIT or end - time.time() < MIN_SECTION_S:
            break
        print(f"[suite] {name}: CUDA fault; starting the section again without the faulted "
              f"unit", flush=True)
    entry = json.loads(record.read_text()) if record.exists() else {"notes": [], "tables": []}
    entry.update(seconds=round(time.time() - t0, 1), budget_s=round(budget), launches=launch + 1)
    if killed:
        entry.update(status="timeout", reason=f"killed at its {budget:.0f} s budget; what it "
                                              f"recorded until then is kept")
    elif entry.get("status") in (None, "running"):
        how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
        errors = entry.get("errors") or [f"its process ended with {how}"]
        entry.update(status="failed", reason=errors[0] + (f" (and {len(errors) - 1} more errors)"
                                                          if len(errors) > 1 else ""))
    print(f"[suite] {name}: {entry['status']} in {entry['seconds']} s"
          + (f" ({entry['reason']})" if entry.get("reason") else ""), flush=True)
    return entry


def write_results(out: Path, results: dict) -> None:
    write_uri(str(out / "results.json"), json.dumps(clean(results), indent=1).encode())
    write_uri(str(out / "results.md"), ("\n".join(markdown(results)) + "\n").encode())


def overview(results: dict) -> list[str]:
    """The head of results.md: device, versions and one line per section."""
    suite = results["suite"]
    env = results["sections"].get("env", {})
    device = env.get("device", "device unknown (env section did not run)")
    lines = [f"# GPU suite: {device}" + (" (smoke, CPU)" if suite["smoke"] else ""), "",
             f"{suite['started']}, {suite['seconds']:.0f} s of a {suite['budget_s']} s budget; "
             f"`{suite['command']}`."]
    if env.get("torch"):
        lines[-1] += (f" torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda')}, "
                      f"driver {env.get('driver', '-')}, Python {env['python']}.")
    lines += ["", "| section | status | s / budget | summary |", "|---|---|---:|---|"]
    for name, e in results["sections"].items():
        text = "; ".join(x for x in (e.get("summary"), e.get("reason")) if x)
        lines.append(f"| {name} | {e['status']} | {e.get('seconds', '-')} / "
                     f"{e.get('budget_s', '-')} | {text} |")
    return lines


def markdown(results: dict) -> list[str]:
    """results.md: the overview, then each section's tables and notes."""
    lines = overview(results)
    for name, e in results["sections"].items():
        lines += ["", f"## {name}: {e['status']}", ""]
        if e.get("reason"):
            lines += [f"Reason: {e['reason']}", ""]
        for t in e.get("tables", []):
            lines += [f"**{t['title']}**", "", *t["lines"], ""]
        lines += [f"- {n}" for n in e.get("notes", [])]
        lines += [f"- CUDA fault in {f['unit']} at {f['what']}: {f['error']}; its other "
                  f"measurements were skipped, the section's other units ran in a fresh process."
                  for f in e.get("faults", [])]
        if e.get("skipped"):
            lines.append(f"- Skipped: {'; '.join(e['skipped'])}.")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder for results.json, results.md and tiles.json")
    p.add_argument("--smoke", action="store_true",
                   help="tiny inputs on the CPU, Triton under its interpreter: checks the code")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated, run in this order (default: all, {','.join(SECTIONS)})")
    p.add_argument("--total-s", type=float, default=None,
                   help=f"seconds for the whole suite (default {TOTAL_S[False]}, smoke "
                        f"{TOTAL_S[True]}); each section gets at most its own budget, tiles "
                        f"the rest")
    p.add_argument("--jobs", type=int, default=None,
                   help="sections run at once, started in order (default 1; smoke: 2 where there "
                        "are 2 CPUs); more than 1 only with --smoke, as they would share the GPU")
    p.add_argument("--inject-fault", metavar="UNIT",
                   help="raise a simulated CUDA fault at the first measurement of UNIT (a kernel: "
                        "segment_sums, loss, assign, assign_upsampled; or a backend: triton, "
                        "torch) in every section, to check that the suite survives it")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(args)

    names = [n for n in args.sections.split(",") if n]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; known: {list(SECTIONS)}")
    jobs = args.jobs or (min(2, os.cpu_count() or 1) if args.smoke else 1)
    if jobs < 1 or (jobs > 1 and not args.smoke):
        p.error("--jobs: 1, or more with --smoke (on the GPU sections would measure each other)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total = args.total_s or TOTAL_S[args.smoke]
    start = time.time()
    command = " ".join(["suite.py", *(sys.argv[1:] if argv is None else argv)])
    results = {"suite": {"smoke": args.smoke, "budget_s": round(total),
                         "started": datetime.datetime.now().isoformat(timespec="seconds"),
                         "command": command,
                         "host_python": platform.python_version(), "seconds": 0.0},
               "sections": {}}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.smoke:   # one thread: on a busy small machine OpenMP's waiting threads cost 10-100x
        env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    work = Path(tempfile.mkdtemp(prefix="ciae-gpu-suite-"))
    lock, slots, running = threading.Lock(), threading.Semaphore(jobs), []

    def record(name: str, entry: dict) -> None:
        with lock:
            results["sections"][name] = entry
            results["suite"]["seconds"] = round(time.time() - start, 1)
            write_results(out, results)

    def run(name: str, budget: float) -> None:
        try:
            entry = run_section(name, budget, args, work, env)
        except Exception as exc:       # the suite's own fault: recorded, the suite goes on
            traceback.print_exc()
            entry = {"status": "failed", "budget_s": round(budget), "reason": one_line(exc)}
        finally:
            slots.release()
        record(name, entry)

    try:
        for name in names:             # started in order, each when a slot is free
            slots.acquire()
            own = SECTIONS[name][1 if args.smoke else 0]
            left = start + total - time.time()
            budget = left if own is None else min(own, left)
            if budget < MIN_SECTION_S:
                slots.release()
                record(name, {"status": "skipped", "budget_s": 0, "seconds": 0,
                              "reason": f"{max(left, 0):.0f} s of the suite's budget left"})
                continue
            record(name, {"status": "running", "budget_s": round(budget)})
            running.append(threading.Thread(target=run, args=(name, budget), daemon=True))
            running[-1].start()
        for thread in running:
            thread.join()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(overview(results)) + f"\n\nEvery figure: {out}/results.md and results.json",
          flush=True)
    return 0 if all(e["status"] == "ok" for e in results["sections"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

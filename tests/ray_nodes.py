"""Ray nodes of the tests' own, started with ``ray start`` as users start them (a head, and other
nodes joining it), each with its own ports and temp dir, and ended by the pids this module
started, never with ``ray stop``.

``RayNode.start(...)`` starts one node; ``node.stop()`` ends it (SIGTERM to its ``ray start``
alone, then SIGKILL to what is left of its session); ``node.kill()`` loses it as a machine is
lost: SIGKILL to its raylet, its workers and every other process of its session, by pid.

Run as a script it is a ``ciae`` driver that prefers one node for its Ray Data work::

    python tests/ray_nodes.py NODE_ID -- label --address ... ARGS

sets ``DataContext.scheduling_strategy`` to a soft node affinity (spilling to other nodes when
that one is busy, moving to them when it is gone) and runs ``workflows.cli.run(ARGS)``: the
jobs' tasks and actors start on that node, so losing it matters, and nothing in the project
needs to know.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# the head notices a lost node in ~2 s instead of ~30 s (Ray's defaults: a health check every
# 3 s, 5 failures; the first after 5 s)
FAST_FAILURE_DETECTION = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "500",
                          "RAY_health_check_timeout_ms": "500", "RAY_health_check_failure_threshold": "3"}


class RayNode:
    """One ``ray start --block`` of ours, in a session of its own (so every process it starts
    is known by its session id)."""

    def __init__(self, proc: subprocess.Popen, temp: str, log, gcs_address: str, node_manager_port: int,
                 dashboard: str | None):
        self.proc, self.temp, self.log = proc, temp, log
        self.gcs_address, self.node_manager_port, self.dashboard = gcs_address, node_manager_port, dashboard

    @classmethod
    def start(cls, head: str | None = None, num_cpus: float = 1, resources: dict | None = None,
              object_store_mb: int = 200, dashboard: bool = False, env: dict | None = None,
              timeout: float = 120) -> "RayNode":
        """A head (``head`` None) or a node joining the head at GCS address ``head``; returns once
        it is up (the head's job server answers / the node is alive in the head's GCS)."""
        temp = tempfile.mkdtemp(prefix="/tmp/ciae-node-")         # short: Ray's socket paths are limited
        while True:     # the workers' range must not hold another of the node's ports (Ray refuses)
            gcs, dash, client, node, objects, agent, agent_grpc, env_agent, metrics, w0 = ports = free_ports(10)
            if w0 + 40 < 65536 and not [p for p in ports[:-1] if w0 <= p <= w0 + 40]:
                break
        cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
               f"--node-manager-port={node}", f"--object-manager-port={objects}",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
               f"--min-worker-port={w0}", f"--max-worker-port={w0 + 40}", f"--num-cpus={num_cpus}",
               f"--object-store-memory={object_store_mb * 2**20}", f"--temp-dir={temp}", "--disable-usage-stats"]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        if head is None:
            cmd += ["--head", f"--port={gcs}", f"--ray-client-server-port={client}",
                    f"--include-dashboard={'true' if dashboard else 'false'}"]
            if dashboard:
                cmd += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"]
            address = f"127.0.0.1:{gcs}"
        else:
            cmd.append(f"--address={head}")
            address = head
        # no drain on SIGTERM (it waits up to 30 s for the node to go idle): the node stops at once
        env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
               "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **(env or {})}
        log = open(os.path.join(temp, "node.log"), "w")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self = cls(proc, temp, log, address, node, f"http://127.0.0.1:{dash}" if dashboard and head is None else None)
        try:
            deadline = time.monotonic() + timeout
            while not self._up():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the Ray node did not start: {open(log.name).read()[-2000:]}")
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise
        return self

    def _up(self) -> bool:
        if self.dashboard:
            try:
                urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2)
                return True
            except OSError:
                return False
        try:
            return self.info() is not None
        except Exception:
            return False

    def info(self) -> dict | None:
        """This node's entry in the GCS: {"node_id" (hex), "alive", "resources"}; None until it
        has registered."""
        from ray._raylet import GcsClient

        for node_id, info in GcsClient(address=self.gcs_address).get_all_node_info(timeout=5).items():
            if info.node_manager_port == self.node_manager_port:
                return {"node_id": node_id.hex(), "alive": info.state == 0,
                        "resources": dict(info.resources_total)}
        return None

    @property
    def node_id(self) -> str:
        return self.info()["node_id"]

    def processes(self) -> list:
        """The live processes of this node's session: ``ray start``, the raylet, its workers and
        agents (psutil.Process each)."""
        import psutil

        found = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == self.proc.pid:
                    found.append(p)
            except (ProcessLookupError, psutil.Error):
                pass
        return found

    def kill(self) -> dict[str, list]:
        """Lose the node: SIGKILL its raylet and workers (and the rest of its processes) by pid.
        Returns the pids killed, {"raylet": [...], "workers": [...], "other": [...]}, and
        "tasks": the workers' titles (``ray::MapWorker(...)``, ``ray::IDLE``, ...)."""
        import psutil

        procs = self.processes()
        named = {"raylet": [], "workers": [], "other": [], "tasks": []}
        for p in procs:
            try:
                name = p.name()
                cmdline = " ".join(p.cmdline())
            except psutil.Error:
                continue
            agent = cmdline.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent"))
            kind = "raylet" if name == "raylet" else "workers" if not agent and (
                "default_worker.py" in cmdline or cmdline.startswith("ray::")) else "other"
            named[kind].append(p.pid)
            if kind == "workers":
                named["tasks"].append(cmdline)
        for kind in ("raylet", "workers", "other"):     # the raylet first: it starts no new worker
            for pid in named[kind]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.processes():                      # one started while we killed
            try:
                p.kill()
            except psutil.Error:
                pass
        self.proc.wait(timeout=30)
        return named

    def wait_dead(self, timeout: float = 30) -> None:
        """Until the head's GCS has marked this node dead."""
        deadline = time.monotonic() + timeout
        while (self.info() or {}).get("alive", False):
            assert time.monotonic() < deadline, "the head did not notice the lost node"
            time.sleep(0.2)

    def stop(self) -> None:
        # SIGTERM to `ray start` alone: it stops its processes in order, the raylet first (sent to
        # the whole group, the raylet outlives the GCS and waits for it past any timeout); then
        # SIGKILL to whatever is left of our session
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in self.processes():                      # any that left the process group
            try:
                p.kill()
            except Exception:
                pass
        self.proc.wait()
        self.log.close()
        shutil.rmtree(self.temp, ignore_errors=True)


def driver_cmd(prefer_node: str, *args: str) -> list[str]:
    """The command of a ``ciae`` driver (``args``: a command and its arguments) whose Ray Data
    work prefers node ``prefer_node`` (see the module's docstring)."""
    return [sys.executable, str(Path(__file__).resolve()), prefer_node, "--", *args]


if __name__ == "__main__":
    node_id, sep, *argv = sys.argv[1:]
    assert sep == "--", sys.argv
    sys.path.insert(0, str(REPO))
    import ray.data
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.data.DataContext.get_current().scheduling_strategy = NodeAffinitySchedulingStrategy(
        node_id, soft=True, _spill_on_unavailable=True)
    from workflows.cli import run

    run(argv)

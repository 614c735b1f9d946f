"""An S3 server for the tests: moto's standalone server (``moto[server]``, what s3fs's own tests
use) on 127.0.0.1, in a process of its own, stopped by the pid that started it.

The code under test reaches it as a user's code reaches S3: through the environment
(``S3_ENV``: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION`` and
``AWS_ENDPOINT_URL``, which pyarrow's ``FileSystem.from_uri`` reads), nothing hard-coded in
``pipeline``. The environment is set before the session's Ray starts (``conftest.ray_local``
asks for it) so that Ray's workers inherit it, as the workers of a cluster whose nodes have it.
``Requests`` counts what the server was asked, by kind, from its log (the tests and
``benchmarks/label/s3.py`` both).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

# what the tests put in the environment besides AWS_ENDPOINT_URL: moto accepts any key
S3_ENV = {"AWS_ACCESS_KEY_ID": "ciae-test-key-id", "AWS_SECRET_ACCESS_KEY": "ciae-test-secret-key",
          "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """``python -m moto.server`` on ``127.0.0.1:port``; ``start`` waits until it answers."""

    def __init__(self, port: int):
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, seconds: float = 60) -> S3Server:
        # its log (a line per request) goes to a file: a pipe nobody reads would fill and stall it
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + seconds
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"moto's S3 server on port {self.port} exited at once: "
                                   f"{self.log.read().decode()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto's S3 server did not answer on port {self.port} in {seconds} s")
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server process this object started (its pid only)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.proc = None


_REQUEST = re.compile(rb'"(?:\x1b\[[0-9;]*m)*([A-Z]+) (\S+) HTTP/')


class Requests:
    """The server's requests, read from its log (one line per request, written before the
    response is sent): ``mark()`` a position, ``since(position)`` the requests after it by kind
    (LIST, GET, HEAD, PUT, POST: multipart start and end, DELETE: one or a batch), ``targets``
    their methods and paths. The log is read at offsets (``os.pread``): the server writes through
    the same open file, whose position a seek here would move."""

    def __init__(self, server: S3Server):
        self.fd = server.log.fileno()

    def mark(self) -> int:
        return os.fstat(self.fd).st_size

    def targets(self, start: int, end: int | None = None) -> list[tuple[str, str]]:
        """(kind, path and query) of each request between two marks (``end``: now)."""
        end = self.mark() if end is None else end
        found = []
        for method, target in _REQUEST.findall(os.pread(self.fd, end - start, start)):
            kind = method.decode()
            if kind == "GET" and b"list-type=" in target:
                kind = "LIST"
            elif kind == "POST" and target.endswith(b"?delete"):
                kind = "DELETE"
            found.append((kind, target.decode()))
        return found

    def since(self, start: int, end: int | None = None) -> dict:
        counts = dict.fromkeys(["LIST", "GET", "HEAD", "PUT", "POST", "DELETE"], 0)
        for kind, _ in self.targets(start, end):
            counts[kind] = counts.get(kind, 0) + 1
        return counts | {"total": sum(counts.values())}


def create_bucket(name: str) -> None:
    """Create a bucket on the server of ``AWS_ENDPOINT_URL`` (bucket creation is allowed here
    only: the pipeline never creates buckets)."""
    import pyarrow.fs as pafs

    fs, _ = pafs.FileSystem.from_uri(f"s3://{name}?allow_bucket_creation=true")
    fs.create_dir(name)


def upload(local: str, uri: str) -> str:
    """Copy a local folder (recursively) to ``uri`` (s3://bucket/prefix); returns ``uri``."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return uri

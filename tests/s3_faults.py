"""A flaky S3 for the tests: an HTTP proxy in front of moto's server (``s3_server``) that answers a
seeded fraction of the requests as S3 does under load, and forwards the rest.

Of every ``round(1 / rate)`` requests, in the order they arrive, one is faulty, at a place drawn
from a seeded random generator (a fixed fraction, the same faults for the same requests), and
gets the next of ``FAULTS`` in turn:

* ``slowdown``: 503 with S3's ``SlowDown`` error body, the request not forwarded;
* ``internal``: 500 with S3's ``InternalError`` body, not forwarded;
* ``drop_before``: the connection reset once the request's first bytes are there, nothing read;
* ``drop_after``: the request read whole (body included), then the connection closed without
  an answer, not forwarded.

``rate=1.0`` is a store that keeps failing; ``fail_after(method, path)`` turns it into one
after the first request it is true for (forwarded whole). ``counts`` holds the requests by
outcome (``ok``: forwarded), ``before_failing`` the counts when ``fail_after`` struck. It runs
in threads of the calling process (one per client connection, HTTP/1.1 keep-alive) on its own
port; ``stop`` closes the open connections too.
"""

from __future__ import annotations

import collections
import http.client
import http.server
import random
import socket
import struct
import sys
import threading
import uuid

from s3_server import free_port

FAULTS = ("slowdown", "internal", "drop_before", "drop_after")
_ERRORS = {"slowdown": (503, "SlowDown", "Please reduce your request rate."),
           "internal": (500, "InternalError", "We encountered an internal error. Please try again.")}
# not passed on either way: they describe one hop's connection, not the request
_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"})


def wrote(method: str, path: str, suffix: str) -> bool:
    """Whether a request (``method``, ``path`` as the proxy got them) made an object whose name
    ends with ``suffix``: a PUT of it whole, or the completion of its multipart upload."""
    name, _, query = path.partition("?")
    return name.endswith(suffix) and (method == "PUT" and not query or method == "POST" and "uploadId=" in query)


class FaultProxy:
    """``FaultProxy(upstream).start()``: requests to ``endpoint`` go to ``upstream`` (moto's
    endpoint, ``http://127.0.0.1:PORT``), a ``rate`` of them answered by a fault instead."""

    def __init__(self, upstream: str, rate: float = 0.0, seed: int = 0, faults: tuple[str, ...] = FAULTS):
        self.upstream = upstream.removeprefix("http://")
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.counts: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self.set(rate, seed, faults)

    def set(self, rate: float, seed: int = 0, faults: tuple[str, ...] = FAULTS, fail_after=None) -> FaultProxy:
        """Fail ``rate`` of the requests from now on (a new schedule seeded with ``seed``), and
        every request once one it forwarded makes ``fail_after(method, path)`` true."""
        assert 0 <= rate <= 1 and faults and set(faults) <= set(FAULTS), (rate, faults)
        with self._lock:
            self.rate, self.faults, self.fail_after, self.before_failing = rate, tuple(faults), fail_after, None
            self._rng, self._n, self._faulty, self._kind = random.Random(seed), 0, -1, 0
        return self

    @property
    def injected(self) -> int:
        return sum(self.counts[f] for f in FAULTS)

    def reset_counts(self) -> collections.Counter:
        """The counts so far, and zero from now on."""
        with self._lock:
            counts, self.counts = self.counts, collections.Counter()
        return counts

    def start(self) -> FaultProxy:
        self._server = _Server(("127.0.0.1", self.port), _Handler)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="s3-faults")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for conn in self._connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._thread.join()

    def _draw(self) -> str:
        with self._lock:
            if self.rate and self._n % (period := round(1 / self.rate)) == 0:     # a new block of requests
                self._faulty = self._n + self._rng.randrange(period)
            fate = "ok"
            if self._n == self._faulty or self.rate == 1:
                fate, self._kind = self.faults[self._kind % len(self.faults)], self._kind + 1
            self._n += 1
            self.counts[fate] += 1
        return fate

    def _forwarded(self, method: str, path: str) -> None:
        with self._lock:
            if self.fail_after is not None and self.fail_after(method, path):
                self.rate, self.fail_after, self.before_failing = 1.0, None, dict(self.counts)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], OSError):      # a client gone mid-answer: no error of ours
            super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"           # keep-alive, as S3 clients use it

    def setup(self) -> None:
        super().setup()
        self.proxy: FaultProxy = self.server.proxy
        self._upstream: http.client.HTTPConnection | None = None
        with self.proxy._lock:
            self.proxy._connections.add(self.connection)

    def finish(self) -> None:
        with self.proxy._lock:
            self.proxy._connections.discard(self.connection)
        if self._upstream is not None:
            self._upstream.close()
        try:
            super().finish()
        except OSError:     # the client or a drop closed it first
            pass

    def handle_one_request(self) -> None:
        try:
            started = self.rfile.peek(1)        # the next request's first bytes, or the client's close
        except OSError:
            started = b""
        if not started:
            self.close_connection = True
            return
        self._fate = self.proxy._draw()
        if self._fate == "drop_before":
            self._drop(reset=True)
            return
        super().handle_one_request()

    def _drop(self, reset: bool = False) -> None:
        """Close the connection without an answer: a reset (RST), or an empty reply (FIN)."""
        if reset:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):     # trailers
                pass
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self) -> None:
        body = self._body()
        if self._fate == "drop_after":
            self._drop()
            return
        if self._fate in _ERRORS:
            status, code, message = _ERRORS[self._fate]
            request_id = uuid.uuid4().hex[:16].upper()
            data = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
                    f"</Message><RequestId>{request_id}</RequestId><HostId>ciae-s3-faults</HostId></Error>").encode()
            self._answer(status, [("Content-Type", "application/xml"), ("x-amz-request-id", request_id)], data,
                         len(data))
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        for attempt in (0, 1):          # moto may have closed the kept-alive upstream connection
            if self._upstream is None:
                self._upstream = http.client.HTTPConnection(self.proxy.upstream, timeout=120)
            try:
                self._upstream.request(self.command, self.path, body=body, headers=headers)
                response = self._upstream.getresponse()
                data = response.read()
                break
            except (ConnectionError, http.client.HTTPException):
                self._upstream.close()
                self._upstream = None
                if attempt:
                    raise
        self.proxy._forwarded(self.command, self.path)
        answer = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP | {"content-length"}]
        length = int(response.getheader("Content-Length") or len(data)) if self.command == "HEAD" else len(data)
        self._answer(response.status, answer, data, length)

    def _answer(self, status: int, headers: list[tuple[str, str]], data: bytes, length: int) -> None:
        self.send_response_only(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    def log_message(self, format, *args) -> None:     # noqa: A002 (http.server's signature)
        pass

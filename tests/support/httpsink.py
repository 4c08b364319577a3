"""A real HTTP server on 127.0.0.1 that records requests and serves scripted answers."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

__all__ = ["Behaviour", "HttpSink", "RecordedRequest"]

LOCALHOST = "127.0.0.1"
_NO_JSON = object()


@dataclass(frozen=True)
class RecordedRequest:
    """One request as received by the sink."""

    method: str
    path: str  # without the query string
    query: str
    headers: dict[str, str]  # header names lower-cased (last value wins)
    raw_headers: list[tuple[str, str]]
    body: bytes
    received_at: float  # time.monotonic() when the request line + body were read
    index: int  # 0-based number of this request for its path
    status: int  # status the sink answered (or will answer) with

    @property
    def json(self) -> Any:
        """Body parsed as JSON, or None when it is empty / not JSON."""
        value = _parse_json(self.body)
        return None if value is _NO_JSON else value

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)


@dataclass
class Behaviour:
    """How the sink answers one path: the n-th request gets ``statuses[n]`` (last repeats)."""

    statuses: list[int] = field(default_factory=lambda: [200])
    retry_after: str | None = None  # added to every non-2xx answer
    delays: list[float] = field(default_factory=lambda: [0.0])  # n-th request waits delays[n]
    body: bytes | None = None  # None: b'{"status": <code>}'
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    served: int = 0

    def next_answer(self) -> tuple[int, float]:
        n = self.served
        self.served += 1
        status = self.statuses[min(n, len(self.statuses) - 1)]
        delay = self.delays[min(n, len(self.delays) - 1)]
        return status, delay


def _parse_json(body: bytes) -> Any:
    if not body:
        return _NO_JSON
    try:
        return json.loads(body)
    except ValueError:
        return _NO_JSON


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    sink: HttpSink


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.server.sink._track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.sink._untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest output clean

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # trailers until empty line
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)  # CRLF after chunk
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _handle(self) -> None:
        sink = self.server.sink
        body = self._read_body()
        received_at = time.monotonic()
        split = urlsplit(self.path)
        status, delay, behaviour, index = sink._answer_for(split.path)
        sink._record(
            RecordedRequest(
                method=self.command,
                path=split.path,
                query=split.query,
                headers={k.lower(): v for k, v in self.headers.items()},
                raw_headers=list(self.headers.items()),
                body=body,
                received_at=received_at,
                index=index,
                status=status,
            )
        )
        if delay > 0 and sink._stopping.wait(delay):
            # Sink is stopping: drop the connection without an answer.
            self.close_connection = True
            return
        payload = (
            behaviour.body
            if behaviour.body is not None
            else json.dumps({"status": status}).encode()
        )
        self.send_response(status)
        self.send_header("Content-Type", behaviour.content_type)
        self.send_header("Content-Length", str(len(payload)))
        if behaviour.retry_after is not None and not 200 <= status < 300:
            self.send_header("Retry-After", behaviour.retry_after)
        for name, value in behaviour.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle


class HttpSink:
    """Threaded HTTP server on 127.0.0.1:<free port>; use as a context manager.

    Unconfigured paths answer 200 with ``{"status": 200}``.
    """

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._requests: list[RecordedRequest] = []
        self._behaviours: dict[str, Behaviour] = {}
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int = 0

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> HttpSink:
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _Server((LOCALHOST, 0), _Handler)
        server.sink = self
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name=f"httpsink-{self.port}",
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop promptly: cuts pending delays short and closes open connections."""
        self._stopping.set()
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> HttpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- configuration -------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    def url(self, path: str = "/") -> str:
        if not path.startswith("/"):
            path = "/" + path
        return self.base_url + path

    def respond(
        self,
        path: str,
        statuses: Sequence[int] = (200,),
        *,
        retry_after: float | str | None = None,
        delay: float | Sequence[float] = 0.0,
        body: bytes | str | Any = None,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        """Script the answers for ``path`` (exact match, query string ignored).

        ``statuses`` are served in order, the last one repeating.  ``retry_after``
        (seconds or an HTTP date string) is sent on every non-2xx answer.  ``delay``
        (seconds, or one per request with the last repeating) is waited before
        answering; :meth:`stop` cuts it short and drops the connection.  ``body``:
        bytes/str verbatim, anything else JSON-encoded; None -> ``{"status": N}``.
        Resets the per-path request counter.
        """
        if not statuses:
            raise ValueError("statuses must not be empty")
        delays = [float(delay)] if isinstance(delay, int | float) else [float(d) for d in delay]
        if not delays:
            raise ValueError("delay sequence must not be empty")
        if body is None or isinstance(body, bytes):
            payload = body
        elif isinstance(body, str):
            payload = body.encode()
        else:
            payload = json.dumps(body).encode()
        ra = None
        if retry_after is not None:
            ra = retry_after if isinstance(retry_after, str) else _fmt_seconds(retry_after)
        behaviour = Behaviour(
            statuses=[int(s) for s in statuses],
            retry_after=ra,
            delays=delays,
            body=payload,
            headers=dict(headers or {}),
            content_type=content_type,
        )
        with self._lock:
            self._behaviours[_norm(path)] = behaviour

    # -- inspection ----------------------------------------------------------------------
    def requests(self, path: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            if path is None:
                return list(self._requests)
            p = _norm(path)
            return [r for r in self._requests if r.path == p]

    def wait_for_requests(
        self, path: str | None, n: int, timeout: float = 10.0
    ) -> list[RecordedRequest]:
        """Wait until at least ``n`` requests hit ``path`` (None: any); return them all."""
        p = None if path is None else _norm(path)

        def matching() -> list[RecordedRequest]:
            return [r for r in self._requests if p is None or r.path == p]

        with self._lock:
            if not self._lock.wait_for(lambda: len(matching()) >= n, timeout=timeout):
                raise TimeoutError(
                    f"expected >= {n} requests to {path!r} within {timeout}s, "
                    f"got {len(matching())}: {[r.path for r in self._requests]}"
                )
            return matching()

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    # -- handler callbacks ---------------------------------------------------------------
    def _answer_for(self, path: str) -> tuple[int, float, Behaviour, int]:
        with self._lock:
            behaviour = self._behaviours.get(path)
            if behaviour is None:
                behaviour = self._behaviours[path] = Behaviour()
            index = behaviour.served
            status, delay = behaviour.next_answer()
            return status, delay, behaviour, index

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)
            self._lock.notify_all()

    def _track(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.add(conn)

    def _untrack(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)


def _norm(path: str) -> str:
    path = urlsplit(path).path or "/"
    return path if path.startswith("/") else "/" + path


def _fmt_seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)

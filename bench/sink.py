"""A loopback HTTP sink standing in for Slack and webhook endpoints, in its own process.

Answers every request ``200 {}`` at once (HTTP/1.1 keep-alive, asyncio), counts
requests per path, and for the latency probe's Slack path notes when each post
arrived (``time.monotonic()``, comparable across processes on Linux) under the
task id found in its text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import re
import threading
import time
from typing import Any

PROBE_PATH = "/slack/probe"
_TASK_ID = re.compile(r"probe ([0-9a-f-]{36}) failed")
_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
    b"Connection: keep-alive\r\n\r\n{}"
)


class _Sink:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.arrivals: dict[str, float] = {}
        self.bad = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1].split("?")[0] if " " in lines[0] else "?"
                length = 0
                for line in lines[1:]:
                    if line[:15].lower() == "content-length:":
                        length = int(line[15:].strip())
                body = await reader.readexactly(length) if length else b""
                now = time.monotonic()
                self.counts[path] = self.counts.get(path, 0) + 1
                if path == PROBE_PATH:
                    try:
                        text = json.loads(body)["text"]
                        m = _TASK_ID.search(text)
                        if m:
                            self.arrivals.setdefault(m.group(1), now)
                    except (ValueError, KeyError, TypeError):
                        self.bad += 1
                writer.write(_RESPONSE)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()


def _main(port_out: Any, commands: Any) -> None:
    sink = _Sink()
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(sink.serve, "127.0.0.1", 0))
    port_out.send(server.sockets[0].getsockname()[1])

    def control() -> None:
        while True:
            try:
                cmd = commands.recv()
            except EOFError:
                cmd = "quit"
            if cmd == "stats":
                snapshot = {
                    "counts": dict(sink.counts),
                    "arrivals": dict(sink.arrivals),
                    "bad": sink.bad,
                }
                commands.send(snapshot)
            elif cmd == "reset":
                sink.counts.clear()
                sink.arrivals.clear()
                commands.send(True)
            else:
                loop.call_soon_threadsafe(loop.stop)
                return

    threading.Thread(target=control, daemon=True).start()
    loop.run_forever()


class SinkProcess:
    """Start with :meth:`start`; ``url(path)``; :meth:`stats`; :meth:`stop`."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._port_r, port_w = ctx.Pipe(duplex=False)
        self._cmd, cmd_child = ctx.Pipe()
        self.proc = ctx.Process(target=_main, args=(port_w, cmd_child), daemon=True)
        self.port = 0

    def start(self) -> SinkProcess:
        self.proc.start()
        if not self._port_r.poll(30):
            raise RuntimeError("HTTP sink did not start")
        self.port = int(self._port_r.recv())
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stats(self) -> dict[str, Any]:
        self._cmd.send("stats")
        result: dict[str, Any] = self._cmd.recv()
        return result

    def reset(self) -> None:
        self._cmd.send("reset")
        self._cmd.recv()

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._cmd.send("quit")
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)

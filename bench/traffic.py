"""The event publisher: a simulated Celery cluster publishing through Celery's own dispatcher.

Events leave exactly as a Celery 5 cluster sends them on the redis transport:

* ``task-sent`` from producer hosts (``gen<pid>@web-NN``), one message each under
  routing key ``task.sent``, published with ``EventDispatcher.publish`` and a kombu
  producer as ``celery.app.amqp`` does, carrying ``queue``/``exchange``/``routing_key``;
* ``task-received``/``task-started``/``task-succeeded``/``task-failed`` from worker
  nodes (``celery@worker-NN``) through an ``EventDispatcher`` with
  ``buffer_group=['task']``, as the worker's event loop sets it up: events are
  buffered and go out as one list under ``task.multi`` when 24 are waiting or the
  loop comes round (here: the end of each pacing tick, 5 ms);
* ``worker-heartbeat`` every 2 s per worker with ``freq``, ``active``,
  ``processed``, ``loadavg`` and the ``sw_*`` fields.

Each event carries ``hostname``, ``utcoffset``, ``pid``, ``clock`` and ``timestamp``
because the dispatcher adds them. Rate control runs in this (separate) process.
"""

from __future__ import annotations

import random
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from bench import catalog

HEARTBEAT_FREQ = 2.0
# Tasks in flight between stages (across the cluster): sent -> received (prefetch),
# received -> started, started -> finished (running).
LAG_RECEIVE, LAG_START, LAG_FINISH = 16, 16, 64
FINAL = frozenset({"task-succeeded", "task-failed"})
BURST_PER_TICK = 240  # events per loop round in a burst
BATCH_MAX = 2000  # redis commands per pipeline at most


@dataclass
class Plan:
    """What one publisher run sends. ``rate`` None: a burst, as fast as it can."""

    broker_url: str
    tasks: int
    rate: float | None = None
    workers: int = 10
    producers: int = 3
    fail_ratio: float = 0.5
    tick: float = 0.005
    probe_rate: float = 0.0  # probe failures per second, for the latency run
    probe_runtime: float = 0.02
    seed: int = 6
    heartbeats: bool = True


@dataclass
class Report:
    events: int = 0
    messages: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    started: float = 0.0  # monotonic
    finished: float = 0.0
    max_behind: float = 0.0  # worst lateness against the schedule, seconds
    probes: dict[str, float] = field(default_factory=dict)  # uuid -> monotonic publish time
    undelivered: int = 0  # PUBLISHes no subscriber received (replay only)

    @property
    def seconds(self) -> float:
        return max(1e-9, self.finished - self.started)

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def task_stream(plan: Plan, rng: random.Random) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(event type, host index, fields) for ``plan.tasks`` tasks, stages interleaved.

    Host index is a producer for ``task-sent`` and a worker for the rest.
    """
    kinds, failures, results = catalog.build(plan.seed)
    uuid4 = uuid.uuid4
    wait_receive: deque[tuple[Any, ...]] = deque()
    wait_start: deque[tuple[Any, ...]] = deque()
    running: deque[tuple[Any, ...]] = deque()
    workers, producers = plan.workers, plan.producers
    fail_ratio = plan.fail_ratio
    randrange, rand = rng.randrange, rng.random

    def received(t: tuple[Any, ...]) -> tuple[str, int, dict[str, Any]]:
        tid, kind, i = t[0], t[1], t[2]
        return (
            "task-received",
            t[3],
            {
                "uuid": tid,
                "name": kind.name,
                "args": kind.args[i],
                "kwargs": kind.kwargs[i],
                "root_id": tid,
                "parent_id": None,
                "retries": 0,
                "eta": None,
                "expires": None,
            },
        )

    def finished(t: tuple[Any, ...]) -> tuple[str, int, dict[str, Any]]:
        if t[4]:
            f = failures[randrange(len(failures))]
            return (
                "task-failed",
                t[3],
                {"uuid": t[0], "exception": f.exception, "traceback": f.traceback},
            )
        return (
            "task-succeeded",
            t[3],
            {
                "uuid": t[0],
                "result": results[randrange(len(results))],
                "runtime": round(0.002 + rand() * 3, 6),
            },
        )

    for n in range(plan.tasks):
        kind = kinds[randrange(len(kinds))]
        i = randrange(len(kind.args))
        tid = str(uuid4())
        task = (tid, kind, i, n % workers, rand() < fail_ratio)
        yield (
            "task-sent",
            n % producers,
            {
                "uuid": tid,
                "root_id": tid,
                "parent_id": None,
                "name": kind.name,
                "args": kind.args[i],
                "kwargs": kind.kwargs[i],
                "retries": 0,
                "eta": None,
                "expires": None,
                "queue": kind.queue,
                "exchange": "",
                "routing_key": kind.queue,
            },
        )
        wait_receive.append(task)
        if len(wait_receive) > LAG_RECEIVE:
            t = wait_receive.popleft()
            yield received(t)
            wait_start.append(t)
        if len(wait_start) > LAG_START:
            t = wait_start.popleft()
            yield "task-started", t[3], {"uuid": t[0]}
            running.append(t)
        if len(running) > LAG_FINISH:
            yield finished(running.popleft())
    while wait_receive or wait_start or running:
        if wait_receive:
            t = wait_receive.popleft()
            yield received(t)
            wait_start.append(t)
        if wait_start:
            t = wait_start.popleft()
            yield "task-started", t[3], {"uuid": t[0]}
            running.append(t)
        if running:
            yield finished(running.popleft())


class Cluster:
    """Dispatchers for the simulated producers and workers, on one broker connection."""

    def __init__(self, plan: Plan) -> None:
        from celery import Celery
        from celery.events import EventDispatcher
        from celery.worker.state import SOFTWARE_INFO
        from kombu import Producer

        self.plan = plan
        self.app = Celery("bench-cluster", broker=plan.broker_url, set_as_current=False)
        self.conn = self.app.connection_for_write()
        self.conn.ensure_connection(max_retries=3)
        # As celery.app.amqp: a disabled dispatcher publishing with the task producer.
        self.producer = Producer(self.conn)
        self.producer.publish = self._counted(self.producer.publish)
        self.senders = []
        for i in range(plan.producers):
            d = EventDispatcher(
                self.conn, hostname=f"gen{2000 + i}@web-{i + 1:02d}", enabled=False, app=self.app
            )
            d.pid = 2000 + i
            self.senders.append(d)
        self.workers = []
        for i in range(plan.workers):
            d = EventDispatcher(
                self.conn,
                hostname=f"celery@worker-{i + 1:02d}",
                app=self.app,
                buffer_group=["task"],
                buffer_limit=24,
            )
            d.pid = 100 + i
            d.producer = self.producer
            self.workers.append(d)
        self.software = dict(SOFTWARE_INFO)
        self.processed = [0] * plan.workers
        self.messages = 0

    def _counted(self, publish: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.messages += 1
            return publish(*args, **kwargs)

        return counted

    def send_sent(self, host: int, fields: dict[str, Any]) -> None:
        self.senders[host].publish("task-sent", fields, self.producer, retry=False)

    def heartbeat(self, i: int) -> None:
        self.workers[i].send(
            "worker-heartbeat",
            freq=HEARTBEAT_FREQ,
            active=LAG_FINISH // self.plan.workers,
            processed=self.processed[i],
            loadavg=(1.42, 1.37, 1.29),
            retry=True,
            **self.software,
        )

    def flush(self, i: int) -> None:
        d = self.workers[i]
        buf = d._group_buffer.get("task")
        if buf:
            d.flush(errors=False)

    def close(self) -> None:
        for d in self.workers:
            d.close()
        self.conn.release()
        self.app.close()


def publish(plan: Plan) -> Report:
    """Publish ``plan`` at its rate (or as a burst) and say what went out, and when.

    Each pacing tick's messages go out in one kombu ``Producer.batch()`` (one redis
    pipeline): the bytes of every message are what the dispatcher makes, only the
    round trips are shared, as many hosts publishing at once would look to redis.
    A probe's ``task-failed`` is published on its own, its time taken just before.
    """
    rng = random.Random(plan.seed)
    cluster = Cluster(plan)
    report = Report()
    by_type: dict[str, int] = {}
    stream = task_stream(plan, rng)
    rate = plan.rate
    tick = plan.tick
    per_tick = (rate * tick) if rate else BURST_PER_TICK
    workers = cluster.workers
    dirty = [False] * plan.workers
    probes_due: deque[tuple[float, str, int]] = deque()
    probe_every = 1.0 / plan.probe_rate if plan.probe_rate else 0.0
    probe_n = 0
    emitted = 0
    done = False
    t0 = time.monotonic()
    report.started = t0
    next_hb = t0
    next_probe = t0 + 0.05 if probe_every else float("inf")
    k = 0

    def count(kind: str, n: int = 1) -> None:
        by_type[kind] = by_type.get(kind, 0) + n

    try:
        while not done or probes_due:
            k += 1
            target = int(k * per_tick)
            now = time.monotonic()
            with cluster.producer.batch(max_size=BATCH_MAX):
                while emitted < target:
                    try:
                        kind, host, fields = next(stream)
                    except StopIteration:
                        done = True
                        break
                    emitted += 1
                    by_type[kind] = by_type.get(kind, 0) + 1
                    if kind == "task-sent":
                        cluster.send_sent(host, fields)
                    else:
                        workers[host].send(kind, **fields)
                        dirty[host] = True
                        if kind in FINAL:
                            cluster.processed[host] += 1
                if now >= next_probe and not done:
                    next_probe += probe_every
                    probe_n += 1
                    pid, w = str(uuid.uuid4()), probe_n % plan.workers
                    for kind, fields in probe_events(pid, probe_n):
                        if kind == "task-sent":
                            cluster.send_sent(probe_n % plan.producers, fields)
                        else:
                            workers[w].send(kind, **fields)
                        count(kind)
                    dirty[w] = True
                    emitted += 3
                    probes_due.append((now + plan.probe_runtime, pid, w))
                for i, d in enumerate(dirty):
                    if d:
                        cluster.flush(i)
                        dirty[i] = False
                if plan.heartbeats and now >= next_hb:
                    next_hb += HEARTBEAT_FREQ
                    for i in range(plan.workers):
                        cluster.heartbeat(i)
                    count("worker-heartbeat", plan.workers)
                    emitted += plan.workers
            while probes_due and (probes_due[0][0] <= now or done):
                _, pid, w = probes_due.popleft()
                workers[w].send("task-failed", **PROBE_FAILURE, uuid=pid)
                count("task-failed")
                emitted += 1
                report.probes[pid] = time.monotonic()
                cluster.flush(w)
            if rate:
                deadline = t0 + k * tick
                now = time.monotonic()
                if now < deadline:
                    time.sleep(deadline - now)
                else:
                    report.max_behind = max(report.max_behind, now - deadline)
            elif done and probes_due:
                time.sleep(0.001)
    finally:
        report.finished = time.monotonic()
        report.events = emitted
        report.messages = cluster.messages
        report.by_type = by_type
        cluster.close()
    return report


PROBE_FAILURE = {
    "exception": "ConnectionError('probe: upstream refused')",
    "traceback": (
        "Traceback (most recent call last):\n"
        '  File "/srv/app/bench/probe.py", line 12, in charge_card\n'
        "    raise ConnectionError('probe: upstream refused')\n"
        "ConnectionError: probe: upstream refused\n"
    ),
}


def probe_events(pid: str, n: int) -> list[tuple[str, dict[str, Any]]]:
    """sent, received and started of one probe task (its failure follows later)."""
    common = {
        "uuid": pid,
        "name": catalog.PROBE_TASK,
        "args": f"({n}, 'probe')",
        "kwargs": "{'amount': 1250}",
        "root_id": pid,
        "parent_id": None,
        "retries": 0,
        "eta": None,
        "expires": None,
    }
    sent = {
        **common,
        "queue": catalog.PROBE_QUEUE,
        "exchange": "",
        "routing_key": catalog.PROBE_QUEUE,
    }
    return [("task-sent", sent), ("task-received", common), ("task-started", {"uuid": pid})]


class Recorder:
    """Takes the place of kombu's redis ``PublishBatch`` while pre-rendering.

    kombu routes each message as usual and hands over its final redis command
    (``PUBLISH topic payload``); it is kept instead of sent. Replaying those
    commands later puts byte-identical messages on the wire.
    """

    def __init__(self, channel: Any, out: list[tuple[str, str]]) -> None:
        self.channel = channel
        self.out = out

    def publish(self, message: Any, **kwargs: Any) -> Any:
        return self.channel.basic_publish(message, _publish_batch=self, **kwargs)

    def add(self, name: str, *args: Any) -> None:
        assert name == "publish", name
        self.out.append((args[0], args[1]))

    def flush(self) -> None:
        pass

    def discard(self) -> None:
        pass

    def close(self) -> None:
        pass


# Pre-rendered traffic is batched as a worker batches at this cluster-wide rate.
RENDER_REFERENCE_RATE = 10_000
TYPE_CODES = {
    "task-sent": "s",
    "task-received": "r",
    "task-started": "t",
    "task-succeeded": "o",
    "task-failed": "f",
}
CODE_TYPES = {v: k for k, v in TYPE_CODES.items()}


@dataclass
class Pool:
    """Pre-rendered messages: (topic, payload, event type codes) in publish order."""

    messages: list[tuple[str, str, str]] = field(default_factory=list)
    events: int = 0
    bytes: int = 0
    tasks: int = 0


def render(pool: Pool, plan: Plan) -> Pool:
    """Append ``plan.tasks`` more tasks to ``pool``, made by the real dispatchers, unsent.

    Task events only: heartbeats are sent live during replay, so their timestamps
    are current (Celery's ``State`` warns about heartbeats from the past).
    """
    rng = random.Random(plan.seed + pool.tasks)
    cluster = Cluster(plan)
    out: list[tuple[str, str]] = []
    channel = cluster.producer.channel
    channel.create_publish_batch = lambda max_size: Recorder(channel, out)
    workers = cluster.workers
    dirty = [False] * plan.workers
    per_tick = max(1, round(RENDER_REFERENCE_RATE * plan.tick))
    codes: list[str] = []  # event codes of the messages not yet assigned
    pending: list[list[str]] = [[] for _ in workers]
    try:
        with cluster.producer.batch(max_size=BATCH_MAX):
            for n, (kind, host, fields) in enumerate(task_stream(plan, rng), 1):
                code = TYPE_CODES[kind]
                if kind == "task-sent":
                    cluster.send_sent(host, fields)
                    codes.append(code)
                else:
                    pending[host].append(code)
                    workers[host].send(kind, **fields)
                    dirty[host] = True
                    if len(pending[host]) >= workers[host].buffer_limit:
                        codes.append("".join(pending[host]))
                        pending[host] = []
                        dirty[host] = False
                if n % per_tick == 0:
                    for i, d in enumerate(dirty):
                        if d:
                            cluster.flush(i)
                            codes.append("".join(pending[i]))
                            pending[i] = []
                            dirty[i] = False
            for i, d in enumerate(dirty):
                if d:
                    cluster.flush(i)
                    codes.append("".join(pending[i]))
    finally:
        cluster.close()
    if len(out) != len(codes):
        raise RuntimeError(f"rendered {len(out)} messages but accounted {len(codes)}")
    for (topic, payload), c in zip(out, codes, strict=True):
        pool.messages.append((topic, payload, c))
        pool.events += len(c)
        pool.bytes += len(payload)
    pool.tasks += plan.tasks
    return pool


def replay(pool: Pool, plan: Plan, events: int) -> Report:
    """Publish the pool's first ``events`` events at ``plan.rate`` (None: a burst).

    Raw pipelined ``PUBLISH`` of the rendered commands, plus live heartbeats from
    the simulated workers every 2 s. The report counts only what redis delivered
    to at least one subscriber in ``delivered``.
    """
    import redis

    cluster = Cluster(plan)
    client = redis.Redis.from_url(plan.broker_url)
    report = Report()
    by_code: dict[str, int] = {}
    rate, tick = plan.rate, plan.tick
    per_tick = rate * tick if rate else float("inf")
    messages = pool.messages
    i = emitted = 0
    k = 0
    undelivered = 0
    t0 = time.monotonic()
    report.started = t0
    next_hb = t0
    try:
        while emitted < events and i < len(messages):
            k += 1
            target = k * per_tick
            pipe = client.pipeline(transaction=False)
            n = 0
            while emitted < target and emitted < events and i < len(messages) and n < BATCH_MAX:
                topic, payload, codes = messages[i]
                pipe.publish(topic, payload)
                for c in codes:
                    by_code[c] = by_code.get(c, 0) + 1
                emitted += len(codes)
                i += 1
                n += 1
            if n:
                undelivered += sum(1 for r in pipe.execute() if not r)
                report.messages += n
            now = time.monotonic()
            if plan.heartbeats and now >= next_hb:
                next_hb += HEARTBEAT_FREQ
                with cluster.producer.batch(max_size=BATCH_MAX):
                    for w in range(plan.workers):
                        cluster.heartbeat(w)
                by_code["h"] = by_code.get("h", 0) + plan.workers
                emitted += plan.workers
            if rate:
                deadline = t0 + k * tick
                now = time.monotonic()
                if now < deadline:
                    time.sleep(deadline - now)
                else:
                    report.max_behind = max(report.max_behind, now - deadline)
    finally:
        report.finished = time.monotonic()
        report.events = emitted
        report.by_type = {CODE_TYPES.get(c, "worker-heartbeat"): n for c, n in by_code.items()}
        report.undelivered = undelivered
        client.close()
        cluster.close()
    return report


def heartbeat_once(plan: Plan) -> int:
    """One live heartbeat from every simulated worker (warms a consumer up)."""
    cluster = Cluster(plan)
    try:
        for w in range(plan.workers):
            cluster.heartbeat(w)
    finally:
        cluster.close()
    return plan.workers


def server_main(conn: Any) -> None:
    """Process entry: a publisher taking commands over a pipe, so its CPU is its own.

    Commands: ("render", plan) -> pool size; ("replay", plan, events) -> Report;
    ("live", plan) -> Report; ("heartbeat", plan) -> events sent; ("quit",).
    """
    pool = Pool()
    while True:
        try:
            cmd = conn.recv()
        except EOFError:
            return
        try:
            if cmd[0] == "render":
                render(pool, cmd[1])
                conn.send(
                    (
                        "ok",
                        {
                            "events": pool.events,
                            "messages": len(pool.messages),
                            "bytes": pool.bytes,
                            "tasks": pool.tasks,
                        },
                    )
                )
            elif cmd[0] == "replay":
                conn.send(("ok", replay(pool, cmd[1], cmd[2])))
            elif cmd[0] == "live":
                conn.send(("ok", publish(cmd[1])))
            elif cmd[0] == "heartbeat":
                conn.send(("ok", heartbeat_once(cmd[1])))
            else:
                conn.send(("ok", None))
                return
        except Exception as exc:  # reported to the caller, never silent
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class PublisherProcess:
    """The publisher in its own process (spawned), driven over a pipe."""

    def __init__(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=server_main, args=(child,), daemon=True)
        self.proc.start()

    def call(self, *cmd: Any, timeout: float = 3600) -> Any:
        self._conn.send(cmd)
        if not self._conn.poll(timeout):
            raise TimeoutError(f"publisher did not answer {cmd[0]!r} in {timeout} s")
        status, value = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"publisher: {value}")
        return value

    def render(self, plan: Plan) -> dict[str, int]:
        result: dict[str, int] = self.call("render", plan)
        return result

    def replay(self, plan: Plan, events: int) -> Report:
        report: Report = self.call("replay", plan, events)
        return report

    def live(self, plan: Plan) -> Report:
        report: Report = self.call("live", plan)
        return report

    def heartbeat(self, plan: Plan) -> int:
        n: int = self.call("heartbeat", plan, timeout=30)
        return n

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def stop(self) -> None:
        import contextlib

        with contextlib.suppress(Exception):
            self.call("quit", timeout=10)
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)

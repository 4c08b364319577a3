"""``python -m bench.run [--quick]``: the intake benchmark, every figure from one run.

Phases (all against one private redis-server on a free loopback port):

1. rates   -- the highest steady rate each consumer sustains, and its CPU per 100k
              events: (a) Celery's EventReceiver with a no-op handler, (b) the same
              feeding ``celery.events.state.State`` as Flower does, (c) ``workflowd
              run`` with 50 workflows and a real SQLite file;
2. burst   -- a burst far beyond what Redis buffers for a subscriber: who survives;
3. latency -- publish of a ``task-failed`` to the retry in the broker and to the
              Slack post, at 1,000 events/s of background traffic;
4. rss     -- peak RSS of the daemon after 1,000,000 distinct tasks, with a
              profile of the daemon taken meanwhile.

Writes a table to stdout and everything to ``bench/results/<date>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import catalog, workflows
from bench.procs import (
    REPO,
    Consumer,
    DaemonConsumer,
    ReceiverConsumer,
    Redis,
    cpu_seconds,
    machine_busy_seconds,
    memory_kib,
    metric_sum,
    wait_until,
)
from bench.sink import SinkProcess
from bench.traffic import Plan, PublisherProcess, Report

RESULTS = Path(__file__).resolve().parent / "results"
EVENTS_PER_TASK = 4  # sent, received, started, succeeded | failed
KEEP_UP = 0.99  # share of published events handled ...
GRACE = 1.0  # ... within this many seconds after publishing stopped
LATENCY_WARMUP = 2.0  # seconds of latency probes counted apart as cold
BUSY_LIMIT = 0.15  # share of a core other programs may use during a probe ...
BUSY_ATTEMPTS = 3  # ... before it is measured again, this many times at most
QUIET_SHARE = 0.10  # before each measurement: other programs below this share of a core
QUIET_WAIT = 120.0  # for up to this many seconds
TARGETS = {
    "c_over_a": 1.0,
    "c_over_b": 2.0,
    "latency_p99_ms": 50.0,
    "rss_mib": 200.0,
}


@dataclass
class Settings:
    quick: bool
    seconds: float  # length of one steady probe
    start_rate: int
    max_rate: int
    bisect_steps: int
    burst_events: int
    latency_seconds: float
    probe_rate: float  # latency probes per second
    background_rate: float
    rss_tasks: int
    rss_rate_cap: int
    rss_rate: int | None
    profile: str  # py-spy | cprofile | none
    phases: tuple[str, ...]
    quiet_wait: float = QUIET_WAIT  # seconds to wait for other programs before measuring
    busy_attempts: int = BUSY_ATTEMPTS
    src: Path | None = None  # workflowd source tree to measure (default: the installed one)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        quick = bool(args.quick)
        s = cls(
            quick=quick,
            seconds=2.0 if quick else 10.0,
            start_rate=4000,
            max_rate=4000 if quick else 256_000,
            bisect_steps=0 if quick else 3,
            burst_events=20_000 if quick else 100_000,
            latency_seconds=5.0 if quick else 60.0,
            probe_rate=5.0 if quick else 10.0,
            background_rate=1000.0,
            rss_tasks=5_000 if quick else 1_000_000,
            rss_rate_cap=10_000,
            rss_rate=4000 if quick else None,
            profile="none" if quick else "py-spy",
            phases=("rates", "burst", "latency", "rss"),
            quiet_wait=0.0 if quick else QUIET_WAIT,
            busy_attempts=1 if quick else BUSY_ATTEMPTS,
        )
        for name in ("seconds", "start_rate", "max_rate", "bisect_steps", "rss_tasks", "rss_rate"):
            value = getattr(args, name)
            if value is not None:
                setattr(s, name, value)
        if args.profile:
            s.profile = args.profile
        if args.only:
            s.phases = tuple(p.strip() for p in args.only.split(","))
        if args.src:
            s.src = Path(args.src).resolve()
        return s


@dataclass
class Probe:
    consumer: str
    rate: float  # asked for, events/s
    published: int = 0
    publish_rate: float = 0.0  # what the publisher achieved
    handled_at_grace: int = 0
    throughput: float = 0.0  # handled within the grace / (publishing time + grace)
    handled: int = 0
    drain_seconds: float | None = None  # after publishing stopped, until all were handled
    cpu_seconds: float = 0.0
    cpu_per_100k: float | None = None
    backlog_peak_bytes: int = 0  # largest pub/sub output buffer redis held for it
    dropped: int = 0  # times redis closed the subscriber (its log) + consumer reconnects
    redis_dropped: int = 0
    reconnects: int = 0
    publisher_cpu_seconds: float = 0.0  # the other processes of the bench meanwhile
    redis_cpu_seconds: float = 0.0
    foreign_cpu_seconds: float = 0.0  # used by processes that are not the bench's
    attempts: int = 1
    undelivered: int = 0
    ok: bool = False
    publisher_limited: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Bench:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.redis = Redis().start()
        try:
            self.sink = SinkProcess().start()
        except BaseException:
            self.redis.stop()
            raise
        self.publisher = PublisherProcess()
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-"))
        self.workflows_dir = self.tmp / "workflows"
        workflows.write(self.workflows_dir, self.sink.url(""))
        self.pool_events = 0
        self.results: dict[str, Any] = {}
        self.stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H%M%SZ")

    def close(self) -> None:
        self.publisher.stop()
        self.sink.stop()
        self.redis.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # --- building blocks --------------------------------------------------------------

    def plan(self, **kw: Any) -> Plan:
        return Plan(broker_url=self.redis.url, **kw)

    def ensure_pool(self, events: int) -> None:
        if self.pool_events >= events:
            return
        tasks = (events - self.pool_events) // EVENTS_PER_TASK + 2000
        t = time.monotonic()
        info = self.publisher.render(self.plan(tasks=tasks))
        self.pool_events = info["events"]
        _say(
            f"rendered {info['events']:,} events in {info['messages']:,} messages "
            f"({info['bytes'] / 2**20:.0f} MiB) in {time.monotonic() - t:.0f} s"
        )

    def daemon(self, **kw: Any) -> DaemonConsumer:
        return DaemonConsumer(
            self.redis.url, self.workflows_dir, env=workflows.ENV, src=self.s.src, **kw
        )

    def consumer(self, label: str) -> Consumer:
        if label == "a":
            return ReceiverConsumer(self.redis.url, "noop")
        if label == "b":
            return ReceiverConsumer(self.redis.url, "state")
        return self.daemon()

    def warm_up(self, c: Consumer, since: int = 0, timeout: float = 60) -> None:
        """Until the consumer has counted live events (more than ``since``): it is subscribed."""
        plan = self.plan(tasks=0)

        def counted() -> bool:
            self.publisher.heartbeat(plan)
            end = time.monotonic() + 0.5
            while time.monotonic() < end:
                if c.count() > since:
                    return True
                time.sleep(0.05)
            return False

        wait_until(counted, timeout, interval=0, what=f"consumer ({c.label}) to subscribe")
        time.sleep(0.3)

    def wait_quiet(self) -> float:
        """Wait (bounded) until other programs leave the machine alone for 2 s in a row.

        Returns the seconds waited. The two cores are shared: a probe measured while
        something else runs measures that something too.
        """
        limit = self.s.quiet_wait
        waited, calm = 0.0, 0
        while waited < limit and calm < 2:
            ours, busy = self.own_cpu(None), machine_busy_seconds()
            time.sleep(1.0)
            waited += 1.0
            foreign = (machine_busy_seconds() - busy) - (self.own_cpu(None) - ours)
            calm = calm + 1 if foreign < QUIET_SHARE else 0
        if limit and waited >= limit:
            _say(f"  the machine stayed busy for {limit:.0f} s; measuring anyway")
        elif waited > 2:
            _say(f"  waited {waited:.0f} s for other programs to finish")
        return waited

    def own_cpu(self, c: Consumer | None) -> float:
        """CPU seconds of every process of the bench (the consumer's included)."""
        pids = {os.getpid(), self.publisher.pid, self.redis.pid, self.sink.pid}
        if c is not None:
            pids.add(c.pid)
        total = 0.0
        for pid in pids:
            if pid:
                with contextlib.suppress(OSError, ValueError):
                    total += cpu_seconds(pid)
        return total

    @contextlib.contextmanager
    def backlog_watch(self) -> Iterator[list[int]]:
        """Sample the largest subscriber output buffer in redis every 0.2 s."""
        peak = [0]
        stop = threading.Event()
        client = self.redis.client()

        def watch() -> None:
            while not stop.wait(0.2):
                with contextlib.suppress(Exception):
                    peak[0] = max(peak[0], self.redis.pubsub_backlog(client))

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        try:
            yield peak
        finally:
            stop.set()
            t.join(2)
            client.close()

    def measure(
        self,
        c: Consumer,
        probe: Probe,
        publish: Callable[[], Report],
        *,
        drain_max: float = 10.0,
    ) -> Report:
        """Run ``publish`` against a started, warmed-up consumer and fill in ``probe``."""
        base, cpu0 = c.counts(), c.cpu()
        drops0, redis_drops0 = c.drops(), self.redis.dropped()
        others = {"publisher": self.publisher.pid, "redis": self.redis.pid}
        others0 = {k: cpu_seconds(p) for k, p in others.items() if p}
        ours = self.own_cpu(c)
        busy0 = machine_busy_seconds()
        with self.backlog_watch() as peak:
            report = publish()
            probe.published = report.events
            probe.publish_rate = round(report.rate)
            probe.undelivered = report.undelivered
            at_grace: int | None = None
            cpu_done = None
            grace_end, deadline = report.finished + GRACE, report.finished + drain_max
            last, last_change = -1, time.monotonic()
            while True:
                now = time.monotonic()
                handled = handled_since(base, c.counts(), report)
                if at_grace is None and (now >= grace_end or handled >= report.events):
                    at_grace = handled
                if handled >= report.events:
                    probe.drain_seconds = round(now - report.finished, 2)
                    cpu_done = c.cpu()
                    break
                if handled != last:
                    last, last_change = handled, now
                # Nothing more for 2 s after the grace: what is missing is lost (dropped).
                if now >= deadline or (at_grace is not None and now - last_change >= 2.0):
                    break
                time.sleep(0.2)
            probe.handled_at_grace = at_grace or 0
            probe.throughput = round(probe.handled_at_grace / (report.seconds + GRACE))
            probe.handled = handled
            probe.backlog_peak_bytes = peak[0]
        cpu = (cpu_done if cpu_done is not None else c.cpu()) - cpu0
        probe.cpu_seconds = round(cpu, 2)
        for k, p0 in others0.items():
            used = round(cpu_seconds(others[k] or 0) - p0, 2)
            setattr(probe, f"{k}_cpu_seconds", used)
        probe.foreign_cpu_seconds = round(
            max(0.0, (machine_busy_seconds() - busy0) - (self.own_cpu(c) - ours)), 2
        )
        if probe.handled:
            probe.cpu_per_100k = round(cpu / probe.handled * 100_000, 2)
        probe.reconnects = c.drops() - drops0
        probe.redis_dropped = self.redis.dropped() - redis_drops0
        probe.dropped = probe.reconnects + probe.redis_dropped
        probe.ok = (
            probe.handled_at_grace >= KEEP_UP * report.events
            and probe.dropped == 0
            and report.undelivered == 0
        )
        if report.rate < 0.97 * probe.rate and not probe.ok:
            probe.publisher_limited = True
        probe.extra = c.extra()
        return report

    # --- phase 1: sustained rates ------------------------------------------------------

    def rate_probe(self, label: str, rate: int) -> Probe:
        events = int(rate * self.s.seconds)
        self.ensure_pool(events)
        plan = self.plan(tasks=0, rate=float(rate))
        replay = functools.partial(self.publisher.replay, plan, events)
        for attempt in range(1, self.s.busy_attempts + 1):
            self.wait_quiet()
            probe = Probe(consumer=label, rate=rate, attempts=attempt)
            c = self.consumer(label)
            c.start()
            try:
                self.warm_up(c)
                report = self.measure(c, probe, replay)
            finally:
                c.stop()
                if isinstance(c, DaemonConsumer):
                    c.cleanup()
            # Another program took CPU from the two cores meanwhile: measure again.
            busy = probe.foreign_cpu_seconds / (report.seconds + GRACE)
            if busy <= BUSY_LIMIT or attempt == self.s.busy_attempts:
                break
            _say(
                f"  ({label}) {rate:>7,}/s: other programs used {busy:.0%} of a core "
                "meanwhile; measuring again"
            )
            time.sleep(5)
        verdict = "keeps up" if probe.ok else "falls behind"
        if probe.dropped:
            verdict += ", dropped by redis"
        _say(
            f"  ({label}) {rate:>7,}/s: handled {probe.handled_at_grace:,}/{probe.published:,} "
            f"within {GRACE:g} s (all after {probe.drain_seconds} s), backlog peak "
            f"{probe.backlog_peak_bytes / 2**20:.1f} MiB, CPU {probe.cpu_per_100k} s/100k, "
            f"others {probe.foreign_cpu_seconds:g} s -> {verdict}"
        )
        return probe

    def search(self, label: str) -> dict[str, Any]:
        """Double until it falls behind, then bisect between the last pass and that fail."""
        probes: list[Probe] = []
        lo, hi = 0, None
        rate = self.s.start_rate
        while True:
            p = self.rate_probe(label, rate)
            probes.append(p)
            if p.publisher_limited:
                break
            if p.ok:
                lo = rate
                if rate * 2 > self.s.max_rate:
                    break
                rate *= 2
            else:
                hi = rate
                break
        for _ in range(self.s.bisect_steps if hi is not None else 0):
            assert hi is not None
            # Aim at what the last failing probe actually handled per second when that
            # lies inside the bracket (it converges in fewer probes), else the middle.
            last_fail = next(p for p in reversed(probes) if not p.ok)
            guess = last_fail.throughput * 0.98
            mid = guess if lo < guess < hi else (lo + hi) / 2
            mid = int(round(mid / 250) * 250)
            if mid <= lo or mid >= hi:
                mid = int(round((lo + hi) / 2 / 250) * 250)
            if mid <= lo or mid >= hi:
                break
            p = self.rate_probe(label, mid)
            probes.append(p)
            if p.ok:
                lo = mid
            else:
                hi = mid
        best = max((p for p in probes if p.ok), key=lambda p: p.rate, default=None)
        return {
            "sustained_rate": lo,
            "first_failing_rate": hi,
            "cpu_per_100k_at_sustained": best.cpu_per_100k if best else None,
            "cpu_per_100k_at_start_rate": probes[0].cpu_per_100k,
            "publisher_limited": any(p.publisher_limited for p in probes),
            "probes": [asdict(p) for p in probes],
        }

    def phase_rates(self) -> None:
        _say(f"phase rates: steady {self.s.seconds:g} s probes, doubling then bisecting")
        out = {}
        for label in ("a", "b", "c"):
            out[label] = self.search(label)
            _say(f"  ({label}) sustains {out[label]['sustained_rate']:,} events/s")
        self.results["rates"] = out

    # --- phase 2: burst ------------------------------------------------------------------

    def phase_burst(self) -> None:
        n = self.s.burst_events
        _say(f"phase burst: {n:,} events as fast as the publisher goes")
        self.ensure_pool(n)
        out = {}
        for label in ("a", "b", "c"):
            probe = self.burst(label, n)
            out[label] = asdict(probe)
            _say(
                f"  ({label}) burst at {probe.publish_rate:,}/s: handled {probe.handled:,}/"
                f"{probe.published:,}, dropped by redis {probe.redis_dropped}x, reconnected "
                f"{probe.reconnects}x, consuming afterwards: "
                f"{probe.extra['consuming_after_burst']}"
            )
        self.results["burst"] = out

    def burst(self, label: str, n: int) -> Probe:
        self.wait_quiet()
        probe = Probe(consumer=label, rate=0)
        c = self.consumer(label)
        c.start()
        try:
            self.warm_up(c)
            plan = self.plan(tasks=0, rate=None)
            self.measure(c, probe, lambda: self.publisher.replay(plan, n), drain_max=15)
            # Still consuming afterwards? Live heartbeats until one is counted.
            probe.extra["consuming_after_burst"] = False
            with contextlib.suppress(TimeoutError):
                self.warm_up(c, since=c.count(), timeout=30)
                probe.extra["consuming_after_burst"] = True
        finally:
            c.stop()
            if isinstance(c, DaemonConsumer):
                c.cleanup()
        return probe

    # --- phase 3: latency ----------------------------------------------------------------

    def phase_latency(self) -> None:
        s = self.s
        _say(
            f"phase latency: {s.probe_rate:g} failures/s for {s.latency_seconds:g} s "
            f"over {s.background_rate:,.0f} events/s of background"
        )
        for attempt in range(1, self.s.busy_attempts + 1):
            self.wait_quiet()
            result = self.latency_once()
            result["steady"]["attempts"] = attempt
            steady = result["steady"]
            busy = steady["foreign_cpu_seconds"] / (s.latency_seconds + GRACE)
            if busy <= BUSY_LIMIT or attempt == self.s.busy_attempts:
                break
            _say(f"  other programs used {busy:.0%} of a core meanwhile; measuring again")
            time.sleep(10)
        self.results["latency"] = result
        for what in ("retry", "slack"):
            r = result[what]
            _say(
                f"  publish -> {what}: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
                f"max {r['max_ms']} ms ({r['n']}/{result['probes']} arrived)"
            )

    def latency_once(self) -> dict[str, Any]:
        s = self.s
        retries: dict[str, float] = {}
        stop = threading.Event()
        client = self.redis.client()
        client.delete(workflows.PROBE_RETRY_QUEUE)

        def watch_retries() -> None:
            while not stop.is_set():
                item = client.brpop([workflows.PROBE_RETRY_QUEUE], timeout=0.5)
                if item is None:
                    continue
                now = time.monotonic()
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    parent = json.loads(item[1])["headers"]["parent_id"]
                    retries.setdefault(parent, now)

        self.sink.reset()
        c = self.daemon()
        c.start()
        watcher = threading.Thread(target=watch_retries, daemon=True)
        watcher.start()
        try:
            self.warm_up(c)
            plan = self.plan(
                tasks=int(s.background_rate * s.latency_seconds / EVENTS_PER_TASK),
                rate=s.background_rate,
                probe_rate=s.probe_rate,
            )
            probe = Probe(consumer="c", rate=s.background_rate)
            report = self.measure(c, probe, functools.partial(self.publisher.live, plan))
            sent = report.probes

            def complete() -> bool:
                arrivals = self.sink.stats()["arrivals"]
                return all(u in arrivals and u in retries for u in sent)

            with contextlib.suppress(TimeoutError):
                wait_until(complete, 15, interval=0.2, what="probe retries and posts")
            arrivals = self.sink.stats()["arrivals"]
        finally:
            stop.set()
            watcher.join(2)
            client.close()
            c.stop()
            c.cleanup()
        # The first probes pay for first connections (HTTP, the retry publisher): a
        # restart's cost, not the steady state. Counted apart.
        cold = {u for u, t in sent.items() if t < report.started + LATENCY_WARMUP}
        steady = {u: t for u, t in sent.items() if u not in cold}
        slack = [(arrivals[u] - t) * 1000 for u, t in steady.items() if u in arrivals]
        retry = [(retries[u] - t) * 1000 for u, t in steady.items() if u in retries]

        def ms(got: dict[str, float]) -> list[float]:
            return sorted(round((got[u] - sent[u]) * 1000, 1) for u in cold if u in got)

        return {
            "probes": len(steady),
            "warmup_excluded": {
                "seconds": LATENCY_WARMUP,
                "probes": len(cold),
                "slack_ms": ms(arrivals),
                "retry_ms": ms(retries),
            },
            "background_events_per_s": round(report.rate),
            "slack": _percentiles(slack, len(steady)),
            "retry": _percentiles(retry, len(steady)),
            "steady": asdict(probe),
        }

    # --- phase 4: RSS after 1M tasks --------------------------------------------------------

    def phase_rss(self) -> None:
        s = self.s
        # A rate the daemon sustains, leaving CPU for the live publisher: 90 % of (c)'s
        # sustained rate from phase 1 (or --rss-rate; 6,000/s without phase 1), capped at
        # what the live publisher manages beside it.
        sustained = self.results.get("rates", {}).get("c", {}).get("sustained_rate") or 0
        rate = s.rss_rate or min(s.rss_rate_cap, int(sustained * 0.9 / 250) * 250 or 6000)
        tasks = s.rss_tasks
        _say(
            f"phase rss: {tasks:,} distinct tasks ({tasks * EVENTS_PER_TASK:,} events) "
            f"at {rate:,} events/s, live"
        )
        profile_path = None
        if s.profile == "py-spy" and shutil.which("py-spy") is None:
            _say("  py-spy not found (pip install py-spy): profiling with cProfile instead")
            s.profile = "cprofile"
        if s.profile == "cprofile":
            profile_path = str(RESULTS / f"profile-{self.stamp}.prof")
        self.wait_quiet()
        c = self.daemon(profile=profile_path)
        c.start()
        samples: list[dict[str, Any]] = []
        stop = threading.Event()
        profile: dict[str, Any] = {}

        def sample() -> None:
            # RSS beside what may explain it: the backlog redis holds for the daemon,
            # events handled so far and tasks the daemon tracks
            t0 = time.monotonic()
            client = self.redis.client()
            try:
                while not stop.wait(2.0):
                    with contextlib.suppress(Exception):
                        m = memory_kib(c.pid)
                        metrics = c.metrics()
                        samples.append(
                            {
                                "t": round(time.monotonic() - t0, 1),
                                "rss_kib": m.get("VmRSS", 0),
                                "backlog_kib": self.redis.pubsub_backlog(client) // 1024,
                                "events": int(metric_sum(metrics, "workflowd_events_total")),
                                "tasks_tracked": int(
                                    metric_sum(metrics, "workflowd_tasks_tracked")
                                ),
                            }
                        )
            finally:
                client.close()

        def spy() -> None:
            # a steady stretch in the middle of the run
            if stop.wait(min(60.0, tasks * EVENTS_PER_TASK / rate / 3)):
                return
            profile.update(py_spy(c.pid, RESULTS, 30 if not s.quick else 5, self.stamp))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        spier = threading.Thread(target=spy, daemon=True)
        if s.profile == "py-spy":
            spier.start()
        try:
            self.warm_up(c)
            probe = Probe(consumer="c", rate=rate)
            plan = self.plan(tasks=tasks, rate=float(rate), heartbeats=True)
            self.measure(c, probe, lambda: self.publisher.live(plan), drain_max=30)
            mem = memory_kib(c.pid)
            extra = c.extra()
            alive = c.alive()
        finally:
            stop.set()
            sampler.join(3)
            if spier.is_alive():
                spier.join(60)
            c.stop()
            log_tail = c.log_tail(2000)
            c.cleanup()
        if profile_path:
            profile = cprofile_summary(profile_path)
        self.results["rss"] = {
            "tasks": tasks,
            "rate": rate,
            "peak_rss_mib": round(mem.get("VmHWM", 0) / 1024, 1),
            "final_rss_mib": round(mem.get("VmRSS", 0) / 1024, 1),
            "steady": asdict(probe),
            "daemon": extra,
            "alive_at_end": alive,
            "rss_curve": samples,
            "profile": profile,
            "log_tail": log_tail if not probe.ok else "",
        }
        _say(
            f"  peak RSS {mem.get('VmHWM', 0) / 1024:.0f} MiB after {probe.handled:,} events "
            f"(kept up: {probe.ok}; CPU {probe.cpu_per_100k} s/100k)"
        )

    # --- all ---------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self.results["machine"] = machine_info(self.redis.version(), self.s.src)
        self.results["settings"] = {**asdict(self.s), "src": str(self.s.src or "")}
        self.results["workload"] = workload_info(self.workflows_dir)
        for phase in self.s.phases:
            getattr(self, f"phase_{phase}")()
        self.results["ratios"] = ratios(self.results)
        self.results["duration_seconds"] = round(time.monotonic() - started)
        return self.results


# --------------------------------------------------------------------------- helpers


def handled_since(base: dict[str, int], now: dict[str, int], report: Report) -> int:
    """Events of ``report`` a consumer handled: per type, at most what was published of it.

    The cap keeps events the consumer causes itself (the daemon's retries may emit
    task-sent) from counting as published ones.
    """
    if "*" in now:
        return min(now["*"] - base.get("*", 0), report.events)
    return sum(min(now.get(kind, 0) - base.get(kind, 0), n) for kind, n in report.by_type.items())


def _percentiles(values: list[float], expected: int) -> dict[str, Any]:
    if not values:
        return {"n": 0, "missing": expected, "p50_ms": None, "p99_ms": None, "max_ms": None}
    v = sorted(values)

    def pct(q: float) -> float:
        return round(v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))], 1)

    return {
        "n": len(v),
        "missing": expected - len(v),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": round(v[-1], 1),
        "mean_ms": round(statistics.fmean(v), 1),
    }


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rates = results.get("rates")
    if rates:
        a, b, c = (rates[k]["sustained_rate"] for k in "abc")
        out["c_over_a"] = {
            "value": round(c / a, 2) if a else None,
            "target": TARGETS["c_over_a"],
        }
        out["c_over_b"] = {
            "value": round(c / b, 2) if b else None,
            "target": TARGETS["c_over_b"],
        }
    lat = results.get("latency")
    if lat:
        worst = max((lat[k]["p99_ms"] or float("inf")) for k in ("retry", "slack"))
        out["latency_p99_ms"] = {"value": worst, "target": TARGETS["latency_p99_ms"]}
    rss = results.get("rss")
    if rss:
        out["rss_mib"] = {"value": rss["peak_rss_mib"], "target": TARGETS["rss_mib"]}
    for key, r in out.items():
        v = r["value"]
        if v is None:
            r["met"] = False
        elif key in ("latency_p99_ms", "rss_mib"):
            r["met"] = v <= r["target"]
        else:
            r["met"] = v >= r["target"]
    return out


def machine_info(redis_version: str, src: Path | None = None) -> dict[str, Any]:
    import celery
    import kombu

    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    commit = "?"
    tree = src or REPO / "src"
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(tree), "status", "--porcelain", "."],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if dirty:
            commit += " (src modified)"
    from importlib import metadata

    libraries: dict[str, str | None] = {}
    for name in ("redis", "hiredis", "orjson", "httpx"):
        try:
            libraries[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            libraries[name] = None
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu": model,
        "cores": os.cpu_count(),
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "redis": redis_version,
        "libraries": libraries,  # redis-py uses hiredis's parser when it is installed
        "workflowd_commit": commit,
    }


def workload_info(directory: Path) -> dict[str, Any]:
    kinds, failures, _ = catalog.build()
    docs = workflows.definitions("http://sink")
    triggers: dict[str, int] = {}
    for d in docs:
        triggers[d["trigger"]["event"]] = triggers.get(d["trigger"]["event"], 0) + 1
    expected = workflows.expected_match_rate(directory)
    return {
        "task_kinds": len(kinds),
        "exceptions": len({f.exception for f in failures}),
        "fail_ratio": 0.5,
        "workers": Plan.workers,
        "producers": Plan.producers,
        "workflows": len(docs),
        "workflows_by_trigger": triggers,
        "expected_runs_per_1000_failures": round(sum(expected.values()), 1),
        "expected_runs_by_workflow": expected,
    }


def py_spy(pid: int, out_dir: Path, seconds: int, stamp: str) -> dict[str, Any]:
    """Sample the daemon with py-spy (the thread holding the GIL) and summarise."""
    exe = shutil.which("py-spy")
    if exe is None:
        return {"error": "py-spy not installed (pip install py-spy)"}
    raw = out_dir / f"profile-{stamp}.txt"
    svg = out_dir / f"profile-{stamp}.svg"
    # --gil: only the thread holding the GIL is sampled, so shares are shares of the
    # Python execution time; --nonblocking: the daemon is not paused for each sample.
    cmd = [exe, "record", "--pid", str(pid), "--gil", "--threads", "--nonblocking"]
    r1 = subprocess.run(
        [*cmd, "--duration", str(seconds), "--rate", "200", "--format", "raw", "-o", str(raw)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r1.returncode != 0:
        return {"error": (r1.stderr or r1.stdout)[-2000:]}
    summary = collapsed_summary(raw.read_text())
    summary["raw"] = str(raw.relative_to(REPO))
    r2 = subprocess.run(
        [*cmd, "--duration", "10", "--rate", "100", "-o", str(svg)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r2.returncode == 0:
        summary["flamegraph"] = str(svg.relative_to(REPO))
    return summary


def collapsed_summary(text: str, top: int = 25) -> dict[str, Any]:
    """Self and inclusive shares per function from py-spy's collapsed stacks, per thread."""
    self_n: dict[str, int] = {}
    incl_n: dict[str, int] = {}
    threads: dict[str, int] = {}
    packages: dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        stack, _, n_s = line.rpartition(" ")
        if not stack:
            continue
        n = int(n_s)
        frames = stack.split(";")
        total += n
        thread = frames[0]
        threads[thread] = threads.get(thread, 0) + n
        funcs = [_frame(f) for f in frames[1:]]
        if funcs:
            self_n[funcs[-1]] = self_n.get(funcs[-1], 0) + n
            pkg = _package(frames[-1])
            packages[pkg] = packages.get(pkg, 0) + n
        for f in set(funcs):
            incl_n[f] = incl_n.get(f, 0) + n

    def share(d: dict[str, int]) -> list[tuple[str, float]]:
        return [
            (k, round(100 * v / total, 1))
            for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]
        ]

    return {
        "samples": total,
        "threads_pct": share(threads),
        "self_by_package_pct": share(packages),
        "self_pct": share(self_n),
        "inclusive_pct": share(incl_n),
    }


def _package(f: str) -> str:
    """Where a frame's code lives: workflowd/<module>, else the top-level package or module."""
    path = f.partition(" (")[2].rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/src/", "/lib/python3.11/", "/lib/python3/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    parts = path.split("/")
    if parts[0] == "workflowd" and len(parts) > 1:
        return "workflowd/" + parts[1].removesuffix(".py")
    return parts[0].removesuffix(".py") or "?"


def _frame(f: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"
    name, _, where = f.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/src/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


def cprofile_summary(path: str, top: int = 25) -> dict[str, Any]:
    import pstats

    st = pstats.Stats(path)
    total = st.total_tt or 1e-9  # type: ignore[attr-defined]
    rows = []
    for (file, line, func), (_cc, _nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append((f"{func} ({Path(file).name}:{line})", tt, ct))
    by_self = sorted(rows, key=lambda r: -r[1])[:top]
    by_cum = sorted(rows, key=lambda r: -r[2])[:top]
    return {
        "file": path,
        "total_seconds": round(total, 2),
        "self_pct": [(n, round(100 * tt / total, 1)) for n, tt, _ in by_self],
        "inclusive_pct": [(n, round(100 * ct / total, 1)) for n, _, ct in by_cum],
    }


def table(results: dict[str, Any]) -> str:
    lines = []
    m = results["machine"]
    lines.append(
        f"{m['date']}  {m['cpu']}, {m['cores']} cores, Python {m['python']}, celery "
        f"{m['celery']}, kombu {m['kombu']}, redis {m['redis']}, workflowd {m['workflowd_commit']}"
    )
    libs = ", ".join(f"{k} {v}" for k, v in m.get("libraries", {}).items() if v)
    lines.append(f"libraries: {libs}")
    rates = results.get("rates")
    if rates:
        lines.append("")
        start = results["settings"]["start_rate"]
        lines.append(f"{'consumer':<42} {'sustained ev/s':>14}   CPU s/100k there   at {start:,}/s")
        names = {
            "a": "(a) EventReceiver, no-op handler",
            "b": "(b) EventReceiver + State (as Flower)",
            "c": "(c) workflowd run, 50 workflows",
        }
        for k in "abc":
            r = rates[k]
            lim = " (publisher-limited)" if r["publisher_limited"] else ""
            lines.append(
                f"{names[k]:<42} {r['sustained_rate']:>14,}   "
                f"{r['cpu_per_100k_at_sustained']!s:>16}   {r['cpu_per_100k_at_start_rate']!s:>9}"
                f"{lim}"
            )
    burst = results.get("burst")
    if burst:
        lines.append("")
        for k in "abc":
            b = burst[k]
            lines.append(
                f"burst ({k}): {b['published']:,} events at {b['publish_rate']:,}/s -> handled "
                f"{b['handled']:,}, dropped by redis {b['redis_dropped']}x, reconnected "
                f"{b['reconnects']}x, consuming afterwards: "
                f"{b['extra'].get('consuming_after_burst')}"
            )
    lat = results.get("latency")
    if lat:
        lines.append("")
        for k in ("retry", "slack"):
            r = lat[k]
            lines.append(
                f"latency task-failed -> {k:<5}: p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  "
                f"max {r['max_ms']} ms  ({r['n']}/{lat['probes']}){_busy(lat['steady'])}"
            )
    rss = results.get("rss")
    if rss:
        lines.append("")
        lines.append(
            f"peak RSS after {rss['tasks']:,} tasks at {rss['rate']:,} ev/s: "
            f"{rss['peak_rss_mib']} MiB (kept up: {rss['steady']['ok']}){_busy(rss['steady'])}"
        )
    r = results.get("ratios", {})
    if r:
        lines.append("")
        if results.get("settings", {}).get("quick"):
            lines.append(
                "quick run: every rate is capped at the start rate; the ratios say nothing"
            )
        for k, v in r.items():
            lines.append(
                f"target {k:<15} {v['value']!s:>8} vs {v['target']:<6} "
                f"{'met' if v['met'] else 'MISSED'}"
            )
    return "\n".join(lines)


def _busy(probe: dict[str, Any]) -> str:
    """A note when other programs took a noticeable share of the machine during a probe."""
    seconds = probe["published"] / max(1.0, probe["publish_rate"]) + GRACE
    share = probe["foreign_cpu_seconds"] / seconds
    return f"  [other programs used {share:.0%} of a core]" if share > BUSY_LIMIT else ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run, well under a minute")
    p.add_argument("--only", help="comma-separated phases: rates,burst,latency,rss")
    p.add_argument("--seconds", type=float, help="length of one steady probe")
    p.add_argument("--start-rate", dest="start_rate", type=int)
    p.add_argument("--max-rate", dest="max_rate", type=int)
    p.add_argument("--bisect-steps", dest="bisect_steps", type=int)
    p.add_argument("--rss-tasks", dest="rss_tasks", type=int)
    p.add_argument("--rss-rate", dest="rss_rate", type=int, help="events/s of the 1M-task run")
    p.add_argument("--profile", choices=["py-spy", "cprofile", "none"])
    p.add_argument("--out", help="result file (default bench/results/<date>.json)")
    p.add_argument(
        "--src",
        help="measure workflowd from this source directory (e.g. a git worktree's src/)",
    )
    args = p.parse_args(argv)
    settings = Settings.from_args(args)
    RESULTS.mkdir(parents=True, exist_ok=True)

    def on_term(signum: int, _: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through every cleanup

    signal.signal(signal.SIGTERM, on_term)
    bench = Bench(settings)
    try:
        results = bench.run()
    finally:
        bench.close()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H%M%SZ")
    out = (
        Path(args.out)
        if args.out
        else RESULTS / f"{stamp}{'-quick' if settings.quick else ''}.json"
    )
    out.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    print()
    print(table(results))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the simulated cluster runs: task names, queues, argument reprs, exceptions, tracebacks.

Everything is drawn once from a seeded RNG so every run publishes the same mix.
Argument reprs are made with Celery's own ``saferepr`` at Celery's limit (1024
characters), so sizes and truncation look like a real worker's events.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Celery's default argsrepr_maxsize / kwargsrepr_maxsize.
REPR_MAXSIZE = 1024

MODULES = {
    # module: (queue, verbs, nouns)
    "billing": ("billing", ["charge", "refund", "invoice", "reconcile"], ["card", "order", "plan"]),
    "emails": ("emails", ["send", "render", "bounce"], ["welcome", "receipt", "digest", "reset"]),
    "reports": ("reports", ["build", "export", "email"], ["daily", "weekly", "ledger"]),
    "search": ("celery", ["index", "reindex", "purge"], ["product", "user", "order"]),
    "media": ("media", ["resize", "transcode", "thumbnail"], ["image", "video", "avatar"]),
    "notifications": ("celery", ["push", "sms", "webhook"], ["alert", "reminder"]),
    "sync": ("sync", ["pull", "push", "merge"], ["crm", "erp", "warehouse"]),
    "etl": ("etl", ["extract", "transform", "load"], ["events", "sessions", "orders"]),
    "auth": ("celery", ["expire", "rotate", "audit"], ["tokens", "keys", "sessions"]),
    "orders": ("orders", ["fulfil", "cancel", "ship", "track"], ["order", "parcel"]),
    "inventory": ("orders", ["recount", "reserve", "release"], ["stock", "sku"]),
    "analytics": ("etl", ["aggregate", "rollup", "sample"], ["metrics", "funnels"]),
}

# (exception repr as Celery reports it, frames of the traceback's last part)
EXCEPTIONS = [
    ("ConnectionError('Connection refused')", "requests"),
    (
        "ConnectionRefusedError(111, 'Connection refused')",
        "socket",
    ),
    ("TimeoutError('Read timed out. (read timeout=30)')", "requests"),
    (
        "OperationalError('could not connect to server: Connection refused\\n\\tIs the server "
        'running on host "db-primary" (10.0.3.7) and accepting\\n\\tTCP/IP connections on port '
        "5432?\\n')",
        "psycopg",
    ),
    (
        'IntegrityError(\'duplicate key value violates unique constraint "orders_pkey"\\n'
        "DETAIL:  Key (id)=(48213) already exists.\\n')",
        "psycopg",
    ),
    ("ValueError(\"invalid literal for int() with base 10: 'N/A'\")", "app"),
    ("KeyError('customer_id')", "app"),
    (
        "HTTPError('503 Server Error: Service Unavailable for url: "
        "https://api.partner.example.com/v2/orders')",
        "requests",
    ),
    ("SoftTimeLimitExceeded()", "app"),
    ("RateLimitExceeded('429 Too Many Requests: retry after 30s')", "requests"),
    ("PermissionError(13, 'Permission denied')", "app"),
    ("MemoryError()", "app"),
]

_FRAMES = {
    "celery": [
        (
            "/usr/local/lib/python3.11/site-packages/celery/app/trace.py",
            453,
            "trace_task",
            "R = retval = fun(*args, **kwargs)",
        ),
        (
            "/usr/local/lib/python3.11/site-packages/celery/app/trace.py",
            736,
            "__protected_call__",
            "return self.run(*args, **kwargs)",
        ),
    ],
    "requests": [
        (
            "/usr/local/lib/python3.11/site-packages/requests/api.py",
            115,
            "post",
            'return request("post", url, data=data, json=json, **kwargs)',
        ),
        (
            "/usr/local/lib/python3.11/site-packages/requests/sessions.py",
            589,
            "request",
            "resp = self.send(prep, **send_kwargs)",
        ),
        (
            "/usr/local/lib/python3.11/site-packages/requests/sessions.py",
            703,
            "send",
            "r = adapter.send(request, **kwargs)",
        ),
        (
            "/usr/local/lib/python3.11/site-packages/requests/adapters.py",
            519,
            "send",
            "raise ConnectionError(e, request=request)",
        ),
    ],
    "socket": [
        (
            "/usr/local/lib/python3.11/site-packages/urllib3/connection.py",
            203,
            "_new_conn",
            "sock = connection.create_connection(",
        ),
        (
            "/usr/local/lib/python3.11/site-packages/urllib3/util/connection.py",
            85,
            "create_connection",
            "raise err",
        ),
        (
            "/usr/local/lib/python3.11/site-packages/urllib3/util/connection.py",
            73,
            "create_connection",
            "sock.connect(sa)",
        ),
    ],
    "psycopg": [
        (
            "/usr/local/lib/python3.11/site-packages/django/db/backends/utils.py",
            89,
            "_execute",
            "return self.cursor.execute(sql, params)",
        ),
        (
            "/usr/local/lib/python3.11/site-packages/django/db/utils.py",
            91,
            "__exit__",
            "raise dj_exc_value.with_traceback(traceback) from exc_value",
        ),
        (
            "/usr/local/lib/python3.11/site-packages/psycopg2/extras.py",
            146,
            "execute",
            "return super().execute(query, vars)",
        ),
    ],
    "app": [],
}


@dataclass(frozen=True)
class TaskKind:
    name: str
    queue: str
    args: tuple[str, ...]  # args reprs to pick from
    kwargs: tuple[str, ...]


@dataclass(frozen=True)
class Failure:
    exception: str
    traceback: str


def _traceback(rng: random.Random, task: str, exception: str, library: str) -> str:
    module = task.rsplit(".", 1)[0].replace(".", "/")
    lines = ["Traceback (most recent call last):"]
    frames = list(_FRAMES["celery"])
    depth = rng.randint(2, 6)
    for i in range(depth):
        frames.append(
            (
                f"/srv/app/{module}/{'helpers' if i else 'tasks'}.py",
                rng.randint(20, 900),
                task.rsplit(".", 1)[1] if i == 0 else f"_step_{i}",
                rng.choice(
                    [
                        "result = client.submit(payload, timeout=self.timeout)",
                        "row = Order.objects.select_for_update().get(pk=order_id)",
                        "data = json.loads(response.text)",
                        "return self._call(method, url, headers=headers, json=body)",
                        "value = int(record['amount'])",
                        "customer = payload['customer_id']",
                    ]
                ),
            )
        )
    frames.extend(_FRAMES[library])
    for path, line, func, code in frames:
        lines.append(f'  File "{path}", line {line}, in {func}')
        lines.append(f"    {code}")
    lines.append(exception.replace("(", ": ", 1).rstrip(")").replace("'", "", 2))
    return "\n".join(lines) + "\n"


def _args_objects(rng: random.Random, size: str) -> tuple[tuple[object, ...], dict[str, object]]:
    if size == "small":
        return (rng.randint(1, 10**7),), {}
    if size == "medium":
        return (
            rng.randint(1, 10**7),
            f"user{rng.randint(1, 99999)}@example.com",
        ), {"priority": rng.randint(0, 9), "source": rng.choice(["api", "web", "cron"])}
    if size == "large":
        return (
            {
                "order_id": rng.randint(1, 10**7),
                "lines": [
                    {"sku": f"SKU-{rng.randint(1000, 9999)}", "qty": rng.randint(1, 5)}
                    for _ in range(rng.randint(3, 8))
                ],
                "currency": "EUR",
                "note": "x" * rng.randint(10, 120),
            },
        ), {"idempotency_key": f"{rng.getrandbits(128):032x}", "dry_run": False}
    # "huge": over Celery's 1024-character limit, so the repr is cut and ends in "..."
    return ([rng.randint(1, 10**9) for _ in range(rng.randint(150, 400))],), {
        "batch": rng.randint(1, 999)
    }


def build(seed: int = 6) -> tuple[list[TaskKind], list[Failure], list[str]]:
    """Task kinds (with arg reprs), failures (with tracebacks) and success results."""
    from celery.utils.saferepr import saferepr

    rng = random.Random(seed)
    kinds: list[TaskKind] = []
    for module, (queue, verbs, nouns) in MODULES.items():
        for verb in verbs:
            for noun in nouns:
                name = f"app.{module}.tasks.{verb}_{noun}"
                sizes = rng.choices(
                    ["small", "medium", "large", "huge"], weights=[40, 40, 17, 3], k=6
                )
                pairs = [_args_objects(rng, s) for s in sizes]
                kinds.append(
                    TaskKind(
                        name=name,
                        queue=queue,
                        args=tuple(saferepr(a, REPR_MAXSIZE) for a, _ in pairs),
                        kwargs=tuple(saferepr(k, REPR_MAXSIZE) for _, k in pairs),
                    )
                )
    failures = []
    for exception, library in EXCEPTIONS:
        for _ in range(4):
            task = rng.choice(kinds).name
            failures.append(Failure(exception, _traceback(rng, task, exception, library)))
    results = [
        "None",
        "True",
        "{'status': 'ok'}",
        "{'status': 'ok', 'rows': 1284, 'elapsed_ms': 412}",
        "'s3://reports/2024/11/ledger-0007.csv'",
        "[104, 105, 106, 107]",
    ]
    return kinds, failures, results


PROBE_TASK = "bench.probe.charge_card"
PROBE_QUEUE = "bench-probe"

"""Fixtures: a real redis-server, real Celery workers, a loopback HTTP sink, a real daemon."""

pytest_plugins = ["tests.support.fixtures", "tests.support.daemon"]

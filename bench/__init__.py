"""Intake benchmark: realistic Celery event traffic against workflowd and Celery's own consumers.

Run it with ``python -m bench.run`` (``--quick`` for a smoke run); see bench/README.md.
"""

"""workflowd: self-healing automation for Celery clusters."""

__version__ = "0.1.0"

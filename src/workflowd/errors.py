"""The exception tree of workflowd, and the located issue type that validation reports.

WorkflowdError
├── ConfigError          settings file or flags that cannot be used
├── WorkflowFileError    a workflow file that does not load (carries Issues)
├── ActionError          an action that ran and failed
│   ├── RetryRefused     a retry that must not be sent (args unknown, ...)
│   └── DeliveryError    an HTTP post that failed after its retries
└── StoreError           the history database cannot be used
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Issue:
    """One problem in a workflow file, located as ``file:line:col: key: message``."""

    file: str
    line: int
    column: int
    key: str
    message: str
    severity: Severity = Severity.ERROR

    def __str__(self) -> str:
        prefix = "warning: " if self.severity is Severity.WARNING else ""
        key = self.key or "(document)"
        return f"{self.file}:{self.line}:{self.column}: {prefix}{key}: {self.message}"

    def to_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "key": self.key,
            "message": self.message,
            "severity": self.severity.value,
        }


class WorkflowdError(Exception):
    """Base of every error workflowd raises on purpose."""


class ConfigError(WorkflowdError):
    """Settings that cannot be used (bad config file, bad flag value)."""


class WorkflowFileError(WorkflowdError):
    """A workflow file that does not load; ``issues`` says where and why."""

    def __init__(self, issues: list[Issue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


class ActionError(WorkflowdError):
    """An action that ran and failed; the message goes into history."""


class RetryRefused(ActionError):
    """A retry that must not be sent, with a reason that says how to fix it."""


class DeliveryError(ActionError):
    """An HTTP delivery (Slack, webhook) that failed after its retries."""

    def __init__(self, message: str, status: int | None = None, attempts: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.attempts = attempts


class StoreError(WorkflowdError):
    """The history database cannot be opened or written."""

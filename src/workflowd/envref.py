"""``${NAME}`` references to the environment, and the redaction of what they expand to.

Values that came from the environment are treated as secrets: every piece of
output (logs, history, dry runs) passes through :class:`Redactor`, which puts
the ``${NAME}`` reference back in place of the value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# $${NAME} is a literal "${NAME}".
_REF = re.compile(r"\$(\$?)\{([^}]*)\}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class EnvRefError(ValueError):
    pass


def expand(value: str, env: Mapping[str, str], secrets: dict[str, str]) -> str:
    """Expand ``${NAME}`` in ``value``; record expanded values in ``secrets`` (value -> name)."""

    def sub(m: re.Match[str]) -> str:
        escaped, name = m.group(1), m.group(2)
        if escaped:
            return "${" + name + "}"
        if not _NAME.match(name):
            raise EnvRefError(f"'${{{name}}}' is not a valid environment variable reference")
        if name not in env:
            raise EnvRefError(f"environment variable {name} is not set (referenced as ${{{name}}})")
        resolved = env[name]
        if resolved:
            secrets[resolved] = name
        return resolved

    return _REF.sub(sub, value) if "$" in value else value


def references(value: str) -> list[str]:
    return [m.group(2) for m in _REF.finditer(value) if not m.group(1)]


class Redactor:
    """Replaces secret values in text with their ``${NAME}`` reference."""

    def __init__(self, secrets: Mapping[str, str] | None = None) -> None:
        self._secrets: dict[str, str] = {}
        self._pattern: re.Pattern[str] | None = None
        if secrets:
            self.add(secrets)

    def add(self, secrets: Mapping[str, str]) -> None:
        # Very short values would redact ordinary words; they are not secrets anyway.
        self._secrets.update({v: k for v, k in secrets.items() if len(v) >= 4})
        if self._secrets:
            alts = sorted(self._secrets, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(a) for a in alts))

    def __call__(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(lambda m: "${" + self._secrets[m.group(0)] + "}", text)

    def deep(self, value: Any) -> Any:
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {k: self.deep(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.deep(v) for v in value]
        return value


def redact_url(url: str) -> str:
    """A URL safe to show: scheme and host, the path and query hidden."""
    m = re.match(r"([a-zA-Z][a-zA-Z0-9+.-]*://)([^/?#@]*@)?([^/?#]*)(.*)", url)
    if not m:
        return "***"
    scheme, _userinfo, host, rest = m.groups()
    return f"{scheme}{host}/***" if rest.strip("/") else f"{scheme}{host}"

"""Message templates: ``{name}`` placeholders checked at load, rendered without ``str.format``.

Rendering never evaluates attribute or index access, so a template cannot reach
into Python objects (``{task_name.__class__}`` is refused at load).
"""

from __future__ import annotations

import difflib
import string
from collections.abc import Mapping
from dataclasses import dataclass

VARIABLES: tuple[str, ...] = (
    "workflow_name",
    "trigger",
    "timestamp",
    "task_id",
    "task_name",
    "task_args",
    "task_kwargs",
    "queue",
    "worker",
    "exception",
    "exception_type",
    "error_message",
    "root_id",
    "failure_count",
    "attempt",
    "elapsed_seconds",
    "threshold_seconds",
)
UNKNOWN = "unknown"

_formatter = string.Formatter()


class TemplateError(ValueError):
    """A template that does not parse or names something that is not a variable."""


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed template: literal text and variable names, alternating."""

    source: str
    parts: tuple[tuple[str, str | None], ...]

    @property
    def variables(self) -> tuple[str, ...]:
        return tuple(name for _, name in self.parts if name is not None)

    def render(self, values: Mapping[str, object]) -> str:
        out: list[str] = []
        for literal, name in self.parts:
            out.append(literal)
            if name is not None:
                value = values.get(name)
                out.append(UNKNOWN if value is None or value == "" else str(value))
        return "".join(out)


def parse(source: str) -> Template:
    """Parse and check ``source``; raise TemplateError naming the bad placeholder."""
    try:
        pieces = list(_formatter.parse(source))
    except ValueError as exc:
        raise TemplateError(f"{exc} (write {{{{ and }}}} for literal braces)") from None
    parts: list[tuple[str, str | None]] = []
    for literal, field, spec, conversion in pieces:
        if field is None:
            parts.append((literal, None))
            continue
        shown = (
            "{"
            + field
            + (f"!{conversion}" if conversion else "")
            + (f":{spec}" if spec else "")
            + "}"
        )
        if field == "":
            raise TemplateError("empty placeholder {}; name a variable, e.g. {task_name}")
        if any(c in field for c in ".[]"):
            raise TemplateError(
                f"placeholder {shown} reaches into attributes or indexes; "
                "only plain variable names are allowed"
            )
        if conversion or spec:
            raise TemplateError(
                f"placeholder {shown}: conversions and format specs are not supported"
            )
        if field not in VARIABLES:
            hint = difflib.get_close_matches(field, VARIABLES, n=1)
            suggestion = f" (did you mean {{{hint[0]}}}?)" if hint else ""
            raise TemplateError(
                f"unknown template variable {{{field}}}{suggestion}; known: {', '.join(VARIABLES)}"
            )
        parts.append((literal, field))
    return Template(source=source, parts=tuple(parts))

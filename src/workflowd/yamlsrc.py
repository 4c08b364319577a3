"""YAML documents to plain Python data, remembering where every key and value stood.

PyYAML's safe loader loses positions and expands aliases without limit; this
module composes nodes itself so errors can name ``file:line:col`` and alias
bombs are refused instead of eating memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from workflowd.errors import Issue

MAX_FILE_BYTES = 1024 * 1024
# A workflow is a few dozen nodes; aliases that expand past this are an attack
# or a mistake, never a workflow.
MAX_EXPANDED_NODES = 20_000

Path = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Mark:
    line: int  # 1-based
    column: int  # 1-based


@dataclass
class Document:
    """One YAML document: its data, and the position of every key and value in it."""

    data: Any
    start: Mark
    # position of a mapping key (for "unknown key"), by the path of its value
    key_marks: dict[Path, Mark] = field(default_factory=dict)
    # position of each value
    value_marks: dict[Path, Mark] = field(default_factory=dict)

    def mark_for(self, path: Path, *, key: bool = False) -> Mark:
        """The nearest known position for ``path``, walking up to the document start."""
        p = path
        while True:
            if key and p in self.key_marks:
                return self.key_marks[p]
            if p in self.value_marks:
                return self.value_marks[p]
            if p in self.key_marks:
                return self.key_marks[p]
            if not p:
                return self.start
            p = p[:-1]


class _Refused(Exception):
    def __init__(self, mark: Mark, message: str) -> None:
        super().__init__(message)
        self.mark = mark
        self.message = message


def _mark(node: yaml.Node) -> Mark:
    m = node.start_mark
    return Mark(m.line + 1, m.column + 1)


class _Builder:
    def __init__(self) -> None:
        self.constructor = yaml.SafeLoader("")  # only its scalar constructors are used
        self.expanded = 0

    def build(self, node: yaml.Node, doc: Document, path: Path, stack: set[int]) -> Any:
        self.expanded += 1
        if self.expanded > MAX_EXPANDED_NODES:
            raise _Refused(
                _mark(node),
                f"document expands to more than {MAX_EXPANDED_NODES} nodes "
                "(YAML alias bomb?); aliases are not needed in workflow files",
            )
        if id(node) in stack:
            raise _Refused(_mark(node), "recursive YAML alias")
        doc.value_marks.setdefault(path, _mark(node))
        if isinstance(node, yaml.ScalarNode):
            try:
                return self.constructor.construct_object(node, deep=True)
            except yaml.constructor.ConstructorError as exc:
                raise _Refused(_mark(node), str(exc.problem or exc)) from None
        stack = stack | {id(node)}
        if isinstance(node, yaml.SequenceNode):
            return [self.build(child, doc, (*path, i), stack) for i, child in enumerate(node.value)]
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise _Refused(_mark(key_node), "YAML merge keys (<<) are not supported")
                key = self.build(key_node, doc, (*path, "<key>"), stack)
                if not isinstance(key, str):
                    raise _Refused(_mark(key_node), f"keys must be strings, not {key!r}")
                if key in out:
                    raise _Refused(_mark(key_node), f"duplicate key {key!r}")
                doc.key_marks[(*path, key)] = _mark(key_node)
                out[key] = self.build(value_node, doc, (*path, key), stack)
            return out
        raise _Refused(_mark(node), f"unsupported YAML node {node.tag}")  # pragma: no cover


def load_documents(text: str, filename: str) -> tuple[list[Document], list[Issue]]:
    """Parse every document of ``text``; return them, or the issues that stopped it."""
    size = len(text.encode("utf-8"))
    if size > MAX_FILE_BYTES:
        return [], [
            Issue(
                filename, 1, 1, "", f"file is {size} bytes; the limit is {MAX_FILE_BYTES} (1 MiB)"
            )
        ]
    docs: list[Document] = []
    builder = _Builder()
    try:
        for node in yaml.compose_all(text, Loader=yaml.SafeLoader):
            if node is None:  # pragma: no cover - compose_all skips empty streams
                continue
            doc = Document(data=None, start=_mark(node))
            doc.data = builder.build(node, doc, (), set())
            docs.append(doc)
    except _Refused as exc:
        return [], [Issue(filename, exc.mark.line, exc.mark.column, "", exc.message)]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = " ".join(p for p in (exc.context, exc.problem) if p)
        return [], [Issue(filename, line, col, "", f"YAML syntax error: {what}")]
    except yaml.YAMLError as exc:
        return [], [Issue(filename, 1, 1, "", f"YAML error: {exc}")]
    # An empty "---" document composes to nothing and is dropped by compose_all;
    # a document holding only null is kept and reported by the loader.
    return docs, []

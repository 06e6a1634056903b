"""Manifest bytes → typed objects and problems: the YAML half of the directory source, bounded.

No I/O and no clock: :func:`parse_file` takes a file's name and bytes and returns what it
holds (:class:`Parsed`) or the one :class:`~aviator.k8s.state.Problem` that makes the whole
file unusable. The directory source (:mod:`aviator.source.directory`) calls it in a worker
process (:mod:`aviator.source.worker`) so that a parse never holds the event loop, and in
its own process for one-shot reads.

Hostile or oversized input is refused before it can cost much (:class:`Limits`), with a
problem naming the file, the limit and what to do:

* **Size**: a file above ``max_file_bytes`` (10 MiB) is not parsed (the directory source does
  not even read it past the limit).
* **Alias expansion**: each document is composed first (the composer shares an aliased node,
  it does not copy it, so composing a 500-byte "billion laughs" costs 500 bytes' worth); then,
  if the file has an anchor at all, its nodes are counted with aliases expanded, over the
  shared graph (each distinct node visited once), before anything is constructed. A file whose
  aliases would add more than ``max_alias_nodes`` (1,000,000) nodes is refused: that bounds what
  every later step (decoding, the content hash's JSON, a debug view) could have to walk, while
  a file without aliases is bounded by its size alone. (Kubernetes' YAML decoder, go-yaml,
  refuses "excessive aliasing" by the ratio of alias-expanded to decoded nodes; a budget of
  added nodes is simpler to state and to check.)
* **Recursion**: an alias inside the node it names (``&a [*a]``) is refused: no API object is
  recursive, and JSON cannot encode one.
* **Depth**: libyaml refuses nesting deeper than 1,000 levels; deeper than Python's recursion
  allows (the content hash's JSON) is a problem for that object, not a crash.

The loader is PyYAML's libyaml binding (``CSafeLoader``, about ten times faster) when this
PyYAML has it, the pure-Python ``SafeLoader`` otherwise; both reject duplicate mapping keys, as
Kubernetes' strict decoding does, and report errors with the same file, line and column.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from aviator.k8s.fields import ObjectError, ref_of
from aviator.k8s.policy import InvalidPolicy
from aviator.k8s.state import ClusterObject, Problem, decode_object

__all__ = [
    "DEFAULT_LIMITS",
    "LIBYAML",
    "Doc",
    "Limits",
    "Parsed",
    "parse_byte_size",
    "parse_file",
    "size_problem",
]

LIBYAML: Final[bool] = hasattr(yaml, "CSafeLoader")
MiB: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """What one manifest file may cost (see the module docstring)."""

    max_file_bytes: int = 10 * MiB
    max_alias_nodes: int = 1_000_000  # nodes a file's aliases may add when expanded

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_alias_nodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


DEFAULT_LIMITS: Final = Limits()


@dataclass(frozen=True, slots=True)
class Doc:
    """One object read from a file, with where it came from."""

    obj: ClusterObject
    document: int
    item: int | None
    line: int | None


@dataclass(frozen=True, slots=True)
class Parsed:
    """What a file that parses holds: its objects, and the problems of the ones skipped."""

    docs: tuple[Doc, ...]
    problems: tuple[Problem, ...]


_SIZE: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmg])(i)?)?b?\s*", re.IGNORECASE)


def parse_byte_size(text: str) -> int:
    """``10Mi``/``10MiB`` (binary), ``500K``/``500KB`` (decimal, as in Kubernetes
    quantities), ``1048576`` → bytes; ValueError for anything else."""
    m = _SIZE.fullmatch(text)
    if m is None:
        raise ValueError(f"expected a size such as 10MiB, 500KB or 1048576, got {text!r}")
    power = "kmg".index(m[2].lower()) + 1 if m[2] else 0
    size = int(float(m[1]) * (1024 if m[3] else 1000) ** power)
    if size < 1:
        raise ValueError(f"a size must be at least 1 byte, got {text!r}")
    return size


def _mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n:,} bytes"


def size_problem(source: str, size: int, limits: Limits) -> Problem | None:
    """The problem of a file of ``size`` bytes, if it is above the limit."""
    if size <= limits.max_file_bytes:
        return None
    exact = f" ({size:,} bytes)" if size >= MiB else ""
    return Problem(
        source,
        f"file too large to read: {_mib(size)}{exact}, the limit is "
        f"{_mib(limits.max_file_bytes)}; split it into smaller files (or raise "
        "--max-file-size)",
    )


# --- the loader ----------------------------------------------------------------------------------

_Base: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_Base):  # type: ignore[valid-type,misc]  # a base chosen at import time
    """Safe loading that rejects duplicate mapping keys, as Kubernetes' strict decoding does
    (PyYAML would silently keep the last one, hiding a typo'd edit)."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                first = seen[key].start_mark.line + 1
                raise ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r} (first at line {first})",
                    key_node.start_mark,
                )
            seen[key] = key_node
        result: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return result


class _RefusedError(Exception):
    """A document that is not constructed: its aliases expand too far, or are recursive."""

    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


def _children(node: Node) -> list[Node]:
    if type(node) is MappingNode:
        return [n for pair in node.value for n in pair]
    if type(node) is SequenceNode:
        return list(node.value)
    return []


def _expansion(root: Node) -> tuple[int, int]:
    """(distinct nodes, nodes once every alias is expanded) under ``root``, itself included.

    Visits each distinct node once (the expanded size of a shared node is memoised) and
    iteratively, so neither a bomb nor deep nesting costs more than the composed graph.
    Raises :class:`_RefusedError` for an alias inside the node it names.
    """
    sizes: dict[int, int] = {}
    on_path: set[int] = {id(root)}
    # [node, its children, index of the next child, expanded size of those visited]
    stack: list[list[Any]] = [[root, _children(root), 0, 0]]
    while stack:
        top = stack[-1]
        node, children, i = top[0], top[1], top[2]
        if i == len(children):
            stack.pop()
            on_path.discard(id(node))
            size = sizes[id(node)] = 1 + top[3]
            if stack:
                stack[-1][3] += size
            continue
        top[2] = i + 1
        child = children[i]
        if type(child) is ScalarNode:
            top[3] += 1
            sizes[id(child)] = 1
        elif (known := sizes.get(id(child))) is not None:
            top[3] += known
        elif id(child) in on_path:
            raise _RefusedError(
                "a YAML alias refers to a node that contains it (a recursive structure, "
                "which no API object can be); not parsed",
                child.start_mark.line + 1,
            )
        else:
            on_path.add(id(child))
            stack.append([child, _children(child), 0, 0])
    return len(sizes), sizes[id(root)]


def _load_documents(text: str, limits: Limits) -> Iterator[tuple[int, Any, list[int]]]:
    """(1-based line, data, start line of each List item) of each YAML document, one at a
    time (so a document's nodes are dropped before the next is composed); raises
    yaml.YAMLError or _RefusedError."""
    # Without an anchor ('&') there is no alias, so nothing to expand: skip the count.
    count = "&" in text
    loader = _Loader(text)
    try:
        number = 0
        added = 0  # nodes that aliases add, over the file's documents so far
        while loader.check_node():
            node = loader.get_node()
            if node is None:  # check_node() said there is one; keep mypy honest
                break
            line = node.start_mark.line + 1
            if count:
                distinct, expanded = _expansion(node)
                added += expanded - distinct
                if added > limits.max_alias_nodes:
                    raise _RefusedError(
                        f"YAML aliases expand too far: document {number + 1} is {distinct:,} "
                        f"nodes as written and {expanded:,} with its aliases expanded; a "
                        f"file's aliases may add at most {limits.max_alias_nodes:,} nodes "
                        "(an alias bomb? write the repeated parts out); not parsed",
                        line,
                    )
            number += 1
            yield line, loader.construct_document(node), _item_lines(node)
    finally:
        loader.dispose()


_ANCHOR: Final = re.compile(r"[&*]([^\s,\[\]{}]+)")


def _yaml_message(exc: yaml.YAMLError, text: str) -> tuple[str, int | None]:
    if isinstance(exc, yaml.reader.ReaderError):
        # Its str() names "<unicode string>" and a character offset: say line and column.
        before = text[: exc.position]
        line = before.count("\n") + 1
        column = exc.position - (before.rfind("\n") + 1) + 1
        return (
            f"unacceptable character #x{exc.character:04x} (line {line}, column {column}): "
            f"{exc.reason}",
            line,
        )
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        what = " ".join(x for x in (exc.context, exc.problem) if x)
        # libyaml's composer leaves the alias's or anchor's name out: take it from the text.
        if exc.problem == "found undefined alias" and (name := _name_at(text, mark)):
            what = f"found undefined alias {name!r}"
        elif (exc.context or "").startswith("found duplicate anchor") and exc.context_mark:
            name = _name_at(text, mark)
            first = exc.context_mark.line + 1
            what = f"found duplicate anchor {name!r} (first at line {first})"
        return f"{what} (line {mark.line + 1}, column {mark.column + 1})", mark.line + 1
    return str(exc), None


def _name_at(text: str, mark: yaml.Mark) -> str | None:
    """The anchor or alias name at ``mark`` (``&name`` / ``*name``), if there is one."""
    lines = text.splitlines()
    here = lines[mark.line][mark.column :] if mark.line < len(lines) else ""
    m = _ANCHOR.match(here)
    return m[1] if m is not None else None


def _item_lines(node: Node) -> list[int]:
    """1-based start line of each entry of a List document's ``items``."""
    if isinstance(node, MappingNode):
        for key, value in node.value:
            if (
                isinstance(key, ScalarNode)
                and key.value == "items"
                and isinstance(value, SequenceNode)
            ):
                return [item.start_mark.line + 1 for item in value.value]
    return []


def _content_version(doc: Mapping[str, Any]) -> str:
    # Canonical JSON of the object minus the server-set fields it might carry.
    meta = doc.get("metadata")
    if isinstance(meta, Mapping):
        doc = {**doc, "metadata": {k: v for k, v in meta.items() if k != "resourceVersion"}}
    blob = json.dumps(doc, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_file(source: str, data: bytes, limits: Limits = DEFAULT_LIMITS) -> Parsed | Problem:
    """Objects and problems of a file, or the one Problem that makes the whole file unusable.

    ``source`` names the file in problems. Never raises for bad input.
    """
    if (too_big := size_problem(source, len(data), limits)) is not None:
        return too_big
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Problem(source, f"not UTF-8 text: {exc.reason} at byte {exc.start}")
    docs: list[Doc] = []
    problems: list[Problem] = []

    def take(raw: Any, number: int, item: int | None, line: int | None) -> None:
        if not isinstance(raw, Mapping):
            problems.append(
                Problem(
                    source,
                    f"must be an object (a YAML mapping), got {type(raw).__name__}",
                    number,
                    item,
                    line,
                )
            )
            return
        try:
            obj = decode_object(raw)
            if obj is None:
                return  # a kind Aviator does not read
            version = _content_version(raw)
        except ObjectError as exc:
            problems.extend(
                Problem(source, e.message, number, item, line, exc.ref, e.path) for e in exc.errors
            )
            return
        except RecursionError:  # JSON of a few hundred levels: no API object is that deep
            problems.append(
                Problem(
                    source,
                    "nested too deeply to read",
                    number,
                    item,
                    line,
                    ref_of(raw, str(raw.get("kind") or "<no kind>")),
                )
            )
            return
        obj = dataclasses.replace(obj, meta=dataclasses.replace(obj.meta, resource_version=version))
        if isinstance(obj, InvalidPolicy):
            problems.extend(
                Problem(source, e.message, number, item, line, obj.ref, e.path) for e in obj.errors
            )
        docs.append(Doc(obj, number, item, line))

    try:
        for number, (line, raw, lines) in enumerate(_load_documents(text, limits), start=1):
            if raw is None:
                continue  # an empty document (a stray '---')
            if isinstance(raw, Mapping) and raw.get("kind") == "List":
                items = raw.get("items")
                if not isinstance(items, list):
                    problems.append(
                        Problem(
                            source,
                            "a List needs a list of items",
                            number,
                            None,
                            line,
                            None,
                            "items",
                        )
                    )
                    continue
                for i, item in enumerate(items):
                    take(item, number, i, lines[i] if i < len(lines) else line)
            else:
                take(raw, number, None, line)
    except yaml.YAMLError as exc:
        message, where = _yaml_message(exc, text)
        return Problem(source, f"YAML does not parse: {message}", line=where)
    except _RefusedError as exc:
        return Problem(source, exc.message, line=exc.line)
    except RecursionError:  # the pure-Python composer recurses (libyaml stops at 1,000 levels)
        return Problem(source, "YAML does not parse: nested too deeply")
    return Parsed(tuple(docs), tuple(problems))

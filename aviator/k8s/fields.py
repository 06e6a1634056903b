"""The vocabulary of validation: how an object and its fields are named, read and checked.

Every parser of a Kubernetes-style object (:mod:`aviator.k8s.objects` for workloads and pods,
:mod:`aviator.k8s.policy` for AviatorPolicy) speaks it:

- :class:`ObjectRef` names the object (``Kind namespace/name``; :func:`ref_of` makes one even
  for an object that does not parse);
- :class:`FieldError` says what was wrong with one field, by its path, and what is allowed;
  :class:`ObjectError` carries every field error of one object;
- :class:`Fields` reads fields of a decoded object and collects a :class:`FieldError` per
  problem, so that one pass reports every error of an object, not the first one;
- :func:`type_name` says how a decoded value is named in a message (``a string ('x')``);
- apimachinery's syntax rules, as functions that say why a value breaks them (or None): DNS-1123
  subdomains and labels, label keys and values, IANA port names.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "FieldError",
    "Fields",
    "ObjectError",
    "ObjectRef",
    "dns_label_error",
    "dns_subdomain_error",
    "label_key_error",
    "label_value_error",
    "port_name_error",
    "ref_of",
    "type_name",
]


@dataclass(frozen=True, slots=True, order=True)
class ObjectRef:
    """Names one object: ``Kind namespace/name``."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class FieldError:
    """One invalid field: its path (``spec.targetRef.kind``) and what was wrong / allowed."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ObjectError(ValueError):
    """An object that could not be parsed; ``errors`` holds every invalid field, in order."""

    def __init__(self, ref: ObjectRef, errors: tuple[FieldError, ...]) -> None:
        if not errors:
            raise ValueError("ObjectError needs at least one FieldError")
        self.ref = ref
        self.errors = errors
        lines = "\n".join(f"  {e}" for e in errors)
        noun = "error" if len(errors) == 1 else "errors"
        super().__init__(f"{ref} is invalid ({len(errors)} {noun}):\n{lines}")


# --- syntax of names and labels, as apimachinery's validation checks them -----------------

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
# IANA_SVC_NAME: a named container port (at most 15 characters, at least one letter).
_PORT_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


def dns_subdomain_error(value: str) -> str | None:
    """Why ``value`` is not a DNS-1123 subdomain (object names), or None if it is one."""
    if len(value) > 253:
        return f"must be at most 253 characters, got {len(value)}"
    if not _DNS_SUBDOMAIN.fullmatch(value):
        return (
            f"{value!r} is not a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit"
        )
    return None


def dns_label_error(value: str) -> str | None:
    """Why ``value`` is not a DNS-1123 label (namespaces), or None if it is one."""
    if len(value) > 63:
        return f"must be at most 63 characters, got {len(value)}"
    if not _DNS_LABEL.fullmatch(value):
        return (
            f"{value!r} is not a DNS-1123 label: lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return None


def label_key_error(key: str) -> str | None:
    """Why ``key`` is not a valid label key (``[prefix/]name``), or None."""
    prefix, slash, name = key.rpartition("/")
    if slash and not prefix:
        return f"label key {key!r} has an empty prefix before '/'"
    if slash and (why := dns_subdomain_error(prefix)) is not None:
        return f"label key {key!r}: prefix {why}"
    if not name or len(name) > 63 or not _LABEL_NAME.fullmatch(name):
        return (
            f"label key {key!r}: name part must be 1-63 characters of letters, digits, "
            "'-', '_' and '.', starting and ending with a letter or digit"
        )
    return None


def label_value_error(value: str) -> str | None:
    """Why ``value`` is not a valid label value (may be empty), or None."""
    if value and (len(value) > 63 or not _LABEL_NAME.fullmatch(value)):
        return (
            f"label value {value!r} must be at most 63 characters of letters, digits, "
            "'-', '_' and '.', starting and ending with a letter or digit"
        )
    return None


def port_name_error(name: str) -> str | None:
    """Why ``name`` is not an IANA service name (a named container port), or None."""
    if not 1 <= len(name) <= 15:
        return f"port name {name!r} must be 1-15 characters"
    if not _PORT_NAME.fullmatch(name) or "--" in name:
        return (
            f"port name {name!r} must be lowercase letters, digits and '-' "
            "(not at either end, never '--')"
        )
    if not any(c.isalpha() for c in name):
        return f"port name {name!r} must contain at least one letter"
    return None


# --- error-collecting reader ----------------------------------------------------------------


def type_name(value: object) -> str:
    """How a decoded JSON/YAML value is named in error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, datetime):
        return f"a timestamp ({value.isoformat()})"
    return type(value).__name__


@dataclass(slots=True)
class Fields:
    """Reads fields of a decoded object, collecting a :class:`FieldError` per problem.

    Each reader returns ``None`` when the field is absent or wrong, so parsing carries on
    and reports every error of the object at once rather than the first one.
    """

    errors: list[FieldError] = field(default_factory=list)

    def error(self, path: str, message: str) -> None:
        self.errors.append(FieldError(path, message))

    def get(
        self, obj: Mapping[str, Any], key: str, path: str, what: str | None = None
    ) -> Any | None:
        """The raw value; reports it missing (with ``what`` it should be) if required."""
        value = obj.get(key)
        if value is None and what is not None:
            self.error(path, f"required field is missing: {what}")
        return value

    def mapping(
        self, obj: Mapping[str, Any], key: str, path: str, what: str | None = None
    ) -> Mapping[str, Any] | None:
        value = self.get(obj, key, path, what)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            self.error(path, f"must be an object, got {type_name(value)}")
            return None
        return value

    def list(
        self, obj: Mapping[str, Any], key: str, path: str, what: str | None = None
    ) -> list[Any] | None:
        value = self.get(obj, key, path, what)
        if value is None:
            return None
        if not isinstance(value, list):
            self.error(path, f"must be a list, got {type_name(value)}")
            return None
        return value

    def string(
        self, obj: Mapping[str, Any], key: str, path: str, what: str | None = None
    ) -> str | None:
        value = self.get(obj, key, path, what)
        if value is None:
            return None
        if not isinstance(value, str):
            self.error(path, f"must be a string, got {type_name(value)}")
            return None
        if not value and what is not None:
            self.error(path, f"must not be empty: {what}")
            return None
        return value

    def integer(
        self, obj: Mapping[str, Any], key: str, path: str, what: str | None = None
    ) -> int | None:
        value = self.get(obj, key, path, what)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(path, f"must be an integer, got {type_name(value)}")
            return None
        return value

    def timestamp(self, obj: Mapping[str, Any], key: str, path: str) -> datetime | None:
        """An RFC 3339 timestamp (as the API writes it), or a YAML timestamp; always aware."""
        value = obj.get(key)
        if value is None:
            return None
        if isinstance(value, datetime):
            # YAML's own timestamps: a value without an offset is UTC, as the API means it.
            return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        if isinstance(value, str):
            try:
                parsed = datetime.fromisoformat(value)
            except ValueError:
                pass
            else:
                return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
        self.error(
            path,
            f"must be an RFC 3339 timestamp such as 2024-05-01T12:00:00Z, got {type_name(value)}",
        )
        return None


def ref_of(doc: Mapping[str, Any], kind: str) -> ObjectRef:
    """A best-effort reference for error messages, even for an object that does not parse."""
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    name, namespace = meta.get("name"), meta.get("namespace")
    return ObjectRef(
        kind,
        namespace if isinstance(namespace, str) and namespace else "default",
        name if isinstance(name, str) and name else "<unnamed>",
    )

"""ORCA load reports in HTTP headers: parse (TEXT, JSON, BIN) and format (TEXT). Pure, and
the standard library only.

This module is the one definition of the header both halves of Aviator speak: the agent in
your app writes it (:func:`format_orca_text`), Aviator's prober reads it
(:func:`report_from_headers`), so a change to the format is one change, tested as a round trip.

The wire format follows Envoy's ``source/common/orca/orca_parser.cc``: one header
``endpoint-load-metrics`` whose value starts with a format prefix,

- ``TEXT name:value,name:value`` (Envoy since 1.3x; newer Envoys also accept ``name=value``),
  names ``cpu_utilization``, ``mem_utilization``, ``application_utilization``, ``eps``,
  ``rps_fractional``, ``named_metrics.<key>`` and ``utilization.<key>``;
- ``JSON {...}``: the protobuf JSON form of ``xds.data.orca.v3.OrcaLoadReport``;
- ``BIN <base64>``: the serialised proto (also the legacy ``endpoint-load-metrics-bin`` header),
  decoded here from the protobuf wire format (no protobuf library needed).

Like Envoy, the parser rejects unknown names, duplicates, empty keys, NaN, infinities and
negative values: a report is either fully valid or an :class:`OrcaParseError`.

Aviator's agent reports requests in flight as ``named_metrics.rif`` and its latency estimate
as ``named_metrics.latency_ms``; it writes ``name:value`` pairs, which every Envoy that parses
TEXT accepts.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Final

__all__ = [
    "LATENCY_MS_METRIC",
    "ORCA_HEADER",
    "ORCA_HEADER_BIN",
    "RIF_METRIC",
    "OrcaLoadReport",
    "OrcaParseError",
    "format_orca_text",
    "parse_orca_header",
    "report_from_headers",
]

ORCA_HEADER: Final = "endpoint-load-metrics"
ORCA_HEADER_BIN: Final = "endpoint-load-metrics-bin"
RIF_METRIC: Final = "rif"
LATENCY_MS_METRIC: Final = "latency_ms"

_SCALARS: Final = (
    "cpu_utilization",
    "mem_utilization",
    "application_utilization",
    "rps_fractional",
    "eps",
)
# Protobuf JSON accepts the original field names and their lowerCamelCase forms.
_JSON_SCALARS: Final = {
    **{name: name for name in _SCALARS},
    "cpuUtilization": "cpu_utilization",
    "memUtilization": "mem_utilization",
    "applicationUtilization": "application_utilization",
    "rpsFractional": "rps_fractional",
}
_JSON_MAPS: Final = {
    "named_metrics": "named_metrics",
    "namedMetrics": "named_metrics",
    "utilization": "utilization",
    "request_cost": "request_cost",
    "requestCost": "request_cost",
}
_EMPTY: Final[Mapping[str, float]] = MappingProxyType({})


class OrcaParseError(ValueError):
    """An ORCA header that Envoy would also reject; the message says why."""


def _check_value(name: str, value: float) -> float:
    if math.isnan(value):
        raise OrcaParseError(f"ORCA metric {name} cannot be NaN")
    if math.isinf(value):
        raise OrcaParseError(f"ORCA metric {name} cannot be infinity")
    if value < 0:
        raise OrcaParseError(f"ORCA metric {name} cannot be negative, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class OrcaLoadReport:
    """The fields of ``xds.data.orca.v3.OrcaLoadReport`` Aviator reads or writes.

    Invariant: every value is finite and ≥ 0 (checked at construction); maps are read-only.
    """

    cpu_utilization: float = 0.0
    mem_utilization: float = 0.0
    application_utilization: float = 0.0
    rps_fractional: float = 0.0
    eps: float = 0.0
    named_metrics: Mapping[str, float] = field(default_factory=lambda: _EMPTY)
    utilization: Mapping[str, float] = field(default_factory=lambda: _EMPTY)
    request_cost: Mapping[str, float] = field(default_factory=lambda: _EMPTY)

    def __post_init__(self) -> None:
        # On the prober's hot path: one cheap range test per value, precise errors only on
        # failure. `0 <= v < inf` is False for NaN, negatives and infinity alike.
        for name in _SCALARS:
            value = getattr(self, name)
            if type(value) is not float:  # JSON and callers pass ints: store floats
                value = float(value)
                object.__setattr__(self, name, value)
            if not 0.0 <= value < math.inf:
                _check_value(name, value)
        for map_name in ("named_metrics", "utilization", "request_cost"):
            original: Mapping[str, float] = getattr(self, map_name)
            if original is _EMPTY:
                continue
            frozen: dict[str, float] = {}
            for key, raw in original.items():
                value = float(raw)
                if not key:
                    raise OrcaParseError(f"ORCA {map_name} key is empty")
                if not 0.0 <= value < math.inf:
                    _check_value(f"{map_name}.{key}", value)
                frozen[key] = value
            # A private read-only copy, so the report stays a value.
            object.__setattr__(self, map_name, MappingProxyType(frozen))

    def __reduce__(self) -> tuple[Callable[..., OrcaLoadReport], tuple[dict[str, object]]]:
        """Pickled with plain dicts (a read-only map is not picklable): the control plane's
        prober process sends reports over a pipe."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("named_metrics", "utilization", "request_cost"):
            values[name] = dict(values[name])
        return (_unpickle_report, (values,))

    @property
    def rif(self) -> float | None:
        """Requests in flight as Aviator's agent reports them (``named_metrics.rif``)."""
        return self.named_metrics.get(RIF_METRIC)

    @property
    def latency_s(self) -> float | None:
        """The server's latency estimate in seconds (``named_metrics.latency_ms`` / 1000)."""
        ms = self.named_metrics.get(LATENCY_MS_METRIC)
        return None if ms is None else ms / 1000.0


def _unpickle_report(values: dict[str, Any]) -> OrcaLoadReport:
    return OrcaLoadReport(**values)


def _parse_number(name: str, text: str) -> float:
    """The value of one TEXT pair; range checks happen once, in OrcaLoadReport."""
    if not text:
        raise OrcaParseError(f"ORCA metric {name} has an empty value")
    try:
        return float(text)
    except ValueError:
        raise OrcaParseError(
            f"ORCA metric {name} has a value that is not a number: {text!r}"
        ) from None


def _parse_text(body: str) -> OrcaLoadReport:
    scalars: dict[str, float] = {}
    named: dict[str, float] = {}
    utilization: dict[str, float] = {}
    seen: set[str] = set()
    for raw in body.split(","):
        item = raw.strip()
        if not item:
            continue
        # Envoy splits each pair on the first ':' (older parsers) or '=' (newer ones).
        colon, equals = item.find(":"), item.find("=")
        cut = colon if equals < 0 or 0 <= colon < equals else equals
        if cut < 0:
            name, value = item, ""
        else:
            name, value = item[:cut].rstrip(), item[cut + 1 :].lstrip()
        if not name:
            raise OrcaParseError(f"ORCA metric name is empty in {item!r}")
        if name in seen:
            raise OrcaParseError(f"{ORCA_HEADER} contains duplicate metric: {name}")
        seen.add(name)
        number = _parse_number(name, value)
        if name.startswith("named_metrics."):
            named[name[14:]] = number
        elif name in _SCALARS:
            scalars[name] = number
        elif name.startswith("utilization."):
            utilization[name[12:]] = number
        else:
            raise OrcaParseError(f"unsupported ORCA metric name: {name}")
    return OrcaLoadReport(
        **scalars,  # type: ignore[arg-type]  # keys are exactly the scalar field names
        named_metrics=named,
        utilization=utilization,
    )


def _parse_json(body: str) -> OrcaLoadReport:
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise OrcaParseError(f"invalid JSON in ORCA header: {exc}") from None
    if not isinstance(doc, dict):
        raise OrcaParseError(f"ORCA JSON must be an object, got {type(doc).__name__}")
    kwargs: dict[str, object] = {}
    for key, value in doc.items():
        if key in _JSON_SCALARS:
            kwargs[_JSON_SCALARS[key]] = _json_number(key, value)
        elif key in _JSON_MAPS:
            if not isinstance(value, dict):
                raise OrcaParseError(f"ORCA JSON field {key} must be an object")
            kwargs[_JSON_MAPS[key]] = {
                str(k): _json_number(f"{key}.{k}", v) for k, v in value.items()
            }
        elif key == "rps":  # deprecated uint64 field: accepted by protobuf JSON, unused here
            _json_number(key, value)
        else:
            raise OrcaParseError(f"unknown field in ORCA JSON: {key}")
    return OrcaLoadReport(**kwargs)  # type: ignore[arg-type]


def _json_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OrcaParseError(f"ORCA JSON field {name} must be a number, got {value!r}")
    return _check_value(name, float(value))


def _parse_bin(body: str) -> OrcaLoadReport:
    text = body.strip()
    if not text:
        raise OrcaParseError("ORCA binary header value is empty")
    try:
        # Unpadded base64 is what grpc-go sends; Envoy accepts it too.
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise OrcaParseError(f"unable to decode ORCA binary header value: {text!r}") from None
    try:
        return _decode_report(raw)
    except _WireError:
        raise OrcaParseError("unable to parse binary ORCA header as OrcaLoadReport") from None


# xds.data.orca.v3.OrcaLoadReport (xds/data/orca/v3/orca_load_report.proto), by field number.
_DOUBLES: Final = {
    1: "cpu_utilization",
    2: "mem_utilization",
    6: "rps_fractional",
    7: "eps",
    9: "application_utilization",
}
_MAPS: Final = {4: "request_cost", 5: "utilization", 8: "named_metrics"}  # map<string, double>
_VARINT, _I64, _LEN, _GROUP, _END_GROUP, _I32 = 0, 1, 2, 3, 4, 5  # protobuf wire types
_MAX_FIELD: Final = (1 << 29) - 1
_MAX_DEPTH: Final = 100  # nested groups; protobuf's own recursion limit


class _WireError(Exception):
    """Bytes that are not a well-formed protobuf message."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _WireError
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _field(
    data: bytes, pos: int, depth: int = 0
) -> tuple[int, int, int | float | bytes | None, int]:
    """The field at ``pos``: (number, wire type, value, position after it). A group (wire
    type 3, long deprecated, in no field of this message) is skipped whole: value None."""
    key, pos = _varint(data, pos)
    number, wire = key >> 3, key & 7
    if not 0 < number <= _MAX_FIELD or key > 0xFFFFFFFF:
        raise _WireError
    value: int | float | bytes | None
    if wire == _VARINT:
        value, pos = _varint(data, pos)
    elif wire == _I64:
        if pos + 8 > len(data):
            raise _WireError
        (value,) = struct.unpack_from("<d", data, pos)
        pos += 8
    elif wire == _LEN:
        size, pos = _varint(data, pos)
        if pos + size > len(data):
            raise _WireError
        value, pos = data[pos : pos + size], pos + size
    elif wire == _I32:
        if pos + 4 > len(data):
            raise _WireError
        value, pos = data[pos : pos + 4], pos + 4
    elif wire == _GROUP:
        if depth >= _MAX_DEPTH:
            raise _WireError
        while True:  # fields up to the END_GROUP of the same number
            if pos >= len(data):
                raise _WireError
            inner, inner_wire, _, pos = _field(data, pos, depth + 1)
            if inner_wire == _END_GROUP:
                if inner != number:
                    raise _WireError
                break
        value = None
    elif wire == _END_GROUP:
        value = None  # only valid inside a group: the caller decides
    else:
        raise _WireError
    return number, wire, value, pos


def _fields(data: bytes) -> list[tuple[int, int, int | float | bytes | None]]:
    """(field number, wire type, value) of every field of one message, in order."""
    out: list[tuple[int, int, int | float | bytes | None]] = []
    pos = 0
    while pos < len(data):
        number, wire, value, pos = _field(data, pos)
        if wire == _END_GROUP:  # an END_GROUP outside a group
            raise _WireError
        out.append((number, wire, value))
    return out


def _map_entry(data: bytes) -> tuple[str, float] | None:
    """A map<string, double> entry; None for an entry with any other field, which protobuf
    (upb) keeps as an unknown field of the report rather than in the map."""
    key, value = "", 0.0  # proto3 defaults for a field the entry leaves out
    for number, wire, field_value in _fields(data):
        if number == 1 and wire == _LEN:
            assert isinstance(field_value, bytes)
            try:
                key = field_value.decode()
            except UnicodeDecodeError:  # protobuf rejects a string that is not UTF-8
                raise _WireError from None
        elif number == 2 and wire == _I64:
            assert isinstance(field_value, float)
            value = field_value
        else:
            return None
    return key, value


def _decode_report(data: bytes) -> OrcaLoadReport:
    """The serialised message, with protobuf's rules: the last value of a scalar wins, map
    entries merge by key, unknown fields (and the deprecated ``rps``, field 3) are skipped."""
    scalars: dict[str, float] = {}
    maps: dict[str, dict[str, float]] = {name: {} for name in _MAPS.values()}
    for number, wire, value in _fields(data):
        if number in _DOUBLES and wire == _I64:
            assert isinstance(value, float)
            scalars[_DOUBLES[number]] = value
        elif number in _MAPS and wire == _LEN:
            assert isinstance(value, bytes)
            entry = _map_entry(value)
            if entry is not None:
                maps[_MAPS[number]][entry[0]] = entry[1]
    return OrcaLoadReport(**scalars, **maps)  # type: ignore[arg-type]  # the field names


def parse_orca_header(value: str) -> OrcaLoadReport:
    """Parse one ``endpoint-load-metrics`` header value (``TEXT``, ``JSON`` or ``BIN`` form)."""
    if value.startswith("TEXT "):
        return _parse_text(value[5:])
    if value.startswith("JSON "):
        return _parse_json(value[5:])
    if value.startswith("BIN "):
        return _parse_bin(value[4:])
    prefix = value[:5].split(" ", 1)[0]
    raise OrcaParseError(f"unsupported ORCA header format: {prefix!r}")


def report_from_headers(headers: Mapping[str, str]) -> OrcaLoadReport | None:
    """The load report in a response's headers, ``None`` if it carries none.

    ``headers`` must look names up case-insensitively (aiohttp's ``CIMultiDictProxy`` does).
    As in Envoy, the legacy binary header wins when both are present.
    Raises :class:`OrcaParseError` if a present header is malformed.
    """
    legacy = headers.get(ORCA_HEADER_BIN)
    if legacy is not None:
        return _parse_bin(legacy)
    value = headers.get(ORCA_HEADER)
    return None if value is None else parse_orca_header(value)


def _fmt(value: float) -> str:
    # repr() gives the shortest text that round-trips; integral values print without ".0".
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def format_orca_text(report: OrcaLoadReport) -> str:
    """The ``TEXT`` header value for ``report``: standard fields that are non-zero, then maps.

    ``parse_orca_header(format_orca_text(r)) == r`` for every report whose map keys contain
    none of ``,:=`` and whose ``request_cost`` is empty (TEXT has no form for it). Zero fields
    are the proto defaults, so leaving them out loses nothing.
    """
    parts = [f"{name}:{_fmt(getattr(report, name))}" for name in _SCALARS if getattr(report, name)]
    parts += [f"named_metrics.{k}:{_fmt(v)}" for k, v in report.named_metrics.items()]
    parts += [f"utilization.{k}:{_fmt(v)}" for k, v in report.utilization.items()]
    return "TEXT " + ",".join(parts)

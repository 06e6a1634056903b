"""ORCA header parsing and formatting, checked against the forms Envoy's parser accepts."""

from __future__ import annotations

import base64
import contextlib
import math
import re
import struct

import pytest
from aviator_agent.orca import (
    ORCA_HEADER,
    ORCA_HEADER_BIN,
    OrcaLoadReport,
    OrcaParseError,
    format_orca_text,
    parse_orca_header,
    report_from_headers,
)
from google.protobuf.message import DecodeError
from hypothesis import assume, given
from hypothesis import strategies as st
from xds.data.orca.v3 import orca_load_report_pb2

# The report Envoy's own orca_parser_test uses, in each of the forms it accepts.
EXAMPLE = OrcaLoadReport(
    cpu_utilization=0.7,
    application_utilization=0.8,
    mem_utilization=0.9,
    rps_fractional=1000,
    eps=2,
    named_metrics={"foo": 123, "bar": 0.2},
    utilization={"total": 0.5},
)


def _bin(report: OrcaLoadReport) -> str:
    msg = orca_load_report_pb2.OrcaLoadReport(
        cpu_utilization=report.cpu_utilization,
        mem_utilization=report.mem_utilization,
        application_utilization=report.application_utilization,
        rps_fractional=report.rps_fractional,
        eps=report.eps,
    )
    msg.named_metrics.update(report.named_metrics)
    msg.utilization.update(report.utilization)
    return base64.b64encode(msg.SerializeToString()).decode()


@pytest.mark.parametrize(
    "value",
    [
        "TEXT cpu_utilization=0.7,application_utilization=0.8,mem_utilization=0.9,"
        "rps_fractional=1000,eps=2,named_metrics.foo=123,named_metrics.bar=0.2,utilization.total=0.5",
        "TEXT cpu_utilization:0.7,application_utilization:0.8,mem_utilization:0.9,"
        "rps_fractional:1000,eps:2,named_metrics.foo:123,named_metrics.bar:0.2,utilization.total:0.5",
        "TEXT cpu_utilization: 0.7 , application_utilization=0.8, mem_utilization=0.9,"
        " rps_fractional=1000, eps=2, named_metrics.foo=123, named_metrics.bar=0.2,"
        " utilization.total=0.5",
        'JSON {"cpu_utilization": 0.7, "application_utilization": 0.8, "mem_utilization": 0.9,'
        ' "rps_fractional": 1000, "eps": 2, "named_metrics": {"foo": 123, "bar": 0.2},'
        ' "utilization": {"total": 0.5}}',
        'JSON {"cpuUtilization": 0.7, "applicationUtilization": 0.8, "memUtilization": 0.9,'
        ' "rpsFractional": 1000, "eps": 2, "namedMetrics": {"foo": 123, "bar": 0.2},'
        ' "utilization": {"total": 0.5}}',
        "BIN " + _bin(EXAMPLE),
        "BIN " + _bin(EXAMPLE).rstrip("="),  # unpadded, as grpc-go sends it
    ],
    ids=["text-equals", "text-colon", "text-spaces", "json", "json-camel", "bin", "bin-unpadded"],
)
def test_every_form_envoy_accepts_parses_to_the_same_report(value: str) -> None:
    assert parse_orca_header(value) == EXAMPLE


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("BAD random-value", "unsupported ORCA header format: 'BAD'"),
        ("", "unsupported ORCA header format"),
        ("TEXT cpu_utilization=0.7,cpu_utilization=0.8", "duplicate metric: cpu_utilization"),
        ("TEXT cpu_utilization=0.7,unsupported_metric=0.8", "unsupported ORCA metric name"),
        ("TEXT named_metrics.=123", "named_metrics key is empty"),
        ("TEXT utilization.=0.9", "utilization key is empty"),
        ("TEXT not-a-list-of-key-value-pairs", "empty value"),
        ('TEXT cpu_utilization="0.7"', "not a number"),
        ("TEXT cpu_utilization=nan", "cannot be NaN"),
        ("TEXT cpu_utilization=inf", "cannot be infinity"),
        ("TEXT cpu_utilization=-1", "cannot be negative"),
        ("JSON not-json", "invalid JSON"),
        ('JSON {"cpu_utilization": 0.7, "unknown_field": 2}', "unknown field"),
        ('JSON {"cpu_utilization": "0.7"}', "must be a number"),
        ('JSON {"named_metrics": [1]}', "must be an object"),
        ("JSON [1, 2]", "must be an object"),
        ("BIN ", "empty"),
        ("BIN !!!", "unable to decode"),
        ("BIN " + base64.b64encode(b"\xff\xff\xff").decode(), "unable to parse binary"),
    ],
)
def test_rejects_what_envoy_rejects(value: str, message: str) -> None:
    with pytest.raises(OrcaParseError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_orca_header(value)


def test_report_accessors_for_aviator_metrics() -> None:
    report = parse_orca_header("TEXT named_metrics.rif=3,named_metrics.latency_ms=12.5")
    assert report.rif == 3.0
    assert report.latency_s == pytest.approx(0.0125)
    assert OrcaLoadReport().rif is None
    assert OrcaLoadReport().latency_s is None


def test_report_is_a_frozen_value() -> None:
    source = {"rif": 1.0}
    report = OrcaLoadReport(named_metrics=source)
    source["rif"] = 99.0  # the report keeps its own copy
    assert report.rif == 1.0
    with pytest.raises(TypeError):
        report.named_metrics["rif"] = 2.0  # type: ignore[index]
    with pytest.raises(OrcaParseError, match="cannot be negative"):
        OrcaLoadReport(eps=-1.0)


def test_headers_lookup_prefers_the_legacy_binary_header() -> None:
    assert report_from_headers({}) is None
    text = {ORCA_HEADER: "TEXT named_metrics.rif=1"}
    assert report_from_headers(text) == OrcaLoadReport(named_metrics={"rif": 1})
    both = {**text, ORCA_HEADER_BIN: _bin(OrcaLoadReport(named_metrics={"rif": 7}))}
    assert report_from_headers(both) == OrcaLoadReport(named_metrics={"rif": 7})


def test_format_uses_colon_pairs_every_envoy_parses() -> None:
    text = format_orca_text(
        OrcaLoadReport(application_utilization=0.25, rps_fractional=40, named_metrics={"rif": 2.0})
    )
    assert text == "TEXT application_utilization:0.25,rps_fractional:40,named_metrics.rif:2"


metric_values = st.floats(min_value=0.0, max_value=1e12, allow_nan=False, allow_infinity=False)
metric_keys = st.text(
    alphabet=st.characters(whitelist_categories=("Ll", "Lu", "Nd"), whitelist_characters="_-."),
    min_size=1,
    max_size=12,
)


@given(
    st.builds(
        OrcaLoadReport,
        cpu_utilization=metric_values,
        mem_utilization=metric_values,
        application_utilization=metric_values,
        rps_fractional=metric_values,
        eps=metric_values,
        named_metrics=st.dictionaries(metric_keys, metric_values, max_size=5),
        utilization=st.dictionaries(metric_keys, metric_values, max_size=3),
    )
)
def test_text_round_trip(report: OrcaLoadReport) -> None:
    parsed = parse_orca_header(format_orca_text(report))
    assert parsed == report
    assert all(math.isfinite(v) for v in parsed.named_metrics.values())


# The BIN form is decoded without the protobuf library (the agent has no dependency): each
# case below is serialised by protobuf itself (xds-protos) and must read back the same.


def _message(report: OrcaLoadReport) -> orca_load_report_pb2.OrcaLoadReport:
    msg = orca_load_report_pb2.OrcaLoadReport(
        cpu_utilization=report.cpu_utilization,
        mem_utilization=report.mem_utilization,
        application_utilization=report.application_utilization,
        rps_fractional=report.rps_fractional,
        eps=report.eps,
    )
    msg.named_metrics.update(report.named_metrics)
    msg.utilization.update(report.utilization)
    msg.request_cost.update(report.request_cost)
    return msg


reports = st.builds(
    OrcaLoadReport,
    cpu_utilization=metric_values,
    mem_utilization=metric_values,
    application_utilization=metric_values,
    rps_fractional=metric_values,
    eps=metric_values,
    named_metrics=st.dictionaries(st.text(min_size=1, max_size=12), metric_values, max_size=5),
    utilization=st.dictionaries(metric_keys, metric_values, max_size=3),
    request_cost=st.dictionaries(metric_keys, metric_values, max_size=3),
)


@given(reports)
def test_bin_reads_what_protobuf_writes(report: OrcaLoadReport) -> None:
    raw = _message(report).SerializeToString()
    assume(raw)  # an all-default report serialises to nothing: an empty value, rejected above
    assert parse_orca_header("BIN " + base64.b64encode(raw).decode()) == report


@given(reports, reports)
def test_bin_merges_concatenated_messages_as_protobuf_does(
    first: OrcaLoadReport, second: OrcaLoadReport
) -> None:
    # A scalar's last value wins and maps merge by key: protobuf's rule for repeated fields.
    raw = _message(first).SerializeToString() + _message(second).SerializeToString()
    assume(raw)
    merged = orca_load_report_pb2.OrcaLoadReport.FromString(raw)
    assert parse_orca_header("BIN " + base64.b64encode(raw).decode()) == OrcaLoadReport(
        cpu_utilization=merged.cpu_utilization,
        mem_utilization=merged.mem_utilization,
        application_utilization=merged.application_utilization,
        rps_fractional=merged.rps_fractional,
        eps=merged.eps,
        named_metrics=dict(merged.named_metrics),
        utilization=dict(merged.utilization),
        request_cost=dict(merged.request_cost),
    )


def test_bin_skips_the_deprecated_rps_and_unknown_fields() -> None:
    msg = _message(EXAMPLE)
    msg.rps = 12345  # field 3, a varint
    # Unknown fields of every wire type a newer proto could add: varint, 64-bit, bytes, 32-bit
    # (field numbers 10..13: one-byte keys, number << 3 | wire type).
    unknown = bytes([10 << 3 | 0, 0x96, 0x01, 11 << 3 | 1, *b"\x00" * 8])
    unknown += bytes([12 << 3 | 2, 3, *b"abc", 13 << 3 | 5, *b"\x00" * 4])
    raw = msg.SerializeToString() + unknown
    assert orca_load_report_pb2.OrcaLoadReport.FromString(raw).cpu_utilization == 0.7
    assert parse_orca_header("BIN " + base64.b64encode(raw).decode()) == EXAMPLE


@pytest.mark.parametrize(
    "raw",
    [
        b"\x09\x00\x00",  # cpu_utilization cut short
        b"\x42\x05\x0a\x01",  # a named_metrics entry longer than the message
        b"\x80" * 11,  # a varint that never ends
        b"\x0b",  # wire type 3 (a group): not in this message
        b"\x00\x00",  # field number 0
        b"\x42\x04\x0a\x02\xff\xfe",  # a map key that is not UTF-8
    ],
)
def test_bin_rejects_what_protobuf_rejects(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        orca_load_report_pb2.OrcaLoadReport.FromString(raw)
    with pytest.raises(OrcaParseError, match="unable to parse binary"):
        parse_orca_header("BIN " + base64.b64encode(raw).decode())


def test_bin_bounds_nested_groups() -> None:
    # A header-sized stack of groups (field 1, START_GROUP) must not exhaust the stack.
    raw = b"\x0b" * 6000 + b"\x0c" * 6000
    with pytest.raises(OrcaParseError, match="unable to parse binary"):
        parse_orca_header("BIN " + base64.b64encode(raw).decode())
    shallow = b"\x0b" * 50 + b"\x0c" * 50  # what protobuf accepts, so do we
    orca_load_report_pb2.OrcaLoadReport.FromString(shallow)
    assert parse_orca_header("BIN " + base64.b64encode(shallow).decode()) == OrcaLoadReport()


@given(st.binary(max_size=64))
def test_bin_never_fails_with_anything_but_a_parse_error(raw: bytes) -> None:
    with contextlib.suppress(OrcaParseError):
        parse_orca_header("BIN " + base64.b64encode(raw).decode())


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# One wire-format field: a known or unknown number, any wire type, a fitting payload (map
# entries as valid entries or as junk), so known fields also come with the wrong wire type.
wire_fields = st.tuples(
    st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 16, 300, (1 << 29) - 1]),
    st.sampled_from([0, 1, 2, 5]),
    st.integers(min_value=0, max_value=(1 << 64) - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.one_of(
        st.binary(max_size=12),
        st.tuples(st.text(max_size=5), st.floats(min_value=0, max_value=1e6)).map(
            lambda kv: b"\x0a" + _varint(len(kv[0].encode())) + kv[0].encode()
            + b"\x11" + struct.pack("<d", kv[1])
        ),
    ),
)  # fmt: skip


def _encode(field: tuple[int, int, int, float, bytes]) -> bytes:
    number, wire, integer, double, payload = field
    key = _varint(number << 3 | wire)
    if wire == 0:
        return key + _varint(integer)
    if wire == 1:
        return key + struct.pack("<d", double)
    if wire == 2:
        return key + _varint(len(payload)) + payload
    return key + struct.pack("<I", integer & 0xFFFFFFFF)


@given(st.lists(wire_fields, max_size=8), st.integers(min_value=0, max_value=3))
def test_bin_agrees_with_protobuf_on_any_message(
    fields: list[tuple[int, int, int, float, bytes]], cut: int
) -> None:
    raw = b"".join(_encode(f) for f in fields)
    raw = raw[: len(raw) - cut] if cut else raw  # sometimes truncated mid-field
    assume(raw)
    header = "BIN " + base64.b64encode(raw).decode()
    try:
        msg = orca_load_report_pb2.OrcaLoadReport.FromString(raw)
    except DecodeError:
        with pytest.raises(OrcaParseError, match="unable to parse binary"):
            parse_orca_header(header)
        return
    try:
        expected = OrcaLoadReport(
            cpu_utilization=msg.cpu_utilization,
            mem_utilization=msg.mem_utilization,
            application_utilization=msg.application_utilization,
            rps_fractional=msg.rps_fractional,
            eps=msg.eps,
            named_metrics=dict(msg.named_metrics),
            utilization=dict(msg.utilization),
            request_cost=dict(msg.request_cost),
        )
    except OrcaParseError as exc:  # well-formed, but a value Envoy rejects (NaN, < 0, "" key)
        with pytest.raises(OrcaParseError, match=re.escape(str(exc))):
            parse_orca_header(header)
        return
    assert parse_orca_header(header) == expected

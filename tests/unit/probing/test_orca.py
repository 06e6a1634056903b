"""ORCA header parsing and formatting, checked against the forms Envoy's parser accepts."""

from __future__ import annotations

import base64
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from xds.data.orca.v3 import orca_load_report_pb2

from aviator.probing.orca import (
    ORCA_HEADER,
    ORCA_HEADER_BIN,
    OrcaLoadReport,
    OrcaParseError,
    format_orca_text,
    parse_orca_header,
    report_from_headers,
)

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

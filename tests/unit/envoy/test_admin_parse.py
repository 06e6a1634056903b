"""Parsing of admin bodies, on text shaped like Envoy 1.40's output (counters that are 0 are
left out of the JSON, uint64 counters are strings, enum defaults are omitted)."""

from __future__ import annotations

import json

import pytest
from google.protobuf import json_format

from aviator.envoy.admin import HostStatus, _parse_stats, _uptime_seconds, parse_clusters

CLUSTERS = {
    "cluster_statuses": [
        {
            "name": "shop/cart",
            "added_via_api": True,
            "host_statuses": [
                {
                    "address": {"socket_address": {"address": "10.1.0.7", "port_value": 8080}},
                    "stats": [
                        {"name": "cx_connect_fail"},
                        {"value": "3", "name": "cx_total"},
                        {"value": "1", "name": "rq_error"},
                        {"value": "41", "name": "rq_success"},
                        {"name": "rq_timeout"},
                        {"value": "42", "name": "rq_total"},
                        {"value": "1", "type": "GAUGE", "name": "cx_active"},
                        {"value": "2", "type": "GAUGE", "name": "rq_active"},
                    ],
                    "health_status": {"eds_health_status": "HEALTHY"},
                    "weight": 250,
                    "locality": {"zone": "zone-a"},
                    "success_rate": {"value": 97.5},
                },
                {
                    "address": {"socket_address": {"address": "fd00::8", "port_value": 8080}},
                    "stats": [{"name": "rq_total"}],
                    "health_status": {
                        "eds_health_status": "DEGRADED",
                        "failed_outlier_check": True,
                    },
                    "weight": 1,
                    "priority": 1,
                    "locality": {},
                    "unknown_future_field": 1,
                },
                {
                    "address": {"socket_address": {"address": "10.1.0.9", "port_value": 8080}},
                    "health_status": {},
                    "weight": 3,
                },
            ],
        }
    ]
}


def test_parse_clusters() -> None:
    ok, ejected, plain = parse_clusters(json.dumps(CLUSTERS))
    assert ok == HostStatus(
        cluster="shop/cart",
        address="10.1.0.7:8080",
        weight=250,
        eds_health="HEALTHY",
        flags=(),
        priority=0,
        zone="zone-a",
        rq_total=42,
        rq_active=2,
        rq_success=41,
        rq_error=1,
        rq_timeout=0,
        cx_active=1,
        cx_total=3,
        cx_connect_fail=0,
        success_rate=97.5,
    )
    assert ok.healthy
    assert not ok.degraded
    assert ejected.address == "[fd00::8]:8080"
    assert ejected.eds_health == "DEGRADED"
    assert ejected.flags == ("failed_outlier_check",)
    assert ejected.priority == 1
    assert ejected.rq_total == 0
    assert ejected.success_rate is None
    assert ejected.degraded
    assert not ejected.healthy
    # No EDS health given (a static host): UNKNOWN, which Envoy treats as healthy.
    assert plain.eds_health == "UNKNOWN"
    assert plain.healthy
    assert plain.weight == 3


def test_parse_clusters_rejects_garbage() -> None:
    with pytest.raises(json_format.ParseError):
        parse_clusters("not json")


def test_parse_stats_splits_numbers_texts_and_histograms() -> None:
    body = {
        "stats": [
            {"name": "control_plane.connected_state", "value": 1},
            {"name": "control_plane.identifier", "value": "aviator-0"},
            {"name": "cluster_manager.warming_clusters", "value": 0},
            {"histograms": {"supported_quantiles": [50], "computed_quantiles": []}},
        ]
    }
    numbers, texts = _parse_stats(body)
    assert numbers == {"control_plane.connected_state": 1, "cluster_manager.warming_clusters": 0}
    assert texts == {"control_plane.identifier": "aviator-0"}


@pytest.mark.parametrize(("text", "seconds"), [("15s", 15), ("0s", 0), ("3600.5s", 3600)])
def test_uptime(text: str, seconds: int) -> None:
    assert _uptime_seconds(text) == seconds

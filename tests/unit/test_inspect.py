"""``aviator inspect``'s pure half: joining Envoy's hosts with Aviator's rows, and the table."""

from __future__ import annotations

import json
from typing import Any

import pytest

from aviator.cli.inspect import _url
from aviator.cli.usage import UsageError
from aviator.envoy.admin import HostStatus
from aviator.envoy.inspect import Report, join, render_table


def host(cluster: str, address: str, weight: int, **kw: Any) -> HostStatus:
    fields: dict[str, Any] = {
        "eds_health": "HEALTHY",
        "flags": (),
        "priority": 0,
        "zone": "",
        "rq_total": 0,
        "rq_active": 0,
        "rq_success": 0,
        "rq_error": 0,
        "rq_timeout": 0,
        "cx_active": 0,
        "cx_total": 0,
        "cx_connect_fail": 0,
        "success_rate": None,
    }
    fields.update(kw)
    return HostStatus(cluster=cluster, address=address, weight=weight, **fields)


def aviator_row(address: str, weight: int | None, **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "workload": "shop/web",
        "address": address,
        "pod": f"pod-{address[-6]}",
        "weight": weight,
        "health": "HEALTHY",
        "hot": False,
        "latency_ms": 12.5,
        "rif": 1.25,
        "error_rate": 0.0,
        "samples": 9,
    }
    row.update(kw)
    return row


HOSTS = [
    host("aviator-xds", "127.0.0.1:18000", 1, rq_total=1),
    host("shop/web", "127.0.0.2:8080", 1000, rq_total=300, rq_active=2),
    host("shop/web", "127.0.0.3:8080", 400, rq_total=100, rq_error=7),
    host("shop/web", "127.0.0.5:8080", 50, flags=("failed_outlier_check",)),
]
AVIATOR = [
    aviator_row("127.0.0.2:8080", 1000),
    aviator_row("127.0.0.3:8080", 600, health="DEGRADED", hot=True),
    aviator_row("127.0.0.4:8080", None),  # new: no weight yet, and Envoy does not hold it
]


def test_join_pairs_endpoints_and_compares_weights() -> None:
    rows = join(HOSTS, AVIATOR)
    assert [(r.cluster, r.address) for r in rows] == [
        ("shop/web", "127.0.0.2:8080"),
        ("shop/web", "127.0.0.3:8080"),
        ("shop/web", "127.0.0.4:8080"),
        ("shop/web", "127.0.0.5:8080"),
    ]  # aviator-xds is not Aviator's: left out
    a, b, c, d = rows
    assert (a.envoy_weight, a.aviator_weight, a.weight_match, a.health_match) == (
        1000,
        1000,
        True,
        True,
    )
    assert a.share == pytest.approx(0.75)
    assert a.rq_active == 2
    assert (b.weight_match, b.health_match, b.hot, b.rq_error) == (False, False, True, 7)
    assert (c.in_envoy, c.in_aviator, c.weight_match) == (False, True, None)
    assert (d.in_envoy, d.in_aviator, d.envoy_flags) == (True, False, ("failed_outlier_check",))
    assert d.share == 0.0


def test_join_without_aviator_and_cluster_filters() -> None:
    only_envoy = join(HOSTS, None)
    assert {r.cluster for r in only_envoy} == {"shop/web"}
    assert all(r.weight_match is None for r in only_envoy)
    assert len(join(HOSTS, None, all_clusters=True)) == 4
    assert [r.address for r in join(HOSTS, AVIATOR, clusters=["aviator-xds"])] == [
        "127.0.0.1:18000"
    ]
    # A cluster Aviator serves is shown even if its name is not namespace/name.
    odd = [host("legacy", "10.0.0.1:80", 7)]
    rows = join(odd, [aviator_row("10.0.0.1:80", 7, workload="legacy")])
    assert [(r.cluster, r.weight_match) for r in rows] == [("legacy", True)]


def test_table_and_json() -> None:
    report = Report("http://e", "http://a", tuple(join(HOSTS, AVIATOR)))
    text = render_table(report)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["cluster", "address", "weight"]
    by_address = {line.split()[1]: line for line in lines[1:-1]}
    assert by_address["127.0.0.2:8080"].rstrip().endswith("yes")
    assert "75%" in by_address["127.0.0.2:8080"]
    assert "DEGRADED hot" in by_address["127.0.0.3:8080"]
    assert by_address["127.0.0.3:8080"].rstrip().endswith("NO (health differs)")
    assert by_address["127.0.0.4:8080"].rstrip().endswith("not in Envoy")
    assert by_address["127.0.0.5:8080"].rstrip().endswith("not in Aviator")
    assert "failed_outlier_check" in by_address["127.0.0.5:8080"]
    assert lines[-1].startswith(
        "4 endpoints in 1 cluster; Envoy's weight equals Aviator's for 1 of 2"
    )
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["weights"] == {"compared": 2, "equal": 1}
    first = doc["endpoints"][0]
    assert first["envoy"]["weight"] == first["aviator"]["weight"] == 1000
    assert doc["endpoints"][2]["envoy"] is None


def test_table_without_aviator_and_empty() -> None:
    text = render_table(Report("http://e", None, tuple(join(HOSTS, None))))
    assert "av.weight" not in text
    assert text.splitlines()[-1].endswith(
        "(Envoy only: add --aviator-admin to compare with Aviator)"
    )
    assert "no endpoints" in render_table(Report("http://e", None, ()))


def test_admin_urls() -> None:
    assert _url("127.0.0.1:9901", "--envoy-admin") == "http://127.0.0.1:9901"
    assert _url("http://127.0.0.1:9901/", "--envoy-admin") == "http://127.0.0.1:9901"
    with pytest.raises(UsageError, match="--aviator-admin must be an http"):
        _url("ftp://x", "--aviator-admin")

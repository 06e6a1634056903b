"""Async client for an Envoy admin endpoint: what an Envoy actually holds and does.

Reads only (plus nothing that changes Envoy). Every failure — connection refused, timeout, an
HTTP error status, a body that does not parse — becomes :class:`EnvoyAdminError` chained to
its cause.

``/clusters?format=json`` is parsed through Envoy's own ``envoy.admin.v3.Clusters`` message, so
field names and defaults (a counter that is 0 is left out of the JSON) follow the proto.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import aiohttp
from envoy.admin.v3 import clusters_pb2
from envoy.config.core.v3 import health_check_pb2
from google.protobuf import json_format

from aviator.envoy.errors import EnvoyAdminError

# Flags of envoy.admin.v3.HostHealthStatus that take a host out of (or mark it in) rotation,
# besides the EDS health Aviator itself publishes.
_HEALTH_FLAG_FIELDS = (
    "failed_active_health_check",
    "failed_outlier_check",
    "failed_active_degraded_check",
    "pending_dynamic_removal",
    "pending_active_hc",
    "excluded_via_immediate_hc_fail",
    "active_hc_timeout",
)


@dataclass(frozen=True, slots=True)
class HostStatus:
    """One upstream host of one cluster as Envoy sees it (``/clusters``).

    ``eds_health`` is the EDS health status name (``HEALTHY``, ``DEGRADED``, ``UNHEALTHY``,
    ``DRAINING``, ``TIMEOUT`` or ``UNKNOWN`` when none was given). ``flags`` holds the names of
    Envoy's own health flags that are set (for example ``failed_outlier_check``), sorted.
    Counters are totals since the host was added; gauges (``*_active``) are current values.
    ``success_rate`` is the outlier detector's last success rate in percent, or None when not
    computed.
    """

    cluster: str
    address: str  # "ip:port" (IPv6 in brackets) or a pipe path
    weight: int
    eds_health: str
    flags: tuple[str, ...]
    priority: int
    zone: str
    rq_total: int
    rq_active: int
    rq_success: int
    rq_error: int
    rq_timeout: int
    cx_active: int
    cx_total: int
    cx_connect_fail: int
    success_rate: float | None

    @property
    def degraded(self) -> bool:
        return self.eds_health == "DEGRADED" or "failed_active_degraded_check" in self.flags

    @property
    def healthy(self) -> bool:
        """Envoy routes to it as a healthy host: EDS says healthy (or nothing) and no flag set."""
        return self.eds_health in ("HEALTHY", "UNKNOWN") and not self.flags


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """The parts of ``/server_info`` Aviator uses."""

    version: str  # e.g. "<sha>/1.40.0/Clean/RELEASE/BoringSSL"
    state: str  # LIVE, DRAINING, PRE_INITIALIZING or INITIALIZING
    node_id: str
    node_cluster: str
    uptime_seconds: int


def _format_address(address: Any) -> str:
    if address.HasField("socket_address"):
        sa = address.socket_address
        host = f"[{sa.address}]" if ":" in sa.address else sa.address
        return f"{host}:{sa.port_value}"
    if address.HasField("pipe"):
        return str(address.pipe.path)
    return json_format.MessageToJson(address, indent=None)


def parse_clusters(text: str) -> list[HostStatus]:
    """Parse the body of ``/clusters?format=json`` into one entry per (cluster, host)."""
    message = clusters_pb2.Clusters()
    json_format.Parse(text, message, ignore_unknown_fields=True)
    hosts: list[HostStatus] = []
    for cluster in message.cluster_statuses:
        for host in cluster.host_statuses:
            stats = {s.name: int(s.value) for s in host.stats}
            health = host.health_status
            hosts.append(
                HostStatus(
                    cluster=cluster.name,
                    address=_format_address(host.address),
                    weight=int(host.weight),
                    eds_health=health_check_pb2.HealthStatus.Name(health.eds_health_status),
                    flags=tuple(sorted(f for f in _HEALTH_FLAG_FIELDS if getattr(health, f))),
                    priority=int(host.priority),
                    zone=str(host.locality.zone),
                    rq_total=stats.get("rq_total", 0),
                    rq_active=stats.get("rq_active", 0),
                    rq_success=stats.get("rq_success", 0),
                    rq_error=stats.get("rq_error", 0),
                    rq_timeout=stats.get("rq_timeout", 0),
                    cx_active=stats.get("cx_active", 0),
                    cx_total=stats.get("cx_total", 0),
                    cx_connect_fail=stats.get("cx_connect_fail", 0),
                    success_rate=(
                        float(host.success_rate.value) if host.HasField("success_rate") else None
                    ),
                )
            )
    return hosts


def _parse_stats(body: Any) -> tuple[dict[str, int], dict[str, str]]:
    """``/stats?format=json`` → (counters and gauges, text readouts); histograms are skipped."""
    numbers: dict[str, int] = {}
    texts: dict[str, str] = {}
    for entry in body["stats"]:
        if "histograms" in entry:
            continue
        value = entry.get("value", 0)
        if isinstance(value, str):
            texts[entry["name"]] = value
        else:
            numbers[entry["name"]] = int(value)
    return numbers, texts


def _uptime_seconds(text: str) -> int:
    # Envoy renders protobuf Durations as "15s".
    return int(float(text.removesuffix("s") or 0))


class EnvoyAdmin:
    """Client for one admin URL such as ``http://127.0.0.1:9901``.

    Use as ``async with EnvoyAdmin(url) as admin:``; outside a context the session is created on
    first use and closed by :meth:`close`.
    """

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def _get(
        self, path: str, params: dict[str, str] | None = None, *, ok: tuple[int, ...] = (200,)
    ) -> tuple[int, str]:
        url = f"{self.url}{path}"
        try:
            async with self._http().get(url, params=params) as response:
                text = await response.text()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EnvoyAdminError(f"GET {url}: {type(exc).__name__}: {exc}") from exc
        if status not in ok:
            raise EnvoyAdminError(f"GET {url}: HTTP {status}: {text.strip()[:200]}")
        return status, text

    async def _get_json(self, path: str, params: dict[str, str] | None = None) -> Any:
        _, text = await self._get(path, params)
        try:
            return json.loads(text)
        except ValueError as exc:
            raise EnvoyAdminError(f"GET {self.url}{path}: body is not JSON: {exc}") from exc

    async def _stats(self, filter_regex: str | None) -> tuple[dict[str, int], dict[str, str]]:
        params = {"format": "json"}
        if filter_regex is not None:
            params["filter"] = filter_regex
        body = await self._get_json("/stats", params)
        try:
            return _parse_stats(body)
        except (KeyError, TypeError, ValueError) as exc:
            raise EnvoyAdminError(f"GET {self.url}/stats: unexpected shape: {exc!r}") from exc

    async def stats(self, filter_regex: str | None = None) -> dict[str, int]:
        """Counters and gauges by name (``filter_regex`` is Envoy's ``filter`` parameter)."""
        numbers, _ = await self._stats(filter_regex)
        return numbers

    async def text_readouts(self, filter_regex: str | None = None) -> dict[str, str]:
        """Text readouts by name, e.g. ``control_plane.identifier`` once a server set it."""
        _, texts = await self._stats(filter_regex)
        return texts

    async def clusters(self) -> list[HostStatus]:
        """Every host of every cluster, with weight, health and per-host request counters."""
        _, text = await self._get("/clusters", {"format": "json"})
        try:
            return parse_clusters(text)
        except json_format.ParseError as exc:
            raise EnvoyAdminError(f"GET {self.url}/clusters: {exc}") from exc

    async def hosts(self, cluster: str) -> list[HostStatus]:
        """The hosts of one cluster (empty if Envoy does not hold that cluster)."""
        return [h for h in await self.clusters() if h.cluster == cluster]

    async def config_dump(self, *, include_eds: bool = True) -> dict[str, Any]:
        """``/config_dump``, with the endpoints Envoy holds when ``include_eds``."""
        params = {"include_eds": ""} if include_eds else None
        body = await self._get_json("/config_dump", params)
        if not isinstance(body, dict):
            raise EnvoyAdminError(f"GET {self.url}/config_dump: expected an object")
        return body

    async def server_info(self) -> ServerInfo:
        body = await self._get_json("/server_info")
        try:
            node = body.get("node", {})
            return ServerInfo(
                version=str(body["version"]),
                state=str(body["state"]),
                node_id=str(node.get("id", "")),
                node_cluster=str(node.get("cluster", "")),
                uptime_seconds=_uptime_seconds(str(body.get("uptime_current_epoch", "0s"))),
            )
        except (KeyError, AttributeError, ValueError) as exc:
            raise EnvoyAdminError(f"GET {self.url}/server_info: unexpected shape: {exc!r}") from exc

    async def ready(self) -> bool:
        """True when Envoy is LIVE (``/ready`` answers 200), False while it initialises (503)."""
        status, _ = await self._get("/ready", ok=(200, 503))
        return status == 200

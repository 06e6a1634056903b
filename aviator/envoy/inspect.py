"""``aviator inspect``: per endpoint, what an Envoy holds beside what Aviator measured.

Envoy's side comes from its admin ``/clusters`` (weight, EDS health, Envoy's own health flags,
request counters); Aviator's from its admin ``/debug/endpoints`` (latency, RIF and error-rate
estimates, the weight and health it publishes). The two are joined on (cluster, address):
Aviator names a workload's cluster ``namespace/name`` and its endpoints ``ip:port``, as Envoy
shows them. An endpoint only one side has is shown too (a push in flight, or an Envoy that
talks to another control plane).

:func:`join` and :func:`render_table` are pure; :func:`collect` does the two reads.

With ``--csds`` the control plane's side alone: its Client Status Discovery Service (on its xDS
port) says what each connected proxy holds, resource by resource, and what it rejected
(:func:`fetch_csds`; :func:`csds_nodes` and :func:`render_csds` are pure).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from aviator.envoy.admin import EnvoyAdmin, HostStatus

__all__ = [
    "AviatorAdminError",
    "CsdsError",
    "CsdsNode",
    "CsdsResource",
    "EndpointRow",
    "Report",
    "collect",
    "csds_nodes",
    "fetch_aviator_endpoints",
    "fetch_csds",
    "join",
    "render_csds",
    "render_table",
]

# Clusters Aviator publishes are named after their workload: namespace/name.
_AVIATOR_CLUSTER = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class AviatorAdminError(Exception):
    """Aviator's admin endpoint could not be read (unreachable, HTTP error, not its shape)."""


@dataclass(frozen=True, slots=True)
class EndpointRow:
    """One endpoint. Envoy's fields are None when Envoy does not hold it; Aviator's when
    Aviator was not asked or does not serve it.

    ``share`` is this endpoint's part of its cluster's ``rq_total`` in Envoy (requests since
    the host was added), None when the cluster has served nothing.
    """

    cluster: str
    address: str
    # What Envoy holds.
    envoy_weight: int | None = None
    envoy_health: str | None = None
    envoy_flags: tuple[str, ...] = ()
    rq_total: int | None = None
    rq_active: int | None = None
    rq_error: int | None = None
    share: float | None = None
    # What Aviator measured and publishes.
    pod: str | None = None
    latency_ms: float | None = None
    rif: float | None = None
    error_rate: float | None = None
    samples: int | None = None
    aviator_weight: int | None = None
    aviator_health: str | None = None
    hot: bool | None = None

    @property
    def in_envoy(self) -> bool:
        return self.envoy_weight is not None

    @property
    def in_aviator(self) -> bool:
        return self.pod is not None or self.aviator_weight is not None

    @property
    def weight_match(self) -> bool | None:
        """Envoy's weight == Aviator's; None when either side has no weight to compare."""
        if self.envoy_weight is None or self.aviator_weight is None:
            return None
        return self.envoy_weight == self.aviator_weight

    @property
    def health_match(self) -> bool | None:
        """Envoy's EDS health is the health Aviator publishes (None: nothing to compare)."""
        if self.envoy_health is None or self.aviator_health is None:
            return None
        return self.envoy_health == self.aviator_health

    def to_json(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "address": self.address,
            "envoy": None
            if not self.in_envoy
            else {
                "weight": self.envoy_weight,
                "health": self.envoy_health,
                "flags": list(self.envoy_flags),
                "rq_total": self.rq_total,
                "rq_active": self.rq_active,
                "rq_error": self.rq_error,
                "share": self.share,
            },
            "aviator": None
            if not self.in_aviator
            else {
                "pod": self.pod,
                "latency_ms": self.latency_ms,
                "rif": self.rif,
                "error_rate": self.error_rate,
                "samples": self.samples,
                "weight": self.aviator_weight,
                "health": self.aviator_health,
                "hot": self.hot,
            },
            "weight_match": self.weight_match,
            "health_match": self.health_match,
        }


@dataclass(frozen=True, slots=True)
class Report:
    """Everything ``aviator inspect`` shows. ``aviator_admin`` None: Envoy's side only."""

    envoy_admin: str
    aviator_admin: str | None
    rows: tuple[EndpointRow, ...]

    @property
    def compared(self) -> int:
        return sum(1 for r in self.rows if r.weight_match is not None)

    @property
    def matching(self) -> int:
        return sum(1 for r in self.rows if r.weight_match)

    def to_json(self) -> dict[str, Any]:
        return {
            "envoy_admin": self.envoy_admin,
            "aviator_admin": self.aviator_admin,
            "endpoints": [r.to_json() for r in self.rows],
            "weights": {"compared": self.compared, "equal": self.matching},
        }


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def join(
    hosts: Iterable[HostStatus],
    aviator: Iterable[Mapping[str, Any]] | None,
    *,
    clusters: Sequence[str] = (),
    all_clusters: bool = False,
) -> list[EndpointRow]:
    """Join Envoy's hosts with Aviator's endpoint rows on (cluster, address), sorted.

    Shown clusters: those named in ``clusters`` if any; else every cluster if
    ``all_clusters``; else the clusters Aviator serves plus Envoy's clusters named like
    Aviator's (``namespace/name``), which leaves out static ones such as ``aviator-xds``.
    """
    envoy_hosts = list(hosts)
    aviator_rows = list(aviator or ())
    by_key: dict[tuple[str, str], Mapping[str, Any]] = {
        (str(r["workload"]), str(r["address"])): r for r in aviator_rows
    }
    served = {cluster for cluster, _ in by_key}

    def shown(cluster: str) -> bool:
        if clusters:
            return cluster in clusters
        return all_clusters or cluster in served or bool(_AVIATOR_CLUSTER.match(cluster))

    totals: dict[str, int] = {}
    for h in envoy_hosts:
        totals[h.cluster] = totals.get(h.cluster, 0) + h.rq_total
    rows: dict[tuple[str, str], EndpointRow] = {}
    for h in envoy_hosts:
        if not shown(h.cluster):
            continue
        total = totals[h.cluster]
        rows[(h.cluster, h.address)] = EndpointRow(
            cluster=h.cluster,
            address=h.address,
            envoy_weight=h.weight,
            envoy_health=h.eds_health,
            envoy_flags=h.flags,
            rq_total=h.rq_total,
            rq_active=h.rq_active,
            rq_error=h.rq_error,
            share=h.rq_total / total if total else None,
            **_aviator_fields(by_key.get((h.cluster, h.address))),
        )
    for key, a in by_key.items():
        if key not in rows and shown(key[0]):
            rows[key] = EndpointRow(cluster=key[0], address=key[1], **_aviator_fields(a))
    return [rows[k] for k in sorted(rows)]


def _aviator_fields(row: Mapping[str, Any] | None) -> dict[str, Any]:
    if row is None:
        return {}
    return {
        "pod": row.get("pod"),
        "latency_ms": _opt_float(row.get("latency_ms")),
        "rif": _opt_float(row.get("rif")),
        "error_rate": _opt_float(row.get("error_rate")),
        "samples": _opt_int(row.get("samples")),
        "aviator_weight": _opt_int(row.get("weight")),
        "aviator_health": row.get("health"),
        "hot": row.get("hot"),
    }


# -- text --------------------------------------------------------------------------------------


def _cell(value: Any, fmt: str = "") -> str:
    if value is None:
        return "-"
    return format(value, fmt)


def _match_text(row: EndpointRow) -> str:
    if not row.in_envoy:
        return "not in Envoy"
    if not row.in_aviator:
        return "not in Aviator"
    match = row.weight_match
    if match is None:
        return "no weight yet"
    text = "yes" if match else "NO"
    if row.health_match is False:
        text += " (health differs)"
    return text


def render_table(report: Report) -> str:
    """The report as an aligned text table with a closing line about the weights."""
    with_aviator = report.aviator_admin is not None
    header = ["cluster", "address", "weight", "health", "flags", "rq_total", "share", "active"]
    header += ["errors"]
    if with_aviator:
        header += ["pod", "latency", "RIF", "err%", "av.weight", "av.health", "equal"]
    table = [header]
    for r in report.rows:
        line = [
            r.cluster,
            r.address,
            _cell(r.envoy_weight),
            _cell(r.envoy_health),
            ",".join(r.envoy_flags) or ("-" if r.in_envoy else ""),
            _cell(r.rq_total),
            "-" if r.share is None else f"{r.share * 100:.0f}%",
            _cell(r.rq_active),
            _cell(r.rq_error),
        ]
        if with_aviator:
            health = r.aviator_health or "-"
            if r.hot:
                health += " hot"
            line += [
                _cell(r.pod),
                "-" if r.latency_ms is None else f"{r.latency_ms:.1f} ms",
                _cell(r.rif, ".1f"),
                "-" if r.error_rate is None else f"{r.error_rate * 100:.1f}%",
                _cell(r.aviator_weight),
                health,
                _match_text(r),
            ]
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    numeric = {"weight", "rq_total", "share", "active", "errors", "latency", "RIF", "err%"}
    numeric.add("av.weight")
    lines = []
    for row in table:
        cells = [
            c.rjust(w) if h in numeric else c.ljust(w)
            for c, w, h in zip(row, widths, header, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    lines.append(_closing(report))
    return "\n".join(lines)


def _closing(report: Report) -> str:
    clusters = len({r.cluster for r in report.rows})
    head = f"{len(report.rows)} endpoints in {clusters} cluster{'s' if clusters != 1 else ''}"
    if not report.rows:
        return "no endpoints of Aviator's clusters in this Envoy (--all shows every cluster)"
    if report.aviator_admin is None:
        return f"{head} (Envoy only: add --aviator-admin to compare with Aviator)"
    differ = [r for r in report.rows if r.weight_match is False]
    text = f"{head}; Envoy's weight equals Aviator's for {report.matching} of {report.compared}"
    if differ:
        text += " (a push may be in flight: run again; a lasting difference means Envoy "
        text += "did not apply Aviator's update, see /debug/proxies for NACKs)"
    return text


# -- I/O ---------------------------------------------------------------------------------------


async def fetch_aviator_endpoints(
    url: str, *, request_timeout_s: float = 5.0
) -> list[dict[str, Any]]:
    """Aviator's ``/debug/endpoints`` rows; :class:`AviatorAdminError` on any failure."""
    target = f"{url.rstrip('/')}/debug/endpoints"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=request_timeout_s)) as http,
            http.get(target) as response,
        ):
            text = await response.text()
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise AviatorAdminError(f"GET {target}: {type(exc).__name__}: {exc}") from exc
    if status != 200:
        raise AviatorAdminError(f"GET {target}: HTTP {status} (is this Aviator's admin address?)")
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise AviatorAdminError(f"GET {target}: body is not JSON: {exc}") from exc
    if not isinstance(body, list) or not all(
        isinstance(r, dict) and "workload" in r and "address" in r for r in body
    ):
        raise AviatorAdminError(f"GET {target}: not a list of endpoints (is this Aviator?)")
    return body


async def collect(
    envoy_admin: str,
    aviator_admin: str | None = None,
    *,
    clusters: Sequence[str] = (),
    all_clusters: bool = False,
    request_timeout_s: float = 5.0,
) -> Report:
    """Read both admin endpoints (at once) and join them.

    Raises :class:`~aviator.envoy.errors.EnvoyAdminError` or :class:`AviatorAdminError`.
    """
    async with EnvoyAdmin(envoy_admin, timeout=request_timeout_s) as admin:
        if aviator_admin is None:
            hosts = await admin.clusters()
            aviator = None
        else:
            hosts, aviator = await asyncio.gather(
                admin.clusters(),
                fetch_aviator_endpoints(aviator_admin, request_timeout_s=request_timeout_s),
            )
    rows = join(hosts, aviator, clusters=clusters, all_clusters=all_clusters)
    return Report(envoy_admin, aviator_admin, tuple(rows))


# -- CSDS: what the proxies of a control plane hold, by its own account ------------------------

_TYPE_SHORT = {
    "type.googleapis.com/envoy.config.cluster.v3.Cluster": "cds",
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment": "eds",
    "type.googleapis.com/envoy.config.listener.v3.Listener": "lds",
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration": "rds",
}
MAX_CSDS_RESPONSE_BYTES = 256 * 1024 * 1024  # resource contents are not asked for


class CsdsError(Exception):
    """A control plane's CSDS could not be asked (unreachable, refused, not served)."""


@dataclass(frozen=True, slots=True)
class CsdsResource:
    """One resource of one proxy: client status (ACKED, NACKED, REQUESTED, DOES_NOT_EXIST),
    the server's view (SYNCED, STALE, NOT_SENT, ERROR), the version held, and a NACK's
    message."""

    type: str
    name: str
    status: str
    config_status: str
    version: str
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "name": self.name,
            "status": self.status,
            "config_status": self.config_status,
            "version": self.version,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class CsdsNode:
    node: str
    resources: tuple[CsdsResource, ...]

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "resources": [r.to_json() for r in self.resources]}


def csds_nodes(response: Any) -> list[CsdsNode]:
    """A ``ClientStatusResponse`` as values (pure)."""
    from envoy.admin.v3 import config_dump_shared_pb2 as dump_pb2
    from envoy.service.status.v3 import csds_pb2

    nodes = []
    for config in response.config:
        resources = tuple(
            CsdsResource(
                type=_TYPE_SHORT.get(c.type_url, c.type_url),
                name=c.name,
                status=dump_pb2.ClientResourceStatus.Name(c.client_status),
                config_status=csds_pb2.ConfigStatus.Name(c.config_status),
                version=c.version_info,
                error=c.error_state.details if c.HasField("error_state") else None,
            )
            for c in config.generic_xds_configs
        )
        nodes.append(CsdsNode(config.node.id, resources))
    return nodes


def render_csds(nodes: Sequence[CsdsNode], *, source: str) -> str:
    """One line per resource of each proxy; a NACK's message in full below its line."""
    header = ["node", "type", "name", "status", "server", "version"]
    table = [header]
    errors: dict[int, str] = {}
    for node in nodes:
        for r in node.resources:
            if r.error:
                errors[len(table)] = " ".join(r.error.split())
            table.append([node.node, r.type, r.name, r.status, r.config_status, r.version or "-"])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = []
    for i, row in enumerate(table):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i in errors:
            lines.append(f"    rejected: {errors[i]}")
    count = sum(len(n.resources) for n in nodes)
    nacked = sum(1 for n in nodes for r in n.resources if r.status == "NACKED")
    if not nodes:
        lines = [f"no proxy is connected to {source} (or none matches --node)"]
    else:
        plural = "y" if len(nodes) == 1 else "ies"
        lines.append(f"{len(nodes)} prox{plural} of {source}, {count} resources, {nacked} rejected")
    return "\n".join(lines)


def _read_tls(
    ca_file: str, cert_file: str | None, key_file: str | None
) -> tuple[bytes, bytes | None, bytes | None]:
    """The CA, and the client certificate and key if given (small files, read once)."""

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    ca = read(ca_file)
    assert ca is not None
    return ca, read(cert_file), read(key_file)


async def fetch_csds(
    address: str,
    *,
    nodes: Sequence[str] = (),
    timeout_s: float = 5.0,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
) -> list[CsdsNode]:
    """Ask the CSDS at ``address`` (``host:port``, the control plane's xDS address) what its
    proxies hold (those of ``nodes`` if given); TLS with ``ca_file`` (and a client certificate
    for mutual TLS). :class:`CsdsError` on any failure."""
    import grpc
    from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc
    from envoy.type.matcher.v3 import node_pb2, string_pb2

    options = [("grpc.max_receive_message_length", MAX_CSDS_RESPONSE_BYTES)]
    try:
        if ca_file is None:
            channel = grpc.aio.insecure_channel(address, options=options)
        else:
            ca, cert, key = _read_tls(ca_file, cert_file, key_file)
            credentials = grpc.ssl_channel_credentials(ca, key, cert)
            channel = grpc.aio.secure_channel(address, credentials, options=options)
    except OSError as exc:
        raise CsdsError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    request = csds_pb2.ClientStatusRequest(
        exclude_resource_contents=True,
        node_matchers=[
            node_pb2.NodeMatcher(node_id=string_pb2.StringMatcher(exact=n)) for n in nodes
        ],
    )
    async with channel:
        stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)
        try:
            response = await stub.FetchClientStatus(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            details = " ".join((exc.details() or "").split())
            if code is grpc.StatusCode.UNIMPLEMENTED:
                raise CsdsError(
                    f"{address} does not serve CSDS (is it Aviator's --xds-address?)"
                ) from exc
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                raise CsdsError(f"CSDS at {address} did not answer in time (--timeout)") from exc
            if code is grpc.StatusCode.UNAVAILABLE:
                raise CsdsError(f"cannot reach CSDS at {address}: {details}") from exc
            raise CsdsError(f"CSDS at {address}: {code.name}: {details}") from exc
    return csds_nodes(response)

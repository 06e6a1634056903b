"""How the leader learns every replica's proxies: per-replica ACK reports in Leases (I/O).

Every replica serves xDS to its own proxies, so only it knows which of them hold a policy's
current endpoints; ``Programmed`` must count the proxies of *every* replica. Each replica
publishes its counts (:class:`~aviator.operator.acks.ClusterAcks` by cluster, bounded JSON,
:func:`~aviator.operator.acks.encode_report`) in an annotation of its own Lease
``aviator-acks-<identity>`` in the operator's namespace: written when the counts change, at
most once per ``min_interval``; nothing in steady state. The Lease is owned by the replica's
Pod (ownerReference), so the garbage collector removes it with the Pod: no delete
permission, no stale reports piling up across rollouts.

The leader, every ``poll_interval``, lists the operator's Pods (``pod_selector``) and reads
the report of each *Ready* one but itself (a replica whose Pod is not Ready, crashed or
restarting, has lost its xDS streams: its proxies reconnect elsewhere and are counted
there). Reads only, within the shipped RBAC (pods: list; leases: get, create, update).

:meth:`AckReports.merged` adds the local counts to the peers'; it is None until the peers
have been read once in this leadership term, so a new leader does not publish a
``Programmed`` computed from its own proxies alone. ``on_change`` is called when a peer's
report changed: the control plane then recomputes the status.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import structlog

from aviator.operator.acks import ClusterAcks, ReportError, decode_report, encode_report, merge_acks
from aviator.operator.election import micro_time
from aviator.operator.elector import LeaderGate
from aviator.operator.kube import ConflictError, KubeApi, KubeError, NotFoundError, path
from aviator.operator.ratelimit import RateLimiter
from aviator.operator.reconciler import Reconciler

__all__ = ["REPORT_ANNOTATION", "AckReports", "report_lease_name"]

log = structlog.get_logger(__name__)

REPORT_ANNOTATION = "aviator.io/xds-acks"
REPORT_LABEL = ("aviator.io/report", "xds-acks")
DEFAULT_POD_SELECTOR = "app.kubernetes.io/name=aviator,app.kubernetes.io/component=control-plane"


def report_lease_name(identity: str) -> str:
    return f"aviator-acks-{identity}"[:253]


def _ready(pod: Mapping[str, Any]) -> bool:
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return bool(c.get("status") == "True")
    return False


class AckReports:
    """This replica's report, written always; the peers' reports, read while leading."""

    def __init__(
        self,
        api: KubeApi,
        *,
        namespace: str,
        identity: str,
        gate: LeaderGate | None = None,
        pod_selector: str = DEFAULT_POD_SELECTOR,
        min_interval: float = 2.0,
        poll_interval: float = 2.0,
        on_change: Callable[[], None] | None = None,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._api = api  # not fenced: every replica writes its own report
        self.namespace = namespace
        self.identity = identity
        self._gate = gate
        self._selector = pod_selector
        self._poll = poll_interval
        self._on_change = on_change
        self._wall = wall
        self._peers: dict[str, dict[str, ClusterAcks]] = {}
        self._peers_read = False
        self._bad: dict[str, str] = {}
        self._own_uid: str | None = None
        self.dropped = 0  # clusters left out of the last report to fit
        self.reconciler: Reconciler[str, str] = Reconciler(
            "ack report",
            self._write,
            limiter=RateLimiter(per_key=min_interval, rate=10.0, burst=10),
        )

    # -- this replica ----------------------------------------------------------------------

    def publish(self, acks: Mapping[str, ClusterAcks]) -> None:
        """This replica's counts now (written if they changed)."""
        text, self.dropped = encode_report(acks)
        self.reconciler.set(self.identity, text)

    async def _write(self, identity: str, text: str | None) -> None:
        assert text is not None
        name = report_lease_name(identity)
        url = path("leases", name, namespace=self.namespace, group="coordination.k8s.io")
        for _ in range(5):
            try:
                lease: dict[str, Any] | None = await self._api.get(url)
            except NotFoundError:
                lease = None
            stamp = micro_time(self._wall())
            if lease is None:
                body = await self._new_lease(name, text, stamp)
                try:
                    await self._api.create(
                        path("leases", namespace=self.namespace, group="coordination.k8s.io"), body
                    )
                    return
                except ConflictError:
                    continue
            meta = dict(lease.get("metadata") or {})
            if (meta.get("annotations") or {}).get(REPORT_ANNOTATION) == text:
                return
            meta["annotations"] = {**(meta.get("annotations") or {}), REPORT_ANNOTATION: text}
            body = {**lease, "metadata": meta,
                    "spec": {**(lease.get("spec") or {}), "holderIdentity": identity,
                             "renewTime": stamp}}  # fmt: skip
            try:
                await self._api.replace(url, body)
                return
            except ConflictError:
                continue
        raise ConflictError("PUT", url, 409, "Conflict", "still conflicting after retries")

    async def _new_lease(self, name: str, text: str, stamp: str) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "name": name,
            "namespace": self.namespace,
            "labels": {"app.kubernetes.io/name": "aviator", REPORT_LABEL[0]: REPORT_LABEL[1]},
            "annotations": {REPORT_ANNOTATION: text},
        }
        if self._own_uid is None:
            with contextlib.suppress(KubeError):
                pod = await self._api.get(path("pods", self.identity, namespace=self.namespace))
                self._own_uid = str((pod.get("metadata") or {}).get("uid") or "")
        if self._own_uid:
            meta["ownerReferences"] = [
                {"apiVersion": "v1", "kind": "Pod", "name": self.identity, "uid": self._own_uid}
            ]
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta,
            "spec": {"holderIdentity": self.identity, "renewTime": stamp},
        }

    # -- the peers (leader) ------------------------------------------------------------------

    @property
    def peers(self) -> Mapping[str, Mapping[str, ClusterAcks]]:
        return self._peers

    def merged(self, local: Mapping[str, ClusterAcks]) -> dict[str, ClusterAcks] | None:
        """``local`` plus every live peer's counts; None until the peers were read in this
        leadership term."""
        if not self._peers_read:
            return None
        clusters = set(local)
        for report in self._peers.values():
            clusters |= set(report)
        return {
            c: merge_acks(local.get(c), *(r.get(c) for r in self._peers.values())) for c in clusters
        }

    def leadership(self, leading: bool) -> None:
        if not leading:
            self._peers_read = False

    async def read_peers(self) -> bool:
        """Read every Ready peer's report once; True if anything changed."""
        pods = await self._api.get(
            path("pods", namespace=self.namespace), query={"labelSelector": self._selector}
        )
        peers: dict[str, dict[str, ClusterAcks]] = {}
        for pod in pods.get("items", []):
            name = str((pod.get("metadata") or {}).get("name", ""))
            if not name or name == self.identity or not _ready(pod):
                continue
            url = path("leases", report_lease_name(name), namespace=self.namespace,
                       group="coordination.k8s.io")  # fmt: skip
            try:
                lease = await self._api.get(url)
            except NotFoundError:
                continue  # no report yet: no proxies yet
            text = ((lease.get("metadata") or {}).get("annotations") or {}).get(REPORT_ANNOTATION)
            if not isinstance(text, str):
                continue
            try:
                peers[name] = decode_report(text)
                self._bad.pop(name, None)
            except ReportError as exc:
                if self._bad.get(name) != str(exc):
                    self._bad[name] = str(exc)
                    log.warning("ignoring a replica's ACK report", replica=name, error=str(exc))
        changed = peers != self._peers or not self._peers_read
        self._peers = peers
        self._peers_read = True
        return changed

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.reconciler.run(), name="ack report")
            tg.create_task(self._poll_peers(), name="peer ack reports")

    async def _poll_peers(self) -> None:
        while True:
            if self._gate is None or self._gate.is_leader():
                try:
                    if await self.read_peers() and self._on_change is not None:
                        self._on_change()
                except KubeError as exc:
                    log.warning("cannot read the replicas' ACK reports", error=str(exc))
            await asyncio.sleep(self._poll)

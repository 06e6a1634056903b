"""Writes each AviatorPolicy's status and its Events (I/O; decisions in :mod:`.status`).

:meth:`StatusWriter.update` takes every policy's resolution and the merged ACK counts, as
often as the control plane likes (each state change, each ACK or NACK); only a policy whose
desired :class:`~aviator.operator.status.PolicyStatus` differs from the one last written
reaches the API server, so steady probing writes nothing. A write is a fresh read of the
policy, :func:`~aviator.operator.status.merge_status` (conditions of other owners survive),
then a replace of the ``status`` subresource with the read's resourceVersion; a 409 (someone
wrote in between) is retried on a fresh read, up to ``conflict_retries`` times. After a
successful write, one core/v1 Event per transition (condition status or reason changed).

Rate limits: each policy at most once per ``per_policy`` seconds, all policies together
``rate`` writes per second after a ``burst``; Programmed Pending and NoProxies (states the
next ACK or report usually ends) wait ``settle`` seconds first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

import structlog

from aviator.k8s.fields import ObjectRef
from aviator.k8s.policy import API_VERSION
from aviator.k8s.resolve import PolicyResolution
from aviator.operator.acks import ClusterAcks
from aviator.operator.elector import Fenced, LeaderGate
from aviator.operator.kube import ConflictError, KubeApi, KubeError, NotFoundError, path
from aviator.operator.ratelimit import RateLimiter
from aviator.operator.reconciler import Reconciler
from aviator.operator.status import (
    PROGRAMMED,
    PolicyStatus,
    ProgrammedReason,
    desired_status,
    event_body,
    merge_status,
)

__all__ = ["StatusWriter", "policy_path"]

log = structlog.get_logger(__name__)

GROUP, VERSION = API_VERSION.split("/")
PLURAL: Final = "aviatorpolicies"
_UNSETTLED = (ProgrammedReason.PENDING.value, ProgrammedReason.NO_PROXIES.value)


def policy_path(ref: ObjectRef, subresource: str | None = None) -> str:
    return path(
        PLURAL,
        ref.name,
        namespace=ref.namespace,
        group=GROUP,
        version=VERSION,
        subresource=subresource,
    )


class StatusWriter:
    """The policies' status, written by the leader on transitions only.

    ``instance`` names this replica in Events (``reportingInstance``). Run :meth:`run` as a
    task; feed :meth:`update`; subscribe :meth:`leadership` to the elector.
    """

    def __init__(
        self,
        api: KubeApi,
        *,
        gate: LeaderGate | None = None,
        instance: str = "aviator",
        per_policy: float = 1.0,
        rate: float = 20.0,
        burst: int = 50,
        settle: float = 5.0,
        conflict_retries: int = 5,
        events: bool = True,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._api = Fenced(api, gate)
        self.instance = instance
        self._wall = wall
        self._conflict_retries = conflict_retries
        self._events = events
        self._settle_s = settle
        self.conflicts = 0  # 409s retried
        self.events_written = 0
        self.reconciler: Reconciler[ObjectRef, PolicyStatus] = Reconciler(
            "status",
            self._write,
            limiter=RateLimiter(per_key=per_policy, rate=rate, burst=burst),
            gate=gate,
            settle=self._settle,
        )

    def update(
        self,
        resolutions: Iterable[PolicyResolution],
        acks: Mapping[str, ClusterAcks],
    ) -> None:
        """Every policy's resolution and the ACK counts by cluster name (every replica's
        merged); policies not in ``resolutions`` are forgotten (they were deleted)."""
        desired: dict[ObjectRef, PolicyStatus] = {}
        for r in resolutions:
            key = r.key
            desired[r.ref] = desired_status(r, acks.get(key.cluster_name) if key else None)
        self.reconciler.sync(desired, absent="forget")

    def leadership(self, leading: bool) -> None:
        self.reconciler.leadership(leading)
        if not leading:
            # What was desired in this term may be stale by the next one: start that one
            # from the next update (which comes once the peers' reports are read).
            self.reconciler.sync({}, absent="forget")

    async def run(self) -> None:
        await self.reconciler.run()

    def _settle(self, status: PolicyStatus | None) -> float:
        programmed = status.condition(PROGRAMMED) if status is not None else None
        if programmed is not None and programmed.reason in _UNSETTLED:
            return self._settle_s
        return 0.0

    async def _write(self, ref: ObjectRef, desired: PolicyStatus | None) -> None:
        assert desired is not None  # statuses are never removed, only forgotten
        url = policy_path(ref)
        for _ in range(self._conflict_retries + 1):
            try:
                obj: dict[str, Any] = await self._api.get(url)
            except NotFoundError:
                return  # deleted meanwhile: the next state forgets it
            now = self._wall()
            merged = merge_status(obj, desired, now)
            if merged.stale:
                log.debug("status not written: the server has a newer generation", policy=str(ref))
                return
            if not merged.changed:
                return
            body = dict(obj)
            body["status"] = merged.status
            try:
                written = await self._api.replace(policy_path(ref, "status"), body)
            except ConflictError:
                self.conflicts += 1
                continue
            log.info(
                "policy status written",
                policy=str(ref),
                conditions={c.type: f"{c.status} {c.reason}" for c in desired.conditions},
                endpoints=desired.endpoints,
            )
            if self._events:
                await self._emit(written, merged.transitions, now)
            return
        raise ConflictError(
            "PUT", policy_path(ref, "status"), 409, "Conflict",
            f"still conflicting after {self._conflict_retries} fresh reads",
        )  # fmt: skip

    async def _emit(
        self, obj: Mapping[str, Any], transitions: Iterable[Any], now: datetime
    ) -> None:
        namespace = str((obj.get("metadata") or {}).get("namespace", ""))
        for i, transition in enumerate(transitions):
            body = event_body(obj, transition, now, instance=self.instance, sequence=i)
            try:
                await self._api.create(path("events", namespace=namespace), body)
                self.events_written += 1
            except KubeError as exc:  # an Event is worth less than the status it reports
                log.warning("could not write an event", policy=obj.get("metadata", {}).get("name"),
                            error=str(exc))  # fmt: skip

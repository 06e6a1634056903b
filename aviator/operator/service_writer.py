"""Keeps the hot-avoiding Services and their Endpoints (I/O; rules in :mod:`.service`).

:meth:`HotAvoidingServices.update` takes every resolution, the weights by workload and
``now``; for each opted-in policy the :class:`~aviator.operator.service.HotSetHysteresis`
decides which pods are listed, and the Service ``<target>-aviator`` and its Endpoints are
created or updated when that changes (each Service at most once per ``per_service``
seconds, all of them within ``rate``), by the leader only. A rejoin that is due later is
re-evaluated by :meth:`run` at that time, without waiting for new input. A policy deleted or
turned off → its Service and Endpoints are deleted (the ownerReference makes the garbage
collector do the same if Aviator is not running). On gaining leadership, Services labelled
``app.kubernetes.io/managed-by: aviator`` that no policy wants are deleted.

A Service of that name that Aviator does not own (no managed-by label, or owned by another
policy) is never modified: the write fails with a message saying so, retried at the
back-off's ceiling.

Needs RBAC for Services and Endpoints: ``deploy/overlays/service`` grants it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping
from typing import Any

import structlog

from aviator.k8s.resolve import PolicyResolution
from aviator.model import WorkloadKey
from aviator.operator.elector import Fenced, LeaderGate
from aviator.operator.kube import ConflictError, KubeApi, KubeError, NotFoundError, path
from aviator.operator.ratelimit import RateLimiter
from aviator.operator.reconciler import Reconciler
from aviator.operator.service import (
    MANAGED_BY,
    DesiredService,
    HotSetHysteresis,
    ServiceKey,
    desired_service,
    owned_by,
    service_name,
)
from aviator.probing.weigher import WeighResult

__all__ = ["HotAvoidingServices", "NotOursError"]

log = structlog.get_logger(__name__)


class NotOursError(KubeError):
    """A Service (or Endpoints) of the name Aviator wants exists and is not Aviator's."""


class HotAvoidingServices:
    """Selector-less Services listing the pods that are not hot, for opted-in policies.

    ``rejoin_after(policy)``: how long a pod must stay cold before it is listed again;
    by default 3 ping intervals of its policy, at least 1 s.
    """

    def __init__(
        self,
        api: KubeApi,
        *,
        gate: LeaderGate | None = None,
        per_service: float = 5.0,
        rate: float = 10.0,
        burst: int = 20,
        rejoin_intervals: float = 3.0,
        conflict_retries: int = 5,
    ) -> None:
        self._api = Fenced(api, gate)
        self._gate = gate
        self._rejoin_intervals = rejoin_intervals
        self._conflict_retries = conflict_retries
        self._hysteresis = HotSetHysteresis()
        self._inputs: tuple[tuple[PolicyResolution, ...], Mapping[WorkloadKey, WeighResult]] = (
            (),
            {},
        )
        self._wakeup: float | None = None
        self._wake = asyncio.Event()
        self._needs_cleanup = gate is None
        self.reconciler: Reconciler[ServiceKey, DesiredService] = Reconciler(
            "services",
            self._write,
            limiter=RateLimiter(per_key=per_service, rate=rate, burst=burst),
            gate=gate,
        )

    def update(
        self,
        resolutions: Iterable[PolicyResolution],
        weights: Mapping[WorkloadKey, WeighResult],
        now: float,
    ) -> None:
        """Every resolution, the latest weights by workload, and the loop time ``now``."""
        self._inputs = (tuple(resolutions), dict(weights))
        self._evaluate(now)

    def _evaluate(self, now: float) -> None:
        resolutions, weights = self._inputs
        desired: dict[ServiceKey, DesiredService] = {}
        wakeup: float | None = None
        for r in resolutions:
            policy, key = r.policy, r.key
            if policy is None or key is None or not policy.publish_service or not r.serving:
                continue
            result = weights.get(key)
            hot = result.hot if result is not None else frozenset()
            listed, at = self._hysteresis.listed(
                ServiceKey(r.ref.namespace, service_name(policy.target_ref.name)),
                (e.address for e in r.endpoints),
                hot,
                hot_quantile=policy.weigher.hot_quantile,
                now=now,
                rejoin_after=max(1.0, self._rejoin_intervals * policy.ping_interval.seconds),
            )
            service = desired_service(r, listed)
            assert service is not None
            desired[service.key] = service
            if at is not None:
                wakeup = at if wakeup is None else min(wakeup, at)
        self._hysteresis.forget(desired)
        self._wakeup = wakeup
        self.reconciler.sync(desired, absent="remove")
        self._wake.set()

    def leadership(self, leading: bool) -> None:
        self.reconciler.leadership(leading)
        if leading:
            self._needs_cleanup = True
            self._wake.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.reconciler.run(), name="services")
            tg.create_task(self._timers(), name="service rejoin timer")

    async def _timers(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._needs_cleanup and (self._gate is None or self._gate.is_leader()):
                try:
                    await self.cleanup()
                    self._needs_cleanup = False
                except KubeError as exc:
                    log.warning("cannot list Aviator's Services, will retry", error=str(exc))
            self._wake.clear()
            timeout = None if self._wakeup is None else max(0.0, self._wakeup - loop.time())
            if self._needs_cleanup:
                timeout = 5.0 if timeout is None else min(timeout, 5.0)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            if self._wakeup is not None and loop.time() >= self._wakeup:
                self._evaluate(loop.time())

    async def cleanup(self) -> int:
        """Delete Aviator's Services that no policy wants; returns how many."""
        selector = f"{MANAGED_BY[0]}={MANAGED_BY[1]}"
        listed = await self._api.get(path("services"), query={"labelSelector": selector})
        stale = 0
        for item in listed.get("items", []):
            meta = item.get("metadata") or {}
            key = ServiceKey(str(meta.get("namespace", "")), str(meta.get("name", "")))
            if key not in self.reconciler:
                self.reconciler.set(key, None)
                stale += 1
        return stale

    # -- writing -----------------------------------------------------------------------------

    async def _write(self, key: ServiceKey, desired: DesiredService | None) -> None:
        for _ in range(self._conflict_retries + 1):
            try:
                if desired is None:
                    await self._delete(key)
                else:
                    await self._apply(desired)
                return
            except ConflictError:
                continue
        raise ConflictError("PUT", str(key), 409, "Conflict", "still conflicting after retries")

    async def _delete(self, key: ServiceKey) -> None:
        for resource in ("endpoints", "services"):
            url = path(resource, key.name, namespace=key.namespace)
            try:
                current = await self._api.get(url)
            except NotFoundError:
                continue
            if not owned_by(current):
                continue  # not ours: never delete it
            with contextlib.suppress(NotFoundError):
                await self._api.delete(url)
        log.info("hot-avoiding Service deleted", service=str(key))

    async def _apply(self, desired: DesiredService) -> None:
        key = desired.key
        changed = await self._put(
            path("services", key.name, namespace=key.namespace),
            path("services", namespace=key.namespace),
            desired.service_body(),
            desired,
            fields=("spec.ports",),
        )
        changed |= await self._put(
            path("endpoints", key.name, namespace=key.namespace),
            path("endpoints", namespace=key.namespace),
            desired.endpoints_body(),
            desired,
            fields=("subsets",),
        )
        if changed:
            log.info(
                "hot-avoiding Service written",
                service=str(key),
                listed=len(desired.endpoints),
                left_out=list(desired.left_out),
            )

    async def _put(
        self,
        url: str,
        collection: str,
        body: dict[str, Any],
        desired: DesiredService,
        *,
        fields: tuple[str, ...],
    ) -> bool:
        """Create ``body`` or bring the existing object to it; True if a write was made."""
        try:
            current: dict[str, Any] = await self._api.get(url)
        except NotFoundError:
            await self._api.create(collection, body)
            return True
        if not owned_by(current, desired.policy_uid):
            kind = body["kind"]
            raise NotOursError(
                "PUT", url, None, "NotOurs",
                f"{kind} {desired.key} exists and is not Aviator's (no label "
                f"{MANAGED_BY[0]}={MANAGED_BY[1]} owned by {desired.policy}): not touching it;"
                " delete or rename it, or turn spec.publishService off",
            )  # fmt: skip
        wanted = dict(current)
        meta = dict(current.get("metadata") or {})
        for k in ("labels", "annotations"):  # ours merged into whatever else is there
            meta[k] = {**(meta.get(k) or {}), **body["metadata"][k]}
        if "ownerReferences" in body["metadata"]:
            meta["ownerReferences"] = body["metadata"]["ownerReferences"]
        wanted["metadata"] = meta
        if "spec" in body:
            spec = dict(current.get("spec") or {})
            spec.update(body["spec"])  # keeps clusterIP, sessionAffinity...: only ports are ours
            wanted["spec"] = spec
        if "subsets" in body:
            wanted["subsets"] = body["subsets"]
        if _same(current, wanted, fields):
            return False
        await self._api.replace(url, wanted)
        return True


def _same(current: Mapping[str, Any], wanted: Mapping[str, Any], fields: tuple[str, ...]) -> bool:
    """Equal in the metadata Aviator sets and in ``fields`` (the server fills defaults in,
    e.g. a Service port's targetPort type, so compare what Aviator asked for only)."""
    cm, wm = current.get("metadata") or {}, wanted.get("metadata") or {}
    for k in ("labels", "annotations", "ownerReferences"):
        if cm.get(k) != wm.get(k):
            return False
    for dotted in fields:
        a: Any = current
        b: Any = wanted
        for part in dotted.split("."):
            a = (a or {}).get(part)
            b = (b or {}).get(part)
        if _normal(a) != _normal(b):
            return False
    return True


def _normal(value: Any) -> Any:
    """Drop the defaults the API server adds to what Aviator writes, for comparison."""
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items() if v not in (None, [], {})}
    return value

"""Writes Aviator's annotations on the pods of opted-in policies (I/O; rules in
:mod:`.annotations`).

:meth:`PodAnnotator.update` takes every resolution, the last weights per workload and the
ranking latency per endpoint; pods whose desired annotations changed *materially* are
patched (a JSON merge patch of three annotations and one label; what is material:
:func:`~aviator.operator.annotations.settle`), each at most once per ``per_pod`` seconds
(30), all together at ``rate`` per second, by the leader only. Pods that
no longer should carry them (policy deleted, option turned off, pod left the endpoints) get
them removed. On gaining leadership the annotator lists the pods labelled
``aviator.io/annotated`` and removes what no policy wants any more (another leader, or none,
may have left them).

Needs RBAC to patch pods: ``deploy/overlays/annotations`` grants it; without it a 403 is
logged once and the policy keeps working (annotations are a by-product, never in the path).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping

import structlog

from aviator.k8s.resolve import PolicyResolution
from aviator.model import EndpointAddress, WorkloadKey
from aviator.operator.annotations import (
    MANAGED_LABEL,
    PodAnnotations,
    PodKey,
    desired_annotations,
    material,
    patch_body,
    settle,
)
from aviator.operator.elector import Fenced, LeaderGate
from aviator.operator.kube import (
    MERGE_PATCH,
    ForbiddenError,
    KubeApi,
    KubeError,
    NotFoundError,
    path,
)
from aviator.operator.ratelimit import RateLimiter
from aviator.operator.reconciler import Reconciler
from aviator.probing.weigher import WeighResult

__all__ = ["PodAnnotator"]

log = structlog.get_logger(__name__)


class PodAnnotator:
    """Pod annotations for opted-in policies, written by the leader on material change."""

    def __init__(
        self,
        api: KubeApi,
        *,
        gate: LeaderGate | None = None,
        per_pod: float = 30.0,
        refresh: float = 600.0,
        rate: float = 20.0,
        burst: int = 50,
    ) -> None:
        self._api = Fenced(api, gate)
        self._refresh = refresh
        self._checked: dict[PodKey, float] = {}  # when each pod was last compared finely
        self._gate = gate
        self._forbidden_logged = False
        self._needs_cleanup = gate is None
        self._wake = asyncio.Event()
        self.reconciler: Reconciler[PodKey, PodAnnotations] = Reconciler(
            "pod annotations",
            self._write,
            limiter=RateLimiter(per_key=per_pod, rate=rate, burst=burst),
            gate=gate,
            material=material,
            log_each_key=False,
        )

    def update(
        self,
        resolutions: Iterable[PolicyResolution],
        weights: Mapping[WorkloadKey, WeighResult],
        latency_s: Callable[[WorkloadKey, EndpointAddress], float | None],
        now: float,
    ) -> None:
        """Every resolution, the weights by workload, the ranking latency of each endpoint
        (None: not measured yet) and the loop time."""
        desired: dict[PodKey, PodAnnotations] = {}
        for r in resolutions:
            key = r.key
            if key is None or r.policy is None or not r.policy.annotate_pods:
                continue
            lat = {e.address: latency_s(key, e.address) for e in r.endpoints}
            desired.update(desired_annotations(r, weights.get(key), lat))
        for pod, want in desired.items():
            checked = self._checked.setdefault(pod, now)
            due = now - checked >= self._refresh
            if due:
                self._checked[pod] = now  # one fine comparison now; the next in `refresh`
            desired[pod] = settle(self.reconciler.written(pod), want, refresh_due=due)
        for pod in [p for p in self._checked if p not in desired]:
            del self._checked[pod]
        self.reconciler.sync(desired, absent="remove")

    def leadership(self, leading: bool) -> None:
        self.reconciler.leadership(leading)
        if leading:
            self._needs_cleanup = True
            self._wake.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.reconciler.run(), name="pod annotations")
            tg.create_task(self._cleanups(), name="pod annotation cleanup")

    async def _cleanups(self) -> None:
        while True:
            if self._needs_cleanup and (self._gate is None or self._gate.is_leader()):
                try:
                    await self.cleanup()
                    self._needs_cleanup = False
                except KubeError as exc:
                    log.warning("cannot list annotated pods, will retry", error=str(exc))
                    await asyncio.sleep(5.0)
                    continue
            self._wake.clear()
            await self._wake.wait()

    async def cleanup(self) -> int:
        """Remove Aviator's annotations from labelled pods that no policy wants annotated;
        returns how many were scheduled for removal."""
        listed = await self._api.get(path("pods"), query={"labelSelector": f"{MANAGED_LABEL}=true"})
        stale = 0
        for item in listed.get("items", []):
            meta = item.get("metadata") or {}
            key = PodKey(str(meta.get("namespace", "")), str(meta.get("name", "")))
            if key not in self.reconciler:
                self.reconciler.set(key, None)
                stale += 1
        if stale:
            log.info("removing stale pod annotations", pods=stale)
        return stale

    async def _write(self, key: PodKey, value: PodAnnotations | None) -> None:
        url = path("pods", key.name, namespace=key.namespace)
        try:
            await self._api.patch(url, patch_body(value), content_type=MERGE_PATCH)
        except NotFoundError:
            return  # the pod is gone, and its annotations with it
        except ForbiddenError:
            if not self._forbidden_logged:
                self._forbidden_logged = True
                log.error(
                    "not allowed to annotate pods: apply deploy/overlays/annotations (RBAC "
                    "to patch pods), or turn spec.annotatePods off",
                    pod=str(key),
                )
            raise

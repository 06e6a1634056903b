"""The Lease that elects the one replica that writes (I/O; decisions in :mod:`.election`).

Every replica runs a :class:`LeaderElector`; exactly one at a time sees :meth:`is_leader`
True, and only it writes status, Events, annotations and Services (the writers in this
package check it before every request, through :class:`Fenced`). Watching, probing and
serving xDS never depend on it.

Why not ``kubernetes.aio.leaderelection`` (kubernetes 37.0.2)? It does use Leases and it
keeps client-go's skew-tolerant "observed time" rule, but:

- a connection error (the API server restarting: ``aiohttp.ClientConnectorError``) is not
  the ``ApiException`` its lock catches, so it escapes ``run()`` and ends the election;
- its requests have no deadline (the client's default is 5 minutes): a leader stuck in a
  renewal on a half-open connection keeps running ``onstarted_leading`` long after its
  lease has passed to another replica, so two replicas write;
- it measures the renew deadline with ``time.time()`` (a wall-clock step shortens or
  stretches it) and stamps records with naive local time marked ``Z``;
- it ends after the first loss instead of standing again, exposes no "am I leader now?",
  and never releases the lease on a graceful stop (a rollout waits a full lease duration).

So this is a small elector following client-go's ``leaderelection.go`` instead: the same
three knobs (lease duration 15 s, renew deadline 10 s, retry period 2 s), the same decision
(:func:`~aviator.operator.election.decide`), leadership counted from the *start* of the last
successful renewal and dropped *at* the renew deadline by a timer (not when a hung request
returns), every request bounded by the time left, a release on :meth:`stop`, and candidacy
that continues after a loss.

Identity: ``POD_NAME`` (the Deployment sets it from the downward API), else the host name.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from aviator.operator.election import (
    Action,
    ElectionTiming,
    LeaseRecord,
    Observation,
    decide,
    released,
)
from aviator.operator.kube import ConflictError, KubeApi, KubeError, NotFoundError, path

__all__ = [
    "DEFAULT_LEASE_NAME",
    "Fenced",
    "LeaderElector",
    "LeaderGate",
    "NotLeaderError",
    "default_identity",
]

log = structlog.get_logger(__name__)

DEFAULT_LEASE_NAME = "aviator-leader"


def default_identity() -> str:
    """This replica's identity: ``$POD_NAME``, else the host name."""
    return os.environ.get("POD_NAME") or socket.gethostname()


class LeaderGate(Protocol):
    """What a writer asks before each write."""

    def is_leader(self) -> bool: ...


class NotLeaderError(Exception):
    """A write was refused because this replica does not (or no longer) lead."""


class LeaderElector:
    """Stands for leadership in Lease ``namespace/name`` as ``identity`` until cancelled.

    ``await run()`` in the control plane's TaskGroup; :meth:`stop` (or cancelling) releases
    the lease if held (unless ``release_on_stop`` is False: then it expires, as after a
    crash). :meth:`is_leader` is exact at every call: it turns False at the renew
    deadline even while a renewal request is still hanging. :meth:`subscribe` gets
    ``listener(True)`` on gaining and ``listener(False)`` on losing, synchronously, at the
    moment it happens (writers cancel their in-flight request there).
    """

    def __init__(
        self,
        api: KubeApi,
        *,
        namespace: str,
        name: str = DEFAULT_LEASE_NAME,
        identity: str | None = None,
        timing: ElectionTiming | None = None,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
        release_on_stop: bool = True,
    ) -> None:
        self._api = api
        self._release_on_stop = release_on_stop
        self.namespace = namespace
        self.name = name
        self.identity = identity or default_identity()
        self.timing = timing or ElectionTiming()
        self._wall = wall
        self._rng = rng or random.Random()
        self._observation: Observation | None = None
        self._lease: dict[str, Any] | None = None  # the Lease as last read or written
        self._valid_until = 0.0  # monotonic (loop) time until which we may act as leader
        self._leading = False
        self._timer: asyncio.TimerHandle | None = None
        self._listeners: list[Callable[[bool], None]] = []
        self._changed = asyncio.Event()
        self._stopping = asyncio.Event()
        self.transitions = 0  # how often this replica gained or lost leadership
        self._last_error: str | None = None

    # -- what writers use --------------------------------------------------------------

    def is_leader(self) -> bool:
        return self._leading and asyncio.get_running_loop().time() < self._valid_until

    @property
    def leader(self) -> str | None:
        """The holder this replica last saw (itself when leading), None if unheld/unknown."""
        if self.is_leader():
            return self.identity
        if self._observation is None:
            return None
        return self._observation.record.holder or None

    def subscribe(self, listener: Callable[[bool], None]) -> Callable[[], None]:
        """Call ``listener(leading)`` on every change; returns the unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def wait_for(self, leading: bool = True) -> None:
        """Return once :meth:`is_leader` is ``leading``."""
        while self.is_leader() is not leading:
            self._changed.clear()
            await self._changed.wait()

    # -- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Stand for leadership until :meth:`stop` or cancellation (then release)."""
        loop = asyncio.get_running_loop()
        log.info("standing for leadership", lease=f"{self.namespace}/{self.name}",
                 identity=self.identity)  # fmt: skip
        try:
            while not self._stopping.is_set():
                await self._attempt(loop)
                period = self.timing.retry_period
                if not self._leading:
                    period *= 1.0 + 0.2 * self._rng.random()  # candidates do not move in step
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(period):
                        await self._stopping.wait()
        finally:
            if self._release_on_stop:
                await asyncio.shield(self._release())
            else:
                self._set_leading(False, asyncio.get_running_loop(), "stopping (not releasing)")

    def stop(self) -> None:
        self._stopping.set()

    async def _attempt(self, loop: asyncio.AbstractEventLoop) -> None:
        deadline = self.timing.renew_deadline
        if self._leading:
            deadline = max(0.05, self._valid_until - loop.time())
        try:
            async with asyncio.timeout(deadline):
                await self._try_acquire_or_renew(loop)
            self._last_error = None
        except (KubeError, TimeoutError) as exc:
            text = str(exc) or "no answer within the renew deadline"
            if text != self._last_error:  # log each new kind of failure once
                log.warning("leader election: cannot read or write the lease", error=text,
                            leading=self.is_leader())  # fmt: skip
                self._last_error = text

    async def _try_acquire_or_renew(self, loop: asyncio.AbstractEventLoop) -> None:
        url = path("leases", self.name, namespace=self.namespace, group="coordination.k8s.io")
        try:
            lease: dict[str, Any] | None = await self._api.get(url)
        except NotFoundError:
            lease = None
        decision = decide(
            self.identity, lease, self._observation, self.timing, now=loop.time(),
            wall=self._wall(),
        )  # fmt: skip
        self._observation = decision.observation
        if decision.action is Action.WAIT:
            if self._leading:  # someone else holds it: we lost it while unable to renew
                self._set_leading(False, loop, "another replica holds the lease")
            return
        assert decision.record is not None
        started = loop.time()
        try:
            if decision.action is Action.CREATE:
                body = _lease_body(self.name, self.namespace, decision.record)
                written = await self._api.create(
                    path("leases", namespace=self.namespace, group="coordination.k8s.io"), body
                )
            else:
                assert lease is not None
                body = dict(lease)
                body["spec"] = {**(lease.get("spec") or {}), **decision.record.spec()}
                written = await self._api.replace(url, body)
        except ConflictError:
            return  # another candidate wrote first: read again next period
        self._lease = written
        rv = str((written.get("metadata") or {}).get("resourceVersion", ""))
        self._observation = Observation(decision.record, rv, loop.time())
        self._valid_until = started + self.timing.renew_deadline
        self._arm_timer(loop)
        if not self._leading:
            self._set_leading(True, loop, "acquired the lease")

    def _arm_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(self._valid_until, self._expire, loop)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if self._leading and loop.time() >= self._valid_until:
            self._set_leading(False, loop, "could not renew the lease within the renew deadline")

    def _set_leading(self, leading: bool, loop: asyncio.AbstractEventLoop, why: str) -> None:
        if leading == self._leading:
            return
        self._leading = leading
        if not leading:
            self._valid_until = 0.0
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        self.transitions += 1
        log.info("leadership gained" if leading else "leadership lost", identity=self.identity,
                 lease=f"{self.namespace}/{self.name}", why=why)  # fmt: skip
        self._changed.set()
        for listener in list(self._listeners):
            try:
                listener(leading)
            except Exception:
                log.exception("leadership listener failed")

    async def _release(self) -> None:
        """Step down (if leading) so the next leader need not wait a lease duration."""
        loop = asyncio.get_running_loop()
        if not self._leading:
            return
        lease = self._lease
        self._set_leading(False, loop, "stopping")
        if lease is None:
            return
        body = dict(lease)
        record = LeaseRecord.from_lease(lease)
        body["spec"] = {**(lease.get("spec") or {}), **released(record, self._wall()).spec()}
        url = path("leases", self.name, namespace=self.namespace, group="coordination.k8s.io")
        try:
            async with asyncio.timeout(1.0):
                await self._api.replace(url, body)
        except (KubeError, TimeoutError) as exc:
            log.info("could not release the lease; it expires on its own", error=str(exc))


def _lease_body(name: str, namespace: str, record: LeaseRecord) -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "aviator"},
        },
        "spec": record.spec(),
    }


class Fenced:
    """A :class:`KubeApi` whose writes go only while ``gate.is_leader()`` (reads always).

    Writers in this package hold one of these, so the check happens right before each
    request, not once per batch.
    """

    def __init__(self, api: KubeApi, gate: LeaderGate | None) -> None:
        self.api = api
        self.gate = gate

    def _check(self) -> None:
        if self.gate is not None and not self.gate.is_leader():
            raise NotLeaderError("this replica does not lead: not writing")

    async def get(self, url_path: str, *, query: dict[str, str] | None = None) -> Any:
        return await self.api.get(url_path, query=query)

    async def create(self, url_path: str, body: dict[str, Any]) -> Any:
        self._check()
        return await self.api.create(url_path, body)

    async def replace(self, url_path: str, body: dict[str, Any]) -> Any:
        self._check()
        return await self.api.replace(url_path, body)

    async def patch(self, url_path: str, body: dict[str, Any], *, content_type: str) -> Any:
        self._check()
        return await self.api.patch(url_path, body, content_type=content_type)

    async def delete(self, url_path: str) -> Any:
        self._check()
        return await self.api.delete(url_path)

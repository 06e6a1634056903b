"""Bring objects to a desired state: on change only, rate-limited, by the leader only (I/O).

Every writer in this package (status, pod annotations, Services) is a :class:`Reconciler`
with its own ``write(key, value)``: the control plane tells it what each object should be
(:meth:`Reconciler.set`, :meth:`Reconciler.sync`), as often as it likes; the reconciler
writes only what differs *materially* (``material(written, desired)``) from what it last
wrote, one object at a time, each at most once per the limiter's per-key interval and all
within its global rate, and only while the gate says this replica leads.

- Desired states that may be transient (``settle(value)`` > 0: a Programmed=Pending that
  the next ACK will undo) wait that long first; if the desire returns to what was written
  meanwhile, nothing is written at all.
- A failed write is retried with exponential back-off (per key); a permanent error (RBAC,
  validation) is logged once per distinct message and retried at the back-off's ceiling.
- Losing leadership cancels the write in flight at once (the gate's listener calls
  :meth:`leadership`); gaining it forgets what was written (another leader may have written
  since), so every desired object is written again if it differs on the server: each
  ``write`` reads the object first and does nothing when it already matches.
- ``value`` None means "this should not exist" (a Service to delete, annotations to remove);
  once written, the key is forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Hashable, Mapping
from typing import Any, Generic, Literal, TypeVar

import structlog

from aviator.operator.elector import LeaderGate, NotLeaderError
from aviator.operator.kube import KubeError
from aviator.operator.ratelimit import RateLimiter

__all__ = ["Reconciler"]

log = structlog.get_logger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _differs(a: object, b: object) -> bool:
    return a != b


def _no_settle(value: object) -> float:
    return 0.0


class Reconciler(Generic[K, V]):
    """Writes desired states through ``write``; see the module docstring."""

    def __init__(
        self,
        name: str,
        write: Callable[[K, V | None], Coroutine[Any, Any, None]],
        *,
        limiter: RateLimiter,
        gate: LeaderGate | None = None,
        material: Callable[[V | None, V | None], bool] = _differs,
        settle: Callable[[V | None], float] = _no_settle,
        backoff: tuple[float, float] = (1.0, 60.0),
        log_each_key: bool = True,
    ) -> None:
        self.name = name
        self._write = write
        self._limiter = limiter
        self._gate = gate
        self._material = material
        self._settle = settle
        self._backoff = backoff
        self._desired: dict[K, V | None] = {}
        self._written: dict[K, V | None] = {}
        self._dirty: dict[K, float] = {}  # key → since when it differs
        self._retry: dict[K, tuple[int, float]] = {}  # key → (failures, not before)
        self._wake = asyncio.Event()
        self._inflight: asyncio.Task[None] | None = None
        self._errors: dict[object, str] = {}  # last error logged, by key (or by kind)
        self._log_each_key = log_each_key
        self.writes = 0  # write attempts
        self.failures = 0

    # -- what the control plane calls ------------------------------------------------------

    def set(self, key: K, value: V | None) -> None:
        """``key`` should be ``value`` (None: should not exist)."""
        self._desired[key] = value
        if key in self._written and not self._material(self._written[key], value):
            self._dirty.pop(key, None)
            self._retry.pop(key, None)
            return
        if key not in self._dirty:
            self._dirty[key] = self._now()
            self._wake.set()

    def forget(self, key: K) -> None:
        """Stop caring about ``key`` (its object is gone): nothing written, nothing kept."""
        self._desired.pop(key, None)
        self._written.pop(key, None)
        self._dirty.pop(key, None)
        self._retry.pop(key, None)
        self._errors.pop(key, None)

    def sync(
        self, desired: Mapping[K, V], *, absent: Literal["forget", "remove"] = "forget"
    ) -> None:
        """Every key's desired value at once; keys known before but not in ``desired`` are
        forgotten (``absent="forget"``) or set to None (``"remove"``)."""
        for key in [k for k in self._desired if k not in desired]:
            if absent == "forget":
                self.forget(key)
            elif self._desired[key] is not None:
                self.set(key, None)
        for key, value in desired.items():
            self.set(key, value)

    def leadership(self, leading: bool) -> None:
        """The gate's listener: on loss cancel the write in flight; on gain rewrite all."""
        if leading:
            self._written.clear()
            self._retry.clear()
            now = self._now()
            for key in self._desired:
                self._dirty.setdefault(key, now)
        elif self._inflight is not None:
            self._inflight.cancel()
        self._wake.set()

    # -- views -------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._dirty)

    def written(self, key: K) -> V | None:
        return self._written.get(key)

    def desired(self, key: K) -> V | None:
        return self._desired.get(key)

    def keys(self) -> list[K]:
        return list(self._desired)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is tracked (desired, possibly as None)."""
        return key in self._desired

    # -- the loop ----------------------------------------------------------------------------

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _leading(self) -> bool:
        return self._gate is None or self._gate.is_leader()

    def _due(self, key: K, now: float) -> float:
        since = self._dirty[key]
        due = max(
            since + self._settle(self._desired.get(key)), self._limiter.next_allowed(key, now)
        )
        if key in self._retry:
            due = max(due, self._retry[key][1])
        return due

    async def run(self) -> None:
        """Write until cancelled."""
        try:
            while True:
                self._wake.clear()
                wait: float | None = None
                if self._dirty and self._leading():
                    now = self._now()
                    key, due = min(
                        ((k, self._due(k, now)) for k in self._dirty), key=lambda kd: kd[1]
                    )
                    if due <= now:
                        await self._write_one(key, now)
                        continue
                    wait = due - now
                elif self._dirty and self._gate is not None:
                    wait = 0.5  # a gate without a listener: look again soon
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
        finally:
            if self._inflight is not None:
                self._inflight.cancel()

    async def _write_one(self, key: K, now: float) -> None:
        value = self._desired.get(key)
        self._limiter.take(key, now)
        self.writes += 1
        task: asyncio.Task[None] = asyncio.create_task(
            self._write(key, value), name=f"{self.name} {key}"
        )
        self._inflight = task
        try:
            await asyncio.wait([task])
        finally:
            self._inflight = None
            if not task.done():
                task.cancel()
        if task.cancelled():
            return  # leadership lost mid-write: it stays dirty for the next leader term
        error = task.exception()
        if error is None:
            if self._log_each_key:
                self._errors.pop(key, None)
            self._retry.pop(key, None)
            if key not in self._desired:
                return  # forgotten while writing
            if value is None and self._desired.get(key) is None:
                self.forget(key)  # removed: nothing left to track
                return
            self._written[key] = value
            if not self._material(value, self._desired.get(key)):
                self._dirty.pop(key, None)
            return
        if isinstance(error, NotLeaderError):
            return
        if not isinstance(error, KubeError):
            raise error
        self.failures += 1
        failures = self._retry.get(key, (0, 0.0))[0] + 1
        low, high = self._backoff
        delay = high if not error.retryable else min(high, low * 2 ** (failures - 1))
        self._retry[key] = (failures, self._now() + delay)
        # One line per key and distinct error; or, for writers of many small objects (pods),
        # one per kind of error (a missing RBAC rule must not log a line per pod).
        slot: object = key if self._log_each_key else (type(error), error.status, error.reason)
        text = str(error) if self._log_each_key else f"{error.status} {error.reason}"
        if self._errors.get(slot) != text:
            self._errors[slot] = text
            log.warning(
                f"{self.name}: write failed, will retry",
                object=str(key),
                error=str(error),
                retry_in_s=round(delay, 1),
            )

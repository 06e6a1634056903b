"""A generic asyncio informer: one collection of the API server, listed then watched.

The contract is client-go's reflector (``tools/cache/reflector.go``), which every Kubernetes
controller relies on, in asyncio form (kopf's ``_cogs/clients/watching.py`` is the same loop):

1. **List**, paginated (``limit`` / ``continue``, :attr:`InformerOptions.page_size` per page),
   without a resourceVersion: a consistent read from etcd. If a continue token expires between
   pages (410: etcd compacted past the list's snapshot), the list starts over as one unpaginated
   request, as client-go's pager does (``FullListIfExpired``). The list *replaces* the cache:
   only real differences (by uid + resourceVersion) become changes, so a relist after a 410
   that finds nothing new emits nothing. :attr:`Informer.synced` turns true once the first list
   is in.
2. **Watch** from the list's resourceVersion with ``allowWatchBookmarks=true`` and a server-side
   ``timeoutSeconds`` drawn in ``[min_watch_timeout, 2 x min_watch_timeout)`` (client-go:
   5-10 min), so that many clients do not reconnect in step. ADDED / MODIFIED / DELETED apply to
   the cache; BOOKMARK only moves the resourceVersion forward (no event); a watch that the
   server ends at its timeout is reopened at once from the last resourceVersion.
3. **410 Gone** (an ERROR event, or the HTTP status when the watch opens): the resourceVersion
   has left the server's window (etcd compaction, a restarted API server whose watch cache
   starts at etcd's current revision). Relist at once and replace the cache; a second 410 in a
   row backs off first.
4. **Any other failure** (connection refused or reset, 5xx, 429, 403 while RBAC is being fixed,
   a malformed line): back off with jitter (:class:`Backoff`: exponential, capped, reset after a
   successful list or a watch that delivered something), then watch again from the last
   resourceVersion (or list, if the first list never succeeded). The cache is never cleared by
   a failure: an API server that goes away leaves the last view in place. A watch that ends
   cleanly within :attr:`InformerOptions.short_watch` having delivered nothing counts as a
   failure too (client-go's "very short watch"), so a server that closes every watch at once is
   not hammered.
5. **Watchdog**: a watch that has been silent for longer than its own ``timeoutSeconds`` plus
   :attr:`InformerOptions.watchdog_margin` (no answer to the request, or no line since the
   last one) is dead (a half-open TCP connection, a stuck proxy: the server would have ended
   it by then) and is dropped and reopened. The whole request
   also has an aiohttp timeout one margin later, for a stream that trickles but never ends.

Objects are read as raw JSON (a GET through the ``kubernetes.aio`` ApiClient, unread by it: the
client's model classes are slow to build and drop fields they do not know), then passed
through a *transform* that keeps only what the caller needs; the cache holds the transformed
value, the object's uid and resourceVersion, and nothing else of the raw dict. An object
whose uid and resourceVersion are unchanged is not transformed again (a relist of 10,000
unchanged pods parses none of them). List items of built-in kinds come without ``apiVersion``
and ``kind``; the informer fills them in from :class:`Resource`, so the transform sees list
items and watch objects alike.

The pure parts (:class:`Backoff`, :func:`watch_timeout`, :class:`ObjectCache`,
:func:`parse_watch_event`) read no clock; the :class:`Informer` takes its randomness and its
sleep as arguments, and its timeouts run on the event loop's clock (fake in tests).
"""

from __future__ import annotations

import asyncio
import enum
import json
import random
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

import aiohttp
import structlog

__all__ = [
    "ApiConnectionError",
    "ApiError",
    "Backoff",
    "Change",
    "ChangeType",
    "ExpiredError",
    "Informer",
    "InformerError",
    "InformerOptions",
    "InformerStats",
    "Key",
    "MalformedResponseError",
    "ObjectCache",
    "Query",
    "Resource",
    "WatchEvent",
    "WatchStalledError",
    "identity_of",
    "parse_watch_event",
    "read_line",
    "watch_timeout",
]

T = TypeVar("T")
Key = tuple[str, str]  # (namespace, name); the namespace is "" for cluster-scoped objects

_MAX_ERROR_BODY: Final = 64 * 1024  # bytes of an error response read for its Status message


# --- errors ---------------------------------------------------------------------------------


class InformerError(Exception):
    """Listing or watching failed; the informer backs off and retries (never fatal)."""


class ApiError(InformerError):
    """The API server answered with an error ``Status`` (an HTTP status or an ERROR event)."""

    def __init__(self, status: int, reason: str = "", message: str = "") -> None:
        self.status = status
        self.reason = reason
        self.message = message
        text = f"{status} {reason}".strip()
        super().__init__(f"{text}: {message}" if message else text)


class ExpiredError(ApiError):
    """410 Gone: the resourceVersion (or continue token) is older than the server keeps."""


class ApiConnectionError(InformerError):
    """The request did not get an answer (refused, reset, TLS, a client-side timeout)."""


class WatchStalledError(InformerError):
    """The watch was silent for longer than its timeout plus the watchdog margin."""


class MalformedResponseError(InformerError):
    """A response or watch line that is not what the API promises."""


def api_error(status: int, body: bytes) -> ApiError:
    """The error an HTTP status and its body (a ``Status`` object, usually) stand for."""
    reason, message = "", ""
    try:
        doc = json.loads(body)
    except ValueError:
        message = body[:200].decode("utf-8", "replace").strip()
    else:
        if isinstance(doc, Mapping):
            reason = str(doc.get("reason") or "")
            message = str(doc.get("message") or "")
    cls = ExpiredError if status == 410 else ApiError
    return cls(status, reason, message)


# --- pure helpers ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential back-off with jitter: the wait after the n-th failure in a row is
    ``min(cap, initial x factor^(n-1)) x (1 + jitter x r)`` for ``r`` in ``[0, 1)``.

    So it never exceeds ``cap x (1 + jitter)``, and jitter keeps clients that failed together
    (an API server restart) from retrying together. client-go's reflector uses 0.8 s doubling
    to 30 s; a control plane that must catch up after an API server restart wants a lower cap.
    """

    initial: float = 0.5
    factor: float = 2.0
    cap: float = 10.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.cap:
            raise ValueError(f"need 0 < initial <= cap, got {self.initial} and {self.cap}")
        if self.factor < 1:
            raise ValueError(f"factor must be >= 1, got {self.factor}")
        if self.jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {self.jitter}")

    def delay(self, failures: int, rand: float) -> float:
        """Seconds to wait after ``failures`` (>= 1) consecutive failures; ``rand`` in [0, 1)."""
        if failures < 1:
            raise ValueError(f"failures must be >= 1, got {failures}")
        exponent = min(failures - 1, 64)  # the cap is reached long before; no float overflow
        base = min(self.cap, self.initial * self.factor**exponent)
        return base * (1.0 + self.jitter * rand)


def watch_timeout(min_timeout: float, rand: float) -> int:
    """The server-side ``timeoutSeconds`` of one watch: ``min_timeout x (1 + rand)``, as
    client-go draws it (``minWatchTimeout x (rand + 1)``), at least 1 s."""
    return max(1, int(min_timeout * (1.0 + rand)))


class ChangeType(enum.StrEnum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


@dataclass(frozen=True, slots=True)
class Change:
    """One object that changed in an informer's cache."""

    type: ChangeType
    key: Key


@dataclass(frozen=True, slots=True)
class Identity:
    """What tells two versions of an object apart: its key, uid and resourceVersion."""

    key: Key
    uid: str
    resource_version: str


def identity_of(obj: Mapping[str, Any]) -> Identity:
    """The identity of an API object; :class:`MalformedResponseError` if it has no name."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
        raise MalformedResponseError(f"an object without metadata.name: {str(obj)[:200]}")
    namespace = meta.get("namespace")
    return Identity(
        (namespace if isinstance(namespace, str) else "", meta["name"]),
        str(meta.get("uid") or ""),
        str(meta.get("resourceVersion") or ""),
    )


@dataclass(frozen=True, slots=True)
class _Entry(Generic[T]):
    uid: str
    resource_version: str
    value: T


class ObjectCache(Generic[T]):
    """Transformed objects by key, with the uid and resourceVersion they were made from.

    Pure (no I/O, no clock). Every mutator returns the changes it made, and only real ones:
    an object whose uid and resourceVersion are those already held is no change (and is not
    transformed again).
    """

    def __init__(self, transform: Callable[[Mapping[str, Any]], T]) -> None:
        self._transform = transform
        self._entries: dict[Key, _Entry[T]] = {}
        self._peak = 0  # the most entries held since the dict was last (re)built

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def keys(self) -> Iterator[Key]:
        return iter(self._entries)

    def values(self) -> Iterator[T]:
        return (e.value for e in self._entries.values())

    def get(self, key: Key) -> T | None:
        entry = self._entries.get(key)
        return entry.value if entry is not None else None

    def entry_for(self, obj: Mapping[str, Any]) -> tuple[Key, _Entry[T]]:
        """The entry ``obj`` would have: the one held if uid and resourceVersion match, else a
        fresh one from the transform. Does not change the cache (see :meth:`replace`)."""
        ident = identity_of(obj)
        old = self._entries.get(ident.key)
        if (
            old is not None
            and old.uid == ident.uid
            and old.resource_version == ident.resource_version
        ):
            return ident.key, old
        return ident.key, _Entry(ident.uid, ident.resource_version, self._transform(obj))

    def replace(self, entries: Mapping[Key, _Entry[T]]) -> list[Change]:
        """Make ``entries`` (from :meth:`entry_for`, e.g. one whole list) the whole cache;
        the added, modified and deleted keys, sorted by key."""
        old = self._entries
        changes: list[Change] = []
        for key in sorted(old.keys() | entries.keys()):
            before, after = old.get(key), entries.get(key)
            if before is None:
                changes.append(Change(ChangeType.ADDED, key))
            elif after is None:
                changes.append(Change(ChangeType.DELETED, key))
            elif (before.uid, before.resource_version) != (after.uid, after.resource_version):
                changes.append(Change(ChangeType.MODIFIED, key))
        self._entries = dict(entries)
        self._peak = len(self._entries)
        return changes

    def upsert(self, obj: Mapping[str, Any]) -> Change | None:
        """Apply an ADDED or MODIFIED event; the change, or None if ``obj`` is already held."""
        key, entry = self.entry_for(obj)
        old = self._entries.get(key)
        if old is entry:
            return None
        self._entries[key] = entry
        self._peak = max(self._peak, len(self._entries))
        return Change(ChangeType.ADDED if old is None else ChangeType.MODIFIED, key)

    def delete(self, obj: Mapping[str, Any]) -> Change | None:
        """Apply a DELETED event; the change, or None if the key was not held."""
        key = identity_of(obj).key
        if self._entries.pop(key, None) is None:
            return None
        if len(self._entries) <= self._peak // 4:
            # A dict never shrinks its table when keys are removed: after 10,000 pods came
            # and went one DELETED event at a time, the empty cache still held ~600 KB
            # (issue 14's churn). A copy is sized for what is left; amortised O(1).
            self._entries = dict(self._entries)
            self._peak = len(self._entries)
        return Change(ChangeType.DELETED, key)


class WatchEventType(enum.StrEnum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"
    BOOKMARK = "BOOKMARK"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One line of a watch stream: its type, the object, and the object's resourceVersion."""

    type: WatchEventType
    object: Mapping[str, Any]
    resource_version: str


def parse_watch_event(line: bytes) -> WatchEvent:
    """Parse one watch line (``{"type": ..., "object": ...}``).

    An ERROR event raises the :class:`ApiError` its ``Status`` object stands for
    (:class:`ExpiredError` for 410); anything malformed raises :class:`MalformedResponseError`.
    """
    try:
        doc = json.loads(line)
    except ValueError as exc:
        raise MalformedResponseError(f"a watch line is not JSON: {line[:200]!r}") from exc
    if not isinstance(doc, Mapping) or not isinstance(doc.get("object"), Mapping):
        raise MalformedResponseError(f"a watch line without an object: {line[:200]!r}")
    obj: Mapping[str, Any] = doc["object"]
    kind = doc.get("type")
    if kind == "ERROR":
        code = obj.get("code")
        status = code if isinstance(code, int) else 500
        cls = ExpiredError if status == 410 else ApiError
        raise cls(status, str(obj.get("reason") or ""), str(obj.get("message") or ""))
    try:
        event_type = WatchEventType(str(kind))
    except ValueError:
        raise MalformedResponseError(f"unknown watch event type {kind!r}") from None
    meta = obj.get("metadata")
    rv = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
    if not isinstance(rv, str) or not rv:
        raise MalformedResponseError(f"a {event_type} event without metadata.resourceVersion")
    return WatchEvent(event_type, obj, rv)


async def read_line(readline: Callable[[], Awaitable[bytes]], silence: float) -> bytes:
    """The next line from ``readline``, or :class:`WatchStalledError` if none comes within
    ``silence`` seconds of loop time (the watchdog; b"" is the end of the stream)."""
    try:
        async with asyncio.timeout(silence):
            return await readline()
    except TimeoutError:
        raise WatchStalledError(f"no watch event or end for {silence:g} s") from None


# --- the informer ---------------------------------------------------------------------------

Query = Mapping[str, str | int | bool]
ListCall = Callable[[Query, float], Awaitable[aiohttp.ClientResponse]]


@dataclass(frozen=True, slots=True)
class Resource:
    """One collection to list and watch.

    ``path`` is the collection's API path (``/api/v1/namespaces/shop/pods``); ``call(query,
    request_timeout)`` sends ``GET path?query`` and returns the response unread (the source
    uses :func:`~aviator.source.kubernetes.source.collection_call`, through a
    ``kubernetes.aio`` ApiClient). ``query`` holds the list and watch parameters by their API
    names: ``limit``, ``continue``, ``watch``, ``resourceVersion``, ``allowWatchBookmarks``,
    ``timeoutSeconds``.
    """

    path: str
    api_version: str
    kind: str
    call: ListCall = field(compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class InformerOptions:
    """Knobs, in seconds; the defaults are client-go's where it has one."""

    page_size: int = 500  # client-go's pager default
    min_watch_timeout: float = 300.0  # each watch asks for [this, 2 x this) (client-go: 5 min)
    watchdog_margin: float = 30.0  # silence beyond a watch's own timeout that marks it dead
    list_timeout: float = 60.0  # one page of a list
    short_watch: float = 1.0  # a clean end this soon with nothing received is a failure
    backoff: Backoff = field(default_factory=Backoff)

    def __post_init__(self) -> None:
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        for name in ("min_watch_timeout", "list_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("watchdog_margin", "short_watch"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(slots=True)
class InformerStats:
    """Counters, for tests, logs and metrics."""

    lists: int = 0  # complete lists (the first one and every relist)
    full_lists: int = 0  # lists restarted unpaginated after a continue token expired
    watches: int = 0  # watch requests opened
    expired: int = 0  # 410s that forced a relist
    stalled: int = 0  # watches the watchdog dropped
    failures: int = 0  # failed requests (each followed by a back-off)
    events: int = 0  # ADDED / MODIFIED / DELETED events applied
    bookmarks: int = 0


ChangeListener = Callable[[Sequence[Change]], None]


class Informer(Generic[T]):
    """Keeps an :class:`ObjectCache` of one :class:`Resource` in step with the API server.

    ``await run()`` lists and watches until cancelled and never raises for an API failure
    (it logs a warning, backs off and retries; see the module docstring). ``on_change`` is
    called after the first list (even when it found nothing, so that "synced" is seen) and
    after every list or event that changed the cache, with the changes.
    """

    def __init__(
        self,
        resource: Resource,
        transform: Callable[[Mapping[str, Any]], T],
        *,
        options: InformerOptions | None = None,
        on_change: ChangeListener | None = None,
        rand: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.resource = resource
        self.options = options or InformerOptions()
        self.cache: ObjectCache[T] = ObjectCache(transform)
        self.stats = InformerStats()
        self._on_change = on_change
        self._rand = rand
        self._sleep = sleep
        self._resource_version = ""
        self._synced = False
        self._watching = False
        self._failures = 0  # consecutive, for the back-off
        self._expired_in_a_row = 0  # 410s with no watch event between them

    def _healthy(self) -> None:
        self._failures = 0
        self._expired_in_a_row = 0

    @property
    def synced(self) -> bool:
        """True once the first list has been applied (and forever after)."""
        return self._synced

    @property
    def watching(self) -> bool:
        """True while a watch stream is open (the server answered it)."""
        return self._watching

    @property
    def resource_version(self) -> str:
        """Where the next watch starts: the last list's, event's or bookmark's version."""
        return self._resource_version

    def values(self) -> Iterator[T]:
        return self.cache.values()

    def __len__(self) -> int:
        return len(self.cache)

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """List, then watch, forever (until cancelled)."""
        loop = asyncio.get_running_loop()
        need_list = True
        while True:
            try:
                if need_list:
                    await self._list()
                    need_list = False
                    self._failures = 0
                started = loop.time()
                received = await self._watch()
                if not received and loop.time() - started < self.options.short_watch:
                    raise InformerError("the watch ended at once with nothing received")
                # A watch that ran its course: the server is healthy again.
                self._healthy()
            except ExpiredError as exc:
                # The resourceVersion left the server's window: only a fresh list helps.
                self.stats.expired += 1
                need_list = True
                self._expired_in_a_row += 1
                _log().info(
                    "k8s.informer.relist",
                    resource=self.resource.path,
                    resource_version=self._resource_version,
                    reason=str(exc),
                )
                if self._expired_in_a_row > 1:
                    await self._back_off(exc)
            except InformerError as exc:
                await self._back_off(exc)

    async def _back_off(self, exc: InformerError) -> None:
        self.stats.failures += 1
        self._failures += 1
        delay = self.options.backoff.delay(self._failures, self._rand())
        error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ApiError) and exc.status == 404:
            error += f" ({self.resource.kind} is not served here: is its CRD installed?)"
        elif isinstance(exc, ApiError) and exc.status in (401, 403):
            error += " (check the credentials and the RBAC rules of this ServiceAccount)"
        # A warning, not a traceback: an API server restarting is an everyday event.
        _log().warning(
            "k8s.informer.retry",
            resource=self.resource.path,
            error=error,
            failures=self._failures,
            retry_in=round(delay, 3),
        )
        await self._sleep(delay)

    # -- list ------------------------------------------------------------------------------

    async def _list(self) -> None:
        entries: dict[Key, _Entry[T]] = {}
        continue_token: str | None = None
        limit: int | None = self.options.page_size
        resource_version = ""
        while True:
            params: dict[str, str | int | bool] = {}
            if limit is not None:
                params["limit"] = limit
            if continue_token:
                params["continue"] = continue_token
            try:
                page = await self._get_json(params)
            except ExpiredError:
                if not continue_token:
                    raise
                # etcd compacted past the list's snapshot between two pages: a consistent
                # list is only to be had by starting over, in one request (client-go's pager).
                self.stats.full_lists += 1
                _log().info("k8s.informer.list_expired", resource=self.resource.path)
                entries, continue_token, limit = {}, None, None
                continue
            meta = page.get("metadata")
            items = page.get("items")
            if not isinstance(meta, Mapping) or not isinstance(items, list):
                raise MalformedResponseError(f"a list of {self.resource.path} without items")
            for item in items:
                if not isinstance(item, dict):
                    raise MalformedResponseError(
                        f"a list item that is not an object: {item!r:.100}"
                    )
                self._complete(item)
                key, entry = self.cache.entry_for(item)
                entries[key] = entry
            del items, page  # the raw page is not kept past this point
            resource_version = str(meta.get("resourceVersion") or "")
            continue_token = str(meta.get("continue") or "") or None
            if continue_token is None:
                break
        if not resource_version:
            raise MalformedResponseError(
                f"a list of {self.resource.path} without a resourceVersion"
            )
        changes = self.cache.replace(entries)
        self._resource_version = resource_version
        first = not self._synced
        self._synced = True
        self.stats.lists += 1
        _log().info(
            "k8s.informer.listed",
            resource=self.resource.path,
            objects=len(self.cache),
            changes=len(changes),
            resource_version=resource_version,
        )
        if changes or first:
            self._notify(changes)

    def _complete(self, obj: dict[str, Any]) -> None:
        # Items of a built-in kind's list carry no apiVersion/kind (custom objects do).
        obj.setdefault("apiVersion", self.resource.api_version)
        obj.setdefault("kind", self.resource.kind)

    async def _get_json(self, params: Query) -> Mapping[str, Any]:
        resp = await self._request(params, request_timeout=self.options.list_timeout)
        try:
            body = await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            _abort(resp)
            raise ApiConnectionError(f"{self.resource.path}: {exc or type(exc).__name__}") from exc
        except BaseException:
            _abort(resp)
            raise
        resp.release()  # read to the end: the connection goes back to the pool
        if resp.status != 200:
            raise api_error(resp.status, body)
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise MalformedResponseError(f"a list of {self.resource.path} is not JSON") from exc
        if not isinstance(doc, Mapping):
            raise MalformedResponseError(f"a list of {self.resource.path} is not an object")
        return doc

    async def _request(self, params: Query, *, request_timeout: float) -> aiohttp.ClientResponse:
        try:
            return await self.resource.call(params, float(request_timeout))
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise ApiConnectionError(f"{self.resource.path}: {exc or type(exc).__name__}") from exc

    # -- watch -----------------------------------------------------------------------------

    async def _watch(self) -> bool:
        """One watch, until the server ends it; whether it delivered any event or bookmark."""
        timeout = watch_timeout(self.options.min_watch_timeout, self._rand())
        silence = timeout + self.options.watchdog_margin
        self.stats.watches += 1
        try:
            # The watchdog covers the wait for the answer too: a request sent on a pooled
            # connection whose peer has gone silent is answered never.
            async with asyncio.timeout(silence):
                resp = await self._request(
                    {
                        "watch": True,
                        "resourceVersion": self._resource_version,
                        "allowWatchBookmarks": True,
                        "timeoutSeconds": timeout,
                    },
                    # A backstop one margin beyond the watchdog, for a stream that trickles
                    # forever.
                    request_timeout=silence + self.options.watchdog_margin,
                )
        except TimeoutError:
            self.stats.stalled += 1
            raise WatchStalledError(f"no answer to the watch request for {silence:g} s") from None
        received = ended = False
        try:
            if resp.status != 200:
                body = await _read_some(resp)
                raise api_error(resp.status, body)
            self._watching = True
            while True:
                try:
                    line = await read_line(resp.content.readline, silence)
                except WatchStalledError:
                    self.stats.stalled += 1
                    raise
                except (aiohttp.ClientError, OSError) as exc:
                    raise ApiConnectionError(
                        f"watch of {self.resource.path}: {exc or type(exc).__name__}"
                    ) from exc
                except ValueError as exc:  # aiohttp: a line beyond its buffer limit
                    raise MalformedResponseError(f"watch of {self.resource.path}: {exc}") from exc
                if not line:
                    ended = True
                    return received  # the server ended the watch (its timeout)
                if not line.strip():
                    continue
                self._apply(parse_watch_event(line))
                received = True
        finally:
            self._watching = False
            if ended:
                resp.release()  # the stream was read to its end: the connection is reusable
            else:
                _abort(resp)

    def _apply(self, event: WatchEvent) -> None:
        self._healthy()  # the watch delivers: back-off starts from scratch next time
        if event.type is WatchEventType.BOOKMARK:
            self.stats.bookmarks += 1
            self._resource_version = event.resource_version
            return
        obj = dict(event.object)
        self._complete(obj)
        if event.type is WatchEventType.DELETED:
            change = self.cache.delete(obj)
        else:
            change = self.cache.upsert(obj)
        self.stats.events += 1
        self._resource_version = event.resource_version
        if change is not None:
            self._notify((change,))

    def _notify(self, changes: Sequence[Change]) -> None:
        if self._on_change is not None:
            self._on_change(changes)


def _abort(resp: aiohttp.ClientResponse) -> None:
    """Drop the response's connection at once. A graceful close would start a TLS shutdown
    that waits for the peer, which a dead or frozen peer never answers (its socket would
    outlive the event loop); the server sees a reset, which is what a dropped watch is."""
    connection = resp.connection
    if connection is not None and connection.protocol is not None:
        connection.protocol.abort()
    resp.close()


async def _read_some(resp: aiohttp.ClientResponse) -> bytes:
    try:
        return await resp.content.read(_MAX_ERROR_BODY)
    except (aiohttp.ClientError, OSError, TimeoutError):
        return b""


def _log() -> Any:
    # A fresh logger each time: a module-level one caches its configuration on first use.
    return structlog.get_logger(__name__)

"""The informer's pure parts: back-off schedule, watch timeouts, the cache's diffing, watch
line parsing, and the watchdog on fake loop time (looptime). The informer against the real
API server is in tests/integration/kubeapi/test_source.py."""

from __future__ import annotations

import asyncio
import errno
import json
import sys
from collections.abc import Mapping
from typing import Any

import pytest

from aviator.source.kubernetes.informer import (
    ApiError,
    Backoff,
    Change,
    ChangeType,
    ExpiredError,
    Informer,
    InformerOptions,
    MalformedResponseError,
    ObjectCache,
    Resource,
    WatchEventType,
    WatchStalledError,
    api_error,
    parse_watch_event,
    read_line,
    watch_timeout,
)


def obj(name: str, rv: str, *, uid: str | None = None, namespace: str = "shop",
        **extra: Any) -> dict[str, Any]:  # fmt: skip
    meta = {"name": name, "namespace": namespace, "uid": uid or f"uid-{name}",
            "resourceVersion": rv}  # fmt: skip
    return {"metadata": meta, **extra}


# --- back-off and watch timeouts --------------------------------------------------------------


def test_backoff_doubles_from_initial_to_the_cap_and_jitter_only_adds() -> None:
    b = Backoff(initial=0.5, factor=2.0, cap=10.0, jitter=0.5)
    assert [b.delay(n, 0.0) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 10, 10, 10]
    assert [b.delay(n, 0.5) for n in range(1, 4)] == [0.625, 1.25, 2.5]
    # Never beyond cap x (1 + jitter), even after very many failures (no float overflow).
    assert b.delay(10_000, 0.999999) < 10.0 * 1.5


def test_backoff_rejects_nonsense() -> None:
    for kwargs in ({"initial": 0}, {"initial": 20, "cap": 10}, {"factor": 0.5}, {"jitter": -1}):
        with pytest.raises(ValueError):  # noqa: PT011 - each message names its own field
            Backoff(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="failures must be >= 1"):
        Backoff().delay(0, 0.0)


def test_watch_timeout_is_drawn_between_the_minimum_and_twice_it() -> None:
    assert watch_timeout(300, 0.0) == 300
    assert watch_timeout(300, 0.999) == 599
    assert watch_timeout(0.2, 0.0) == 1  # at least one second


# --- the cache --------------------------------------------------------------------------------


class CountingTransform:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, doc: Mapping[str, Any]) -> str:
        self.calls += 1
        return f"{doc['metadata']['name']}@{doc['metadata']['resourceVersion']}"


def _replace(cache: ObjectCache[str], *docs: dict[str, Any]) -> list[Change]:
    return cache.replace(dict(cache.entry_for(d) for d in docs))


def test_replace_emits_only_real_differences_and_does_not_transform_unchanged_objects() -> None:
    t = CountingTransform()
    cache: ObjectCache[str] = ObjectCache(t)
    first = _replace(cache, obj("a", "1"), obj("b", "1"), obj("c", "1"))
    assert [c.type for c in first] == [ChangeType.ADDED] * 3
    assert t.calls == 3

    # A relist that finds the same objects: no change, and nothing parsed again.
    assert _replace(cache, obj("c", "1"), obj("a", "1"), obj("b", "1")) == []
    assert t.calls == 3

    # b modified, c deleted, d added, a recreated under the same name (new uid).
    changes = _replace(cache, obj("a", "9", uid="new"), obj("b", "2"), obj("d", "3"))
    assert changes == [
        Change(ChangeType.MODIFIED, ("shop", "a")),
        Change(ChangeType.MODIFIED, ("shop", "b")),
        Change(ChangeType.DELETED, ("shop", "c")),
        Change(ChangeType.ADDED, ("shop", "d")),
    ]
    assert sorted(cache.values()) == ["a@9", "b@2", "d@3"]
    assert t.calls == 6


def test_events_change_the_cache_once() -> None:
    cache: ObjectCache[str] = ObjectCache(CountingTransform())
    assert cache.upsert(obj("a", "1")) == Change(ChangeType.ADDED, ("shop", "a"))
    assert cache.upsert(obj("a", "1")) is None  # the same version again
    assert cache.upsert(obj("a", "2")) == Change(ChangeType.MODIFIED, ("shop", "a"))
    assert cache.get(("shop", "a")) == "a@2"
    assert cache.delete(obj("a", "3")) == Change(ChangeType.DELETED, ("shop", "a"))
    assert cache.delete(obj("a", "3")) is None
    assert len(cache) == 0


def test_cluster_scoped_objects_have_an_empty_namespace_key() -> None:
    cache: ObjectCache[str] = ObjectCache(CountingTransform())
    doc = {"metadata": {"name": "n", "uid": "u", "resourceVersion": "1"}}
    assert cache.upsert(doc) == Change(ChangeType.ADDED, ("", "n"))


def test_an_object_without_a_name_is_a_malformed_response() -> None:
    cache: ObjectCache[str] = ObjectCache(CountingTransform())
    with pytest.raises(MalformedResponseError, match=r"metadata\.name"):
        cache.upsert({"metadata": {}})


# --- watch lines ------------------------------------------------------------------------------


def line(doc: Any) -> bytes:
    return json.dumps(doc).encode() + b"\n"


def test_parse_watch_event_types_and_resource_versions() -> None:
    added = parse_watch_event(line({"type": "ADDED", "object": obj("a", "7")}))
    assert (added.type, added.resource_version) == (WatchEventType.ADDED, "7")
    bookmark = parse_watch_event(
        line({"type": "BOOKMARK", "object": {"kind": "Pod", "metadata": {"resourceVersion": "9"}}})
    )
    assert (bookmark.type, bookmark.resource_version) == (WatchEventType.BOOKMARK, "9")


def test_an_error_event_raises_its_status_and_410_is_expired() -> None:
    gone = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}
    with pytest.raises(ExpiredError) as exc:
        parse_watch_event(line({"type": "ERROR", "object": gone}))
    assert (exc.value.status, exc.value.reason, exc.value.message) == (410, "Expired", "too old")
    with pytest.raises(ApiError) as other:
        parse_watch_event(line({"type": "ERROR", "object": {"code": 500, "message": "boom"}}))
    assert not isinstance(other.value, ExpiredError)
    assert other.value.status == 500


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (b"not json\n", "not JSON"),
        (line({"type": "ADDED"}), "without an object"),
        (line({"type": "SOMETHING", "object": obj("a", "1")}), "unknown watch event type"),
        (line({"type": "ADDED", "object": {"metadata": {"name": "a"}}}), "resourceVersion"),
    ],
)
def test_malformed_watch_lines(text: bytes, match: str) -> None:
    with pytest.raises(MalformedResponseError, match=match):
        parse_watch_event(text)


def test_http_errors_become_api_errors_with_the_status_message() -> None:
    body = json.dumps({"kind": "Status", "reason": "Forbidden", "message": "pods is forbidden"})
    err = api_error(403, body.encode())
    assert (err.status, err.reason, str(err)) == (
        403,
        "Forbidden",
        "403 Forbidden: pods is forbidden",
    )
    assert isinstance(api_error(410, b"{}"), ExpiredError)
    assert api_error(502, b"<html>bad gateway</html>").message == "<html>bad gateway</html>"


# --- the watchdog, on fake time -------------------------------------------------------------


@pytest.mark.looptime
async def test_the_watchdog_drops_a_watch_silent_for_its_bound() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def silent() -> bytes:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    with pytest.raises(WatchStalledError, match="no watch event or end for 330 s"):
        await read_line(silent, 330.0)
    assert loop.time() - start == pytest.approx(330.0)


@pytest.mark.looptime
async def test_the_watchdog_lets_a_slow_but_living_watch_be() -> None:
    async def slow() -> bytes:
        await asyncio.sleep(329.0)
        return b'{"type": "BOOKMARK"}\n'

    assert await read_line(slow, 330.0) == b'{"type": "BOOKMARK"}\n'


# --- the loop's back-off, against a server that refuses connections -------------------------


async def test_failures_back_off_on_the_schedule_with_the_injected_jitter() -> None:
    async def refused(query: Any, request_timeout: float) -> Any:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)
        if len(delays) == 6:
            raise asyncio.CancelledError

    informer: Informer[str] = Informer(
        Resource("/api/v1/pods", "v1", "Pod", refused),
        CountingTransform(),
        options=InformerOptions(backoff=Backoff(initial=1.0, factor=2.0, cap=8.0, jitter=0.5)),
        rand=lambda: 0.5,
        sleep=sleep,
    )
    with pytest.raises(asyncio.CancelledError):
        await informer.run()
    assert delays == [1.25, 2.5, 5.0, 10.0, 10.0, 10.0]
    assert not informer.synced
    assert informer.stats.failures == 6


def test_a_cache_emptied_by_delete_events_gives_its_memory_back() -> None:
    # issue 14's churn: a dict keeps its table when keys are popped, so 10,000 pods deleted
    # one event at a time left ~300 KB (x the informers) behind in an empty cache.
    cache: ObjectCache[str] = ObjectCache(lambda d: str(d["metadata"]["name"]))
    objs = [
        {"metadata": {"name": f"p{i}", "namespace": "n", "uid": str(i), "resourceVersion": "1"}}
        for i in range(10_000)
    ]
    empty = sys.getsizeof(cache._entries)
    for o in objs:
        cache.upsert(o)
    assert sys.getsizeof(cache._entries) > 100 * empty
    for o in objs[:9_000]:
        cache.delete(o)
    assert len(cache) == 1_000
    assert sorted(cache.keys()) == sorted(("n", f"p{i}") for i in range(9_000, 10_000))
    for o in objs[9_000:]:
        cache.delete(o)
    assert len(cache) == 0
    assert sys.getsizeof(cache._entries) <= 4 * empty

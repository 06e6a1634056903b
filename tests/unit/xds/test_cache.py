"""The cache: checked publishes, shared serialisation, targeted wake-ups, no gRPC."""

from __future__ import annotations

import subprocess
import sys

import pytest

from aviator.model import WorkloadKey
from aviator.xds import resources as r
from aviator.xds.cache import Cache
from aviator.xds.snapshot import Snapshot, SnapshotError, build_snapshot
from tests.unit.xds.fakes import workload


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def resources_changed(self, type_url: str) -> None:
        self.calls.append(type_url)


def test_cache_module_does_not_import_grpc() -> None:
    code = (
        "import sys; import aviator.xds.cache, aviator.xds.snapshot, aviator.xds.protocol; "
        "bad = sorted(m for m in sys.modules if m == 'grpc' or m.startswith('grpc.')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_inconsistent_snapshot_raises_and_keeps_the_old_one() -> None:
    cache = Cache()
    good = build_snapshot([workload("a", 1)])
    cache.publish(good)
    bad = Snapshot.from_messages(clusters=[r.build_cluster(WorkloadKey("default", "b"))])
    with pytest.raises(SnapshotError, match="no endpoints"):
        cache.publish(bad)
    assert set(cache.resources(r.CLUSTER_TYPE)) == {"default/a"}
    assert cache.get(r.ENDPOINT_TYPE, "default/a") is good.of_type(r.ENDPOINT_TYPE)["default/a"]


def test_unchecked_publish_is_possible_for_tests() -> None:
    cache = Cache()
    bad = Snapshot.from_messages(clusters=[r.build_cluster(WorkloadKey("default", "b"))])
    cache.publish(bad, check=False)
    assert set(cache.resources(r.CLUSTER_TYPE)) == {"default/b"}


def test_unchanged_resources_keep_their_serialised_entry() -> None:
    cache = Cache()
    cache.publish(build_snapshot([workload("a", 1), workload("b", 1)]))
    a_before = cache.get(r.ENDPOINT_TYPE, "default/a")
    b_before = cache.get(r.ENDPOINT_TYPE, "default/b")
    changes = cache.publish(build_snapshot([workload("a", 1), workload("b", 2)]))
    assert cache.get(r.ENDPOINT_TYPE, "default/a") is a_before  # same Any object shared
    b_after = cache.get(r.ENDPOINT_TYPE, "default/b")
    assert b_after is not b_before
    assert b_after is not None
    assert b_after.version != b_before.version  # type: ignore[union-attr]
    assert dict(changes.changed) == {r.ENDPOINT_TYPE: frozenset({"default/b"})}


def test_identical_publish_changes_nothing_and_wakes_nobody() -> None:
    cache = Cache()
    watcher = Recorder()
    cache.watch_all(watcher, r.CLUSTER_TYPE)
    cache.publish(build_snapshot([workload("a", 1)]))
    assert watcher.calls == [r.CLUSTER_TYPE]
    changes = cache.publish(build_snapshot([workload("a", 1)]))
    assert not changes
    assert watcher.calls == [r.CLUSTER_TYPE]
    assert cache.publishes == 1


def test_a_change_wakes_only_the_watchers_of_that_name() -> None:
    cache = Cache()
    cache.publish(build_snapshot([workload("a", 1), workload("b", 1)]))
    on_a, on_b, on_all_eds, on_all_cds = Recorder(), Recorder(), Recorder(), Recorder()
    cache.watch(on_a, r.ENDPOINT_TYPE, ["default/a"])
    cache.watch(on_b, r.ENDPOINT_TYPE, ["default/b"])
    cache.watch_all(on_all_eds, r.ENDPOINT_TYPE)
    cache.watch_all(on_all_cds, r.CLUSTER_TYPE)
    cache.publish(build_snapshot([workload("a", 5), workload("b", 1)]))
    assert on_a.calls == [r.ENDPOINT_TYPE]
    assert on_b.calls == []
    assert on_all_eds.calls == [r.ENDPOINT_TYPE]
    assert on_all_cds.calls == []  # clusters did not change


def test_watching_an_unknown_name_wakes_when_it_appears_and_when_it_goes() -> None:
    cache = Cache()
    cache.publish(build_snapshot([workload("a", 1)]))
    watcher = Recorder()
    cache.watch(watcher, r.ENDPOINT_TYPE, ["default/later"])
    cache.publish(build_snapshot([workload("a", 2)]))  # another name changed
    assert watcher.calls == []
    cache.publish(build_snapshot([workload("a", 1), workload("later", 1)]))
    assert watcher.calls == [r.ENDPOINT_TYPE]
    cache.publish(build_snapshot([workload("a", 1)]))
    assert watcher.calls == [r.ENDPOINT_TYPE] * 2


def test_not_ready_until_the_first_publish_which_wakes_every_watcher() -> None:
    cache = Cache()
    named, wildcard, other = Recorder(), Recorder(), Recorder()
    cache.watch(named, r.ENDPOINT_TYPE, ["default/a", "default/b"])
    cache.watch_all(wildcard, r.CLUSTER_TYPE)
    cache.watch_all(wildcard, r.LISTENER_TYPE)
    assert not cache.ready
    changes = cache.publish(Snapshot())  # "nothing exists" is an answer too
    assert not changes
    assert cache.ready
    # Each watcher once per type it watches, whatever changed: they owe held-back answers.
    assert named.calls == [r.ENDPOINT_TYPE]
    assert sorted(wildcard.calls) == sorted([r.CLUSTER_TYPE, r.LISTENER_TYPE])
    assert other.calls == []
    cache.publish(Snapshot())
    assert named.calls == [r.ENDPOINT_TYPE]  # later publishes wake only on changes


def test_unwatch_and_forget() -> None:
    cache = Cache()
    watcher = Recorder()
    cache.watch(watcher, r.ENDPOINT_TYPE, ["default/a", "default/b"])
    cache.watch_all(watcher, r.CLUSTER_TYPE)
    assert cache.watcher_count(r.ENDPOINT_TYPE, "default/a") == 1
    cache.unwatch(watcher, r.ENDPOINT_TYPE, ["default/a"])
    assert cache.watcher_count(r.ENDPOINT_TYPE, "default/a") == 0
    assert cache.watcher_count(r.ENDPOINT_TYPE, "default/b") == 1
    cache.forget(watcher)
    assert cache.watcher_count(r.ENDPOINT_TYPE, "default/b") == 0
    assert cache.watcher_count(r.CLUSTER_TYPE) == 0
    cache.publish(build_snapshot([workload("a", 1), workload("b", 1)]))
    assert watcher.calls == []


def test_removed_type_is_a_change() -> None:
    cache = Cache()
    cache.publish(build_snapshot([workload("a", 1)], gateway=r.GatewayConfig()))
    changes = cache.publish(build_snapshot([workload("a", 1)]))
    assert set(changes.changed) == {r.LISTENER_TYPE, r.ROUTE_TYPE}
    assert not cache.resources(r.LISTENER_TYPE)


def test_a_watched_set_is_one_entry_for_every_watcher_of_equal_names() -> None:
    cache = Cache()
    cache.publish(build_snapshot([workload("a", 1), workload("b", 1), workload("c", 1)]))
    first, second, other = Recorder(), Recorder(), Recorder()
    names = frozenset({"default/a", "default/b"})
    cache.watch_set(first, r.ENDPOINT_TYPE, names)
    cache.watch_set(second, r.ENDPOINT_TYPE, frozenset(names))  # equal, not the same object
    cache.watch_set(other, r.ENDPOINT_TYPE, frozenset({"default/c"}))
    assert len(cache._by_set[r.ENDPOINT_TYPE]) == 2
    assert cache.watcher_count(r.ENDPOINT_TYPE, "default/a") == 2
    cache.publish(build_snapshot([workload("a", 2), workload("b", 1), workload("c", 1)]))
    assert (first.calls, second.calls, other.calls) == ([r.ENDPOINT_TYPE], [r.ENDPOINT_TYPE], [])
    cache.unwatch_set(first, r.ENDPOINT_TYPE, names)
    cache.publish(build_snapshot([workload("a", 2), workload("b", 2), workload("c", 2)]))
    assert (first.calls, second.calls, other.calls) == (
        [r.ENDPOINT_TYPE],
        [r.ENDPOINT_TYPE] * 2,
        [r.ENDPOINT_TYPE],
    )
    cache.unwatch_set(second, r.ENDPOINT_TYPE, names)
    cache.forget(other)
    assert cache._by_set[r.ENDPOINT_TYPE] == {}
    assert cache.watcher_count(r.ENDPOINT_TYPE, "default/c") == 0

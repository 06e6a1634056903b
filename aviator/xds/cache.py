"""The snapshot cache: what every proxy should hold, and who to tell when it changes.

This module imports no gRPC (a test checks it): it answers "what is the current resource of
this name, at which version?" and wakes the watchers of exactly the names that changed. The
server (``aviator.xds.server``) owns the protocol: nonces, ACKs, NACKs, ordering.

Invariants:
- a published snapshot has passed :meth:`Snapshot.check` (unless the caller asked otherwise);
  a failed check raises and leaves the previous snapshot serving;
- an unchanged resource keeps its :class:`ResourceEntry` object (and so its packed ``Any``)
  across publishes: one serialisation per resource version, shared by every stream;
- a change to one resource wakes only the watchers of that name, plus the wildcard watchers
  of its type (Contour #6743: every endpoint change fanned out to every subscription);
- until the first publish the cache is not :attr:`Cache.ready`; the first publish wakes every
  watcher.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

import structlog

from aviator.xds.resources import TYPE_SHORT
from aviator.xds.snapshot import ResourceEntry, Snapshot

log = structlog.get_logger(__name__)


class Watcher(Protocol):
    """Something (a stream) to wake when resources it watches change."""

    def resources_changed(self, type_url: str) -> None:
        """Called synchronously from :meth:`Cache.publish`; must not block or raise."""


@dataclass(frozen=True, slots=True)
class Changes:
    """What one publish changed, per type URL: names added, updated or removed."""

    changed: Mapping[str, frozenset[str]]

    def __bool__(self) -> bool:
        return any(self.changed.values())


class Cache:
    """The current snapshot plus a name → watchers index. Single-threaded (one event loop)."""

    def __init__(self) -> None:
        self._snapshot = Snapshot()
        self._by_name: dict[str, dict[str, set[Watcher]]] = {}
        # Whole name sets (see watch_set), with their watchers: one entry per distinct set.
        self._by_set: dict[str, dict[Set[str], set[Watcher]]] = {}
        self._wildcard: dict[str, set[Watcher]] = {}
        self._publishes = 0
        self._ready = False
        self._notifying: Mapping[str, frozenset[str]] | None = None

    @property
    def ready(self) -> bool:
        """True once a snapshot was published (an empty one counts).

        Before that the cache does not know what exists, which is not the same as "nothing
        exists": streams answer no request until then (see ``aviator.xds.protocol``).
        """
        return self._ready

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def publishes(self) -> int:
        """How many publishes changed something (for tests and the debug view)."""
        return self._publishes

    def resources(self, type_url: str) -> Mapping[str, ResourceEntry]:
        return self._snapshot.of_type(type_url)

    def get(self, type_url: str, name: str) -> ResourceEntry | None:
        return self._snapshot.of_type(type_url).get(name)

    def type_version(self, type_url: str) -> str:
        return self._snapshot.type_version(type_url)

    # -- publishing --------------------------------------------------------------------------

    def publish(self, snapshot: Snapshot, *, check: bool = True) -> Changes:
        """Make ``snapshot`` current and wake the watchers of what changed.

        With ``check`` (the default) an inconsistent snapshot raises :class:`SnapshotError`
        and nothing changes. ``check=False`` exists for tests that need to publish resources
        a proxy will reject.
        """
        if check:
            snapshot.check()
        old = self._snapshot
        merged: dict[str, Mapping[str, ResourceEntry]] = {}
        changed: dict[str, frozenset[str]] = {}
        for type_url in set(old.resources) | set(snapshot.resources):
            before = old.of_type(type_url)
            after = snapshot.of_type(type_url)
            entries: dict[str, ResourceEntry] = {}
            names: set[str] = set()
            for name, entry in after.items():
                previous = before.get(name)
                if previous is not None and previous.version == entry.version:
                    entries[name] = previous  # keep the already-shared Any
                else:
                    entries[name] = entry
                    names.add(name)
            names.update(before.keys() - after.keys())
            if entries:
                merged[type_url] = MappingProxyType(entries)
            if names:
                changed[type_url] = frozenset(names)
        self._snapshot = Snapshot(MappingProxyType(merged))
        result = Changes(MappingProxyType(changed))
        first, self._ready = not self._ready, True
        if result:
            self._publishes += 1
            log.debug(
                "snapshot published",
                changed={TYPE_SHORT.get(t, t): len(n) for t, n in changed.items()},
            )
        if first:
            self._notify_all()  # requests held back until now are owed an answer
        elif result:
            self._notify(changed)
        return result

    def _notify(self, changed: Mapping[str, frozenset[str]]) -> None:
        self._notifying = changed
        try:
            for type_url, names in changed.items():
                woken: set[Watcher] = set(self._wildcard.get(type_url, ()))
                by_name = self._by_name.get(type_url, {})
                for name in names:
                    woken.update(by_name.get(name, ()))
                for watched, watchers in self._by_set.get(type_url, {}).items():
                    if not names.isdisjoint(watched):
                        woken.update(watchers)
                for watcher in woken:
                    watcher.resources_changed(type_url)
        finally:
            self._notifying = None

    def changed_names(self, type_url: str) -> frozenset[str] | None:
        """Inside a :meth:`Watcher.resources_changed` call made by a publish: the names of
        ``type_url`` that this publish added, changed or removed. None anywhere else (and on
        the first publish, which wakes every watcher): the caller cannot know what changed.

        A stream uses it to look only at those names instead of all it subscribes to.
        """
        if self._notifying is None:
            return None
        return self._notifying.get(type_url, frozenset())

    def _notify_all(self) -> None:
        woken: dict[Watcher, set[str]] = {}
        for type_url, watchers in self._wildcard.items():
            for watcher in watchers:
                woken.setdefault(watcher, set()).add(type_url)
        for type_url, by_name in self._by_name.items():
            for watchers in by_name.values():
                for watcher in watchers:
                    woken.setdefault(watcher, set()).add(type_url)
        for type_url, by_set in self._by_set.items():
            for watchers in by_set.values():
                for watcher in watchers:
                    woken.setdefault(watcher, set()).add(type_url)
        for watcher, type_urls in woken.items():
            for type_url in type_urls:
                watcher.resources_changed(type_url)

    # -- watching ----------------------------------------------------------------------------

    def watch(self, watcher: Watcher, type_url: str, names: Iterable[str]) -> None:
        """Wake ``watcher`` when any of ``names`` of ``type_url`` is added, changed or removed.

        Names need not exist yet: a watcher is woken when they appear.
        """
        by_name = self._by_name.setdefault(type_url, {})
        for name in names:
            by_name.setdefault(name, set()).add(watcher)

    def unwatch(self, watcher: Watcher, type_url: str, names: Iterable[str]) -> None:
        by_name = self._by_name.get(type_url, {})
        for name in names:
            watchers = by_name.get(name)
            if watchers is not None:
                watchers.discard(watcher)
                if not watchers:
                    del by_name[name]

    def watch_set(self, watcher: Watcher, type_url: str, names: Set[str]) -> None:
        """:meth:`watch` of every name in ``names``, indexed by the set itself: when many
        watchers watch equal sets (1,000 SotW streams of the same 1,000 EDS names), the
        cache holds one entry per distinct set instead of a watcher per name and stream (a
        million set entries, 31 MB). A publish checks each distinct set against the names it
        changed. Undo with :meth:`unwatch_set` and the same set."""
        if names:
            self._by_set.setdefault(type_url, {}).setdefault(names, set()).add(watcher)

    def unwatch_set(self, watcher: Watcher, type_url: str, names: Set[str]) -> None:
        by_set = self._by_set.get(type_url, {})
        watchers = by_set.get(names)
        if watchers is not None:
            watchers.discard(watcher)
            if not watchers:
                del by_set[names]

    def watch_all(self, watcher: Watcher, type_url: str) -> None:
        """Wake ``watcher`` on any change of ``type_url`` (wildcard subscriptions)."""
        self._wildcard.setdefault(type_url, set()).add(watcher)

    def unwatch_all(self, watcher: Watcher, type_url: str) -> None:
        self._wildcard.get(type_url, set()).discard(watcher)

    def forget(self, watcher: Watcher) -> None:
        """Drop every watch of ``watcher`` (a stream that ended)."""
        for watchers in self._wildcard.values():
            watchers.discard(watcher)
        for by_name in self._by_name.values():
            for name in [n for n, ws in by_name.items() if watcher in ws]:
                by_name[name].discard(watcher)
                if not by_name[name]:
                    del by_name[name]
        for by_set in self._by_set.values():
            for names in [n for n, ws in by_set.items() if watcher in ws]:
                by_set[names].discard(watcher)
                if not by_set[names]:
                    del by_set[names]

    def watcher_count(self, type_url: str, name: str | None = None) -> int:
        """Watchers of one name (``None``: wildcard watchers) — for tests and the debug view."""
        if name is None:
            return len(self._wildcard.get(type_url, ()))
        watchers = set(self._by_name.get(type_url, {}).get(name, ()))
        for names, by_set in self._by_set.get(type_url, {}).items():
            if name in names:
                watchers |= by_set
        return len(watchers)

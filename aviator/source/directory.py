"""``--source dir:PATH``: cluster state from a directory of Kubernetes-style YAML.

Every ``*.yaml`` / ``*.yml`` file under PATH (recursively) may hold several documents
(``---``), each an AviatorPolicy, Deployment, StatefulSet or Pod, or a ``kind: List`` of
them; other kinds are ignored. The directory is polled (a ``stat`` of each file every
``interval`` seconds; a file is re-read only when its mtime, size or inode change, or while
its mtime is less than 2 s older than its last read, since mtimes are coarse; it is
re-parsed only when its content hash changes), so edits, new files and deletions take
effect within about one interval, without a restart. A scan in which no file's
contribution changed builds nothing (with 10,000 pods, rebuilding the state at every scan
cost half a core).

Nothing of this runs on the event loop that serves xDS, the admin port and the probes
(``offload``, the default of :meth:`DirectorySource.run`): each scan walks, stats, reads and
hashes in a thread, and parses changed files in a worker process
(:mod:`aviator.source.worker`; YAML parsing is CPU-bound Python, which a thread would run
under the GIL at the loop's expense). Stopping the source kills the worker, abandoning a
parse in progress. The parsing itself, and its limits, are :mod:`aviator.source.yamlfiles`.

What happens to bad input (each case is also a :class:`Problem` in the state and a
structlog warning naming file, document, object and field):

* **An object that does not parse** (a Pod without a name, a Deployment with an empty
  selector...) is skipped; every other object of the file is served.
* **An invalid AviatorPolicy that has a name** is kept as an
  :class:`~aviator.k8s.policy.InvalidPolicy`, so that its status can say why; it produces
  no endpoints.
* **A file whose YAML no longer parses** (or is not UTF-8) keeps serving the objects of
  its last good version. An editor's half-saved file must not drop pods from Envoy; the
  problem says the file is stale until fixed. A file that never parsed serves nothing.
* **A file beyond the limits** (:class:`~aviator.source.yamlfiles.Limits`: larger than
  10 MiB, which is not even read; YAML aliases that would expand by more than a million
  nodes, an alias bomb; a recursive alias) is treated as one that does not parse: its last
  good objects stay, with a problem naming the file, the limit and what to do.
* **A file or subdirectory that cannot be read** (permissions) keeps its last objects too.
* **The same object in two places**: the first one (by file path, then document order)
  wins, the others are reported.
* **PATH itself disappears** after a good start: the last state keeps being served, with a
  problem (a remount or an atomic directory swap is more likely than "delete everything").
  PATH missing at start is a :class:`SourceError`.

Names starting with ``.`` are skipped, files and directories alike: editors' swap files,
and the ``..data`` / ``..2024_...`` links of a Kubernetes ConfigMap volume (whose visible
files are symlinks into them, so reading both would duplicate every object).

Objects from files carry no server-set metadata, so the source fills it in: a
``resourceVersion`` that is a hash of the object's content, a ``creationTimestamp`` from the
moment the object was first seen (so that in a conflict the policy that was there first
keeps winning, as on a cluster), and a ``uid`` derived from both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import stat
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final

import structlog

from aviator.k8s.fields import ObjectRef
from aviator.k8s.state import ClusterObject, ClusterState, Problem
from aviator.source.store import Store
from aviator.source.worker import ParseWorker
from aviator.source.yamlfiles import DEFAULT_LIMITS, Doc, Limits, Parsed, parse_file, size_problem

__all__ = ["DEFAULT_INTERVAL", "DirectorySource", "Limits", "SourceError", "load_directory"]

DEFAULT_INTERVAL: Final = 0.4  # seconds between scans: "within about a second" with margin
SUFFIXES: Final = (".yaml", ".yml")
# A file modified less than this before it was read is re-hashed at every scan (see _read).
_RACY_NS: Final = 2_000_000_000
_UID_NAMESPACE: Final = uuid.UUID("6f0d6a52-7f3e-4d0f-9a8c-5b8e2a1c0d11")  # fixed, arbitrary


class SourceError(Exception):
    """The directory cannot be used at all (missing, not a directory, unreadable)."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class _File:
    """What one file contributes: its objects and problems, and what it was read from."""

    stat_key: tuple[int, int, int]  # (mtime_ns, size, inode): cheap change detection
    read_ns: int  # file-system clock when the bytes were read (see _RACY_NS)
    digest: str  # sha256 of the bytes: a touch without a change re-parses nothing
    docs: tuple[Doc, ...]
    problems: tuple[Problem, ...]

    def same_contribution(self, other: _File | None) -> bool:
        """Whether this version of the file adds the same objects and problems as ``other``
        (the same parse, so the same tuple; a touch or a re-read changes neither)."""
        return other is not None and self.docs is other.docs and self.problems == other.problems


Parse = Callable[[str, bytes], Parsed | Problem]


class DirectorySource:
    """Polls a directory of manifests and produces :class:`ClusterState` snapshots.

    ``scan()`` does one synchronous pass on the calling thread and returns the new state, or
    None when nothing changed; ``states()`` and ``run(store)`` repeat a pass every
    ``interval`` using the injected ``sleep``. With ``offload`` (the default) each of their
    passes reads files in a thread and parses them in a worker process
    (:class:`~aviator.source.worker.ParseWorker`), so the event loop never waits for a parse;
    ``offload=False`` does everything on the loop's thread (tests on fake loop time).
    Invariant: every state it returns differs from the one before in ``version``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        interval: float = DEFAULT_INTERVAL,
        limits: Limits = DEFAULT_LIMITS,
        offload: bool = True,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        wall_clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.root = Path(root)
        self.interval = interval
        self.limits = limits
        self.offload = offload
        self._sleep = sleep
        self._wall_clock = wall_clock
        self._files: dict[Path, _File] = {}
        self._first_seen: dict[ObjectRef, datetime] = {}
        self._state: ClusterState | None = None
        self._dir_problems: tuple[Problem, ...] = ()
        self.parse_count = 0  # files parsed so far (a changed digest), for tests and metrics
        self.worker: ParseWorker | None = None  # while states() runs with offload

    @property
    def name(self) -> str:
        return f"dir:{self.root}"

    @property
    def state(self) -> ClusterState | None:
        """The last state :meth:`scan` produced (None before the first scan)."""
        return self._state

    # --- one pass -------------------------------------------------------------------------

    def scan(self, parse: Parse | None = None) -> ClusterState | None:
        """Read what changed since the last scan; the new state, or None if none changed.

        Files are parsed with ``parse`` (default: here, with this source's limits). The
        first call always returns a state, or raises :class:`SourceError` if the directory
        cannot be read.
        """
        if parse is None:
            limits = self.limits

            def parse(source: str, data: bytes) -> Parsed | Problem:
                return parse_file(source, data, limits)

        before, dir_before = self._files, self._dir_problems
        try:
            paths, unreadable = self._walk()
        except OSError as exc:
            if self._state is None:
                raise SourceError(
                    f"cannot read directory {self.root}: {exc.strerror or exc}"
                ) from exc
            self._dir_problems = (
                Problem(
                    str(self.root),
                    f"cannot read the directory ({exc.strerror or exc}); "
                    "serving the last state read from it",
                ),
            )
        else:
            # The files of a subdirectory that cannot be listed now keep their last objects,
            # as a file that cannot be read does.
            kept = {
                p: f
                for p, f in self._files.items()
                if any(p.is_relative_to(d) for d, _ in unreadable)
            }
            self._dir_problems = tuple(
                Problem(
                    str(d),
                    f"cannot read the directory ({why}); serving the last objects read from it",
                )
                for d, why in unreadable
            )
            self._files = kept | {p: f for p in paths if (f := self._read(p, parse)) is not None}
        if (
            self._state is not None
            and self._dir_problems == dir_before
            and self._files.keys() == before.keys()
            and all(f.same_contribution(before.get(p)) for p, f in self._files.items())
        ):
            # Nothing any file contributes has changed: the state is the last one. Building
            # it again would cost O(objects) at every scan (10,000 pods: about half a core).
            return None
        return self._publish()

    def _walk(self) -> tuple[list[Path], list[tuple[Path, str]]]:
        """Manifest files under the root, sorted, and the subdirectories that failed."""
        if not self.root.is_dir():
            raise NotADirectoryError(20, "not a directory (or missing)", str(self.root))
        errors: list[OSError] = []
        paths: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(self.root, onerror=errors.append):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            paths.extend(
                Path(dirpath, name)
                for name in filenames
                if not name.startswith(".") and name.endswith(SUFFIXES)
            )
        if errors and errors[0].filename == str(self.root):
            raise errors[0]
        failed = [(Path(e.filename), str(e.strerror or e)) for e in errors if e.filename]
        return sorted(paths), failed

    def _read(self, path: Path, parse: Parse) -> _File | None:
        """The file's contribution (re-parsed only if its content changed); None if gone."""
        source = str(path)
        old = self._files.get(path)
        limit = self.limits.max_file_bytes
        try:
            st = path.stat()
            if not stat.S_ISREG(st.st_mode):
                return None
            key = (st.st_mtime_ns, st.st_size, st.st_ino)
            # Trust an unchanged stat only if the file had been still for a while when it
            # was read: mtimes are coarse (a kernel tick, or 1-2 s on some file systems), so
            # a same-size rewrite in the same tick keeps the same key ("racy git" problem).
            if old is not None and old.stat_key == key and st.st_mtime_ns + _RACY_NS < old.read_ns:
                return old
            read_ns = time.time_ns()
            if st.st_size > limit:
                data = b""
            else:
                with path.open("rb") as f:
                    data = f.read(limit + 1)  # it may have grown since the stat
        except FileNotFoundError:
            return None  # deleted between the walk and the read: it is gone
        except OSError as exc:
            return self._stale(path, old, (0, 0, 0), 0, "", f"cannot read: {exc.strerror or exc}")
        if st.st_size > limit or len(data) > limit:
            size = max(st.st_size, len(data))
            problem = size_problem(source, size, self.limits)
            assert problem is not None
            # Not read, so not hashed: the stat key tells when to look again.
            return self._stale(path, old, key, read_ns, f"too large:{size}", problem.message)
        digest = hashlib.sha256(data).hexdigest()
        if old is not None and old.digest == digest:
            return dataclasses.replace(old, stat_key=key, read_ns=read_ns)
        self.parse_count += 1
        parsed = parse(source, data)
        if isinstance(parsed, Problem):
            return self._stale(path, old, key, read_ns, digest, parsed.message, parsed.line)
        return _File(key, read_ns, digest, parsed.docs, parsed.problems)

    def _stale(
        self,
        path: Path,
        old: _File | None,
        key: tuple[int, int, int],
        read_ns: int,
        digest: str,
        message: str,
        line: int | None = None,
    ) -> _File:
        # Keep the last good objects (and their problems), flagged stale; see the module doc.
        if old is not None and old.docs:
            kept = f"serving the {len(old.docs)} object(s) of its last good version until fixed"
            object_problems = tuple(p for p in old.problems if p.document is not None)
            docs = old.docs
        else:
            kept = "none of its objects are served"
            object_problems, docs = (), ()
        problem = Problem(str(path), f"{message}; {kept}", line=line)
        return _File(key, read_ns, digest, docs, (problem, *object_problems))

    def _publish(self) -> ClusterState | None:
        objects: dict[ObjectRef, ClusterObject] = {}
        origin: dict[ObjectRef, tuple[Path, Doc]] = {}
        problems: list[Problem] = []
        for path in sorted(self._files):
            f = self._files[path]
            problems.extend(f.problems)
            for d in f.docs:
                ref = d.obj.ref
                if ref in origin:
                    first_path, first = origin[ref]
                    problems.append(
                        Problem(
                            str(path),
                            f"duplicate: {ref} is already defined in "
                            f"{first_path} document {first.document}; this one is ignored",
                            d.document,
                            d.item,
                            d.line,
                            ref,
                        )
                    )
                    continue
                origin[ref] = (path, d)
                objects[ref] = d.obj
        problems[:0] = self._dir_problems
        now = self._wall_clock()
        self._first_seen = {ref: self._first_seen.get(ref, now) for ref in objects}
        state = ClusterState.build((self._stamp(obj) for obj in objects.values()), problems)
        if self._state is not None and state.version == self._state.version:
            return None
        self._log(state)
        self._state = state
        return state

    def _stamp(self, obj: ClusterObject) -> ClusterObject:
        meta = obj.meta
        created = meta.creation_timestamp or self._first_seen[obj.ref]
        uid = meta.uid or str(uuid.uuid5(_UID_NAMESPACE, f"{obj.ref}@{created.isoformat()}"))
        if created is meta.creation_timestamp and uid is meta.uid:
            return obj
        return dataclasses.replace(
            obj, meta=dataclasses.replace(meta, creation_timestamp=created, uid=uid)
        )

    def _log(self, state: ClusterState) -> None:
        # A fresh logger each time: a module-level one caches its configuration on first use.
        log = structlog.get_logger(__name__)
        before = set(self._state.problems) if self._state is not None else set()
        for p in state.problems:
            if p not in before:
                log.warning(
                    "k8s.dirsource.problem",
                    file=p.source,
                    document=p.document,
                    item=p.item,
                    line=p.line,
                    object=str(p.object) if p.object else None,
                    field=p.field,
                    message=p.message,
                )
        log.info(
            "k8s.dirsource.state",
            source=self.name,
            version=state.version,
            policies=len(state.policies),
            workloads=len(state.workloads),
            pods=len(state.pods),
            problems=len(state.problems),
        )

    # --- polling --------------------------------------------------------------------------

    async def states(self) -> AsyncIterator[ClusterState]:
        """The first state once read, then each changed state, scanning every ``interval``.

        With ``offload``, closing the iterator (or cancelling the task iterating it) kills
        the parse worker, abandoning a parse in progress.
        """
        if not self.offload:
            first = self.scan()
            yield first if first is not None else self._require_state()
            while True:
                await self._sleep(self.interval)
                if (state := self.scan()) is not None:
                    yield state
        else:
            worker = self.worker = ParseWorker(self.limits)
            try:
                await asyncio.to_thread(worker.start)  # an interpreter start: not on the loop
                first = await asyncio.to_thread(self.scan, worker.parse)
                yield first if first is not None else self._require_state()
                while True:
                    await self._sleep(self.interval)
                    if (state := await asyncio.to_thread(self.scan, worker.parse)) is not None:
                        yield state
            finally:
                # Also when cancelled while a scan runs in its thread: the thread's parse
                # then raises WorkerClosedError and that scan is dropped, changing nothing.
                worker.close()

    def _require_state(self) -> ClusterState:
        assert self._state is not None  # scan() always sets it or raises
        return self._state

    async def run(self, store: Store) -> None:
        """Publish to ``store`` until cancelled (the :class:`StateSource` protocol)."""
        async for state in self.states():
            store.publish(state)


def load_directory(root: str | os.PathLike[str]) -> ClusterState:
    """One scan of ``root`` (for one-shot checks and tests); raises :class:`SourceError`."""
    state = DirectorySource(root).scan()
    assert state is not None  # the first scan always produces a state
    return state


if TYPE_CHECKING:
    from aviator.source.store import StateSource

    _conforms: StateSource = DirectorySource(".")  # mypy checks the protocol is met

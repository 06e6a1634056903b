"""What the connected proxies hold of each cluster's endpoints: the input of ``Programmed`` (pure).

A policy is *programmed* once every connected proxy subscribed to its cluster has ACKed a
version of the cluster's ClusterLoadAssignment that carries its current endpoints. "Current
endpoints" means the current *set of addresses*: a weight-only change (every reweigh that
moves traffic) does not un-program a policy, so weights never cause status writes; a pod
joining or leaving does, until the proxies ACK the new set.

Three values, filled by the control plane and merged across replicas:

- :class:`EndpointVersions` remembers, per cluster, the CLA versions published since its
  address set last changed (bounded), so "does version V carry the current endpoints?" is a
  set lookup. The control plane calls :meth:`EndpointVersions.observe` for each CLA it
  publishes.
- :class:`ProxyHolding` is one proxy's view of one cluster: the CLA version it ACKed, and
  Envoy's message if it rejected the last one. :func:`cluster_acks` counts holdings into
- :class:`ClusterAcks`: proxies subscribed, how many hold the current endpoints, how many
  rejected them (with up to :data:`MAX_MESSAGES` of Envoy's messages). One replica's counts;
  :func:`merge_acks` adds those of every replica (each reports its own, see
  :mod:`aviator.operator.reports`).

:func:`encode_report` / :func:`decode_report` turn a replica's counts into the bounded JSON a
replica publishes in its report Lease, and back.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "MAX_MESSAGES",
    "MAX_MESSAGE_LENGTH",
    "REPORT_LIMIT_BYTES",
    "ClusterAcks",
    "EndpointVersions",
    "ProxyHolding",
    "ReportError",
    "cluster_acks",
    "decode_report",
    "encode_report",
    "merge_acks",
]

MAX_MESSAGES: Final = 3  # Envoy's rejection messages kept per cluster
MAX_MESSAGE_LENGTH: Final = 512  # characters of each (Envoy's can be kilobytes of proto text)
# A replica report lives in one annotation; all annotations of an object share 256 KiB.
REPORT_LIMIT_BYTES: Final = 200_000
_REPORT_FORMAT: Final = 1


def _clip(message: str) -> str:
    message = " ".join(message.split())
    if len(message) <= MAX_MESSAGE_LENGTH:
        return message
    return message[: MAX_MESSAGE_LENGTH - 1] + "…"


def _messages(messages: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted({c for m in messages if (c := _clip(m))}))[:MAX_MESSAGES]


@dataclass(frozen=True, slots=True)
class ClusterAcks:
    """The proxies subscribed to one cluster, and what they hold of its endpoints.

    Invariants: counts are ≥ 0 and ``current + rejected <= proxies``; ``messages`` are
    distinct, sorted, at most :data:`MAX_MESSAGES`, each at most :data:`MAX_MESSAGE_LENGTH`
    characters.
    """

    proxies: int = 0  # connected proxies subscribed to the cluster's endpoints
    current: int = 0  # of those: hold a version carrying the current endpoints
    rejected: int = 0  # of those: rejected the current endpoints (NACK)
    messages: tuple[str, ...] = ()  # Envoy's error messages

    def __post_init__(self) -> None:
        if min(self.proxies, self.current, self.rejected) < 0:
            raise ValueError(f"ClusterAcks counts must be >= 0: {self}")
        if self.current + self.rejected > self.proxies:
            raise ValueError(f"ClusterAcks: current + rejected > proxies: {self}")
        object.__setattr__(self, "messages", _messages(self.messages))

    @property
    def pending(self) -> int:
        """Proxies that neither hold the current endpoints nor rejected them (yet)."""
        return self.proxies - self.current - self.rejected


def merge_acks(*parts: ClusterAcks | None) -> ClusterAcks:
    """The counts of several replicas added up (None parts count as nothing)."""
    present = [p for p in parts if p is not None]
    return ClusterAcks(
        proxies=sum(p.proxies for p in present),
        current=sum(p.current for p in present),
        rejected=sum(p.rejected for p in present),
        messages=tuple(m for p in present for m in p.messages),
    )


@dataclass(frozen=True, slots=True)
class ProxyHolding:
    """One connected proxy's state for one cluster's endpoints (EDS resource ``cluster``).

    ``version``: the CLA version the proxy ACKed and holds (None: nothing yet).
    ``rejection``: Envoy's message when it NACKed a response carrying this cluster's newest
    version and does not hold the current endpoints (None otherwise).
    """

    node_id: str
    cluster: str
    version: str | None
    rejection: str | None = None


class EndpointVersions:
    """Per cluster: the CLA versions that carry its current address set (bounded memory).

    :meth:`observe` each published CLA (its version and a hashable key of its address set,
    e.g. a frozenset of addresses). A new address set starts a new generation of versions;
    versions published while the set stays the same (weight changes) join it, up to
    ``keep`` of them (the oldest are forgotten: a proxy still holding one of those is counted
    as pending, which at worst delays Programmed, never fakes it).
    """

    def __init__(self, *, keep: int = 64) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self._keep = keep
        self._members: dict[str, Hashable] = {}
        self._versions: dict[str, OrderedDict[str, None]] = {}

    def observe(self, cluster: str, version: str, members: Hashable) -> None:
        versions = self._versions.get(cluster)
        if versions is None or self._members.get(cluster) != members:
            versions = OrderedDict()
            self._versions[cluster] = versions
            self._members[cluster] = members
        versions[version] = None
        versions.move_to_end(version)
        while len(versions) > self._keep:
            versions.popitem(last=False)

    def carries_current(self, cluster: str, version: str | None) -> bool:
        """Whether CLA ``version`` of ``cluster`` carries its current address set."""
        return version is not None and version in self._versions.get(cluster, ())

    def retain(self, clusters: Iterable[str]) -> None:
        """Forget every cluster not in ``clusters`` (those no longer served)."""
        keep = set(clusters)
        for cluster in [c for c in self._versions if c not in keep]:
            del self._versions[cluster]
            del self._members[cluster]

    def __contains__(self, cluster: object) -> bool:
        return cluster in self._versions


def cluster_acks(
    holdings: Iterable[ProxyHolding], versions: EndpointVersions
) -> dict[str, ClusterAcks]:
    """Count each cluster's holdings: current, rejected, or pending (a proxy counted once per
    cluster, by node id: the same node on two streams is one proxy, its best state wins)."""
    best: dict[str, dict[str, tuple[int, str | None]]] = {}
    for h in holdings:
        if versions.carries_current(h.cluster, h.version):
            state: tuple[int, str | None] = (2, None)
        elif h.rejection is not None:
            state = (1, h.rejection)
        else:
            state = (0, None)
        nodes = best.setdefault(h.cluster, {})
        if h.node_id not in nodes or nodes[h.node_id][0] < state[0]:
            nodes[h.node_id] = state
    out: dict[str, ClusterAcks] = {}
    for cluster, nodes in best.items():
        states = list(nodes.values())
        out[cluster] = ClusterAcks(
            proxies=len(states),
            current=sum(1 for s, _ in states if s == 2),
            rejected=sum(1 for s, _ in states if s == 1),
            messages=tuple(m for s, m in states if s == 1 and m is not None),
        )
    return out


class ReportError(ValueError):
    """A replica report that does not decode; the message says what is wrong."""


def encode_report(
    acks: Mapping[str, ClusterAcks], *, limit_bytes: int = REPORT_LIMIT_BYTES
) -> tuple[str, int]:
    """Compact JSON of one replica's counts, at most ``limit_bytes`` long; and how many
    clusters were left out to fit (the ones with the fewest proxies go first; a cluster left
    out counts as "no proxies on that replica", which can only delay Programmed=True)."""
    items = sorted(acks.items(), key=lambda kv: (-kv[1].proxies, kv[0]))
    clusters = {
        name: [a.proxies, a.current, a.rejected, list(a.messages)]
        for name, a in items
        if a.proxies > 0
    }
    dropped = 0
    while True:
        text = json.dumps({"v": _REPORT_FORMAT, "clusters": clusters}, separators=(",", ":"))
        if len(text.encode()) <= limit_bytes or not clusters:
            return text, dropped
        # Drop from the tail (fewest proxies) in chunks proportional to the overshoot.
        over = len(text.encode()) / limit_bytes
        n = max(1, int(len(clusters) * (1 - 1 / over)) + 1)
        for name in list(clusters)[-n:]:
            del clusters[name]
            dropped += 1


def decode_report(text: str) -> dict[str, ClusterAcks]:
    """The counts in a report written by :func:`encode_report`; :class:`ReportError` if it
    is not one (a replica of another version, a hand edit)."""
    try:
        doc: Any = json.loads(text)
    except ValueError as exc:
        raise ReportError(f"not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("v") != _REPORT_FORMAT:
        raise ReportError(f'expected {{"v": {_REPORT_FORMAT}, "clusters": {{...}}}}')
    clusters = doc.get("clusters")
    if not isinstance(clusters, dict):
        raise ReportError('"clusters" must be an object')
    out: dict[str, ClusterAcks] = {}
    for name, value in clusters.items():
        try:
            proxies, current, rejected, messages = value
            if not all(
                isinstance(n, int) and not isinstance(n, bool) for n in (proxies, current, rejected)
            ):
                raise TypeError("counts must be integers")
            if not isinstance(messages, list) or not all(isinstance(m, str) for m in messages):
                raise TypeError("messages must be strings")
            out[name] = ClusterAcks(proxies, current, rejected, tuple(messages))
        except (TypeError, ValueError) as exc:
            raise ReportError(f"cluster {name!r}: {exc}") from exc
    return out

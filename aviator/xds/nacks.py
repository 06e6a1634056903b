"""What proxies rejected: the NACK journal (every NACK, for the debug view and the log) and
the rejected versions per node (never sent again to that node until the desired state changes,
on this stream or a later one). Bounded; no gRPC.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aviator.xds.protocol import StreamKind

from aviator.xds.resources import (
    TYPE_SHORT,
)

MAX_NACKED_VERSIONS = 64  # per node and type; content versions, so old ones rarely matter
_MAX_NACKING_NODES = 4096  # nodes whose rejected versions are remembered (least recent go)
_MAX_NACK_MESSAGE = 4096  # characters of a NACK's message kept and logged (Envoy's are short)


def capped(text: str, limit: int = _MAX_NACK_MESSAGE) -> str:
    """The first ``limit`` characters of a proxy's message (a NACK's error text)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters not kept)"


@dataclass(frozen=True, slots=True)
class NackRecord:
    """A proxy rejected a response: what, when, and why (Envoy's message verbatim)."""

    node_id: str
    stream_id: int
    kind: StreamKind
    type_url: str
    rejected_version: str
    accepted_version: str  # what the proxy keeps using ("" when unknown)
    error_code: int
    message: str
    at: float  # wall-clock seconds

    @property
    def type(self) -> str:
        return TYPE_SHORT.get(self.type_url, self.type_url)


class NackJournal:
    """The last NACKs of each node, kept in memory for the status and debug views.

    Bounded: ``per_node`` records for each of at most ``max_nodes`` nodes (least recently
    rejected nodes are forgotten first). Survives stream restarts.
    """

    def __init__(self, *, per_node: int = 16, max_nodes: int = 1024) -> None:
        self._per_node = per_node
        self._max_nodes = max_nodes
        self._by_node: OrderedDict[str, deque[NackRecord]] = OrderedDict()

    def record(self, nack: NackRecord) -> None:
        records = self._by_node.pop(nack.node_id, None) or deque(maxlen=self._per_node)
        records.append(nack)
        self._by_node[nack.node_id] = records
        while len(self._by_node) > self._max_nodes:
            self._by_node.popitem(last=False)

    def for_node(self, node_id: str) -> tuple[NackRecord, ...]:
        return tuple(self._by_node.get(node_id, ()))

    def all(self) -> tuple[NackRecord, ...]:
        return tuple(sorted((n for rs in self._by_node.values() for n in rs), key=lambda n: n.at))


class RejectedVersions:
    """The versions each node rejected, per type: what must not be sent to it again.

    Kept by node id rather than by stream, so a proxy that reconnects is not sent again what
    it rejected on its previous stream. Bounded: at most ``per_type`` versions per node and
    type (the oldest rejection is forgotten first) for at most ``max_nodes`` nodes (the node
    that rejected least recently is forgotten first).
    """

    def __init__(
        self, *, per_type: int = MAX_NACKED_VERSIONS, max_nodes: int = _MAX_NACKING_NODES
    ) -> None:
        if per_type < 1 or max_nodes < 1:
            raise ValueError(f"need per_type >= 1 and max_nodes >= 1, got {per_type}, {max_nodes}")
        self._per_type = per_type
        self._max_nodes = max_nodes
        self._by_node: OrderedDict[str, dict[str, OrderedDict[str, None]]] = OrderedDict()

    def add(self, node_id: str, type_url: str, version: str) -> None:
        types = self._by_node.pop(node_id, None) or {}
        self._by_node[node_id] = types
        versions = types.setdefault(type_url, OrderedDict())
        versions.pop(version, None)
        versions[version] = None
        while len(versions) > self._per_type:
            versions.popitem(last=False)
        while len(self._by_node) > self._max_nodes:
            self._by_node.popitem(last=False)

    def of(self, node_id: str, type_url: str) -> tuple[str, ...]:
        """The versions of ``type_url`` that ``node_id`` rejected, oldest first."""
        return tuple(self._by_node.get(node_id, {}).get(type_url, ()))

    def __len__(self) -> int:
        """Nodes remembered."""
        return len(self._by_node)

"""What one ADS stream may ask of the server, and how a refused stream is told.

A stream beyond :class:`StreamLimits` is refused (:class:`StreamRefusedError`) and every other
stream carries on; :func:`shown` keeps what a client sends out of log lines unless it is short,
printable ASCII. Pure: no gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)

_MAX_SHOWN = 128  # a client-chosen string longer than this is logged as its length only


def shown(text: str, limit: int = _MAX_SHOWN) -> str:
    """``text`` for a log line if it is short, printable ASCII; else only its size.

    What a client sends (type URLs, nonces, versions) goes into log lines through this, so a
    hostile stream cannot write its payload (or terminal escapes, or 100 KB) into the log.
    """
    if len(text) <= limit and text.isascii() and text.isprintable():
        return text
    return f"<{len(text.encode('utf-8', 'replace'))} bytes, not shown>"


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """What one ADS stream may ask of the server; beyond it the stream is refused
    (:class:`StreamRefusedError`) and every other stream carries on.

    The defaults are far above what a proxy sends and far below what hurts the server:
    ``max_names`` bounds the names one stream subscribes to per type (a sidecar subscribes
    to one EDS name per workload; 16,384 workloads is past any mesh Aviator serves, and a
    list of 100,000 names is refused); ``max_name_bytes`` a resource name (cluster names are
    ``<namespace>/<name>``, at most 317 bytes); ``max_node_id_bytes`` the node id (Envoy's
    are a pod name or a hostname); ``max_unknown_types`` the distinct type URLs this server
    does not serve that a stream may ask for (ignored, logged once) before it is refused.
    """

    max_node_id_bytes: int = 1024
    max_names: int = 16_384
    max_name_bytes: int = 1024
    max_unknown_types: int = 16
    # The node ids that may connect (aviator run --xds-allow-node); None: any. A stream whose
    # first request names another node, or none, is refused (PERMISSION_DENIED).
    allowed_nodes: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.allowed_nodes is not None and not self.allowed_nodes:
            raise ValueError("StreamLimits.allowed_nodes must name a node, or be None (any)")
        for name in ("max_node_id_bytes", "max_names", "max_name_bytes", "max_unknown_types"):
            if getattr(self, name) < 1:
                raise ValueError(f"StreamLimits.{name} must be >= 1, got {getattr(self, name)}")


DEFAULT_LIMITS = StreamLimits()


class StreamRefusedError(Exception):
    """A stream sent what no proxy sends, or more than the server gives one proxy: it ends
    with gRPC status ``code`` (a ``grpc.StatusCode`` name; this module imports no gRPC) and
    ``message``, which names the field and the limit and never repeats the request's
    content."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

"""Response bodies shared by the streams of one server: one serialised body per content, so
1,000 streams that send the same resources hold one copy. No gRPC.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any


class ResponseBodies:
    """Response bodies (all but the nonce) shared by the streams of one server.

    A body is named by its stream kind, type and content version (a hash of exactly what it
    carries), so every stream owing the same content copies one body instead of assembling
    it: after a change to every workload, the same 1,000 CLAs go to each of 1,000 streams,
    and copying a body (in C) costs a tenth of adding 1,000 resources to a new response
    (``aviator bench xds``). Keeps the ``size`` most recently used bodies.
    """

    def __init__(self, size: int = 16) -> None:
        self._size = size
        self._bodies: OrderedDict[tuple[str, str, str], Any] = OrderedDict()

    def get(self, key: tuple[str, str, str], build: Callable[[], Any]) -> Any:
        body = self._bodies.get(key)
        if body is None:
            body = self._bodies[key] = build()
            if len(self._bodies) > self._size:
                self._bodies.popitem(last=False)
        else:
            self._bodies.move_to_end(key)
        return body

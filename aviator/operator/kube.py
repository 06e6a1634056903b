"""A thin JSON client for the few API calls the operator makes (I/O).

Every writer in this package talks to the API server through :class:`KubeApi`: raw dicts in,
raw dicts out, over the official client's asyncio ``ApiClient`` (``kubernetes.aio``, so the
kubeconfig, in-cluster service account, token refresh and TLS settings are the client's own).
Raw JSON rather than the generated models: the operator reads and writes a handful of fields
of Leases, Events, Pods, Services, Endpoints and AviatorPolicy status, and the generated
(pydantic) models would turn every object into a validated tree for nothing; the typed
``CustomObjectsApi`` returns dicts anyway.

Errors are this package's own (:class:`KubeError` and its subclasses), the client's chained:
:class:`ConflictError` (409, an optimistic-concurrency loss: re-read and retry),
:class:`NotFoundError` (404), :class:`UnavailableError` (no answer, a timeout, a 5xx or 429:
retry later), anything else permanent for this request (:class:`ForbiddenError`, 403, names
the missing RBAC rule in its message).

Every request has a deadline (``timeout``; a hung connection must not hold a leader's write
past its lease) and counts itself in :attr:`KubeApi.requests` (by method), which the tests
use to count writes on the real API server.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections import Counter
from collections.abc import Mapping
from typing import Any, Final

import aiohttp
from kubernetes.aio.client import ApiClient, Configuration
from kubernetes.aio.client.exceptions import ApiException

__all__ = [
    "MERGE_PATCH",
    "STRATEGIC_MERGE_PATCH",
    "ConflictError",
    "ForbiddenError",
    "InvalidError",
    "KubeApi",
    "KubeError",
    "NotFoundError",
    "UnavailableError",
    "api_client_from_kubeconfig",
    "api_client_in_cluster",
    "path",
]

MERGE_PATCH: Final = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH: Final = "application/strategic-merge-patch+json"


class KubeError(Exception):
    """A request the API server refused or did not answer; ``status`` is the HTTP status
    (None when there was no answer), ``reason`` the Status reason (``Conflict``...)."""

    retryable: bool = False

    def __init__(self, method: str, url_path: str, status: int | None, reason: str, message: str):
        self.method = method
        self.path = url_path
        self.status = status
        self.reason = reason
        self.message = message
        code = f"HTTP {status}" if status is not None else "no answer"
        super().__init__(f"{method} {url_path}: {code} {reason}: {message}")


class ConflictError(KubeError):
    """409: the object changed since it was read (or already exists, on create)."""


class NotFoundError(KubeError):
    """404: no such object (or, for a list, no such resource type)."""


class ForbiddenError(KubeError):
    """403: RBAC does not allow it; the message names the verb and resource."""


class InvalidError(KubeError):
    """422: the server's validation rejected the object; the message says which field."""


class UnavailableError(KubeError):
    """No usable answer: connection refused or reset, a timeout, 429 or a 5xx."""

    retryable = True


def path(
    resource: str,
    name: str | None = None,
    *,
    namespace: str | None = None,
    group: str = "",
    version: str = "v1",
    subresource: str | None = None,
) -> str:
    """The REST path of a resource: ``path("pods", "web-0", namespace="shop")``,
    ``path("aviatorpolicies", "web", namespace="shop", group="aviator.io",
    version="v1alpha1", subresource="status")``."""
    base = f"/apis/{group}/{version}" if group else f"/api/{version}"
    if namespace is not None:
        base += f"/namespaces/{urllib.parse.quote(namespace, safe='')}"
    base += f"/{resource}"
    if name is not None:
        base += f"/{urllib.parse.quote(name, safe='')}"
        if subresource is not None:
            base += f"/{subresource}"
    return base


def _error(method: str, url_path: str, status: int, body: bytes) -> KubeError:
    reason, message = "", body.decode(errors="replace")[:2000]
    try:
        decoded = json.loads(body)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict):
        reason = str(decoded.get("reason") or "")
        message = str(decoded.get("message") or message)
    cls: type[KubeError] = KubeError
    if status == 409:
        cls = ConflictError
    elif status == 404:
        cls = NotFoundError
    elif status == 403:
        cls = ForbiddenError
    elif status == 422:
        cls = InvalidError
    elif status == 429 or status >= 500:
        cls = UnavailableError
    return cls(method, url_path, status, reason, message)


class KubeApi:
    """JSON requests through a ``kubernetes.aio`` ``ApiClient`` (which it does not own).

    ``field_manager`` names Aviator in the objects' ``managedFields`` on every write.
    """

    def __init__(
        self, api_client: ApiClient, *, timeout: float = 10.0, field_manager: str = "aviator"
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout!r}")
        self._client = api_client
        self.timeout = timeout
        self.field_manager = field_manager
        self.requests: Counter[str] = Counter()  # by method: GET, POST, PUT, PATCH, DELETE

    @property
    def client(self) -> ApiClient:
        """The ``ApiClient`` requests go through (owned by the caller)."""
        return self._client

    @property
    def writes(self) -> int:
        """Mutating requests sent so far (answered or not)."""
        return sum(n for method, n in self.requests.items() if method != "GET")

    async def get(self, url_path: str, *, query: Mapping[str, str] | None = None) -> Any:
        return await self.request("GET", url_path, query=query)

    async def create(self, url_path: str, body: Mapping[str, Any]) -> Any:
        return await self.request("POST", url_path, body, query=self._manager())

    async def replace(self, url_path: str, body: Mapping[str, Any]) -> Any:
        return await self.request("PUT", url_path, body, query=self._manager())

    async def patch(
        self, url_path: str, body: Mapping[str, Any], *, content_type: str = MERGE_PATCH
    ) -> Any:
        return await self.request(
            "PATCH", url_path, body, query=self._manager(), content_type=content_type
        )

    async def delete(self, url_path: str) -> Any:
        return await self.request("DELETE", url_path)

    def _manager(self) -> dict[str, str]:
        return {"fieldManager": self.field_manager}

    async def request(
        self,
        method: str,
        url_path: str,
        body: Mapping[str, Any] | None = None,
        *,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        deadline: float | None = None,
    ) -> Any:
        """One request; the decoded JSON answer (None for an empty one). Raises
        :class:`KubeError` (a subclass) for every failure, the client's error chained."""
        self.requests[method] += 1
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            async with asyncio.timeout(deadline or self.timeout):
                params = await self._client.param_serialize(
                    method=method,
                    resource_path=url_path,
                    query_params=list((query or {}).items()) or None,
                    header_params=headers,
                    body=dict(body) if body is not None else None,
                    auth_settings=["BearerToken"],
                )
                response = await self._client.call_api(*params)
                data: bytes = await response.read()  # type: ignore[no-untyped-call]
                status: int = response.status
        except TimeoutError as exc:
            raise UnavailableError(method, url_path, None, "Timeout", "no answer in time") from exc
        except aiohttp.ClientError as exc:
            raise UnavailableError(method, url_path, None, type(exc).__name__, str(exc)) from exc
        except ApiException as exc:  # the client raises some errors itself
            status_code = exc.status if isinstance(exc.status, int) else 0
            body_bytes = (exc.body or "").encode() if isinstance(exc.body, str) else b""
            if not status_code:
                raise UnavailableError(method, url_path, None, str(exc.reason), str(exc)) from exc
            raise _error(method, url_path, status_code, body_bytes) from exc
        if not 200 <= status < 300:
            raise _error(method, url_path, status, data)
        return json.loads(data) if data else None


async def api_client_from_kubeconfig(
    kubeconfig: str | None = None, *, context: str | None = None
) -> ApiClient:
    """An ``ApiClient`` for ``kubeconfig`` (default ``~/.kube/config``) and ``context``."""
    from kubernetes.aio import config

    configuration = Configuration()
    await config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=kubeconfig, context=context, client_configuration=configuration
    )
    return ApiClient(configuration=configuration)


def api_client_in_cluster() -> ApiClient:
    """An ``ApiClient`` for the Pod's service account (token, CA and namespace files)."""
    from kubernetes.aio import config

    configuration = Configuration()
    config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    return ApiClient(configuration=configuration)

"""Suite-wide test setup."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator

import pytest

# The real-API-server fixtures (kube_env, kube_namespace, release_dir, aviator_crd,
# aviator_install), registered here once so that a session starts at most one API server.
from tests.kubeapi.fixtures import (
    aviator_crd,
    aviator_install,
    kube_env,
    kube_namespace,
    release_dir,
)

__all__ = ["aviator_crd", "aviator_install", "kube_env", "kube_namespace", "release_dir"]


def pytest_sessionstart(session: pytest.Session) -> None:
    asyncio.set_event_loop(None)


@pytest.fixture(autouse=True)
def _close_stray_event_loop(request: pytest.FixtureRequest) -> Iterator[None]:
    """Close the event loop looptime's plugin creates around a *sync* test.

    looptime 0.9 calls ``policy.get_event_loop()`` before every test function, which in a
    sync test creates a loop that nobody closes; its ResourceWarning then fails whichever
    async test runs when it is garbage-collected (warnings are errors here).
    """
    yield
    if inspect.iscoroutinefunction(request.function):
        return
    try:
        loop = asyncio.get_event_loop_policy().get_event_loop()
    except RuntimeError:
        return
    if not loop.is_running() and not loop.is_closed():
        loop.close()
    asyncio.set_event_loop(None)

"""Suite-wide test setup."""

from __future__ import annotations

import asyncio

import pytest


def pytest_sessionstart(session: pytest.Session) -> None:
    # looptime asks the policy for an event loop around synchronous tests; before any async test
    # has run, that creates a loop nobody closes, and its garbage collection later turns into a
    # ResourceWarning (an error under filterwarnings=error) inside an unrelated async test.
    asyncio.set_event_loop(None)

"""Suite-wide test setup."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

pytest_plugins = ("pytester",)  # tests/test_leak_fixture.py runs pytest on small test files

# How many loop iterations a test's tasks get, after it and its fixtures end, to finish what
# they were already finishing (a task cancelled but not awaited needs one) before they count
# as leaked.
_SETTLE_ITERATIONS = 20


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


@dataclass(slots=True)
class _Watch:
    """The loop an async test runs in, and the tasks that were there before the test."""

    runner: asyncio.Runner
    before: set[asyncio.Task[Any]]
    reported: bool = False  # a failure was reported already (or the test failed on its own)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.runner.get_loop()


_WATCH = pytest.StashKey[_Watch]()


@pytest.fixture(autouse=True)
def _no_leaked_tasks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail an async test that leaves a task pending on its event loop (kopf's habit).

    A task is leaked when the test or one of its fixtures created it and it is still pending
    once the test and those fixtures have ended: it would have run on, unseen, had
    pytest-asyncio's runner not cancelled it silently when it closed the loop. Such a task is
    a bug in the code (a component whose stop does not wait for its tasks) or in the test (a
    ``create_task`` nobody awaits); the error names each task and where it is suspended.

    This fixture is set up before the test's other function-scoped fixtures and torn down
    after them, but before the loop is closed: it asks pytest-asyncio for the test's runner
    itself (``_<scope>_scoped_runner``, the fixture pytest-asyncio 1.x runs tests in).

    looptime fakes time only while the test function runs; in the true time of the teardown
    every fake-time timer is long due, so a task leaked asleep would wake and finish there,
    unseen. A test in fake time is therefore also checked the moment it returns, still in
    fake time (:func:`pytest_pyfunc_call`): it must stop what it started before it returns.
    """
    marker = request.node.get_closest_marker("asyncio")
    if marker is None:  # a sync test: no loop of its own
        yield
        return
    scope = marker.kwargs.get("loop_scope") or request.config.getini(
        "asyncio_default_test_loop_scope"
    )
    runner: asyncio.Runner = request.getfixturevalue(f"_{scope}_scoped_runner")
    watch = _Watch(runner, asyncio.all_tasks(runner.get_loop()))
    request.node.stash[_WATCH] = watch
    yield
    _check(watch, watch.before, "after the test and its fixtures ended")


@pytest.hookimpl(wrapper=True, trylast=True)  # trylast: inside looptime's wrapper
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Iterator[None]:
    """In fake time (looptime), check for leaked tasks as soon as the test returns."""
    watch = pyfuncitem.stash.get(_WATCH, None)
    if watch is None or not getattr(watch.loop, "looptime_on", False):
        return (yield)
    before = asyncio.all_tasks(watch.loop)
    result = yield  # a test that fails is not checked: its failure says enough
    _check(watch, before, "when the test returned (in fake time: looptime)")
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[pytest.TestReport]:
    report = yield
    watch = item.stash.get(_WATCH, None)
    if watch is not None and report.when == "call" and report.failed:
        watch.reported = True  # its own failure (or a leak found in fake time) is enough
    return report


def _check(watch: _Watch, before: set[asyncio.Task[Any]], when: str) -> None:
    """Fail (once per test) naming the tasks not in ``before`` still pending after a settle;
    cancel them either way, so that none runs on into the next test."""
    watch.runner.run(_settle(before))
    leaked = _pending(watch.loop, before)
    if not leaked:
        return
    described = "\n".join(f"  - {_describe(task)}" for task in leaked)
    watch.runner.run(_cancel(leaked))
    if watch.reported:
        return
    watch.reported = True
    pytest.fail(
        f"{len(leaked)} asyncio task(s) still pending {when} (stop or await them):\n{described}",
        pytrace=False,
    )


def _pending(
    loop: asyncio.AbstractEventLoop, before: set[asyncio.Task[Any]]
) -> list[asyncio.Task[Any]]:
    """Tasks of ``loop`` not in ``before`` and not done (but the one asking, if any)."""
    current = asyncio.current_task(loop) if loop.is_running() else None
    tasks = asyncio.all_tasks(loop) - before - {current}
    return sorted((t for t in tasks if not t.done()), key=_describe)


async def _settle(before: set[asyncio.Task[Any]]) -> None:
    """A few loop iterations for tasks already ending (cancelled, not yet awaited) to end."""
    loop = asyncio.get_running_loop()
    for _ in range(_SETTLE_ITERATIONS):
        if not _pending(loop, before):
            return
        await asyncio.sleep(0)


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks, timeout=5.0)


def _describe(task: asyncio.Task[Any]) -> str:
    """``'name' (Coro.qualname, suspended at path:line)`` of a pending task."""
    coro = task.get_coro()
    what = getattr(coro, "__qualname__", repr(coro))
    frame = getattr(coro, "cr_frame", None)
    if frame is None:
        return f"{task.get_name()!r} ({what})"
    path = Path(frame.f_code.co_filename)
    with contextlib.suppress(ValueError):
        path = path.relative_to(Path.cwd())
    return f"{task.get_name()!r} ({what}, suspended at {path}:{frame.f_lineno})"

"""The suite's leaked-task check (tests/conftest.py) fails a test that leaves a task pending,
and only such a test: pytest runs in a child process on small test files that use it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")  # the suite's own, as it is
INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
filterwarnings = error
"""

TESTS = """
import asyncio

import pytest


async def forever() -> None:
    await asyncio.Event().wait()


async def test_leaks_a_task() -> None:
    asyncio.create_task(forever(), name="the-leak")


@pytest.mark.looptime
async def test_leaks_a_sleeper_in_fake_time() -> None:
    asyncio.create_task(asyncio.sleep(3600), name="the-sleeper")
    await asyncio.sleep(10)


@pytest.fixture
async def leaky_fixture():
    task = asyncio.create_task(forever(), name="from-a-fixture")
    yield task


async def test_a_fixture_that_leaks(leaky_fixture) -> None:
    pass


@pytest.fixture
async def tidy_fixture():
    task = asyncio.create_task(forever(), name="stopped-by-its-fixture")
    yield task
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_fixture_that_stops_its_task(tidy_fixture) -> None:
    pass


async def test_awaits_its_task() -> None:
    await asyncio.create_task(asyncio.sleep(0.01))


async def test_cancels_without_awaiting() -> None:
    asyncio.create_task(forever()).cancel()  # ends within a loop iteration: not a leak


async def test_a_task_that_finishes_during_teardown() -> None:
    asyncio.create_task(asyncio.sleep(0))


def test_sync() -> None:
    pass
"""


def test_the_check_fails_exactly_the_tests_that_leak(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The suite's conftest imports the suite's own modules (tests.kubeapi): the child pytest
    # finds them from the repository root, as the suite itself does (rootdir on sys.path).
    root = str(CONFTEST.parent.parent)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    )
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makeini(INI)
    pytester.makepyfile(test_leaks=TESTS)
    outcome = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")

    # A leak found after teardown is an error at teardown (the call itself passed); one
    # found when a fake-time test returns fails the test.
    outcome.assert_outcomes(passed=7, failed=1, errors=2)
    text = outcome.stdout.str()
    after = "1 asyncio task(s) still pending after the test and its fixtures ended"
    for test, task in (
        ("test_leaks_a_task", "'the-leak' (forever, suspended at test_leaks.py:"),
        ("test_a_fixture_that_leaks", "'from-a-fixture' (forever, suspended at test_leaks.py:"),
    ):
        assert f"ERROR at teardown of {test} " in text
        assert f"{after} (stop or await them):\n  - {task}" in text
    assert "___ test_leaks_a_sleeper_in_fake_time ___" in text
    assert (
        "1 asyncio task(s) still pending when the test returned (in fake time: looptime) "
        "(stop or await them):\n  - 'the-sleeper' (sleep, suspended at "
    ) in text
    assert "Task was destroyed but it is pending" not in text  # the check cancels what it finds
    summary = {
        line.split()[0] + " " + line.split("::")[1].split()[0]
        for line in outcome.stdout.lines
        if line.startswith(("PASSED ", "FAILED ", "ERROR "))
    }
    assert summary == {
        "PASSED test_leaks_a_task",
        "ERROR test_leaks_a_task",
        "FAILED test_leaks_a_sleeper_in_fake_time",
        "PASSED test_a_fixture_that_leaks",
        "ERROR test_a_fixture_that_leaks",
        "PASSED test_a_fixture_that_stops_its_task",
        "PASSED test_awaits_its_task",
        "PASSED test_cancels_without_awaiting",
        "PASSED test_a_task_that_finishes_during_teardown",
        "PASSED test_sync",
    }

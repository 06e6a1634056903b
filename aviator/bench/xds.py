"""``aviator bench xds``: how fast a weight change reaches many ADS streams, at what cost.

Each *run* starts a fresh ADS server process (``python -m aviator.bench.xds_server``, the
production ``aviator.xds`` server fed directly, no debounce) with a fleet of ``--endpoints``
endpoints in workloads of ``--per-workload`` (default 10: 100 endpoints are 10 workloads,
10,000 are 1,000), and one or more client processes (``python -m aviator.bench.xds_clients``)
holding ``--streams`` simulated Envoys: grpc.aio ADS streams that subscribe to CDS (wildcard),
then to the EDS name of every cluster, and ACK every response with its version and nonce,
state-of-the-world or delta (``--kinds``). The server runs alone in its process, so its CPU
time and resident memory are its own.

Changes are closed-loop: the coordinator tells the clients which serialised CLAs change ``k``
will carry, then asks the server to apply it; the server stamps ``time.time()`` as it reads the
change, rebuilds the snapshot from every workload (as ``aviator run`` does) and publishes it;
each stream stamps ``time.time()`` on receipt (one machine: one clock). *Held* is the moment
the last stream received the change. The next change starts once every push was ACKed, plus
``--gap-ms``. Scenario ``one`` changes one workload per change (``--changes``), ``all`` every
workload at once (``--all-changes``). CPU per update is the server's CPU time from reading a
change to the last ACK it caused.

With ``--envoys K`` a last run adds K real Envoys (SotW and delta alternately, sidecar
bootstraps, ``--concurrency 1``) next to ``--envoy-streams`` simulated streams, and measures
how long each Envoy takes to hold each change: its ``cluster.<name>.update_success`` counter
polled every ``--envoy-poll-ms`` on the admin endpoint; after each change, the weights Envoy
reports in ``/clusters`` for that cluster are checked against the change.

Prints a table, writes ``--json FILE`` and ``--markdown FILE`` (the figures section of
``docs/benchmarks/xds.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp

from aviator.bench.xds_child import Child, ChildError
from aviator.bench.xds_report import (
    ChangeRecord,
    envoy_lines,
    evaluate_goals,
    goal_lines,
    markdown,
    percentile,
    spread,
    summarize_changes,
    text_table,
)
from aviator.bench.xds_server import MAX_SEQ, Fleet, FleetShape, cla_bytes

__all__ = ["Settings", "configure", "run", "settings_from_args"]

KINDS = ("sotw", "delta")


@dataclass(frozen=True, slots=True)
class Settings:
    streams: tuple[int, ...] = (10, 100, 1_000)
    endpoints: tuple[int, ...] = (100, 1_000, 10_000)
    per_workload: int = 10
    kinds: tuple[str, ...] = KINDS
    changes: int = 100
    all_changes: int = 10
    envoys: int = 2
    envoy_endpoints: int = 1_000
    envoy_streams: tuple[int, ...] = (100, 0)
    envoy_changes: int = 100
    envoy_poll_s: float = 0.002
    gap_s: float = 0.02
    timeout_s: float = 30.0
    client_procs: int = 1
    per_channel: int = 1
    grid: bool = True  # False: only the Envoy runs
    probe_timing: bool = False  # real probes from the server process (issue 13, item 6)

    def __post_init__(self) -> None:
        if not self.streams or min(self.streams) < 1:
            raise ValueError(f"--streams must be positive counts, got {self.streams}")
        if not self.endpoints or min(self.endpoints) < 1:
            raise ValueError(f"--endpoints must be positive counts, got {self.endpoints}")
        if unknown := set(self.kinds) - set(KINDS):
            raise ValueError(f"unknown --kinds {sorted(unknown)}: choose from {', '.join(KINDS)}")
        if not self.kinds:
            raise ValueError("--kinds must name at least one of sotw, delta")
        if self.per_workload < 1:
            raise ValueError(f"--per-workload must be >= 1, got {self.per_workload}")
        if self.changes < 0 or self.all_changes < 0 or self.changes + self.all_changes < 1:
            raise ValueError("--changes and --all-changes must be >= 0, and not both 0")
        if max(self.changes + self.all_changes, self.envoy_changes) > MAX_SEQ:
            raise ValueError(f"at most {MAX_SEQ} changes per run")
        if self.envoys < 0 or self.envoy_changes < 1 or min(self.envoy_streams, default=-1) < 0:
            raise ValueError("--envoys and --envoy-streams must be >= 0, --envoy-changes >= 1")
        if self.envoy_poll_s <= 0 or self.gap_s < 0 or self.timeout_s <= 0:
            raise ValueError("--envoy-poll-ms and --timeout must be > 0, --gap-ms >= 0")
        if self.client_procs < 1 or self.per_channel < 1:
            raise ValueError("--client-procs and --per-channel must be >= 1")


QUICK = Settings(
    streams=(10, 100),
    endpoints=(100, 1_000),
    changes=20,
    all_changes=3,
    envoys=1,
    envoy_endpoints=100,
    envoy_streams=(10,),
    envoy_changes=20,
)


def _counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v.replace("_", "")) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected counts like 10,100,1000: {text!r}") from None
    return tuple(dict.fromkeys(values))


def _names(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))


def configure(parser: argparse.ArgumentParser) -> None:
    d = Settings()
    parser.add_argument("--streams", type=_counts, help="simulated ADS streams (10,100,1000)")
    parser.add_argument("--endpoints", type=_counts, help="endpoints in total (100,1000,10000)")
    parser.add_argument(
        "--per-workload", type=int, help=f"endpoints per workload ({d.per_workload})"
    )
    parser.add_argument("--kinds", type=_names, help="sotw,delta (both)")
    parser.add_argument("--changes", type=int, help=f"one-workload changes per run ({d.changes})")
    parser.add_argument(
        "--all-changes", type=int, help=f"all-workload changes per run ({d.all_changes})"
    )
    parser.add_argument("--envoys", type=int, help=f"real Envoys in the last run ({d.envoys})")
    parser.add_argument(
        "--envoy-endpoints", type=int, help=f"endpoints of the Envoy run ({d.envoy_endpoints})"
    )
    parser.add_argument(
        "--envoy-streams",
        type=_counts,
        help="simulated streams beside them, one Envoy run each (100,0)",
    )
    parser.add_argument(
        "--envoy-changes", type=int, help=f"changes in the Envoy run ({d.envoy_changes})"
    )
    parser.add_argument(
        "--envoy-poll-ms", type=float, help=f"admin poll interval ({d.envoy_poll_s * 1000:g})"
    )
    parser.add_argument("--gap-ms", type=float, help=f"pause between changes ({d.gap_s * 1000:g})")
    parser.add_argument("--timeout", type=float, help=f"seconds per change ({d.timeout_s:g})")
    parser.add_argument("--client-procs", type=int, help="client processes (1)")
    parser.add_argument("--per-channel", type=int, help="streams per gRPC connection (1)")
    parser.add_argument(
        "--quick", action="store_true", help="a small grid: 10,100 streams × 100,1000 endpoints"
    )
    parser.add_argument(
        "--no-grid", action="store_true", help="skip the grid: only the runs with real Envoys"
    )
    parser.add_argument(
        "--probe-timing",
        action="store_true",
        help="probe a backend from the server process, from a process of its own, a thread of "
        "its own and the serving loop, and print the probes' round trips during each change "
        "(issue 13, item 6)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write figures")
    parser.add_argument(
        "--markdown", type=Path, default=None, metavar="FILE", help="write the figures as Markdown"
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """``--quick`` picks the small defaults; explicit options override either."""
    base = QUICK if args.quick else Settings()
    given: dict[str, Any] = {
        "streams": args.streams,
        "endpoints": args.endpoints,
        "per_workload": args.per_workload,
        "kinds": args.kinds,
        "changes": args.changes,
        "all_changes": args.all_changes,
        "envoys": args.envoys,
        "envoy_endpoints": args.envoy_endpoints,
        "envoy_streams": args.envoy_streams,
        "envoy_changes": args.envoy_changes,
        "envoy_poll_s": None if args.envoy_poll_ms is None else args.envoy_poll_ms / 1000,
        "gap_s": None if args.gap_ms is None else args.gap_ms / 1000,
        "timeout_s": args.timeout,
        "client_procs": args.client_procs,
        "per_channel": args.per_channel,
        "grid": False if args.no_grid else None,
        "probe_timing": True if args.probe_timing else None,
    }
    return replace(base, **{k: v for k, v in given.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"aviator bench xds: {exc}")
        return 2
    from aviator.bench.xds_child import raise_nofile_limit

    raise_nofile_limit()
    doc = asyncio.run(bench(settings, progress=print, json_path=args.json))
    print()
    print(text_table(doc["runs"]))
    for line in envoy_lines(doc["runs"]):
        print(line)
    print()
    for line in goal_lines([_goal(g) for g in doc["goals"]]):
        print(line)
    if args.markdown is not None:
        args.markdown.write_text(markdown(doc))
    return 0 if doc["complete"] else 1


def _goal(g: dict[str, Any]) -> Any:
    from aviator.bench.xds_report import Goal

    return Goal(**g)


# -- orchestration -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunSpec:
    kind: str
    streams: int
    endpoints: int
    changes: int
    all_changes: int
    envoys: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        extra = f" + {len(self.envoys)} Envoys" if self.envoys else ""
        return f"{self.kind} {self.streams:,} streams × {self.endpoints:,} endpoints{extra}"


def plan_runs(settings: Settings) -> list[RunSpec]:
    """Every run of the grid (endpoints outermost, cheapest first), then the Envoy runs."""
    runs = [
        RunSpec(kind, streams, endpoints, settings.changes, settings.all_changes)
        for endpoints in sorted(settings.endpoints)
        for streams in sorted(settings.streams)
        for kind in settings.kinds
        if settings.grid
    ]
    if settings.envoys:
        envoy_kinds = tuple(settings.kinds[i % len(settings.kinds)] for i in range(settings.envoys))
        runs.extend(
            RunSpec(
                settings.kinds[0],
                streams,
                settings.envoy_endpoints,
                settings.envoy_changes,
                0,
                envoy_kinds,
            )
            for streams in settings.envoy_streams
        )
    return runs


async def bench(
    settings: Settings,
    *,
    progress: Any = print,
    json_path: Path | None = None,
) -> dict[str, Any]:
    """Run every planned run; return (and after each run, write) the document."""
    doc: dict[str, Any] = {
        "benchmark": "xds",
        "settings": {k: getattr(settings, k) for k in Settings.__dataclass_fields__},
        "machine": _machine(await _envoy_version()),
        "runs": [],
        "errors": [],
        "goals": [],
        "complete": False,
    }
    with tempfile.TemporaryDirectory(prefix="aviator-bench-xds-") as tmp:
        for spec in plan_runs(settings):
            progress(f"[xds] {spec.label} ...")
            started = time.perf_counter()
            try:
                result = await _run(spec, settings, Path(tmp), progress)
            except (ChildError, OSError, RuntimeError, TimeoutError, aiohttp.ClientError) as exc:
                doc["errors"].append({"run": spec.label, "error": str(exc)})
                progress(f"[xds] {spec.label}: FAILED: {exc}")
                continue
            doc["runs"].append(result)
            one = result["scenarios"].get("one")
            brief = (
                f"held p99 {one['held_ms']['p99']:.1f} ms"
                if one and one["held_ms"]["p99"] is not None
                else ""
            )
            progress(f"[xds] {spec.label}: done in {time.perf_counter() - started:.0f} s {brief}")
            doc["goals"] = [_asdict(g) for g in evaluate_goals(doc["runs"])]
            if json_path is not None:
                _write_json(json_path, doc)
    doc["complete"] = (
        not doc["errors"]
        and all(
            s["complete"] == s["changes"] and s.get("envoy_missed", 0) == 0
            for r in doc["runs"]
            for s in r["scenarios"].values()
        )
        and all(r.get("envoy_mismatches", 0) == 0 for r in doc["runs"])
    )
    doc["goals"] = [_asdict(g) for g in evaluate_goals(doc["runs"])]
    if json_path is not None:
        _write_json(json_path, doc)
    return doc


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=1) + "\n")


def _asdict(goal: Any) -> dict[str, Any]:
    return {"text": goal.text, "met": goal.met, "detail": goal.detail}


async def _run(
    spec: RunSpec, settings: Settings, tmp: Path, progress: Any = print
) -> dict[str, Any]:
    shape = FleetShape.for_endpoints(spec.endpoints, settings.per_workload)
    fleet = Fleet(shape)
    tag = f"{spec.kind}-{spec.streams}-{spec.endpoints}-{len(spec.envoys)}"
    server = Child("aviator.bench.xds_server", tmp / f"server-{tag}.log", name="xds server")
    procs = min(settings.client_procs, spec.streams) if spec.streams else 0
    clients = [
        Child("aviator.bench.xds_clients", tmp / f"clients-{tag}-{i}.log", name=f"clients {i}")
        for i in range(procs)
    ]
    envoys: list[Any] = []
    session = aiohttp.ClientSession()  # polls the Envoys' admin endpoints
    try:
        await server.start()
        setup = await server.call(
            {
                "op": "setup",
                "workloads": shape.workloads,
                "per_workload": shape.per_workload,
                "probe_timing": settings.probe_timing,
            },
            60,
        )
        port = int(setup["port"])
        # Generous: 1,000 streams each fetching 1,000 CLAs take a while on 2 cores.
        setup_timeout = 120 + spec.streams * shape.workloads / 5_000
        started = time.perf_counter()
        for c in clients:
            await c.start()
        shares = [spec.streams // procs + (i < spec.streams % procs) for i in range(procs)]
        first = 0
        for c, n in zip(clients, shares, strict=True):
            c.send(
                {
                    "op": "connect",
                    "port": port,
                    "streams": n,
                    "kind": spec.kind,
                    "workloads": shape.workloads,
                    "first": first,
                    "per_channel": settings.per_channel,
                }
            )
            first += n
        for c in clients:
            await c.recv(setup_timeout)
        sync_s = time.perf_counter() - started
        for i, kind in enumerate(spec.envoys):
            envoys.append(await _start_envoy(i, kind, port, tmp / f"envoy-{tag}-{i}"))
        for envoy in envoys:
            await _wait_envoy_synced(envoy, fleet, setup_timeout)
        synced = await server.call({"op": "usage"}, 30)
        expected_streams = spec.streams + len(spec.envoys)
        if synced["streams"] != expected_streams:
            raise RuntimeError(
                f"server has {synced['streams']} streams, expected {expected_streams}"
            )
        client_cpu0 = [(await c.call({"op": "usage"}, 30))["cpu_s"] for c in clients]
        wall0 = time.perf_counter()
        scenarios: dict[str, Any] = {}
        verified = mismatches = 0
        seq = 0
        for which, count in (("one", spec.changes), ("all", spec.all_changes)):
            records = []
            for _ in range(count):
                seq += 1
                record, checks = await _change(
                    seq, which, fleet, server, clients, envoys, session, settings
                )
                records.append(record)
                if which == "all" or record.missed:
                    held = "-" if record.held_s is None else f"{record.held_s * 1000:,.0f} ms"
                    lag = max(record.loop_lag_s, default=0.0) * 1000
                    progress(
                        f"[xds]   change {seq} ({which}): held {held}, "
                        f"{record.responses} responses, {record.missed} streams missed it, "
                        f"server loop lag max {lag:,.1f} ms{_probe_line(record)}"
                    )
                verified += checks[0]
                mismatches += checks[1]
                await asyncio.sleep(settings.gap_s)
            if records:
                scenarios[which] = summarize_changes(records)
                after = await server.call({"op": "usage"}, 30)
                scenarios[which]["server_rss_mb_after"] = after["rss_mb"]
                scenarios[which]["server_peak_rss_mb_after"] = after["peak_rss_mb"]
                scenarios[which]["records"] = [_record_json(r) for r in records]
        wall = time.perf_counter() - wall0
        client_cpu = [
            (await c.call({"op": "usage"}, 30))["cpu_s"] - cpu0
            for c, cpu0 in zip(clients, client_cpu0, strict=True)
        ]
        end = await server.call({"op": "usage"}, 30)
        result: dict[str, Any] = {
            "label": spec.label,
            "kind": spec.kind,
            "streams": spec.streams,
            "endpoints": shape.endpoints,
            "workloads": shape.workloads,
            "per_workload": shape.per_workload,
            "envoys": list(spec.envoys),
            "sync_s": sync_s,
            **(
                {"probe_quiet_rtt_ms": _probe_quiet(setup["probe_quiet_s"])}
                if "probe_quiet_s" in setup
                else {}
            ),
            "server": {
                "rss_mb_before_streams": setup["rss_mb"],
                "rss_mb": synced["rss_mb"],
                "rss_mb_end": end["rss_mb"],
                # Peak while every stream fetched everything at once, and over the whole run.
                "peak_rss_mb_sync": synced["peak_rss_mb"],
                "peak_rss_mb": end["peak_rss_mb"],
                "cpu_s_changes": end["cpu_s"] - synced["cpu_s"],
            },
            "clients_cpu_utilisation": [c / wall for c in client_cpu] if wall > 0 else [],
            "scenarios": scenarios,
        }
        if envoys:
            result["envoy_verified"] = verified
            result["envoy_mismatches"] = mismatches
            result["envoy_poll_ms"] = settings.envoy_poll_s * 1000
        return result
    finally:
        await session.close()
        for envoy in envoys:
            await envoy.stop()
        for c in clients:
            await c.stop()
        await server.stop()


def _record_json(r: ChangeRecord) -> dict[str, Any]:
    return {
        "seq": r.seq,
        "held_ms": None if r.held_s is None else r.held_s * 1000,
        "missed": r.missed,
        "cpu_ms": None if r.cpu_s is None else r.cpu_s * 1000,
        "build_ms": r.build_s * 1000,
        "publish_ms": r.publish_s * 1000,
        "responses": r.responses,
        "bytes": r.bytes,
        "envoy_ms": [None if e is None else e * 1000 for e in r.envoy_s],
        "loop_lag_ms_max": max(r.loop_lag_s, default=0.0) * 1000,
    }


def _probe_quiet(samples: dict[str, list[float]]) -> dict[str, Any]:
    """The probes' round trips at rest (--probe-timing), per prober kind, in ms."""
    return {
        k: {q: None if v is None else v * 1000 for q, v in spread(rtts).items()}
        for k, rtts in samples.items()
    }


def _probe_line(record: ChangeRecord) -> str:
    """``, probe RTT p99 thread 1.2 ms / loop 250.0 ms`` (--probe-timing), else empty."""
    if not record.probe_s:
        return ""
    parts = []
    for kind, rtts in sorted(record.probe_s.items()):
        p99 = percentile(rtts, 0.99)
        parts.append(f"{kind} " + ("-" if p99 is None else f"{p99 * 1000:,.1f} ms"))
    return ", probe RTT p99 " + " / ".join(parts)


async def _change(
    seq: int,
    which: str,
    fleet: Fleet,
    server: Child,
    clients: Sequence[Child],
    envoys: Sequence[Any],
    session: aiohttp.ClientSession,
    settings: Settings,
) -> tuple[ChangeRecord, tuple[int, int]]:
    changed = fleet.change(seq, which)
    # The first and last changed CLA by name: with every change in one response per stream
    # (what this server sends), holding both is holding the change.
    needles = [cla_bytes(changed[0]).hex()]
    if len(changed) > 1:
        needles.append(cla_bytes(changed[-1]).hex())
    timeout = settings.timeout_s
    for c in clients:
        c.send({"op": "expect", "seq": seq, "needles": needles, "timeout": timeout})
    for c in clients:
        await c.recv(30)
    cluster = changed[0].key.cluster_name
    baselines = [await _update_success(session, envoy, cluster) for envoy in envoys]
    pollers = [
        asyncio.create_task(
            _poll_envoy(session, envoy, cluster, base, settings.envoy_poll_s, timeout)
        )
        for envoy, base in zip(envoys, baselines, strict=True)
    ]
    try:
        reply = await server.call({"op": "change", "seq": seq, "which": which}, 60)
        held = [await c.recv(timeout + 30) for c in clients]
        reached = [await p for p in pollers]
    finally:
        for p in pollers:
            p.cancel()
    t_change = float(reply["t_change"])
    quiet = await server.call({"op": "quiet", "timeout": timeout}, timeout + 30)
    cpu = float(quiet["cpu_s"]) - float(reply["cpu_s"]) if quiet["quiet"] else None
    checks = (0, 0)
    if envoys:
        expected = {f"{e.address.ip}:{e.address.port}": e.weight for e in changed[0].endpoints}
        ok = 0
        for envoy in envoys:
            hosts = await envoy.admin.hosts(cluster)
            ok += {h.address: h.weight for h in hosts} == expected
        checks = (len(envoys), len(envoys) - ok)
    times = tuple(t for h in held for t in h["times"])
    return (
        ChangeRecord(
            seq=seq,
            which=which,
            t_change=t_change,
            build_s=float(reply["build_s"]),
            publish_s=float(reply["publish_s"]),
            cpu_s=cpu,
            times=times,
            responses=sum(int(h["responses"]) for h in held),
            bytes=sum(int(h["bytes"]) for h in held),
            envoy_s=tuple(None if t is None else t - t_change for t in reached),
            loop_lag_s=tuple(float(x) for x in quiet.get("loop_lag_s", ())),
            probe_s={k: tuple(map(float, v)) for k, v in quiet.get("probe_s", {}).items()},
        ),
        checks,
    )


# -- real Envoys ---------------------------------------------------------------------------------


async def _start_envoy(index: int, kind: str, port: int, workdir: Path) -> Any:
    from aviator.envoy.bootstrap import render_bootstrap
    from aviator.envoy.process import EnvoyProcess, free_port

    bootstrap = render_bootstrap(
        xds_host="127.0.0.1",
        xds_port=port,
        node_id=f"bench-envoy-{index}-{kind}",
        mode="sidecar",
        listen_port=free_port(),
        admin_port=0,
        delta=kind == "delta",
    )
    envoy = EnvoyProcess(bootstrap, workdir=workdir, log_level="warning")
    await envoy.start()
    return envoy


async def _wait_envoy_synced(envoy: Any, fleet: Fleet, within: float) -> None:
    """Until Envoy holds every cluster, none warming, and the last one has its endpoints."""
    last = fleet.workloads()[-1].key.cluster_name
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        stats = await envoy.admin.stats(r"^cluster_manager\.(active|warming)_clusters$")
        if (
            stats.get("cluster_manager.active_clusters", 0) >= fleet.shape.workloads
            and stats.get("cluster_manager.warming_clusters", 1) == 0
            and await envoy.admin.hosts(last)
        ):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"Envoy (pid {envoy.pid}) did not hold the fleet within {within:.0f} s")


def _stat_filter(cluster: str) -> str:
    return f"^cluster\\.{re.escape(cluster)}\\.update_success$"


async def _update_success(session: aiohttp.ClientSession, envoy: Any, cluster: str) -> int:
    """Envoy's ``cluster.<cluster>.update_success`` counter (0 until it was first counted).

    Asked as text with ``type=Counters&usedonly``: about 0.5 ms a poll against 3 ms for
    ``EnvoyAdmin.stats`` (JSON of every stat the filter matches) with 100 clusters, so the
    poll costs Envoy's main thread, which also applies the xDS updates, little.
    """
    params = {"filter": _stat_filter(cluster), "type": "Counters", "usedonly": ""}
    async with session.get(f"{envoy.admin_url}/stats", params=params) as response:
        text = await response.text()
    prefix = f"cluster.{cluster}.update_success: "
    for line in text.splitlines():
        if line.startswith(prefix):
            return int(line[len(prefix) :])
    return 0


async def _poll_envoy(
    session: aiohttp.ClientSession,
    envoy: Any,
    cluster: str,
    baseline: int,
    interval: float,
    within: float,
) -> float | None:
    """``time.time()`` of the first poll answer showing the cluster updated past
    ``baseline``; None after ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        count = await _update_success(session, envoy, cluster)
        at = time.time()
        if count > baseline:
            return at
        await asyncio.sleep(interval)
    return None


# -- the machine ---------------------------------------------------------------------------------


def _machine(envoy_version: str) -> dict[str, Any]:
    import grpc
    from google import protobuf

    cpu = platform.processor() or platform.machine()
    memory_gb = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gb = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": memory_gb,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": protobuf.__version__,
        "envoy": envoy_version,
        "platform": platform.platform(),
    }


async def _envoy_version() -> str:
    from aviator.envoy.process import find_envoy

    try:
        proc = await asyncio.create_subprocess_exec(
            str(find_envoy()),
            "--version",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
    except Exception:
        return "unknown"
    match = re.search(r"/(\d+\.\d+\.\d+)/", out.decode(errors="replace"))
    return match.group(1) if match else "unknown"

"""One run of the latency benchmark: fresh fleet, fresh sidecars (and a fresh control plane for
Aviator), one open-loop load, then everything stopped. I/O shell around the pure plan.

Order of a run (:func:`run_once`):

1. the backend fleet in its own process (each backend reports ORCA load);
2. for a control-plane policy, ``aviator run`` on a directory describing the fleet;
3. ``sidecars`` Envoys (``--concurrency 1``), each waited for until it holds every backend;
4. k6 (:mod:`aviator.testbed.k6load`) initialises its VUs; its setup restarts the backends'
   profile clocks right before the first arrival, so profile time and load time coincide
   (the gap is measured: ``clock_lead_ms``);
5. while the load runs, the first sidecar's view of the cluster (per-host weight, health,
   requests in flight) is sampled every ``SAMPLE_EVERY_S`` (wall-clock stamped, put on the
   load's time afterwards): how CSWRR's ORCA-fed weights and Aviator's EDS weights move;
6. afterwards: the load result, the backends' own counters and the sidecars' cluster stats;
   then sidecars, control plane and fleet are stopped, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Final
from urllib.parse import urlsplit

import structlog

from aviator.bench.controlplane import ControlPlane, ControlPlaneSettings
from aviator.bench.policies import WORKLOAD, Policy, sidecar_bootstrap, workload_host
from aviator.bench.reaction import TRACE_EVERY_S, Trace, reactions
from aviator.bench.records import RunRecord, WeightSample
from aviator.bench.scenarios import RunPlan
from aviator.envoy.errors import EnvoyAdminError
from aviator.envoy.process import EnvoyProcess, free_port
from aviator.model import EndpointAddress
from aviator.testbed.backend import BackendSpec
from aviator.testbed.fleet import Fleet
from aviator.testbed.fleetserver import FleetSpec
from aviator.testbed.k6load import run_k6_load
from aviator.testbed.k6plan import DEFAULT_THINNING, K6RunInfo
from aviator.testbed.loadresult import LoadResult
from aviator.testbed.loadspec import LoadSpec

__all__ = ["run_once"]

log = structlog.get_logger(__name__)

SAMPLE_EVERY_S: Final = 1.0
# Sidecar cluster counters summed over the fleet of sidecars.
_CLUSTER_STATS: Final = (
    "upstream_rq_total",
    "upstream_rq_5xx",
    "upstream_rq_pending_overflow",
    "upstream_cx_total",
    "outlier_detection.ejections_enforced_total",
)
_READY_TIMEOUT_S: Final = 30.0


def _endpoint(url: str) -> EndpointAddress:
    parts = urlsplit(url)
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"backend URL without host or port: {url}")
    return EndpointAddress(parts.hostname, parts.port)


@contextlib.asynccontextmanager
async def _sidecars(
    policy: Policy,
    count: int,
    endpoints: Sequence[EndpointAddress],
    xds: tuple[str, int] | None,
) -> AsyncIterator[list[tuple[EnvoyProcess, int]]]:
    """``count`` running sidecars as (process, listener port); all stopped on exit."""
    envoys: list[tuple[EnvoyProcess, int]] = []
    try:
        for i in range(count):
            port = free_port()
            config = sidecar_bootstrap(
                policy, node_id=f"bench-sidecar-{i}", listen_port=port, endpoints=endpoints, xds=xds
            )
            envoy = EnvoyProcess(config, log_level="error")
            await envoy.start()
            envoys.append((envoy, port))
        yield envoys
    finally:
        await asyncio.gather(*(e.stop() for e, _ in envoys), return_exceptions=True)


async def _wait_for_hosts(envoy: EnvoyProcess, expected: set[str]) -> None:
    """Until the sidecar is LIVE and holds every backend of the workload (for Aviator: the
    first EDS answer arrived; its health is Aviator's business)."""
    async with asyncio.timeout(_READY_TIMEOUT_S):
        await envoy.wait_live()
        while True:
            try:
                hosts = await envoy.admin.hosts(WORKLOAD.cluster_name)
            except EnvoyAdminError:
                hosts = []
            if {h.address for h in hosts} >= expected:
                return
            await asyncio.sleep(0.1)


async def _sample_weights(
    envoy: EnvoyProcess, names: Mapping[str, str], out: list[WeightSample]
) -> None:
    """Append one :class:`WeightSample` per ``SAMPLE_EVERY_S`` until cancelled, stamped with
    the wall clock (``time.time()``); :func:`_on_load_time` moves them onto the load's time."""
    while True:
        await asyncio.sleep(SAMPLE_EVERY_S - time.time() % SAMPLE_EVERY_S)
        try:
            hosts = await envoy.admin.hosts(WORKLOAD.cluster_name)
        except EnvoyAdminError as exc:
            log.debug("weight sample failed", error=str(exc))
            continue
        seen = [h for h in hosts if h.address in names]
        out.append(
            WeightSample(
                t=time.time(),
                weight={names[h.address]: h.weight for h in seen},
                health={names[h.address]: "EJECTED" if h.flags else h.eds_health for h in seen},
                active={names[h.address]: h.rq_active for h in seen},
            )
        )


def _on_load_time(
    samples: Sequence[WeightSample], origin_wall_s: float, until_s: float
) -> list[WeightSample]:
    """The samples taken while arrivals ran, ``t`` in seconds from the first intended send."""
    shifted = [
        WeightSample(t=s.t - origin_wall_s, weight=s.weight, health=s.health, active=s.active)
        for s in samples
    ]
    return [s for s in shifted if 0.0 <= s.t <= until_s]


async def _trace(
    admin_url: str, envoy: EnvoyProcess, names: Mapping[str, str], out: list[Trace]
) -> None:
    """Every ``TRACE_EVERY_S`` until cancelled: the control plane's ``/debug/endpoints`` and the
    sidecar's weights, stamped with the wall clock (moved onto load time afterwards)."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
        while True:
            await asyncio.sleep(TRACE_EVERY_S - time.time() % TRACE_EVERY_S)
            t = time.time()
            try:
                async with session.get(admin_url + "/debug/endpoints") as resp:
                    view = await resp.json()
                hosts = await envoy.admin.hosts(WORKLOAD.cluster_name)
            except (aiohttp.ClientError, TimeoutError, EnvoyAdminError, ValueError) as exc:
                log.debug("trace poll failed", error=str(exc))
                continue
            control = {
                names[e["address"]]: {
                    k: e.get(k) for k in ("latency_ms", "rif", "samples", "weight", "hot")
                }
                for e in view
                if e.get("address") in names
            }
            envoy_w = {names[h.address]: h.weight for h in hosts if h.address in names}
            out.append(Trace(t=t, control=control, envoy=envoy_w))


def _slowdowns(run: RunPlan) -> list[tuple[str, float, float]]:
    """(backend, start, end) in load time of every slowdown that starts inside the run."""
    out = []
    for i, profile in enumerate(run.profiles):
        phases = profile.phases
        for j, ph in enumerate(phases):
            prev = phases[j - 1] if j else None
            if prev is None or ph.mean_service_s <= prev.mean_service_s * 1.5:
                continue
            end = phases[j + 1].start_s if j + 1 < len(phases) else run.duration_s
            out.append((f"b{i}", ph.start_s, end))
    return sorted(out, key=lambda x: x[1])


async def _sidecar_stats(envoys: Sequence[EnvoyProcess]) -> dict[str, int]:
    totals = dict.fromkeys(_CLUSTER_STATS, 0)
    prefix = f"cluster.{WORKLOAD.cluster_name}."
    for envoy in envoys:
        try:
            stats = await envoy.admin.stats(r"^cluster\.bench/bench\.")
        except EnvoyAdminError as exc:
            log.warning("sidecar stats unavailable", error=str(exc))
            continue
        for name in _CLUSTER_STATS:
            totals[name] += stats.get(prefix + name, 0)
    return totals


async def run_once(
    run: RunPlan,
    policy: Policy,
    *,
    repeat: int,
    seed: int,
    sidecars: int = 3,
    deadline_s: float = 5.0,
    control_plane: ControlPlaneSettings | None = None,
    thinning: int = DEFAULT_THINNING,
    vus: int | None = None,
    keep_traces: bool = False,
) -> RunRecord:
    """Run ``policy`` through ``run`` once, on a fresh fleet and fresh proxies.

    Failures of the machinery (a process that does not start, a control plane that is not
    there) end the run with ``error`` set; the processes are stopped either way.
    ``keep_traces``: the record keeps the control plane's 50 ms polls (Aviator runs).
    """
    if sidecars < 1:
        raise ValueError(f"sidecars must be >= 1, got {sidecars}")
    began = time.monotonic()
    weights: list[WeightSample] = []
    backend_stats: dict[str, dict[str, Any]] = {}
    sidecar_stats: dict[str, int] = {}
    result: LoadResult | None = None
    k6: K6RunInfo | None = None
    traces: list[Trace] = []
    reaction: list[dict[str, Any]] = []
    kept: list[dict[str, Any]] = []
    error: str | None = None
    rate = run.mean_rate
    fleet_spec = FleetSpec(
        backends=tuple(
            BackendSpec(f"b{i}", profile, seed=seed * 1000 + i)
            for i, profile in enumerate(run.profiles)
        ),
        agent=run.scenario.agent,
    )
    try:
        async with contextlib.AsyncExitStack() as stack:
            fleet = await stack.enter_async_context(Fleet(fleet_spec))
            urls = fleet.backend_urls
            endpoints = [_endpoint(u) for u in urls.values()]
            names = {str(_endpoint(u)): name for name, u in urls.items()}
            xds: tuple[str, int] | None = None
            cp: ControlPlane | None = None
            if policy.needs_control_plane:
                ports = {n: _endpoint(u).port for n, u in urls.items()}
                cp = await stack.enter_async_context(ControlPlane(ports, settings=control_plane))
                xds = cp.xds_address
            envoys = await stack.enter_async_context(_sidecars(policy, sidecars, endpoints, xds))
            await asyncio.gather(*(_wait_for_hosts(e, set(names)) for e, _ in envoys))
            spec = LoadSpec(
                targets=tuple(f"http://127.0.0.1:{port}" for _, port in envoys),
                duration_s=run.duration_s,
                steps=run.steps,
                host=workload_host(),
                seed=seed,
                deadline_s=deadline_s,
                warmup_s=run.warmup_s,
            )
            raw: list[WeightSample] = []
            sampler = asyncio.create_task(_sample_weights(envoys[0][0], names, raw))
            tracer = (
                asyncio.create_task(_trace(cp.admin_url, envoys[0][0], names, traces))
                if cp is not None
                else None
            )
            try:
                k6 = await run_k6_load(
                    spec,
                    clock_url=fleet.control_url + "/testbed/clock",
                    thinning=thinning,
                    vus=vus,
                )
                result = k6.result
            finally:
                sampler.cancel()
                if tracer is not None:
                    tracer.cancel()
                # Not `suppress(CancelledError)`: that would also swallow our own cancellation.
                await asyncio.gather(sampler, *([tracer] if tracer else []), return_exceptions=True)
            weights.extend(_on_load_time(raw, k6.origin_wall_s, run.duration_s))
            if traces:
                threshold = (control_plane or ControlPlaneSettings()).latency_threshold_ms
                on_load = [
                    Trace(t=tr.t - k6.origin_wall_s, control=tr.control, envoy=tr.envoy)
                    for tr in traces
                ]
                reaction = [r.to_json() for r in reactions(on_load, _slowdowns(run), threshold)]
                if keep_traces:
                    kept = [tr.to_json() for tr in on_load if 0.0 <= tr.t <= run.duration_s]
            backend_stats = {n: s.to_json() for n, s in (await fleet.stats()).items()}
            sidecar_stats = await _sidecar_stats([e for e, _ in envoys])
    except Exception as exc:  # reported in the record and the output, never hidden
        error = f"{type(exc).__name__}: {exc}"
        log.error(
            "benchmark run failed", policy=policy.name, scenario=run.scenario.name, error=error
        )
    return RunRecord(
        scenario=run.scenario.name,
        load_fraction=run.load,
        policy=policy.name,
        repeat=repeat,
        seed=seed,
        sidecars=sidecars,
        offered_rate=rate,
        load=result,
        weights=tuple(weights),
        backend_stats=backend_stats,
        sidecar_stats=sidecar_stats,
        wall_s=time.monotonic() - began,
        error=error,
        generator=k6.to_json() if k6 is not None else None,
        reaction=tuple(reaction),
        traces=tuple(kept),
    )

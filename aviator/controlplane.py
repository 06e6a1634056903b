"""The composition root: one function of the whole control plane.

``ControlPlane`` builds every component (source, store, prober, estimator, weigher state,
publisher, cache, ADS server, admin server) and owns every long-running task in one
``asyncio.TaskGroup``. A task that ends on its own is an error and stops the whole control
plane; :meth:`ControlPlane.stop` is the graceful way out.

The flow on each change:

- a new ``ClusterState`` → resolve (pure) → probe targets (``Prober.set_targets``) and the
  set of served workloads → a new snapshot;
- every ``reweigh_interval`` → estimator stats at ``now`` → ``weigh`` per workload (pure; the
  previous result carries hysteresis) → a new snapshot only if some weights changed;
- snapshots go through the debounced ``Publisher`` to the ``Cache``, which wakes only the ADS
  streams subscribed to what changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import socket
import uuid
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any

import prometheus_client
import structlog

from aviator.admin import AdminServer
from aviator.k8s.lastvalid import LastValid
from aviator.k8s.resolve import ACCEPTED, PolicyResolution, resolve_state, serving
from aviator.k8s.state import ClusterState
from aviator.model import WeightedWorkload, WorkloadKey, parse_host_port
from aviator.probing.estimator import Estimator
from aviator.probing.prober import (
    DEFAULT_MAX_PROBE_RATE,
    AddressPolicy,
    Prober,
    TransportFactory,
    spread_probe_budget,
)
from aviator.probing.results import ProbeKey, ProbeOutcome, ProbeResult, ProbeTarget
from aviator.probing.weigher import WeighResult, WorkloadWeigher
from aviator.source.directory import DirectorySource
from aviator.source.store import StateSource, Store
from aviator.source.yamlfiles import DEFAULT_LIMITS, Limits
from aviator.xds.cache import Cache
from aviator.xds.publisher import Publisher
from aviator.xds.resources import GatewayConfig, ListenSpec
from aviator.xds.server import AdsServer, ServerLimits, ServerTls, StreamLimits
from aviator.xds.snapshot import SnapshotBuilder, SnapshotError

log = structlog.get_logger(__name__)

DEFAULT_XDS_ADDRESS = "127.0.0.1:18000"
DEFAULT_ADMIN_ADDRESS = "127.0.0.1:18001"


class ControlPlaneError(Exception):
    """The control plane cannot start or keep running (bad address, source failure)."""


class TaskEndedError(ControlPlaneError):
    """A long-running task of the control plane returned or raised on its own.

    Nothing but :meth:`ControlPlane.stop` ends the control plane cleanly: a task that ends
    otherwise leaves a process that looks alive and serves stale state, so :meth:`run`
    stops everything and raises this, and ``aviator run`` exits 1 for a supervisor to
    restart it. ``task`` is the task's name (``source``, ``reconcile``, ``prober``, ...).
    """

    def __init__(self, task: str, error: BaseException | None = None) -> None:
        self.task = task
        self.error = error
        if error is None:
            message = f"control-plane task {task!r} ended on its own"
        else:
            detail = " ".join(str(error).split())
            message = f"control-plane task {task!r} failed: {type(error).__name__}: {detail}"
        super().__init__(message)


async def _supervised(name: str, work: Awaitable[None]) -> None:
    """Run ``work``; its return or its exception becomes a :class:`TaskEndedError`."""
    try:
        await work
    except Exception as exc:
        raise TaskEndedError(name, exc) from exc
    raise TaskEndedError(name)


def make_source(
    spec: str,
    *,
    kubeconfig: str | None = None,
    context: str | None = None,
    namespaces: tuple[str, ...] = (),
    limits: Limits = DEFAULT_LIMITS,
) -> StateSource:
    """``dir:PATH`` → a directory source, ``kubernetes`` → the API server (in-cluster
    credentials unless ``kubeconfig``; every namespace unless ``namespaces``; a directory's files
    bounded by ``limits``). ValueError for anything else, and for Kubernetes options given to
    another source."""
    kind, sep, arg = spec.partition(":")
    if spec == "kubernetes":
        from aviator.source.kubernetes import KubernetesSource

        return KubernetesSource(kubeconfig=kubeconfig, context=context, namespaces=namespaces)
    if kubeconfig is not None or context is not None or namespaces:
        raise ValueError("--kubeconfig, --context and --namespace need --source kubernetes")
    if kind == "dir" and sep and arg:
        if not os.path.isdir(arg):
            raise ValueError(f"--source {spec}: {arg!r} is not a directory")
        return DirectorySource(arg, limits=limits)
    raise ValueError(f"--source must be dir:PATH or kubernetes, got {spec!r}")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything ``aviator run`` is told, parsed once."""

    source: str
    xds_address: str = DEFAULT_XDS_ADDRESS
    admin_address: str = DEFAULT_ADMIN_ADDRESS
    gateway: GatewayConfig | None = dataclasses.field(default_factory=GatewayConfig)
    identifier: str = dataclasses.field(
        default_factory=lambda: f"aviator/{socket.gethostname()}/{uuid.uuid4().hex[:8]}"
    )
    reweigh_interval: float = 0.1  # how often estimates become weights (pushes are rarer)
    publish_quiet: float = 0.05
    publish_max_delay: float = 0.25
    max_probes_in_flight: int = 256
    # Probes per second for every endpoint together; above it every interval is stretched by
    # one factor (spread_probe_budget; aviator run --max-probe-rate; issue 9, item 6).
    max_probe_rate: float = DEFAULT_MAX_PROBE_RATE
    # --source kubernetes only: a kubeconfig (else in-cluster), its context, the namespaces.
    kubeconfig: str | None = None
    context: str | None = None
    namespaces: tuple[str, ...] = ()
    # Pods on loopback or link-local addresses are not probed unless allowed (issue 14;
    # AddressPolicy): the demo and the tests run their pods on 127.0.0.1.
    allow_probe_loopback: bool = False
    allow_probe_link_local: bool = False
    debug_views: bool = True  # /debug/* on the admin server (aviator run --no-debug-views)
    # xDS over TLS (all three: mutual TLS), and the node ids allowed to connect (empty: any).
    xds_tls_cert: str | None = None
    xds_tls_key: str | None = None
    xds_tls_client_ca: str | None = None
    xds_allowed_nodes: tuple[str, ...] = ()
    source_limits: Limits = DEFAULT_LIMITS  # what one manifest file may cost (dir source)

    def __post_init__(self) -> None:
        parse_host_port(self.xds_address, any_port=True)
        parse_host_port(self.admin_address, any_port=True)
        if not self.reweigh_interval > 0:
            raise ValueError("reweigh_interval must be > 0")
        if not (math.isfinite(self.max_probe_rate) and self.max_probe_rate > 0):
            raise ValueError(f"--max-probe-rate must be a number > 0, got {self.max_probe_rate!r}")
        if (self.xds_tls_cert is None) != (self.xds_tls_key is None):
            raise ValueError("--xds-tls-cert and --xds-tls-key go together")
        if self.xds_tls_client_ca is not None and self.xds_tls_cert is None:
            raise ValueError("--xds-tls-client-ca needs --xds-tls-cert and --xds-tls-key")

    def xds_tls(self) -> ServerTls | None:
        if self.xds_tls_cert is None or self.xds_tls_key is None:
            return None
        return ServerTls(self.xds_tls_cert, self.xds_tls_key, self.xds_tls_client_ca)


@dataclass(slots=True)
class _Served:
    """One served workload: its resolution, its last weights, and the weigher that keeps its
    endpoints' signals between passes (built at the first pass, kept across states while the
    endpoints, knobs and threshold stay the same)."""

    resolution: PolicyResolution
    weights: WeighResult | None = None
    weigher: WorkloadWeigher | None = None

    def carried_from(self, old: _Served | None) -> _Served:
        """This workload's weighing state from ``old``, its previous resolution: the weights
        always (they carry the hysteresis), the weigher when it still weighs the same."""
        if old is None:
            return self
        self.weights = old.weights
        new, before = self.resolution, old.resolution
        if (
            old.weigher is not None
            and new.policy is not None
            and before.policy is not None
            and new.policy.weigher == before.policy.weigher
            and new.policy.latency_threshold == before.policy.latency_threshold
            and [e.address for e in new.endpoints] == [e.address for e in before.endpoints]
        ):
            self.weigher = old.weigher
        return self


class ControlPlane:
    """Owns every component; ``await run()`` until :meth:`stop` or a failure."""

    def __init__(
        self,
        settings: Settings,
        *,
        source: StateSource | None = None,
        transport_factory: TransportFactory | None = None,
        registry: prometheus_client.CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry or prometheus_client.CollectorRegistry()
        self.source = source or make_source(
            settings.source,
            kubeconfig=settings.kubeconfig,
            context=settings.context,
            namespaces=settings.namespaces,
            limits=settings.source_limits,
        )
        self.store = Store()
        self.cache = Cache()
        self._builder = SnapshotBuilder()  # rebuilds only the workloads that changed
        self.publisher = Publisher(
            self.cache, quiet=settings.publish_quiet, max_delay=settings.publish_max_delay
        )
        # The gateway listeners connected nodes want (their bootstraps' --listen and
        # --listen-address); built into every snapshot next to the default one.
        self._listeners: frozenset[ListenSpec] = frozenset()
        self._built = False  # a snapshot was built from the state: listener changes rebuild
        self.ads = AdsServer(
            self.cache,
            identifier=settings.identifier,
            metrics_registry=self.registry,
            gateway=settings.gateway,
            on_listeners=self._listeners_wanted,
            limits=ServerLimits(
                stream=StreamLimits(allowed_nodes=frozenset(settings.xds_allowed_nodes) or None)
            ),
            tls=settings.xds_tls(),
        )
        self.estimator: Estimator[ProbeKey] = Estimator()
        self.prober: Prober[ProbeKey] = Prober(
            self._on_probe,
            max_in_flight=settings.max_probes_in_flight,
            transport_factory=transport_factory,
            addresses=AddressPolicy(
                allow_loopback=settings.allow_probe_loopback,
                allow_link_local=settings.allow_probe_link_local,
            ),
        )
        self._pods: dict[ProbeKey, str] = {}  # the pod of each probe target, for problems
        self.admin = AdminServer(
            registry=self.registry,
            ready=self.readiness,
            views={
                "policies": self.policies_view,
                "endpoints": self.endpoints_view,
                "proxies": self.proxies_view,
                "problems": self.problems_view,
            },
            debug=settings.debug_views,
        )
        self._state: ClusterState | None = None
        self._resolutions: tuple[PolicyResolution, ...] = ()
        self._last_valid = LastValid()  # what an invalid policy keeps serving (issue 9)
        self._served: dict[WorkloadKey, _Served] = {}
        self._reported: dict[str, str] = {}  # what was last logged per object, to log changes
        self._stop = asyncio.Event()
        self.xds_port: int | None = None
        self.admin_port: int | None = None
        self._probes = prometheus_client.Counter(
            "aviator_probes", "Probe results by outcome", ["outcome"], registry=self.registry
        )
        self._weight_changes = prometheus_client.Counter(
            "aviator_weight_changes", "Workloads whose weights changed", registry=self.registry
        )
        self._policies = prometheus_client.Gauge(
            "aviator_policies", "Policies by serving state", ["serving"], registry=self.registry
        )
        self._endpoints = prometheus_client.Gauge(
            "aviator_endpoints", "Endpoints served", registry=self.registry
        )
        self._probe_stretch = prometheus_client.Gauge(
            "aviator_probe_interval_stretch",
            "Factor the probe budget (--max-probe-rate) stretches every pingInterval by (1: none)",
            registry=self.registry,
        )
        self._probe_stretch.set(1.0)
        self._stretch = 1.0

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, *, started: asyncio.Event | None = None) -> None:
        """Start the servers, run every task, stop everything on :meth:`stop` or failure."""
        host, port = parse_host_port(self.settings.admin_address, any_port=True)
        try:
            self.xds_port = await self.ads.start(self.settings.xds_address)
            self.admin_port = await self.admin.start(host, port)
        except OSError as exc:
            await self.ads.stop(0)
            raise ControlPlaneError(str(exc)) from exc
        log.info(
            "control plane started",
            source=self.source.name,
            xds_port=self.xds_port,
            admin_port=self.admin_port,
        )
        if started is not None:
            started.set()
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(_supervised(name, work), name=name)
                    for name, work in (
                        ("source", self.source.run(self.store)),
                        ("reconcile", self._follow_state()),
                        ("prober", self.prober.run()),
                        ("weigher", self._reweigh_loop()),
                        ("publisher", self.publisher.run()),
                    )
                ]
                # A task that ends raises TaskEndedError, which makes the group cancel this
                # wait and every other task; the group then raises it (in an ExceptionGroup).
                await self._stop.wait()
                for task in tasks:
                    task.cancel()
        except* TaskEndedError as group:
            ended = group.exceptions[0]
            assert isinstance(ended, TaskEndedError)
            # One line, no traceback: the supervisor's log shows why the process restarted.
            log.error("control plane stopping", task=ended.task, reason=str(ended))
            raise ended from ended.error
        finally:
            await self.prober.close()
            self.publisher.publish_now()
            await self.admin.stop()
            await self.ads.stop(0.5)
            log.info("control plane stopped")

    def stop(self) -> None:
        """Ask :meth:`run` to finish (signal handlers call this)."""
        self._stop.set()

    def readiness(self) -> tuple[bool, list[str]]:
        reasons = []
        if not self.store.synced:
            reasons.append(f"source {self.source.name} not read yet")
        if self.xds_port is None:
            reasons.append("xDS server not listening")
        return not reasons, reasons

    # -- state → targets → snapshot --------------------------------------------------------

    async def _follow_state(self) -> None:
        async for state in self.store.updates():
            self.apply_state(state)

    def apply_state(self, state: ClusterState) -> None:
        """Resolve ``state``, retarget the prober and publish the new set of workloads."""
        self._state = state
        # Every source's invalid policies keep serving their last valid spec (issue 9).
        self._last_valid = self._last_valid.update(state.policies)
        self._resolutions = resolve_state(state, last_valid=self._last_valid)
        self._report()
        now_serving = serving(self._resolutions)
        served: dict[WorkloadKey, _Served] = {}
        for key, resolution in now_serving.items():
            served[key] = _Served(resolution).carried_from(self._served.get(key))
        self._served = served
        targets = self._probe_targets()
        self.prober.set_targets(targets)
        # Staleness and half-lives follow each endpoint's pingInterval (issue 9).
        self.estimator.track({k: t.interval_s for k, t in targets.items()})
        self._policies.labels(serving="true").set(len(served))
        self._policies.labels(serving="false").set(len(self._resolutions) - len(served))
        self._endpoints.set(sum(len(s.resolution.endpoints) for s in served.values()))
        self.reweigh(asyncio.get_running_loop().time(), force=True)

    def _probe_targets(self) -> dict[ProbeKey, ProbeTarget]:
        """One target per served endpoint: the pod's own IP (from its status, never from the
        policy), the probe port resolved on that pod, the policy's path. The prober refuses
        the addresses its AddressPolicy does not allow (``probe_refusals``)."""
        targets: dict[ProbeKey, ProbeTarget] = {}
        self._pods = {}
        for key, s in self._served.items():
            policy = s.resolution.policy
            assert policy is not None  # serving resolutions carry their policy
            for e in s.resolution.endpoints:
                self._pods[ProbeKey(key, e.address)] = e.pod
                targets[ProbeKey(key, e.address)] = ProbeTarget(
                    ip=e.address.ip,
                    port=e.probe_port,
                    path=policy.probe.path,
                    interval_s=policy.ping_interval.seconds,
                    timeout_s=policy.probe.timeout.seconds,
                )
        targets, stretch = spread_probe_budget(targets, self.settings.max_probe_rate)
        if stretch != self._stretch:
            self._stretch = stretch
            self._probe_stretch.set(stretch)
            log.info(
                "probe budget: every pingInterval stretched"
                if stretch > 1
                else "probe budget: met",
                max_probe_rate=self.settings.max_probe_rate,
                asked_per_s=round(stretch * self.settings.max_probe_rate, 1)
                if stretch > 1
                else None,
                stretch=round(stretch, 3),
            )
        return targets

    def _on_probe(self, key: ProbeKey, result: ProbeResult) -> None:
        self._probes.labels(outcome=result.outcome.value).inc()
        self.estimator.observe(key, result, result.finished_at)
        if result.outcome is not ProbeOutcome.OK:
            log.debug("probe failed", target=str(key), outcome=result.outcome, detail=result.detail)

    async def _reweigh_loop(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.settings.reweigh_interval
        while True:
            await asyncio.sleep(delay)
            start = loop.time()
            self.reweigh(start)
            delay = reweigh_delay(self.settings.reweigh_interval, loop.time() - start)

    def reweigh(self, now: float, *, force: bool = False) -> bool:
        """Weigh every served workload at ``now``; submit a snapshot if anything changed.

        Each workload's :class:`WorkloadWeigher` is given the statistics of the endpoints the
        estimator says moved since the last pass (``take_changes``), not every endpoint's:
        with 10,000 endpoints a pass read and weighed all of them, 0.3-0.8 s each, most of a
        core at rest (issue 9, item 6). A workload with nothing new is not weighed at all."""
        changed = force
        moved: dict[WorkloadKey, list[ProbeKey]] = {}
        for probe_key in self.estimator.take_changes(now):
            moved.setdefault(probe_key.workload, []).append(probe_key)
        for key, s in self._served.items():
            policy = s.resolution.policy
            assert policy is not None
            weigher = s.weigher
            if weigher is None:
                weigher = s.weigher = WorkloadWeigher(
                    (e.address for e in s.resolution.endpoints),
                    knobs=policy.weigher,
                    latency_threshold_s=policy.latency_threshold.seconds,
                    previous=s.weights,
                )
                weigher.update(
                    {
                        e.address: self.estimator.stats(ProbeKey(key, e.address), now)
                        for e in s.resolution.endpoints
                    }
                )
            elif keys := moved.get(key):
                weigher.update({k.address: self.estimator.stats(k, now) for k in keys})
            result = weigher.weigh()
            if result.changed:
                self._weight_changes.inc()
                changed = True
            s.weights = result
        if changed:
            self._submit()
        return changed

    def workloads(self) -> list[WeightedWorkload]:
        out = []
        for key, s in sorted(self._served.items()):
            endpoints = s.weights.as_tuple() if s.weights is not None else ()
            out.append(WeightedWorkload(key, s.resolution.traffic_port, endpoints))
        return out

    def _listeners_wanted(self, listeners: frozenset[ListenSpec]) -> None:
        """The ADS server's nodes want other gateway listeners: rebuild with them (not before
        the state was read: an empty snapshot would withdraw every cluster)."""
        self._listeners = listeners
        if self._built:
            self._submit()

    def _submit(self) -> None:
        self._built = True
        try:
            snapshot = self._builder.build(
                self.workloads(), gateway=self.settings.gateway, listeners=self._listeners
            )
        except SnapshotError as exc:
            log.error("cannot build a snapshot, keeping the last one", problems=exc.problems)
            return
        self.publisher.submit(snapshot)

    def _report(self) -> None:
        """Log each policy's conditions once, when they change (the source logs its own
        problems: broken files and objects)."""
        seen: dict[str, str] = {}
        for r in self._resolutions:
            ref = str(r.ref)
            seen[ref] = "; ".join(f"{c.type}={c.status} {c.reason}" for c in r.conditions)
            accepted = r.condition(ACCEPTED)
            if r.last_valid and r.serving and accepted is not None:
                # Once per invalid update, whatever else changes while it is served.
                seen[ref] = f"last valid: {accepted.message}"
            if self._reported.get(ref) == seen[ref]:
                continue
            bad = [c for c in r.conditions if c.status.value != "True"]
            if r.last_valid and r.serving and r.policy is not None and accepted is not None:
                log.warning(
                    "policy update invalid, serving its last valid spec",
                    policy=ref,
                    reason=accepted.reason.value,
                    message=accepted.message,
                    resource_version=r.policy.meta.resource_version,
                    generation=r.policy.meta.generation,
                )
                continue
            for c in bad:
                log.warning(
                    "policy not serving",
                    policy=ref,
                    condition=c.type,
                    reason=c.reason.value,
                    message=c.message,
                )
            if not bad:
                log.info("policy serving", policy=ref, endpoints=len(r.endpoints))
        self._reported = seen

    # -- views -----------------------------------------------------------------------------

    def policies_view(self) -> list[dict[str, Any]]:
        return [
            {
                "policy": str(r.ref),
                "serving": r.serving,
                # The current spec is invalid; "spec" is the last valid one, still served.
                "servingLastValid": r.last_valid and r.serving,
                "target": str(r.target.ref) if r.target is not None else None,
                "port": r.port,
                "conditions": [
                    {
                        "type": c.type,
                        "status": c.status.value,
                        "reason": c.reason.value,
                        "message": c.message,
                    }
                    for c in r.conditions
                ]
                + _refused_condition(r, self.probe_refusals()),
                "pods": r.pods,
                "endpoints": len(r.endpoints),
                "notReady": list(r.not_ready),
                "spec": r.policy.spec_dict() if r.policy is not None else None,
            }
            for r in self._resolutions
        ]

    def endpoints_view(self) -> list[dict[str, Any]]:
        now = asyncio.get_running_loop().time()
        out = []
        for key, s in sorted(self._served.items()):
            weights: Mapping[Any, Any] = s.weights.endpoints if s.weights is not None else {}
            hot = s.weights.hot if s.weights is not None else frozenset()
            for e in s.resolution.endpoints:
                st = self.estimator.stats(ProbeKey(key, e.address), now)
                we = weights.get(e.address)
                out.append(
                    {
                        "workload": key.cluster_name,
                        "address": str(e.address),
                        "pod": e.pod,
                        "zone": e.zone,
                        "weight": we.weight if we is not None else None,
                        "health": we.health.value if we is not None else None,
                        "hot": e.address in hot,
                        "latency_ms": _ms(st.latency_s) if st else None,
                        "probe_latency_ms": _ms(st.probe_latency_s) if st else None,
                        "reported_latency_ms": _ms(st.reported_latency_s) if st else None,
                        "rif": st.rif if st else None,
                        "error_rate": round(st.error_rate, 4) if st else None,
                        "samples": st.samples if st else 0,
                        "age_s": round(st.age_s, 3) if st else None,
                    }
                )
        return out

    def proxies_view(self) -> dict[str, Any]:
        return {
            "identifier": self.settings.identifier,
            "proxies": [dataclasses.asdict(p) for p in self.ads.proxies()],
            "nacks": [dataclasses.asdict(n) for n in self.ads.nacks()],
        }

    def probe_refusals(self) -> list[tuple[WorkloadKey, str]]:
        """(workload, message) for each endpoint the prober refuses to contact: it is served
        with no probe data (a neutral weight), and nothing else changes."""
        return [
            (
                key.workload,
                f"{key.workload}: pod {self._pods.get(key, '?')} at {key.address} is not "
                f"probed: {why}",
            )
            for key, why in sorted(self.prober.refused.items())
        ]

    def problems_view(self) -> list[str]:
        problems = [str(p) for p in self._state.problems] if self._state is not None else []
        return problems + [message for _, message in self.probe_refusals()]


def _refused_condition(
    r: PolicyResolution, refusals: list[tuple[WorkloadKey, str]]
) -> list[dict[str, str]]:
    """A ``Probed=False`` condition naming each pod the prober refused, if any."""
    messages = [m for workload, m in refusals if r.serving and r.key == workload]
    if not messages:
        return []
    return [
        {
            "type": "Probed",
            "status": "False",
            "reason": "ProbeAddressRefused",
            "message": "; ".join(messages),
        }
    ]


def reweigh_delay(interval: float, took: float) -> float:
    """Seconds to wait before the next weighing pass, after one that took ``took``.

    A pass is O(endpoints) on the event loop (10,000 endpoints: about 0.3 s), and at a fixed
    ``interval`` a big fleet kept the loop busy weighing most of the time (half a core, the
    admin port answering in over a second, the prober starved: issue 9, item 6). Waiting at
    least four times what the pass took keeps weighing under a fifth of the loop; fleets
    whose pass is under a quarter of ``interval`` are weighed every ``interval`` as before.
    """
    return max(interval, 4 * took)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


async def run_until_signalled(control_plane: ControlPlane) -> None:
    """Run until SIGINT/SIGTERM, then stop gracefully."""
    import signal

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, control_plane.stop)
    try:
        await control_plane.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

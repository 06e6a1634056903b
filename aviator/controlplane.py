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

With ``--source kubernetes`` the control plane also runs the operator
(:mod:`aviator.operator.runtime`: status, the leader Lease, Events, annotations, Services),
told after each resolve, after each reweigh that changed something (and once a second), and
every second of what its own proxies hold. The operator never takes serving down: its failures
are logged, it is restarted with back-off, and xDS keeps serving (issue 12).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import math
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import prometheus_client
import structlog
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from aviator.admin import AdminServer, ScrapeCollector, add_process_metrics
from aviator.heap import HeapKeeper
from aviator.k8s.fields import dns_label_error
from aviator.k8s.lastvalid import LastValid
from aviator.k8s.resolve import ACCEPTED, PolicyResolution, resolve_state, serving
from aviator.k8s.state import ClusterState
from aviator.log import configured as log_setup
from aviator.model import EndpointAddress, WeightedWorkload, WorkloadKey, parse_host_port
from aviator.operator.xds_acks import XdsAcks
from aviator.probing.estimator import EndpointStats, Estimator
from aviator.probing.prober import (
    DEFAULT_MAX_PROBE_RATE,
    Prober,
    ProbeSink,
    spread_probe_budget,
)
from aviator.probing.process import ProberProcess, ProberSpec
from aviator.probing.results import ProbeKey, ProbeOutcome, ProbeResult, ProbeTarget
from aviator.probing.thread import ProberThread
from aviator.probing.transport import TransportFactory
from aviator.probing.weigher import WeighResult, WorkloadWeigher
from aviator.source.directory import DirectorySource
from aviator.source.store import StateSource, Store
from aviator.source.yamlfiles import DEFAULT_LIMITS, Limits
from aviator.xds.cache import Cache
from aviator.xds.publisher import Publisher
from aviator.xds.resources import ENDPOINT_TYPE, GatewayConfig, ListenSpec
from aviator.xds.server import AdsServer, ServerLimits, ServerTls, StreamLimits
from aviator.xds.snapshot import Snapshot, SnapshotBuilder, SnapshotError

if TYPE_CHECKING:  # the operator loads the Kubernetes client: only with --source kubernetes
    from aviator.operator.runtime import Operator, OperatorSettings

log = structlog.get_logger(__name__)

DEFAULT_OPERATOR_NAMESPACE = "aviator-system"
OPERATOR_BACKOFF = (1.0, 60.0)  # seconds before restarting a failed operator: first, ceiling
ACK_POLL_INTERVAL = 1.0  # how often this replica's proxies' ACKs are counted for the operator
DEFAULT_XDS_ADDRESS = "127.0.0.1:18000"
DEFAULT_ADMIN_ADDRESS = "127.0.0.1:18001"
MAX_ENDPOINT_WEIGHT_SERIES = 100_000  # the opt-in per-endpoint weights: a scrape's worth
# Probe round trips: a millisecond on a LAN to the longest timeout a policy may set.
PROBE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PROBLEM_KINDS = (  # aviator_problems{kind}: every kind is always exported (0 when none)
    "file",  # a manifest file that could not be read or parsed (directory source)
    "object",  # a problem with an object (one per field at fault): kind, shape, a value
    "policy_invalid",  # a policy whose spec does not validate (Accepted=False, Invalid)
    "policy_conflicted",  # a second policy for a workload (Accepted=False, Conflicted)
    "policy_target_not_found",  # ResolvedRefs=False, TargetNotFound
    "policy_port_not_found",  # ResolvedRefs=False, PortNotFound
    "probe_refused",  # a pod address the prober refuses to contact (AddressPolicy)
    "proxy_metadata",  # node metadata of a connected proxy that was ignored
)


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
    # Freeze the long-lived heap out of the collector's full passes (aviator.heap); process-wide,
    # so off unless asked: `aviator run` asks (--no-freeze-heap), an embedding program may not.
    freeze_heap: bool = False
    # Where probes run: "process" (aviator.probing.process: a child process, so a probe's
    # round trip waits for nothing of the control plane's, not even its GIL; `aviator run`'s
    # default), "thread" (aviator.probing.thread: a thread and loop of its own) or "loop" (this
    # event loop: the default, so that tests on fake loop time drive the prober).
    probe_in: str = "loop"
    # xDS over TLS (all three: mutual TLS), and the node ids allowed to connect (empty: any).
    xds_tls_cert: str | None = None
    xds_tls_key: str | None = None
    xds_tls_client_ca: str | None = None
    xds_allowed_nodes: tuple[str, ...] = ()
    source_limits: Limits = DEFAULT_LIMITS  # what one manifest file may cost (dir source)
    # --source kubernetes only: write status, Events, the Lease... (aviator.operator); the
    # namespace of its Leases (else $POD_NAMESPACE, else aviator-system).
    operator: bool = True
    operator_namespace: str | None = None
    # aviator_endpoint_weight, one series per endpoint (labels: workload, address), for at
    # most this many endpoints; 0: not exported (addresses as labels are unbounded).
    endpoint_weight_metrics: int = 0

    def __post_init__(self) -> None:
        if self.operator_namespace is not None:
            if self.source != "kubernetes":
                raise ValueError("--operator-namespace needs --source kubernetes")
            if (why := dns_label_error(self.operator_namespace)) is not None:
                raise ValueError(f"--operator-namespace {self.operator_namespace!r}: {why}")
        parse_host_port(self.xds_address, any_port=True)
        parse_host_port(self.admin_address, any_port=True)
        if not self.reweigh_interval > 0:
            raise ValueError("reweigh_interval must be > 0")
        if not 0 <= self.endpoint_weight_metrics <= MAX_ENDPOINT_WEIGHT_SERIES:
            raise ValueError(
                f"--endpoint-weight-metrics must be in 0..{MAX_ENDPOINT_WEIGHT_SERIES}, "
                f"got {self.endpoint_weight_metrics}"
            )
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


#: The interpreter's thread switch interval ``aviator run`` sets (Python's default: 5 ms). While
#: the worker thread weighs, the loop waits up to one interval each time it takes the
#: interpreter back (after every socket call): with 10,000 pods answering, ``/healthz`` at
#: rest took up to 201 ms (p99 135) at 5 ms and 53 ms (p99 30) at 1 ms.
SWITCH_INTERVAL_S = 0.001


@dataclass(frozen=True, slots=True)
class _WeighJob:
    """One workload's part of a weighing pass: its weigher and what moved (``fresh``: the
    weigher is new, ``stats`` holds every endpoint)."""

    key: WorkloadKey
    served: _Served
    weigher: WorkloadWeigher
    stats: dict[EndpointAddress, EndpointStats | None]
    fresh: bool


def _weigh(jobs: list[_WeighJob]) -> list[tuple[_WeighJob, WeighResult]]:
    """The rule over each job: touches only the jobs' weighers (the worker thread's while a
    pass is off the loop)."""
    out = []
    for job in jobs:
        if job.stats or job.fresh:
            job.weigher.update(job.stats)
        out.append((job, job.weigher.weigh()))
    return out


class ControlPlane:
    """Owns every component; ``await run()`` until :meth:`stop` or a failure."""

    def __init__(
        self,
        settings: Settings,
        *,
        source: StateSource | None = None,
        transport_factory: TransportFactory | None = None,
        registry: prometheus_client.CollectorRegistry | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """``rng``: the prober's source of jitter (a seeded one makes a run on fake time
        reproducible); ``transport_factory``: how probes reach pods (default aiohttp)."""
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
        # The periodic weighing pass's rule and snapshot build run in this thread
        # (reweigh_off_loop); while one is in flight (_idle clear), states wait and a forced
        # pass (_again) or a rebuild (_submit_wanted) is done when it ends.
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="weigh")
        self._idle = asyncio.Event()
        self._idle.set()
        self._again = False
        self._submit_wanted = False
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

        # One description of the prober, wherever it runs. In a process of its own under
        # `aviator run` (a probe's round trip then carries no lag of the loop that serves xDS,
        # nor of this interpreter); on this loop by default, so that tests on fake loop time
        # drive it.
        level, json_logs = log_setup()
        # The child seeds its own from this; here the rng itself is used (and not drawn from:
        # a run on fake time keeps its jitter).
        crosses = settings.probe_in == "process"
        spec = ProberSpec(
            max_in_flight=settings.max_probes_in_flight,
            allow_loopback=settings.allow_probe_loopback,
            allow_link_local=settings.allow_probe_link_local,
            seed=rng.getrandbits(64) if rng is not None and crosses else None,
            log_level=level,
            log_json=json_logs,
        )

        def make_prober(sink: ProbeSink[ProbeKey]) -> Prober[ProbeKey]:
            return spec.build(
                sink, self._probe_log_fields, rng=rng, transport_factory=transport_factory
            )

        self.prober: Prober[ProbeKey] | ProberThread[ProbeKey] | ProberProcess[ProbeKey]
        if crosses:
            if transport_factory is not None:
                raise ValueError("a transport_factory cannot cross to a prober process")
            self.prober = ProberProcess(self._on_probe, spec, log_fields=self._probe_log_fields)
        elif settings.probe_in == "thread":
            self.prober = ProberThread(self._on_probe, make_prober)
        elif settings.probe_in == "loop":
            self.prober = make_prober(self._on_probe)
        else:
            raise ValueError(f"probe_in must be process, thread or loop, got {settings.probe_in!r}")
        self._pods: dict[ProbeKey, str] = {}  # the pod of each probe target, for problems
        # The operator (--source kubernetes): built by its task once it has an ApiClient.
        self.operates = settings.source == "kubernetes" and settings.operator
        self.operator: Operator | None = None
        self.operator_identity = os.environ.get("POD_NAME") or (
            # Not in a pod: the host name alone would let two processes on one machine hold
            # the same lease, each believing it leads.
            f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        )
        self.acks = XdsAcks()
        self._operator_error: str | None = None  # the last failure, logged once
        self._weights_told = -math.inf  # loop time the operator last got the weights
        views: dict[str, Callable[[], Any]] = {
            "policies": self.policies_view,
            "endpoints": self.endpoints_view,
            "proxies": self.proxies_view,
            "problems": self.problems_view,
        }
        if self.operates:
            views["operator"] = self.operator_view
        self.admin = AdminServer(
            registry=self.registry,
            ready=self.readiness,
            views=views,
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
        self._add_metrics()

    def _add_metrics(self) -> None:
        """The metrics beyond the counters above (docs/metrics.md): bounded labels only."""
        registry = self.registry
        add_process_metrics(registry)
        self._probe_seconds = prometheus_client.Histogram(
            "aviator_probe_duration_seconds",
            "Probe round trips by outcome (a failure: until it was noticed)",
            ["outcome"],
            buckets=PROBE_BUCKETS,
            registry=registry,
        )
        self._failing: set[ProbeKey] = set()  # endpoints whose last probe failed
        prometheus_client.Gauge(
            "aviator_probe_failing_endpoints",
            "Endpoints whose last probe failed",
            registry=registry,
        ).set_function(lambda: len(self._failing))
        prometheus_client.Gauge(
            "aviator_probe_targets", "Endpoints being probed", registry=registry
        ).set_function(lambda: len(self.prober.targets))
        prometheus_client.Gauge(
            "aviator_probes_in_flight", "Probes waiting for an answer", registry=registry
        ).set_function(lambda: self.prober.in_flight)
        self._build_seconds = prometheus_client.Histogram(
            "aviator_snapshot_build_seconds",
            "Building a snapshot from the weighed workloads (only what changed is rebuilt)",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry,
        )
        self._reweigh_seconds = prometheus_client.Histogram(
            "aviator_reweigh_duration_seconds",
            "One weighing pass over every served workload",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry,
        )
        registry.register(ScrapeCollector(self._problem_metrics))
        if self.settings.endpoint_weight_metrics:
            registry.register(ScrapeCollector(self._weight_metrics))

    def _problem_metrics(self) -> Iterator[Metric]:
        counts = dict.fromkeys(PROBLEM_KINDS, 0)
        if self._state is not None:
            for p in self._state.problems:
                counts["object" if p.object is not None else "file"] += 1
        for r in self._resolutions:  # each policy once per kind of trouble
            bad = {
                f"policy_{_snake(c.reason.value)}" for c in r.conditions if c.status.value != "True"
            }
            for kind in bad & counts.keys():
                counts[kind] += 1
        counts["probe_refused"] = len(self.prober.refused)
        counts["proxy_metadata"] = sum(len(p.problems) for p in self.ads.proxies())
        family = GaugeMetricFamily(
            "aviator_problems",
            "What Aviator cannot use or serve right now, by kind (docs/metrics.md); "
            "/debug/problems and /debug/policies say which and why",
            labels=["kind"],
        )
        for kind, count in counts.items():
            family.add_metric([kind], count)
        yield family

    def _weight_metrics(self) -> Iterator[Metric]:
        """``aviator_endpoint_weight`` for the first ``endpoint_weight_metrics`` endpoints by
        (workload, address); the rest are counted, not shown."""
        cap = self.settings.endpoint_weight_metrics
        family = GaugeMetricFamily(
            "aviator_endpoint_weight",
            "The weight Aviator publishes for each endpoint (opt-in: aviator run "
            "--endpoint-weight-metrics)",
            labels=["workload", "address"],
        )
        shown = dropped = 0
        for key, s in sorted(self._served.items()):
            if s.weights is None:
                continue
            for address, endpoint in sorted(s.weights.endpoints.items()):
                if shown >= cap:
                    dropped += 1
                    continue
                family.add_metric([key.cluster_name, str(address)], endpoint.weight)
                shown += 1
        yield family
        yield GaugeMetricFamily(
            "aviator_endpoint_weight_series_dropped",
            "Endpoints whose weight is not exported: above --endpoint-weight-metrics",
            value=dropped,
        )

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
                works: list[tuple[str, Awaitable[None]]] = [
                    ("source", self.source.run(self.store)),
                    ("reconcile", self._follow_state()),
                    ("prober", self.prober.run()),
                    ("weigher", self._reweigh_loop()),
                    ("publisher", self.publisher.run()),
                ]
                if self.operates:
                    works += [("operator", self._run_operator()), ("acks", self._ack_loop())]
                if self.settings.freeze_heap:
                    works.append(("heap", HeapKeeper().run()))
                tasks = [tg.create_task(_supervised(name, work), name=name) for name, work in works]
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
            self._worker.shutdown(wait=False, cancel_futures=True)
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
            await self._idle.wait()  # not while a pass weighs the previous state off the loop
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
        self._failing &= targets.keys()
        self._policies.labels(serving="true").set(len(served))
        self._policies.labels(serving="false").set(len(self._resolutions) - len(served))
        self._endpoints.set(sum(len(s.resolution.endpoints) for s in served.values()))
        self.reweigh(asyncio.get_running_loop().time(), force=True)
        self._state_to_operator()

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

    def _probe_log_fields(self, key: ProbeKey) -> dict[str, object]:
        """What a log line about one probed endpoint carries: its policy, workload, endpoint
        (ip:port) and pod."""
        served = self._served.get(key.workload)
        return {
            "policy": str(served.resolution.ref) if served is not None else None,
            "workload": str(key.workload),
            "endpoint": str(key.address),
            "pod": self._pods.get(key),
        }

    def _on_probe(self, key: ProbeKey, result: ProbeResult) -> None:
        self._probes.labels(outcome=result.outcome.value).inc()
        self._probe_seconds.labels(outcome=result.outcome.value).observe(result.rtt_s)
        if result.ok:
            self._failing.discard(key)
        else:
            self._failing.add(key)
        self.estimator.observe(key, result, result.finished_at)
        if result.outcome is not ProbeOutcome.OK:
            log.debug(
                "probe failed",
                **self._probe_log_fields(key),
                outcome=result.outcome.value,
                detail=result.detail,
            )

    async def _reweigh_loop(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.settings.reweigh_interval
        while True:
            await asyncio.sleep(delay)
            start = loop.time()
            await self.reweigh_off_loop(start)
            took = loop.time() - start
            self._reweigh_seconds.observe(took)
            delay = reweigh_delay(self.settings.reweigh_interval, took)

    @property
    def _off_loop(self) -> bool:
        """A pass is in flight in the worker thread (its weighers and builder are the
        thread's)."""
        return not self._idle.is_set()

    def reweigh(self, now: float, *, force: bool = False) -> bool:
        """Weigh every served workload at ``now``, on the event loop; submit a snapshot if
        anything changed (or ``force``). What a new state does at once (``apply_state``);
        the periodic passes run :meth:`reweigh_off_loop`. While one of those is in flight,
        its weighers and snapshot builder are the worker thread's: this only asks it to
        weigh again (forced) when it is done, and returns False."""
        if self._off_loop:
            self._again = self._again or force
            return False
        changed = self._apply_weights(_weigh(self._weigh_jobs(now))) or force
        if changed:
            self._submit()
        self._weights_to_operator(now, changed)
        return changed

    async def reweigh_off_loop(self, now: float) -> bool:
        """:meth:`reweigh`, with the rule and the snapshot build in the control plane's worker
        thread: with 10,000 endpoints a pass took 100-250 ms of CPU (the rule over every
        endpoint of a workload whose signals moved, then its ClusterLoadAssignment), and on
        the loop that was how long xDS, admin and the prober's sockets waited (issue 9, item
        6). In the thread the loop gets the interpreter back every switch interval
        (:data:`SWITCH_INTERVAL_S` under ``aviator run``). The loop only gathers what moved
        before and applies the results after; states wait for the pass to end
        (``_follow_state``), and a forced pass asked for meanwhile runs on the loop after it
        (that one builds the snapshot)."""
        loop = asyncio.get_running_loop()
        self._idle.clear()
        try:
            jobs = self._weigh_jobs(now)
            results = await loop.run_in_executor(self._worker, _weigh, jobs)
            changed = self._apply_weights(results)
            if changed and not self._again:  # else the forced pass after this one builds
                self._submit_wanted = False
                workloads, listeners = self.workloads(), self._listeners
                built = await loop.run_in_executor(
                    self._worker, self._build_snapshot, workloads, listeners
                )
                if not self._submit_wanted:  # else the listeners moved meanwhile: build again
                    self._publish(built)
        finally:
            self._idle.set()
        again, submit, self._again = self._again, self._submit_wanted, False
        if again:
            return self.reweigh(now, force=True)
        if submit:
            self._submit()
        self._weights_to_operator(now, changed)
        return changed

    def _weigh_jobs(self, now: float) -> list[_WeighJob]:
        """What a pass weighs (on the loop): each served workload's weigher and the statistics
        of its endpoints that moved since the last pass (``take_changes``), not of every
        endpoint (10,000 endpoints took 0.3-0.8 s a pass read in full, issue 9, item 6). A
        workload with nothing new is weighed only to see that nothing changed."""
        moved: dict[WorkloadKey, list[ProbeKey]] = {}
        for probe_key in self.estimator.take_changes(now):
            moved.setdefault(probe_key.workload, []).append(probe_key)
        jobs = []
        for key, s in self._served.items():
            policy = s.resolution.policy
            assert policy is not None
            fresh = s.weigher is None
            if s.weigher is None:
                s.weigher = WorkloadWeigher(
                    (e.address for e in s.resolution.endpoints),
                    knobs=policy.weigher,
                    latency_threshold_s=policy.latency_threshold.seconds,
                    previous=s.weights,
                )
                stats = {
                    e.address: self.estimator.stats(ProbeKey(key, e.address), now)
                    for e in s.resolution.endpoints
                }
            else:
                stats = {k.address: self.estimator.stats(k, now) for k in moved.get(key, ())}
            jobs.append(_WeighJob(key, s, s.weigher, stats, fresh))
        return jobs

    def _apply_weights(self, results: list[tuple[_WeighJob, WeighResult]]) -> bool:
        changed = False
        for job, result in results:
            if self._served.get(job.key) is not job.served:
                continue  # a state replaced it meanwhile
            if result.changed:
                self._weight_changes.inc()
                changed = True
            job.served.weights = result
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
        if self._off_loop:  # the worker thread holds the builder: it builds again after
            self._submit_wanted = True
            return
        self._publish(self._build_snapshot(self.workloads(), self._listeners))

    def _build_snapshot(
        self, workloads: list[WeightedWorkload], listeners: frozenset[ListenSpec]
    ) -> Snapshot | None:
        """A snapshot of ``workloads`` (on the loop, or in the worker thread: it touches only
        the builder). None if it cannot be built (logged; the last one stays)."""
        started = time.perf_counter()
        try:
            return self._builder.build(
                workloads, gateway=self.settings.gateway, listeners=listeners
            )
        except SnapshotError as exc:
            log.error("cannot build a snapshot, keeping the last one", problems=exc.problems)
            return None
        finally:
            self._build_seconds.observe(time.perf_counter() - started)

    def _publish(self, snapshot: Snapshot | None) -> None:
        self._built = True
        if snapshot is not None:
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

    # -- the operator (--source kubernetes) -------------------------------------------------

    def operator_settings(self) -> OperatorSettings:
        from aviator.operator.runtime import OperatorSettings

        namespace = (
            self.settings.operator_namespace
            or os.environ.get("POD_NAMESPACE")
            or DEFAULT_OPERATOR_NAMESPACE
        )
        return OperatorSettings(namespace=namespace, identity=self.operator_identity)

    async def _run_operator(self) -> None:
        """Run the operator with an ApiClient of its own (its writes never queue behind the
        source's watches; the same credentials), restarting it with back-off whatever it
        fails with: serving xDS never depends on it. Cancelled: it releases the lease."""
        from aviator.operator.kube import KubeApi
        from aviator.operator.runtime import Operator
        from aviator.source.kubernetes.source import new_api_client

        loop = asyncio.get_running_loop()
        low, high = OPERATOR_BACKOFF
        delay = low
        while True:
            started = loop.time()
            client = None
            try:
                client = await new_api_client(self.settings.kubeconfig, self.settings.context)
                operator = Operator(KubeApi(client), self.operator_settings())
                self.operator = operator
                operator.state_changed(self._resolutions)
                operator.acks_changed(self.acks.current)
                self._weights_told = -math.inf  # the next reweigh tells it the weights
                await operator.run()
                why = "ended on its own"
            except Exception as exc:
                why = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            finally:
                self.operator = None
                if client is not None:
                    with contextlib.suppress(Exception):
                        await client.close()  # type: ignore[no-untyped-call]
            if loop.time() - started > high:
                delay = low  # it ran a good while: this is a new failure, not the same one
            self._operator_error = why
            log.error("operator failed, restarting it; xDS keeps serving", error=why,
                      retry_in_s=delay)  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(high, delay * 2)

    async def _ack_loop(self) -> None:
        """Every second: what this replica's proxies hold, for the operator's Programmed."""
        while True:
            await asyncio.sleep(ACK_POLL_INTERVAL)
            operator = self.operator
            if operator is None:
                continue
            acks = self.acks.poll(
                self.cache.resources(ENDPOINT_TYPE), self.cache.publishes, self.ads.streams()
            )
            if acks is not None:
                self._tell_operator("acks_changed", operator.acks_changed, acks)

    def _state_to_operator(self) -> None:
        if (operator := self.operator) is not None:
            self._tell_operator("state_changed", operator.state_changed, self._resolutions)
            self._weights_told = -math.inf  # and the weights with the new resolutions, next

    def _weights_to_operator(self, now: float, changed: bool) -> None:
        """After a reweigh that changed something, and at least once a second."""
        operator = self.operator
        if operator is None or (not changed and now - self._weights_told < 1.0):
            return
        self._weights_told = now
        weights = {k: s.weights for k, s in self._served.items() if s.weights is not None}

        def latency_s(key: WorkloadKey, address: EndpointAddress) -> float | None:
            stats = self.estimator.stats(ProbeKey(key, address), now)
            return stats.latency_s if stats is not None else None

        self._tell_operator("weights_changed", operator.weights_changed, weights, latency_s, now)

    def _tell_operator(self, what: str, call: Callable[..., None], *args: Any) -> None:
        """``call(*args)``; an error is logged (once while it repeats), never raised: the
        reweigh and the resolve that tell the operator must go on serving."""
        try:
            call(*args)
        except Exception as exc:
            why = f"{what}: {type(exc).__name__}: {' '.join(str(exc).split())}"
            if why != self._operator_error:
                log.exception("operator call failed; xDS keeps serving", error=why)
            self._operator_error = why

    def operator_view(self) -> dict[str, Any]:
        operator = self.operator
        view: dict[str, Any] = (
            operator.view()
            if operator is not None
            else {"identity": self.operator_identity, "running": False}
        )
        view["lastError"] = self._operator_error
        view["ackPolls"] = self.acks.polls
        return view

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


def _snake(reason: str) -> str:
    """``TargetNotFound`` → ``target_not_found`` (a condition reason as a label value)."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in reason).lstrip("_")


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

"""One object for the control plane: the elector and every writer, fed by three calls (I/O).

:class:`Operator` builds the :class:`~aviator.operator.elector.LeaderElector`, the
:class:`~aviator.operator.status_writer.StatusWriter`, the
:class:`~aviator.operator.annotator.PodAnnotator`, the
:class:`~aviator.operator.service_writer.HotAvoidingServices` and the
:class:`~aviator.operator.reports.AckReports`, subscribes the writers to leadership changes,
and runs them all in one TaskGroup. The control plane tells it what happened:

- :meth:`Operator.state_changed` after every resolve (each new ClusterState);
- :meth:`Operator.weights_changed` after a reweigh (with the weights, the ranking latency
  per endpoint and the loop time);
- :meth:`Operator.acks_changed` with this replica's own ACK counts whenever they may have
  changed (a poll of the ADS streams every second is enough).

Everything else (who leads, which peer reports to merge, when to write, what to skip) is
decided inside. Every replica watches, probes and serves xDS and publishes its ACK report;
only the leader writes status, Events, annotations and Services.

Wired into :class:`aviator.controlplane.ControlPlane` (only with ``--source kubernetes``;
``ControlPlane._run_operator``, ``_ack_loop``, ``_state_to_operator`` and
``_weights_to_operator``, with :class:`aviator.operator.xds_acks.XdsAcks` for the ACK
counts), following this recipe::

    # run(), before the TaskGroup: an ApiClient of its own (writes never queue behind
    # watches), same credentials as the source; POD_NAMESPACE/POD_NAME from the Deployment.
    client = await new_api_client(kubeconfig, context)     # aviator.source.kubernetes.source
    self.operator = Operator(KubeApi(client), OperatorSettings(
        namespace=os.environ.get("POD_NAMESPACE", "aviator-system")))
    tg.create_task(self.operator.run(), name="operator")  # stop: cancel; it releases the lease
    tg.create_task(self._ack_loop(), name="acks")          # acks_changed every second
    # apply_state(), after resolving:
    self.operator.state_changed(self._resolutions)
    # reweigh(now), when something changed and at least once a second:
    self.operator.weights_changed(
        {k: s.weights for k, s in self._served.items() if s.weights is not None},
        lambda k, a: (st.latency_s if (st := self.estimator.stats(ProbeKey(k, a), now)) else None),
        now)
    # _ack_loop(), every second: for each served cluster, EndpointVersions.observe(name,
    # cache entry version, frozenset of the CLA's addresses); then one ProxyHolding per
    # (stream, EDS name it subscribes to and Aviator serves) -> acks.cluster_acks(...)
    self.operator.acks_changed(cluster_acks(holdings, self._endpoint_versions))
    # views: "operator": self.operator.view

The ADS side is three accessors on a protocol stream (aviator/xds/protocol.py):
``subscribed`` (the EDS names it subscribes to; wildcard: every served one),
``held_version`` (the version it holds, ACKed, of a name) and ``rejection`` (Envoy's message
when its last response carrying that name was NACKed and it does not hold that version),
and ``AdsServer.streams()`` to iterate the live streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aviator.k8s.resolve import PolicyResolution
from aviator.model import EndpointAddress, WorkloadKey
from aviator.operator.acks import ClusterAcks
from aviator.operator.annotator import PodAnnotator
from aviator.operator.election import ElectionTiming
from aviator.operator.elector import DEFAULT_LEASE_NAME, LeaderElector, default_identity
from aviator.operator.kube import KubeApi
from aviator.operator.reports import DEFAULT_POD_SELECTOR, AckReports
from aviator.operator.service_writer import HotAvoidingServices
from aviator.operator.status_writer import StatusWriter
from aviator.probing.weigher import WeighResult

__all__ = ["Operator", "OperatorSettings"]


@dataclass(frozen=True, slots=True)
class OperatorSettings:
    """``namespace``: the operator's own (``POD_NAMESPACE``), where the Leases live."""

    namespace: str
    identity: str = field(default_factory=default_identity)
    lease_name: str = DEFAULT_LEASE_NAME
    timing: ElectionTiming = field(default_factory=ElectionTiming)
    pod_selector: str = DEFAULT_POD_SELECTOR
    events: bool = True
    status_settle: float = 5.0  # Programmed Pending/NoProxies wait this long before a write
    annotation_interval: float = 30.0  # per pod
    service_interval: float = 5.0  # per Service
    report_interval: float = 2.0  # own ACK report, and the leader's poll of the others'
    release_on_stop: bool = True  # step down at stop() (False: the lease expires, as a crash)


class Operator:
    """What Aviator writes back to the cluster; see the module docstring."""

    def __init__(self, api: KubeApi, settings: OperatorSettings) -> None:
        self.settings = settings
        self.api = api
        self.elector = LeaderElector(
            api,
            namespace=settings.namespace,
            name=settings.lease_name,
            identity=settings.identity,
            timing=settings.timing,
            release_on_stop=settings.release_on_stop,
        )
        gate = self.elector
        self.status = StatusWriter(
            api, gate=gate, instance=settings.identity, settle=settings.status_settle,
            events=settings.events,
        )  # fmt: skip
        self.annotator = PodAnnotator(api, gate=gate, per_pod=settings.annotation_interval)
        self.services = HotAvoidingServices(api, gate=gate, per_service=settings.service_interval)
        self.reports = AckReports(
            api,
            namespace=settings.namespace,
            identity=settings.identity,
            gate=gate,
            pod_selector=settings.pod_selector,
            min_interval=settings.report_interval,
            poll_interval=settings.report_interval,
            on_change=self._update_status,
        )
        for writer in (self.status, self.annotator, self.services, self.reports):
            self.elector.subscribe(writer.leadership)
        self._resolutions: tuple[PolicyResolution, ...] = ()
        self._local: dict[str, ClusterAcks] = {}

    # -- the three calls -------------------------------------------------------------------

    def state_changed(self, resolutions: Iterable[PolicyResolution]) -> None:
        """Every policy's resolution after a new ClusterState."""
        self._resolutions = tuple(resolutions)
        self._update_status()

    def weights_changed(
        self,
        weights: Mapping[WorkloadKey, WeighResult],
        latency_s: Callable[[WorkloadKey, EndpointAddress], float | None],
        now: float,
    ) -> None:
        """The weights of every served workload after a reweigh, the latency the weigher
        ranked each endpoint by, and the loop time."""
        self.annotator.update(self._resolutions, weights, latency_s, now)
        self.services.update(self._resolutions, weights, now)

    def acks_changed(self, local: Mapping[str, ClusterAcks]) -> None:
        """This replica's own ACK counts by cluster name (every connected proxy)."""
        self._local = dict(local)
        self.reports.publish(self._local)
        self._update_status()

    def _update_status(self) -> None:
        merged = self.reports.merged(self._local)
        if merged is None:
            return  # not leading, or the peers not read yet: wait for on_change
        self.status.update(self._resolutions, merged)

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Run the elector and every writer until cancelled or :meth:`stop`."""
        async with asyncio.TaskGroup() as tg:
            election = tg.create_task(self.elector.run(), name="leader election")
            writers = [
                tg.create_task(self.status.run(), name="status writer"),
                tg.create_task(self.annotator.run(), name="pod annotator"),
                tg.create_task(self.services.run(), name="hot-avoiding services"),
                tg.create_task(self.reports.run(), name="ack reports"),
            ]
            await election  # ends on stop(), after releasing the lease
            for task in writers:
                task.cancel()

    def stop(self) -> None:
        """Step down (releasing the lease) and end :meth:`run`."""
        self.elector.stop()

    def view(self) -> dict[str, Any]:
        """For ``/debug/operator``: who leads, what is pending, how much was written."""
        return {
            "identity": self.settings.identity,
            "leader": self.elector.leader,
            "leading": self.elector.is_leader(),
            "lease": f"{self.settings.namespace}/{self.settings.lease_name}",
            "status": {
                "pending": self.status.reconciler.pending,
                "writes": self.status.reconciler.writes,
                "failures": self.status.reconciler.failures,
                "conflicts": self.status.conflicts,
                "events": self.status.events_written,
            },
            "annotations": {
                "pending": self.annotator.reconciler.pending,
                "writes": self.annotator.reconciler.writes,
            },
            "services": {
                "pending": self.services.reconciler.pending,
                "writes": self.services.reconciler.writes,
            },
            "peers": sorted(self.reports.peers),
            "report_dropped_clusters": self.reports.dropped,
            # Every request this replica sent to the API server, by method (GET reads; the
            # rest are writes: the Lease renewals, its ACK report, and the leader's writes).
            "requests": dict(sorted(self.api.requests.items())),
        }

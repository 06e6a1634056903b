"""The API server out of reach, then back (issue 14): the last good state keeps being served,
nothing is lost, nothing is deleted that was not; the Lease lost and regained cleanly.

Aviator (the Kubernetes source inside a real :class:`ControlPlane`, its ServiceAccount's
credentials) reaches the real API server through a TCP proxy on loopback that the test cuts:

- *refused*: the proxy stops listening and resets every open connection (a partition that
  the kernel reports: a restarted node, a firewall rejecting);
- *blackhole*: open connections go silent, new ones are accepted and never answered (packets
  dropped: only the informers' watchdog and request timeouts notice). In that variant the
  API server is also restarted behind the proxy, so the watches come back to a 410 and the
  informers relist.

Meanwhile the test changes the cluster directly (kubectl as admin, not through the proxy):
pods added, removed and made ready, a policy edited, one deleted, one created. After the
proxy lets traffic through again every change must appear and the source's state must equal
a fresh read of the server; at no moment before may anything that was not deleted leave the
store. Real processes need real time: the outage is 60 s (refused) and 30 s (blackhole),
every wait is a polled deadline.

The election half runs :class:`LeaderElector` and :class:`StatusWriter` against the real
server: the API server away for longer than the renew deadline, and a Lease taken by
another holder (a ``kubectl patch`` of ``holderIdentity``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from aviator.controlplane import ControlPlane, Settings
from aviator.k8s.state import ClusterState
from aviator.operator.acks import ClusterAcks
from aviator.operator.election import ElectionTiming
from aviator.operator.elector import LeaderElector
from aviator.operator.status_writer import StatusWriter
from aviator.source.kubernetes import Backoff, InformerOptions, KubernetesSource
from aviator.testbed.kubeapi import KubeTestEnv
from aviator.xds.resources import CLUSTER_TYPE
from tests.kubeapi.fixtures import AviatorInstall

from .operator_support import eventually, kube_api, read_state, resolutions
from .test_source import RecordingStore, _endpoints, _names, _pods, policy_yaml

pytestmark = pytest.mark.timeout(420)

# Watches of 2-4 s, a watchdog 2 s beyond; a back-off that reaches 2 s (x 1.5 jitter) within
# a few failures, as an outage of a minute would make it.
OPTIONS = InformerOptions(
    min_watch_timeout=2.0,
    watchdog_margin=2.0,
    list_timeout=5.0,
    short_watch=0.2,
    backoff=Backoff(initial=0.2, cap=2.0, jitter=0.5),
)


# --- a proxy the test can cut ------------------------------------------------------------------


class CuttableProxy:
    """A TCP proxy from a loopback port to the API server.

    :meth:`refuse` closes the listening socket (new connections: refused) and aborts every
    open connection (the peer sees a reset); :meth:`blackhole` keeps listening but forwards
    nothing on any connection, open or new, and closes nothing. :meth:`restore` forwards new
    connections again, on the same port; connections a blackhole froze stay frozen (the
    client's watchdog has to find them), as after a real partition.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._generation = 0  # connections accepted since the last restore
        self._frozen: set[int] = set()  # generations that forward nothing
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def refuse(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()
        self._server = None

    def blackhole(self) -> None:
        self._frozen.add(self._generation)

    async def restore(self) -> None:
        self._generation += 1
        if self._server is None:
            await self.start()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        for w in self._writers:
            w.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        generation = self._generation
        self.connections += 1
        self._writers.append(writer)
        if generation in self._frozen:
            return  # accepted, never answered: the client's timeouts must notice
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()  # the API server itself is down
            return
        self._writers.append(up_writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst, generation))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, generation: int
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                if generation in self._frozen:
                    await asyncio.Event().wait()  # hold the bytes, close nothing
                dst.write(data)
                await dst.drain()
            dst.close()


def kubeconfig_through(original: Path, port: int, into: Path) -> Path:
    config = yaml.safe_load(original.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{port}"
    into.write_text(yaml.safe_dump(config))
    return into


# --- the control plane, watched ---------------------------------------------------------------


@dataclass
class Plane:
    cp: ControlPlane
    source: KubernetesSource
    store: RecordingStore
    task: asyncio.Task[None]
    samples: list[tuple[bool, frozenset[str]]] = field(default_factory=list)

    def clusters(self) -> frozenset[str]:
        return (
            frozenset(self.cp.cache.resources(CLUSTER_TYPE)) if self.cp.cache.ready else frozenset()
        )

    async def until(
        self, predicate: Callable[[ClusterState], bool], what: str, *, within: float = 30.0
    ) -> ClusterState:
        deadline = time.monotonic() + within
        while True:
            if self.task.done():
                self.task.result()
                raise AssertionError("the control plane stopped")
            if self.store.synced and predicate(self.store.current):
                return self.store.current
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {within} s: {what}")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def control_plane(kubeconfig: Path, ns: str) -> AsyncIterator[Plane]:
    source = KubernetesSource(kubeconfig=kubeconfig, namespaces=(ns,), options=OPTIONS)
    settings = Settings(source="kubernetes", xds_address="127.0.0.1:0", admin_address="127.0.0.1:0")
    cp = ControlPlane(settings, source=source)
    store = RecordingStore()
    cp.store = store  # the real Store, remembering every state it accepted
    started = asyncio.Event()
    task = asyncio.create_task(cp.run(started=started), name="control plane")
    await asyncio.wait_for(started.wait(), 20)
    try:
        yield Plane(cp, source, store, task)
    finally:
        cp.stop()
        await asyncio.wait_for(task, 20)


def _policies(state: ClusterState, ns: str) -> set[str]:
    return _names(state, "AviatorPolicy", ns)


def _threshold(state: ClusterState, ns: str, name: str) -> float | None:
    for p in state.policies:
        if (p.ref.namespace, p.ref.name) == (ns, name) and hasattr(p, "latency_threshold"):
            return float(p.latency_threshold.seconds)
    return None


def _digest(state: ClusterState, ns: str) -> dict[str, Any]:
    """What a state says about ``ns``, comparable with a fresh read of the server."""
    return {
        "policies": sorted(_policies(state, ns)),
        "deployments": sorted(_names(state, "Deployment", ns)),
        "pods": {name: (str(p.pod_ip), p.ready) for name, p in sorted(_pods(state, ns).items())},
        "thresholds": {n: _threshold(state, ns, n) for n in sorted(_policies(state, ns))},
    }


async def _kubectl(env: KubeTestEnv, ns: str, *args: str, input: str | None = None) -> str:
    proc = await asyncio.to_thread(functools.partial(env.kubectl, *args, "-n", ns, input=input))
    return proc.stdout


async def _ready(env: KubeTestEnv, ns: str, pod: str, ip: str | None, ready: bool = True) -> None:
    await asyncio.to_thread(functools.partial(env.set_pod_status, ns, pod, ip=ip, ready=ready))


async def _live_pods(env: KubeTestEnv, ns: str, app: str) -> list[str]:
    pods = await asyncio.to_thread(
        env.request, "GET", f"/api/v1/namespaces/{ns}/pods?labelSelector=app%3D{app}"
    )
    return sorted(
        p["metadata"]["name"] for p in pods["items"] if not p["metadata"].get("deletionTimestamp")
    )


@pytest.mark.parametrize(("mode", "outage"), [("refused", 60.0), ("blackhole", 30.0)])
async def test_an_unreachable_api_server_keeps_the_last_state_and_loses_no_event(
    aviator_install: AviatorInstall, kube_namespace: str, tmp_path: Path, mode: str, outage: float
) -> None:
    env, ns = aviator_install.env, kube_namespace
    for name in ("web", "api"):
        await _kubectl(env, ns, "create", "deployment", name, "--image=example/web",
                       "--port=8080", "--replicas=2")  # fmt: skip
    web = await asyncio.to_thread(env.wait_for_pods, ns, "app=web", 2)
    api = await asyncio.to_thread(env.wait_for_pods, ns, "app=api", 2)
    web_a, web_b = (p["metadata"]["name"] for p in web)
    for i, name in enumerate([web_a, web_b, *(p["metadata"]["name"] for p in api)]):
        await _ready(env, ns, name, f"10.71.0.{i + 1}")
    await _kubectl(env, ns, "apply", "-f", "-", input=policy_yaml("web", "web"))
    await _kubectl(env, ns, "apply", "-f", "-", input=policy_yaml("api", "api"))

    proxy = CuttableProxy(env.port)
    await proxy.start()
    kubeconfig = kubeconfig_through(aviator_install.kubeconfig, proxy.port, tmp_path / "kc")
    try:
        async with control_plane(kubeconfig, ns) as plane:
            before = await plane.until(
                lambda s: len(_endpoints(s, ns, "web")) == 2 and len(_endpoints(s, ns, "api")) == 2,
                "both policies serving two endpoints",
            )
            await eventually(
                _async(lambda: plane.clusters() == {f"{ns}/web", f"{ns}/api"}),
                what="both clusters in the xDS cache",
            )
            assert plane.cp.readiness() == (True, [])
            published = len(plane.store.history)
            pod_informer = next(i for i in plane.source.informers if i.resource.kind == "Pod")
            failures = pod_informer.stats.failures

            # --- the outage ---------------------------------------------------------------
            if mode == "refused":
                await proxy.refuse()
            else:
                proxy.blackhole()
            cut = time.monotonic()
            watched: list[str] = []

            async def watch_outage() -> None:
                # The last good state, ready, its clusters in the cache: sampled throughout.
                while True:
                    current = plane.store.current
                    if current is not before:
                        watched.append(f"the state changed at {time.monotonic() - cut:.1f} s")
                    if plane.cp.readiness() != (True, []):
                        watched.append(f"not ready: {plane.cp.readiness()[1]}")
                    if plane.clusters() != {f"{ns}/web", f"{ns}/api"}:
                        watched.append(f"clusters {sorted(plane.clusters())}")
                    await asyncio.sleep(0.25)

            sampler = asyncio.create_task(watch_outage())
            try:
                # Changes the control plane cannot see yet.
                await _kubectl(env, ns, "scale", "deployment", "web", "--replicas=3")
                web_now = await asyncio.to_thread(env.wait_for_pods, ns, "app=web", 3)
                (web_c,) = [p["metadata"]["name"] for p in web_now if
                            p["metadata"]["name"] not in (web_a, web_b)]  # fmt: skip
                await _ready(env, ns, web_c, "10.71.0.9")
                await _kubectl(env, ns, "delete", "pod", web_a, "--wait=false")
                await _ready(env, ns, web_b, None, ready=False)
                await _ready(env, ns, web_b, None, ready=True)  # a flap, seen only as its end
                await _kubectl(
                    env, ns, "apply", "-f", "-",
                    input=policy_yaml("web", "web").replace("100ms", "300ms"),
                )  # fmt: skip
                await _kubectl(env, ns, "delete", "aviatorpolicy", "api")
                await _kubectl(env, ns, "apply", "-f", "-", input=policy_yaml("api2", "api"))
                if mode == "blackhole":
                    # The watch cache the informers resumed from goes with the server: the
                    # watches come back to a 410 and the informers relist.
                    await asyncio.to_thread(env.stop_apiserver)
                    await asyncio.to_thread(env.start_apiserver)
                # Wait out the rest of the outage (the assertions are the sampler's).
                while (left := outage - (time.monotonic() - cut)) > 0:
                    await asyncio.sleep(min(left, 1.0))
                    assert not sampler.done()
                assert pod_informer.stats.failures > failures, "the outage was not noticed"
            finally:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            assert watched == [], watched[:10]
            assert plane.store.current is before
            assert len(plane.store.history) == published

            # --- back ---------------------------------------------------------------------
            await proxy.restore()
            back = time.monotonic()
            truth = await asyncio.to_thread(read_state, env, ns)
            expected = _digest(truth, ns)
            assert expected["policies"] == ["api2", "web"]
            assert web_a not in expected["pods"]
            assert expected["thresholds"]["web"] == 0.3
            state = await plane.until(
                lambda s: _digest(s, ns) == expected, "every change made during the outage",
                within=60,
            )  # fmt: skip
            caught_up = time.monotonic() - back
            assert _endpoints(state, ns, "web") == ["10.71.0.2:8080", "10.71.0.9:8080"]
            assert len(_endpoints(state, ns, "api2")) == 2
            await eventually(
                _async(lambda: plane.clusters() == {f"{ns}/web", f"{ns}/api"}),
                what="the clusters after the catch-up",
            )  # api2 targets the same workload: the same cluster, never withdrawn
            # No spurious delete: every state published after the outage holds what was
            # never deleted (the deployments, web-b, api's pods, policy web).
            for s in plane.store.history[published:]:
                assert _names(s, "Deployment", ns) == {"web", "api"}
                assert {web_b, *(p["metadata"]["name"] for p in api)} <= set(_pods(s, ns))
                assert "web" in _policies(s, ns)
            if mode == "blackhole":
                # Every informer comes back to a 410 and relists (one with nothing to catch
                # up on may still be waiting on its watchdog or back-off when the rest did).
                await eventually(
                    _async(lambda: all(i.stats.expired >= 1 for i in plane.source.informers)),
                    within=30, what="a 410 and a relist in every informer",
                )  # fmt: skip
            # (refused: the watches usually resume from their resourceVersions, still in the
            # watch cache's window; a relist, if other writes pushed them out, is as good.)
            lists = {i.resource.kind: i.stats.lists for i in plane.source.informers}
            print(
                f"{mode}: outage {outage:.0f} s, caught up {caught_up:.2f} s after the proxy "
                f"let traffic through, {len(plane.store.history) - published} publish(es), "
                f"pod informer failures {pod_informer.stats.failures - failures}, "
                f"stalled {pod_informer.stats.stalled}, expired {pod_informer.stats.expired}, "
                f"lists {lists}"
            )
    finally:
        await proxy.close()


def _async(check: Callable[[], bool]) -> Callable[[], Any]:
    async def wrapped() -> bool:
        return check()

    return wrapped


# --- the Lease --------------------------------------------------------------------------------

FAST = ElectionTiming(lease_duration=2.0, renew_deadline=1.5, retry_period=0.25)
LEASE_NS = "aviator-system"


@dataclass
class Replica:
    elector: LeaderElector
    writes_api: Any  # the status writer's KubeApi (its own, to count its writes alone)
    writer: StatusWriter


@contextlib.asynccontextmanager
async def replicas(
    kubeconfig: Path, lease: str, names: tuple[str, ...], timing: ElectionTiming = FAST
) -> AsyncIterator[list[Replica]]:
    out: list[Replica] = []
    async with contextlib.AsyncExitStack() as stack:
        for name in names:
            api = await stack.enter_async_context(kube_api(kubeconfig, timeout=5.0))
            elector = LeaderElector(
                api, namespace=LEASE_NS, name=lease, identity=name, timing=timing
            )
            writes_api = await stack.enter_async_context(
                kube_api(kubeconfig, timeout=5.0, field_manager=f"aviator-{name}")
            )
            writer = StatusWriter(writes_api, gate=elector, instance=name, settle=0.0,
                                  per_policy=0.0)  # fmt: skip
            elector.subscribe(writer.leadership)
            electing = asyncio.create_task(elector.run(), name=f"{name} elector")
            stack.push_async_callback(_stop, elector, electing)
            writing = asyncio.create_task(writer.run(), name=f"{name} writer")
            stack.push_async_callback(_cancel, writing)
            out.append(Replica(elector, writes_api, writer))
        yield out


async def _stop(elector: LeaderElector, task: asyncio.Task[None]) -> None:
    """A graceful stop: the elector releases the lease (its client still open)."""
    elector.stop()
    try:
        await asyncio.wait_for(task, 5)
    except TimeoutError:
        await _cancel(task)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class LeaderSampler:
    """Who believes it leads, every 10 ms; counts overlaps (two at once)."""

    def __init__(self, electors: list[LeaderElector]) -> None:
        self.electors = electors
        self.overlaps = 0
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.samples += 1
            if sum(e.is_leader() for e in self.electors) > 1:
                self.overlaps += 1
            await asyncio.sleep(0.01)

    async def __aenter__(self) -> LeaderSampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        await _cancel(self._task)


def _acks(clusters: list[str], step: int) -> dict[str, ClusterAcks]:
    """ACK counts that change what Programmed says at each step (NoProxies, Programmed,
    Pending), so that the writers have something new to write."""
    proxies, current = [(0, 0), (1, 1), (2, 1)][step]
    return {c: ClusterAcks(proxies=proxies, current=current) for c in clusters}


async def test_the_api_server_away_past_the_renew_deadline_stops_all_writes_then_one_leads(
    aviator_install: AviatorInstall, kube_env: KubeTestEnv, kube_namespace: str
) -> None:
    env, ns = kube_env, kube_namespace
    await _kubectl(env, ns, "create", "deployment", "web", "--image=example/web", "--port=8080")
    await _kubectl(env, ns, "apply", "-f", "-", input=policy_yaml("web", "web"))
    res = await resolutions(env, ns)
    clusters = [f"{ns}/web"]
    async with (
        replicas(aviator_install.kubeconfig, f"faults-{ns[-6:]}", ("rep-a", "rep-b")) as reps,
        LeaderSampler([r.elector for r in reps]) as sampler,
    ):
        for r in reps:
            r.writer.update(res, _acks(clusters, 0))
        leader = await eventually(
            _async(lambda: any(r.elector.is_leader() for r in reps)), what="a leader"
        )
        assert leader
        (first,) = [r for r in reps if r.elector.is_leader()]
        await eventually(_async(lambda: first.writes_api.writes >= 1), what="a status write")

        lost: list[float] = []
        for r in reps:
            r.elector.subscribe(lambda leading: None if leading else lost.append(time.monotonic()))
        await asyncio.to_thread(functools.partial(env.stop_apiserver, kill=True))
        cut = time.monotonic()
        try:
            await eventually(
                _async(lambda: not any(r.elector.is_leader() for r in reps)),
                within=FAST.renew_deadline + 2, what="nobody leading",
            )  # fmt: skip
            assert lost
            assert lost[0] - cut <= FAST.renew_deadline + 0.2
            writes = [r.writes_api.writes for r in reps]
            # Something to write on every replica: none may try while nobody leads.
            for r in reps:
                r.writer.update(res, _acks(clusters, 1))
            away = time.monotonic()
            while time.monotonic() - away < 3 * FAST.lease_duration:
                assert not any(r.elector.is_leader() for r in reps)
                await asyncio.sleep(0.05)
            assert [r.writes_api.writes for r in reps] == writes, "a write while nobody led"
        finally:
            await asyncio.to_thread(env.start_apiserver)

        # Back: exactly one leads again (never two at once), and only it writes.
        await eventually(
            _async(lambda: sum(r.elector.is_leader() for r in reps) == 1),
            within=60, what="one leader again",
        )  # fmt: skip
        (second,) = [r for r in reps if r.elector.is_leader()]
        (other,) = [r for r in reps if r is not second]
        other_writes = other.writes_api.writes
        for r in reps:
            r.writer.update(res, _acks(clusters, 2))
        before = second.writes_api.writes
        await eventually(_async(lambda: second.writes_api.writes > before), what="a write")
        await asyncio.sleep(4 * FAST.lease_duration)  # several renewals: still one leader
        assert sum(r.elector.is_leader() for r in reps) == 1
        assert second.elector.is_leader()
        assert other.writes_api.writes == other_writes
    assert sampler.overlaps == 0
    assert sampler.samples > 500
    print(f"leadership lost {lost[0] - cut:.2f} s after the cut (renew deadline "
          f"{FAST.renew_deadline} s); {sampler.samples} samples, no overlap")  # fmt: skip


async def test_a_lease_taken_by_another_holder_stops_the_leader_writing(
    aviator_install: AviatorInstall, kube_env: KubeTestEnv, kube_namespace: str
) -> None:
    env, ns = kube_env, kube_namespace
    await _kubectl(env, ns, "create", "deployment", "web", "--image=example/web", "--port=8080")
    await _kubectl(env, ns, "apply", "-f", "-", input=policy_yaml("web", "web"))
    res = await resolutions(env, ns)
    clusters = [f"{ns}/web"]
    lease = f"stolen-{ns[-6:]}"
    # A renew deadline long enough that stopping at it would be told apart from stopping on
    # seeing another holder (a retry period later).
    timing = ElectionTiming(lease_duration=6.0, renew_deadline=4.0, retry_period=0.25)
    async with replicas(aviator_install.kubeconfig, lease, ("rep-only",), timing) as (rep,):
        rep.writer.update(res, _acks(clusters, 0))
        await eventually(_async(rep.elector.is_leader), what="leading")
        await eventually(_async(lambda: rep.writes_api.writes >= 1), what="a status write")
        lost: list[float] = []
        rep.elector.subscribe(lambda leading: None if leading else lost.append(time.monotonic()))

        # What another holder's write looks like: kubectl edit of holderIdentity (and the
        # renewTime it would set).
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        patch = {"spec": {"holderIdentity": "intruder", "renewTime": now}}
        await asyncio.to_thread(
            env.kubectl, "patch", "lease", lease, "-n", LEASE_NS, "--type=merge",
            "-p", json.dumps(patch),
        )  # fmt: skip
        stolen = time.monotonic()
        await eventually(
            _async(lambda: not rep.elector.is_leader()), within=timing.renew_deadline,
            what="leadership given up",
        )  # fmt: skip
        took = lost[0] - stolen
        assert took < timing.renew_deadline - 1.0, f"stopped only at the renew deadline ({took})"
        writes = rep.writes_api.writes
        rep.writer.update(res, _acks(clusters, 1))
        # The intruder never renews: the replica waits its lease duration out, writing nothing,
        # and then takes the lease back.
        while not rep.elector.is_leader():
            assert rep.writes_api.writes == writes, "a write while another holder had the lease"
            held = await asyncio.to_thread(
                env.get, "leases", lease, namespace=LEASE_NS, group="coordination.k8s.io"
            )
            if rep.elector.is_leader():
                break
            assert held["spec"]["holderIdentity"] == "intruder"
            assert time.monotonic() - stolen < timing.lease_duration + 10, "never took it back"
            await asyncio.sleep(0.1)
        back = time.monotonic() - stolen
        assert back >= timing.lease_duration - 0.5, f"took the lease back after {back:.2f} s"
        rep.writer.update(res, _acks(clusters, 2))
        await eventually(_async(lambda: rep.writes_api.writes > writes), what="writing again")
        spec = (await asyncio.to_thread(
            env.get, "leases", lease, namespace=LEASE_NS, group="coordination.k8s.io"
        ))["spec"]  # fmt: skip
        assert spec["holderIdentity"] == "rep-only"
    print(f"stopped {took:.2f} s after the lease was taken; took it back after {back:.2f} s")

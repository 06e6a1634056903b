"""The Kubernetes source against the real API server (tests/kubeapi): list + watch, 410s,
a killed watch, an API server restart, readiness, and the operator ServiceAccount's RBAC.

Aviator runs with the ServiceAccount the shipped manifests create (``aviator_install``: the
CRD and ``operator.yaml`` applied), so what these tests pass with is the RBAC that ships.
The test's own changes go through kubectl as admin, as a user's would. Real I/O needs real
time: every wait is a deadline on a polled condition, never a sleep taken as an assertion.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import signal
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from aviator.controlplane import ControlPlane, Settings
from aviator.envoy.process import free_port
from aviator.k8s.fields import ObjectRef
from aviator.k8s.objects import Pod
from aviator.k8s.resolve import PolicyResolution, resolve_state
from aviator.k8s.state import ClusterState
from aviator.source.kubernetes import Backoff, InformerOptions, KubernetesSource
from aviator.source.kubernetes.informer import Informer
from aviator.source.kubernetes.source import new_api_client, resources
from aviator.source.store import Store
from aviator.testbed.kubeapi import KubeTestEnv
from tests.kubeapi.fixtures import AviatorInstall

# Short watches and back-off, so that reconnects happen within a test.
FAST = InformerOptions(
    min_watch_timeout=2.0,
    watchdog_margin=2.0,
    short_watch=0.2,
    backoff=Backoff(initial=0.1, cap=0.5, jitter=0.5),
)


class RecordingStore(Store):
    """The real Store, remembering every state it accepted."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[ClusterState] = []

    def publish(self, state: ClusterState) -> bool:
        accepted = super().publish(state)
        if accepted:
            self.history.append(state)
        return accepted


@dataclass
class Running:
    source: KubernetesSource
    store: RecordingStore
    task: asyncio.Task[None]
    env: KubeTestEnv
    namespace: str
    created: list[str] = field(default_factory=list)

    async def kubectl(self, *args: str, input: str | None = None) -> str:
        proc = await asyncio.to_thread(
            functools.partial(self.env.kubectl, *args, "-n", self.namespace, input=input)
        )
        return proc.stdout

    async def until(
        self, predicate: Callable[[ClusterState], bool], what: str, *, within: float = 15.0
    ) -> ClusterState:
        """The first published state (the current one included) that satisfies
        ``predicate``, polled until ``within`` seconds have passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            if self.task.done():
                self.task.result()  # raise what ended the source
                raise AssertionError("the source stopped")
            if self.store.synced and predicate(self.store.current):
                return self.store.current
            if loop.time() > deadline:
                raise AssertionError(f"not within {within} s: {what}; last state: {_summary(self)}")
            await asyncio.sleep(0.02)

    def resolution(self, name: str) -> PolicyResolution:
        return _resolution(self.store.current, self.namespace, name)


def _resolution(state: ClusterState, namespace: str, name: str) -> PolicyResolution:
    ref = ObjectRef("AviatorPolicy", namespace, name)
    found = [r for r in resolve_state(state) if r.ref == ref]
    assert found, f"no policy {ref} in the state"
    return found[0]


def _names(state: ClusterState, kind: str, namespace: str) -> set[str]:
    return {o.ref.name for o in state.objects if (o.ref.kind, o.ref.namespace) == (kind, namespace)}


def _pods(state: ClusterState, namespace: str) -> dict[str, Pod]:
    return {p.meta.name: p for p in state.pods if p.meta.namespace == namespace}


def _summary(run: Running) -> str:
    s = run.store.current
    ns = run.namespace
    return (
        f"policies={sorted(_names(s, 'AviatorPolicy', ns))} "
        f"deployments={sorted(_names(s, 'Deployment', ns))} "
        f"statefulsets={sorted(_names(s, 'StatefulSet', ns))} pods={sorted(_pods(s, ns))} "
        f"problems={[str(p) for p in s.problems]}"
    )


def policy_yaml(name: str, target: str, *, kind: str = "Deployment", namespace: str | None = None,
                extra: str = "") -> str:  # fmt: skip
    meta = f"  name: {name}\n" + (f"  namespace: {namespace}\n" if namespace else "")
    return (
        "apiVersion: aviator.io/v1alpha1\nkind: AviatorPolicy\nmetadata:\n"
        + meta
        + textwrap.dedent(f"""\
            spec:
              targetRef: {{apiVersion: apps/v1, kind: {kind}, name: {target}}}
              latencyThreshold: 100ms
              pingInterval: 5s
            """)
        + extra
    )


@contextlib.asynccontextmanager
async def running(
    env: KubeTestEnv,
    kubeconfig: Path,
    namespace: str,
    *,
    all_namespaces: bool = False,
    options: InformerOptions = FAST,
) -> AsyncIterator[Running]:
    source = KubernetesSource(
        kubeconfig=kubeconfig,
        namespaces=() if all_namespaces else (namespace,),
        options=options,
    )
    store = RecordingStore()
    task = asyncio.create_task(source.run(store), name="kubernetes source")
    try:
        yield Running(source, store, task, env, namespace)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _informer(source: KubernetesSource, kind: str) -> Informer[Any]:
    (found,) = [i for i in source.informers if i.resource.kind == kind]
    return found


# --- list + watch -----------------------------------------------------------------------------

STATEFULSET = """\
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  serviceName: db
  replicas: 1
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      containers:
        - {name: db, image: example/db, ports: [{name: sql, containerPort: 5432}]}
"""


async def _deployment(env: KubeTestEnv, ns: str, name: str, replicas: int) -> list[str]:
    """A Deployment made with kubectl; the names of its pods, once the controller made them."""
    await asyncio.to_thread(
        env.kubectl, "create", "deployment", name, "--image=example/web", "--port=8080",
        f"--replicas={replicas}", "-n", ns,
    )  # fmt: skip
    pods = await asyncio.to_thread(env.wait_for_pods, ns, f"app={name}", replicas)
    return [p["metadata"]["name"] for p in pods]


async def _ready(
    env: KubeTestEnv, ns: str, pod: str, ip: str | None, *, ready: bool = True
) -> None:
    await asyncio.to_thread(functools.partial(env.set_pod_status, ns, pod, ip=ip, ready=ready))


def _endpoints(state: ClusterState, ns: str, policy: str) -> list[str]:
    return sorted(str(e.address) for e in _resolution(state, ns, policy).endpoints)


async def test_lists_then_watches_policies_workloads_and_pods(
    aviator_install: AviatorInstall, kube_namespace: str
) -> None:
    env, ns = aviator_install.env, kube_namespace
    # Made before the source starts: seen by the list.
    web = await _deployment(env, ns, "web", 2)
    async with running(env, aviator_install.kubeconfig, ns, all_namespaces=True) as run:
        state = await run.until(lambda s: len(_pods(s, ns)) == 2, "the listed pods")
        assert _names(state, "Deployment", ns) == {"web"}
        assert run.source.synced

        # Made after: seen by the watch.
        await run.kubectl("apply", "-f", "-", input=policy_yaml("web", "web"))
        await run.until(lambda s: "web" in _names(s, "AviatorPolicy", ns), "the policy")
        await run.kubectl("apply", "-f", "-", input=STATEFULSET)
        await run.kubectl("apply", "-f", "-", input=policy_yaml("db", "db", kind="StatefulSet"))
        state = await run.until(lambda s: "db-0" in _pods(s, ns), "the statefulset's pod")
        assert _names(state, "StatefulSet", ns) == {"db"}

        await _ready(env, ns, web[0], "127.0.0.31")
        await _ready(env, ns, web[1], "127.0.0.32")
        await _ready(env, ns, "db-0", "127.0.0.41")
        state = await run.until(
            lambda s: len(_endpoints(s, ns, "web")) == 2 and len(_endpoints(s, ns, "db")) == 1,
            "the ready pods as endpoints",
        )
        assert _endpoints(state, ns, "web") == ["127.0.0.31:8080", "127.0.0.32:8080"]
        assert _endpoints(state, ns, "db") == ["127.0.0.41:5432"]
        assert _resolution(state, ns, "web").serving

        # Edits and deletions arrive too.
        await run.kubectl(
            "apply", "-f", "-", input=policy_yaml("web", "web").replace("100ms", "250ms")
        )
        await run.until(
            lambda s: (
                (p := _resolution(s, ns, "web").policy) is not None
                and p.latency_threshold.seconds == 0.25
            ),
            "the edited policy",
        )
        await run.kubectl("delete", "aviatorpolicy", "web")
        await run.until(lambda s: _names(s, "AviatorPolicy", ns) == {"db"}, "the policy gone")
        await run.kubectl("delete", "statefulset", "db")
        await run.until(
            lambda s: not _names(s, "StatefulSet", ns) and "db-0" not in _pods(s, ns),
            "the statefulset and its pod gone",
        )
        assert not run.store.current.problems


async def test_a_policy_without_a_namespace_lands_in_the_kubeconfigs_namespace_and_works_there(
    aviator_install: AviatorInstall, kube_namespace: str
) -> None:
    env, ns = aviator_install.env, kube_namespace
    # A user whose kubeconfig context points at `ns`, applying the product's example as is.
    user = await asyncio.to_thread(env.admin_kubeconfig, ns)
    example = policy_yaml("my-app", "my-app")
    assert "namespace:" not in example
    await asyncio.to_thread(
        env.kubectl, "create", "deployment", "my-app", "--image=example/web", "--port=8080",
        kubeconfig=user,
    )  # fmt: skip
    await asyncio.to_thread(env.kubectl, "apply", "-f", "-", input=example, kubeconfig=user)
    (pod,) = await asyncio.to_thread(env.wait_for_pods, ns, "app=my-app", 1)
    await _ready(env, ns, pod["metadata"]["name"], "127.0.0.51")

    async with running(env, aviator_install.kubeconfig, ns, all_namespaces=True) as run:
        state = await run.until(
            lambda s: (
                "my-app" in _names(s, "AviatorPolicy", ns) and len(_endpoints(s, ns, "my-app")) == 1
            ),
            "the policy in the kubeconfig's namespace, serving",
        )
        assert _endpoints(state, ns, "my-app") == ["127.0.0.51:8080"]
        assert not [p for p in state.policies if p.ref.name == "my-app" and p.ref.namespace != ns]


async def test_many_namespaces_each_have_their_informers_and_none_starves(
    aviator_install: AviatorInstall, kube_namespace: str
) -> None:
    env = aviator_install.env
    # 26 namespaces: 104 watches, more than the client's default pool of 100 connections.
    extra = [f"{kube_namespace[:50]}-{i}" for i in range(25)]
    for ns in extra:
        await asyncio.to_thread(env.create_namespace, ns)
    try:
        # Watches of the default length (5-10 min): each holds its connection throughout.
        source = KubernetesSource(
            kubeconfig=aviator_install.kubeconfig,
            namespaces=[kube_namespace, *extra],
            options=dataclasses.replace(FAST, min_watch_timeout=300.0),
        )
        store = RecordingStore()
        task = asyncio.create_task(source.run(store))
        try:
            await _poll(lambda: store.synced, "every informer synced", task, within=30)
            assert len(source.informers) == 4 * 26
            await _poll(
                lambda: all(i.watching for i in source.informers), "every informer watching", task
            )
            last = extra[-1]
            await asyncio.to_thread(
                env.kubectl, "apply", "-f", "-", "-n", last, input=policy_yaml("web", "web")
            )
            await _poll(
                lambda: "web" in _names(store.current, "AviatorPolicy", last), "the policy", task
            )
            assert {p.ref.namespace for p in store.current.policies} == {last}
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        for ns in extra:
            await asyncio.to_thread(
                env.kubectl, "delete", "namespace", ns, "--wait=false", "--ignore-not-found"
            )


async def test_a_pod_without_an_ip_is_in_the_state_but_is_no_endpoint(
    aviator_install: AviatorInstall, kube_namespace: str
) -> None:
    env, ns = aviator_install.env, kube_namespace
    (pod,) = await _deployment(env, ns, "web", 1)
    await asyncio.to_thread(
        env.kubectl, "apply", "-f", "-", "-n", ns, input=policy_yaml("web", "web")
    )
    async with running(env, aviator_install.kubeconfig, ns) as run:
        state = await run.until(lambda s: pod in _pods(s, ns), "the pending pod")
        assert _pods(state, ns)[pod].pod_ip is None
        assert _endpoints(state, ns, "web") == []
        assert _resolution(state, ns, "web").not_ready == (pod,)

        # Running and Ready, but still without an IP (a kubelet that has not reported it).
        await _ready(env, ns, pod, None)
        state = await run.until(lambda s: _pods(s, ns)[pod].ready_condition, "Ready=True")
        assert _pods(state, ns)[pod].phase == "Running"
        assert _endpoints(state, ns, "web") == []

        await _ready(env, ns, pod, "127.0.0.61")
        await run.until(lambda s: _endpoints(s, ns, "web") == ["127.0.0.61:8080"], "its IP")


async def test_a_pod_turning_not_ready_leaves_the_endpoints(
    aviator_install: AviatorInstall, kube_namespace: str
) -> None:
    env, ns = aviator_install.env, kube_namespace
    a, b = await _deployment(env, ns, "web", 2)
    await asyncio.to_thread(
        env.kubectl, "apply", "-f", "-", "-n", ns, input=policy_yaml("web", "web")
    )
    await _ready(env, ns, a, "127.0.0.71")
    await _ready(env, ns, b, "127.0.0.72")
    async with running(env, aviator_install.kubeconfig, ns) as run:
        await run.until(lambda s: len(_endpoints(s, ns, "web")) == 2, "two endpoints")
        await _ready(env, ns, b, None, ready=False)
        state = await run.until(
            lambda s: _endpoints(s, ns, "web") == ["127.0.0.71:8080"], "b out of the endpoints"
        )
        assert _resolution(state, ns, "web").not_ready == (b,)
        await _ready(env, ns, b, None, ready=True)
        await run.until(lambda s: len(_endpoints(s, ns, "web")) == 2, "b back")


# --- 410 Gone, a killed watch, an API server restart -----------------------------------------


async def test_an_expired_continue_token_restarts_the_list_in_full_and_loses_nothing(
    aviator_install: AviatorInstall, kube_namespace: str
) -> None:
    env, ns = aviator_install.env, kube_namespace
    names = await _deployment(env, ns, "web", 5)
    api = await new_api_client(str(aviator_install.kubeconfig))
    try:
        (pods,) = [r for r in resources(api, ns) if r.kind == "Pod"]
        compacted: list[int] = []

        async def call(query: Any, request_timeout: float) -> Any:
            resp = await pods.call(query, request_timeout)
            if "limit" in query and "continue" not in query and not compacted:
                # After the first page: move etcd on and compact it past the list's snapshot,
                # so that the continue token of the next page is too old (410).
                await asyncio.to_thread(env.kubectl, "create", "configmap", "bump", "-n", ns)
                compacted.append(await asyncio.to_thread(env.compact))
            return resp

        changes: list[Any] = []
        informer: Informer[Any] = Informer(
            dataclasses.replace(pods, call=call),
            lambda doc: doc["metadata"]["name"],
            options=dataclasses.replace(FAST, page_size=2),
            on_change=changes.extend,
        )
        task = asyncio.create_task(informer.run())
        try:
            await _poll(lambda: informer.synced, "the list", task)
            assert compacted
            assert informer.stats.full_lists == 1
            assert sorted(informer.values()) == names
            assert [c.type.value for c in changes] == ["ADDED"] * 5

            # The watch starts from the full list's resourceVersion: the next change is seen.
            await asyncio.to_thread(env.kubectl, "scale", "deployment", "web", "--replicas=6",
                                    "-n", ns)  # fmt: skip
            await _poll(lambda: len(informer) == 6, "the sixth pod", task)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await api.close()  # type: ignore[no-untyped-call]


async def _poll(
    predicate: Callable[[], bool], what: str, task: asyncio.Task[None], *, within: float = 20.0
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if task.done():
            task.result()
            raise AssertionError(f"stopped before {what}")
        if loop.time() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.02)


async def test_a_restarted_api_server_answers_410_and_the_relist_changes_nothing(
    aviator_install: AviatorInstall, kube_namespace: str
) -> None:
    env, ns = aviator_install.env, kube_namespace
    a, b = await _deployment(env, ns, "web", 2)
    await asyncio.to_thread(
        env.kubectl, "apply", "-f", "-", "-n", ns, input=policy_yaml("web", "web")
    )
    await _ready(env, ns, a, "127.0.0.81")
    await _ready(env, ns, b, "127.0.0.82")
    async with running(env, aviator_install.kubeconfig, ns) as run:
        before = await run.until(lambda s: len(_endpoints(s, ns, "web")) == 2, "two endpoints")
        published = len(run.store.history)
        lists = {i.resource.kind: i.stats.lists for i in run.source.informers}

        # Compaction alone: the watch cache still serves the informers' resourceVersions, so
        # reconnecting watches (2-4 s each) go on without a 410 and without a relist.
        await asyncio.to_thread(env.kubectl, "create", "configmap", "bump-0", "-n", ns)
        await asyncio.to_thread(env.compact)
        watches = {i.resource.kind: i.stats.watches for i in run.source.informers}
        for informer in run.source.informers:
            await _poll(
                lambda i=informer: i.stats.watches >= watches[i.resource.kind] + 2,
                f"two new watches of {informer.resource.path}",
                run.task,
            )
        assert [i.stats.expired for i in run.source.informers] == [0, 0, 0, 0]
        assert {i.resource.kind: i.stats.lists for i in run.source.informers} == lists
        assert len(run.store.history) == published

        # Move etcd past every informer's resourceVersion, then restart the API server: its
        # new watch cache starts at etcd's revision, so every watch from before gets a 410.
        await asyncio.to_thread(env.kubectl, "create", "configmap", "bump", "-n", ns)
        await asyncio.to_thread(env.stop_apiserver)
        await asyncio.to_thread(env.start_apiserver)
        for informer in run.source.informers:
            await _poll(
                lambda i=informer: i.stats.expired >= 1 and i.stats.lists > lists[i.resource.kind],
                f"a 410 and a relist of {informer.resource.path}",
                run.task,
            )
        await asyncio.sleep(run.source.coalesce * 4)  # let a (wrong) publish happen, if any
        assert len(run.store.history) == published, "the relists found nothing new"
        assert run.store.current is before

        # Nothing is lost after the relist: the next changes arrive.
        await run.kubectl("scale", "deployment", "web", "--replicas=3")
        state = await run.until(lambda s: len(_pods(s, ns)) == 3, "the third pod")
        assert _endpoints(state, ns, "web") == ["127.0.0.81:8080", "127.0.0.82:8080"]


async def test_a_killed_api_server_loses_no_event_and_never_empties_the_store(
    aviator_install: AviatorInstall, kube_namespace: str
) -> None:
    env, ns = aviator_install.env, kube_namespace
    a, b = await _deployment(env, ns, "web", 2)
    await asyncio.to_thread(
        env.kubectl, "apply", "-f", "-", "-n", ns, input=policy_yaml("web", "web")
    )
    await _ready(env, ns, a, "127.0.0.91")
    await _ready(env, ns, b, "127.0.0.92")
    # A slower back-off than the other tests: the informers are still waiting to retry when
    # the server is back, so the changes below are made before they relist.
    options = dataclasses.replace(FAST, backoff=Backoff(initial=0.5, cap=2.0, jitter=0.5))
    async with running(env, aviator_install.kubeconfig, ns, options=options) as run:
        before = await run.until(lambda s: len(_endpoints(s, ns, "web")) == 2, "two endpoints")
        published = len(run.store.history)

        await asyncio.to_thread(functools.partial(env.stop_apiserver, kill=True))
        failures = {i.resource.kind: i.stats.failures for i in run.source.informers}
        for informer in run.source.informers:
            await _poll(
                lambda i=informer: i.stats.failures > failures[i.resource.kind],
                f"{informer.resource.path} failing",
                run.task,
            )
        # The outage: the last state keeps being served. An event that reached the informers
        # just before the kill (a Deployment's status written by the controller manager) may
        # have been published since `before`; nothing emptier was (the loop at the end checks
        # every state from `published` on).
        assert _endpoints(run.store.current, ns, "web") == _endpoints(before, ns, "web")
        assert set(_pods(run.store.current, ns)) == set(_pods(before, ns))

        await asyncio.to_thread(env.start_apiserver)
        relisted_before_changes = [i.stats.lists > 1 for i in run.source.informers]
        # Changes made as soon as the server is back, while the informers are backing off.
        await run.kubectl("scale", "deployment", "web", "--replicas=3")
        await run.kubectl(
            "apply", "-f", "-", input=policy_yaml("web", "web").replace("100ms", "300ms")
        )
        await _ready(env, ns, b, None, ready=False)

        state = await run.until(
            lambda s: (
                len(_pods(s, ns)) == 3
                and _endpoints(s, ns, "web") == ["127.0.0.91:8080"]
                and (p := _resolution(s, ns, "web").policy) is not None
                and p.latency_threshold.seconds == 0.3
            ),
            "every change made after the restart",
        )
        assert _names(state, "Deployment", ns) == {"web"}
        # No state after the outage ever lacked what was there before it.
        for s in run.store.history[published:]:
            assert _names(s, "Deployment", ns) == {"web"}
            assert _names(s, "AviatorPolicy", ns) == {"web"}
            assert {a, b} <= set(_pods(s, ns))
        print(f"informers that relisted before the changes were made: {relisted_before_changes}")


# --- the watchdog -----------------------------------------------------------------------------


class FreezingProxy:
    """A TCP proxy to the API server; :meth:`freeze` makes every open connection go silent
    (nothing forwarded either way, nothing closed: a half-open connection), while new
    connections work."""

    def __init__(self, port: int) -> None:
        self.upstream_port = port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._generation = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        self._generation += 1

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in self._tasks:
            t.cancel()
        for w in self._writers:
            w.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        generation = self._generation
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst, generation))
            self._tasks.add(task)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, generation: int
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                if self._generation != generation:
                    await asyncio.Event().wait()  # frozen: hold the bytes, close nothing
                dst.write(data)
                await dst.drain()
            dst.close()


async def test_the_watchdog_reopens_a_watch_that_went_silent(
    aviator_install: AviatorInstall, kube_namespace: str, tmp_path: Path
) -> None:
    env, ns = aviator_install.env, kube_namespace
    await _deployment(env, ns, "web", 1)
    proxy = FreezingProxy(env.port)
    await proxy.start()
    config = yaml.safe_load(aviator_install.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
    kubeconfig = tmp_path / "through-proxy"
    kubeconfig.write_text(yaml.safe_dump(config))
    # Watches of 3-6 s; silent 1 s beyond that is dead.
    options = dataclasses.replace(
        FAST, min_watch_timeout=3.0, watchdog_margin=1.0, list_timeout=5.0
    )
    try:
        async with running(env, kubeconfig, ns, options=options) as run:
            await run.until(lambda s: len(_pods(s, ns)) == 1, "the pod")
            pods = _informer(run.source, "Pod")
            proxy.freeze()
            # Made while the watch is frozen: it reaches Aviator only through a new watch.
            await run.kubectl("scale", "deployment", "web", "--replicas=2")
            await run.until(lambda s: len(_pods(s, ns)) == 2, "the second pod", within=30)
            assert pods.stats.stalled >= 1
            assert pods.stats.lists == 1  # a new watch from the same resourceVersion sufficed
    finally:
        await proxy.close()


# --- readiness through the control plane -------------------------------------------------------


async def test_readyz_is_false_until_every_informer_has_synced(
    aviator_crd: str, kube_env: KubeTestEnv, kube_namespace: str
) -> None:
    env, ns = kube_env, kube_namespace
    # A ServiceAccount that may read everything Aviator watches but pods, for now.
    await asyncio.to_thread(env.kubectl, "create", "serviceaccount", "limited", "-n", ns)
    await asyncio.to_thread(
        env.kubectl, "create", "role", "limited", "-n", ns, "--verb=get,list,watch",
        "--resource=aviatorpolicies.aviator.io,deployments.apps,statefulsets.apps",
    )  # fmt: skip
    await asyncio.to_thread(
        env.kubectl, "create", "rolebinding", "limited", "-n", ns, "--role=limited",
        f"--serviceaccount={ns}:limited",
    )  # fmt: skip
    kubeconfig = await asyncio.to_thread(env.service_account_kubeconfig, ns, "limited")
    source = KubernetesSource(kubeconfig=kubeconfig, namespaces=[ns], options=FAST)
    settings = Settings(source="kubernetes", xds_address="127.0.0.1:0", admin_address="127.0.0.1:0")
    cp = ControlPlane(settings, source=source)
    assert cp.readiness() == (
        False,
        [f"source {source.name} not read yet", "xDS server not listening"],
    )
    started = asyncio.Event()
    task = asyncio.create_task(cp.run(started=started))
    try:
        await asyncio.wait_for(started.wait(), 10)
        url = f"http://127.0.0.1:{cp.admin_port}/readyz"
        pods = _informer(source, "Pod")
        others = [i for i in source.informers if i is not pods]
        await _poll(
            lambda: all(i.synced for i in others) and pods.stats.failures >= 3,
            "three informers synced, pods forbidden",
            task,
        )
        assert cp.readiness() == (False, [f"source {source.name} not read yet"])
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            assert resp.status == 503

        await asyncio.to_thread(
            env.kubectl, "create", "role", "pods", "-n", ns, "--verb=get,list,watch",
            "--resource=pods",
        )  # fmt: skip
        await asyncio.to_thread(
            env.kubectl, "create", "rolebinding", "pods", "-n", ns, "--role=pods",
            f"--serviceaccount={ns}:limited",
        )  # fmt: skip
        await _poll(lambda: cp.readiness()[0], "ready once pods may be read", task)
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            assert resp.status == 200
    finally:
        cp.stop()
        await asyncio.wait_for(task, 10)


# --- aviator run, as users start it ------------------------------------------------------------


async def test_aviator_run_source_kubernetes_serves_a_policy_and_stops_on_sigterm(
    aviator_install: AviatorInstall, kube_namespace: str
) -> None:
    env, ns = aviator_install.env, kube_namespace
    (pod,) = await _deployment(env, ns, "web", 1)
    await asyncio.to_thread(
        env.kubectl, "apply", "-f", "-", "-n", ns, input=policy_yaml("web", "web")
    )
    await _ready(env, ns, pod, "127.0.0.101")
    admin = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aviator", "run", "--source", "kubernetes",
        "--kubeconfig", str(aviator_install.kubeconfig), "--namespace", ns,
        "--xds-address", f"127.0.0.1:{free_port()}", "--admin-address", f"127.0.0.1:{admin}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        async with aiohttp.ClientSession() as http:
            while True:
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with http.get(f"http://127.0.0.1:{admin}/readyz") as r:
                        if r.status == 200:
                            break
                assert loop.time() < deadline, "aviator run never became ready"
                assert proc.returncode is None, "aviator run exited"
                await asyncio.sleep(0.05)
            async with http.get(f"http://127.0.0.1:{admin}/debug/policies") as r:
                policies = json.loads(await r.text())
            async with http.get(f"http://127.0.0.1:{admin}/debug/endpoints") as r:
                endpoints = json.loads(await r.text())
        assert [(p["policy"], p["serving"]) for p in policies] == [
            (f"AviatorPolicy {ns}/web", True)
        ]
        assert [e["address"] for e in endpoints] == ["127.0.0.101:8080"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    text = err.decode()
    assert proc.returncode == 0, text[-3000:]
    assert "control plane stopped" in text
    assert "Traceback" not in text

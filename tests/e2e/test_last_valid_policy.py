"""End to end (issue 9, item 2): a typo in a serving policy does not take its workload offline.

The control plane on its own first (``apply_state`` through a valid spec, an invalid update,
other changes while it is invalid, a deletion, a re-creation): what it serves, shows and logs.
Then the whole chain:

A directory source in a temporary directory, the control plane, a real Envoy gateway and two
real HTTP backends. Requests flow through the gateway without pause while the policy file is
edited into an invalid form (``latencyThreshold: 100``, no unit) and then repaired. Checked
from every side:

- from the client: every request answers 200 (0 failed);
- from Envoy: ``/config_dump`` holds the workload's cluster and ``/clusters`` its two hosts at
  every sample, before, during and after the bad edit;
- from the control plane's admin port: ``/debug/policies`` reports Accepted=False, reason
  Invalid, naming ``spec.latencyThreshold`` and the last valid spec it keeps serving
  (``servingLastValid``), and Accepted=True again after the repair.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from aviator import controlplane as controlplane_module
from aviator.controlplane import ControlPlane, Settings
from aviator.envoy.bootstrap import render_bootstrap
from aviator.envoy.process import EnvoyProcess, free_port
from aviator.k8s.objects import parse_pod, parse_workload
from aviator.k8s.policy import parse_policy_entry
from aviator.k8s.state import ClusterState
from aviator.model import WorkloadKey
from aviator.source.store import Store
from aviator.xds.resources import GatewayConfig
from tests import envoy_fixtures
from tests.envoy_fixtures import Backend, BackendFactory, poll_until

http_backends = envoy_fixtures.http_backends  # the fixture, visible to this module's tests

CLUSTER = "shop/web"
POLICY = "AviatorPolicy shop/web"


def _pod(name: str, backend: Backend) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": "web"}},
        "spec": {
            "containers": [
                {"name": "web", "ports": [{"name": "http", "containerPort": backend.port}]}
            ]
        },
        "status": {
            "phase": "Running",
            "podIP": backend.host,
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


DEPLOYMENT = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "web", "namespace": "shop"},
    "spec": {
        "selector": {"matchLabels": {"app": "web"}},
        "template": {
            "metadata": {"labels": {"app": "web"}},
            "spec": {
                "containers": [{"name": "web", "ports": [{"name": "http", "containerPort": 8080}]}]
            },
        },
    },
}


def _policy(latency_threshold: object) -> dict[str, Any]:
    return {
        "apiVersion": "aviator.io/v1alpha1",
        "kind": "AviatorPolicy",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
            "latencyThreshold": latency_threshold,
            "pingInterval": "200ms",
            "port": "http",  # each pod names its own port number
        },
    }


def _write(path: Path, *docs: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # a dot file: the source skips it
    tmp.write_text(yaml.safe_dump_all(docs))
    tmp.replace(path)  # atomic: the source never reads a half-written file


class NoSource:
    """A state source that publishes nothing: the test calls ``apply_state`` itself."""

    name = "none"

    async def run(self, store: Store) -> None:
        await asyncio.Event().wait()


class Log:
    """Stands in for the control plane's logger: records (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        def record(event: str, **fields: Any) -> None:
            self.lines.append((level, event, fields))

        return record

    def events(self, event: str) -> list[dict[str, Any]]:
        return [f for _, e, f in self.lines if e == event]


def _state(policy: dict[str, Any] | None, pods: int = 2, uid: str = "uid-1") -> ClusterState:
    objects: list[Any] = [parse_workload(DEPLOYMENT)]
    for i in range(pods):
        backend = Backend(f"web-{i}", f"10.0.0.{i + 1}", 8080)
        objects.append(parse_pod(_pod(backend.name, backend)))
    if policy is not None:
        policy["metadata"].update(uid=uid, resourceVersion=str(policy["spec"]["latencyThreshold"]))
        objects.append(parse_policy_entry(policy))
    return ClusterState.build(objects)


async def test_the_control_plane_serves_the_last_valid_spec_shows_it_and_logs_it_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = Log()
    monkeypatch.setattr(controlplane_module, "log", log)
    cp = ControlPlane(Settings(source="none"), source=NoSource())
    web = WorkloadKey("shop", "web")
    loop = asyncio.get_running_loop()

    cp.apply_state(_state(_policy("50ms")))
    assert [w.key for w in cp.workloads()] == [web]
    served = cp.workloads()
    targets = dict(cp.prober.targets)

    cp.apply_state(_state(_policy(100)))  # the typo
    assert cp.workloads() == served  # same cluster, same endpoints, same weights
    assert dict(cp.prober.targets) == targets  # probed as before
    (view,) = cp.policies_view()
    assert view["serving"] is True
    assert view["servingLastValid"] is True
    assert view["spec"]["latencyThreshold"] == "50ms"
    for _ in range(50):
        cp.reweigh(loop.time())
    cp.apply_state(_state(_policy(100), pods=3))  # other changes while it is invalid
    assert len(cp.workloads()[0].endpoints) == 3  # pods still follow the served spec
    (warning,) = log.events("policy update invalid, serving its last valid spec")
    assert "spec.latencyThreshold" in warning["message"]
    assert warning["resource_version"] == "50ms"
    assert log.events("policy not serving") == []

    cp.apply_state(_state(None))  # deleted: the cluster goes
    assert cp.workloads() == []
    cp.apply_state(_state(_policy(100), uid="uid-2"))  # re-created, invalid from the start
    assert cp.workloads() == []
    (view,) = cp.policies_view()
    assert view["servingLastValid"] is False
    assert view["serving"] is False


@dataclass
class Watch:
    """Traffic through the gateway and samples of what Envoy holds, until ``stop``."""

    gateway_url: str
    envoy: EnvoyProcess
    want_hosts: set[str]
    statuses: list[tuple[float, int, str]] = field(default_factory=list)  # (sent, status, body)
    samples: list[tuple[float, bool, frozenset[str]]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def traffic(self, rate: float = 60.0) -> None:
        async with aiohttp.ClientSession() as http:
            pending: set[asyncio.Task[None]] = set()
            while not self.stop.is_set():
                task = asyncio.create_task(self._one(http))
                pending.add(task)
                task.add_done_callback(pending.discard)
                await asyncio.sleep(1 / rate)
            await asyncio.gather(*pending)

    async def _one(self, http: aiohttp.ClientSession) -> None:
        sent = time.monotonic()
        try:
            async with http.get(self.gateway_url, headers={"Host": "web.shop"}) as r:
                self.statuses.append((sent, r.status, (await r.text())[:80]))
        except aiohttp.ClientError as exc:
            self.statuses.append((sent, 0, repr(exc)))

    async def more(self, requests: int, samples: int, *, within: float = 60) -> None:
        """Wait until this many more requests were answered and Envoy sampled (the traffic a
        phase must carry, however slow the machine), then return."""
        want = (len(self.statuses) + requests, len(self.samples) + samples)

        async def enough() -> bool:
            return len(self.statuses) >= want[0] and len(self.samples) >= want[1]

        await poll_until(enough, within=within)

    async def envoy_side(self) -> None:
        """Sample Envoy's active clusters (config_dump) and the hosts it routes to."""
        while not self.stop.is_set():
            dump = await self.envoy.admin.config_dump(include_eds=False)
            (clusters,) = [c for c in dump["configs"] if c["@type"].endswith("ClustersConfigDump")]
            active = {c["cluster"]["name"] for c in clusters.get("dynamic_active_clusters", [])}
            hosts = frozenset(h.address for h in await self.envoy.admin.hosts(CLUSTER))
            self.samples.append((time.monotonic(), CLUSTER in active, hosts))
            await asyncio.sleep(0.05)


@dataclass
class Stack:
    root: Path
    control_plane: ControlPlane
    envoy: EnvoyProcess
    gateway_url: str
    admin_url: str
    hosts: set[str]


@pytest.fixture
async def stack(tmp_path: Path, http_backends: BackendFactory) -> AsyncIterator[Stack]:
    backends = [await http_backends("web-a"), await http_backends("web-b")]
    root = tmp_path / "source"
    root.mkdir()
    _write(root / "web.yaml", DEPLOYMENT, _policy("50ms"))
    _write(root / "pods.yaml", *(_pod(b.name, b) for b in backends))
    gateway_port = free_port()
    settings = Settings(
        source=f"dir:{root}",
        xds_address="127.0.0.1:0",
        admin_address="127.0.0.1:0",
        gateway=GatewayConfig(address="127.0.0.1", port=gateway_port),
    )
    control_plane = ControlPlane(settings)
    started = asyncio.Event()
    task = asyncio.create_task(control_plane.run(started=started))
    await started.wait()
    assert control_plane.xds_port is not None
    bootstrap = render_bootstrap(
        xds_host="127.0.0.1",
        xds_port=control_plane.xds_port,
        node_id="last-valid-gateway",
        listen_port=gateway_port,
        admin_port=0,
    )
    try:
        async with EnvoyProcess(bootstrap, workdir=tmp_path / "envoy") as envoy:
            yield Stack(
                root,
                control_plane,
                envoy,
                f"http://127.0.0.1:{gateway_port}/",
                f"http://127.0.0.1:{control_plane.admin_port}/debug/policies",
                {f"{b.host}:{b.port}" for b in backends},
            )
    finally:
        control_plane.stop()
        await task


async def _policy_view(admin_url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(admin_url) as r:
        assert r.status == 200
        views = {p["policy"]: p for p in await r.json()}
    view: dict[str, Any] = views[POLICY]
    return view


def _accepted(view: dict[str, Any]) -> dict[str, Any]:
    accepted: dict[str, Any] = next(c for c in view["conditions"] if c["type"] == "Accepted")
    return accepted


@pytest.mark.envoy
async def test_an_invalid_edit_keeps_the_last_valid_spec_serving_without_a_failed_request(
    stack: Stack,
) -> None:
    async def routed() -> bool:
        hosts = {h.address for h in await stack.envoy.admin.hosts(CLUSTER) if h.healthy}
        if hosts != stack.hosts:
            return False
        try:  # the listener may not be bound yet
            async with (
                aiohttp.ClientSession() as http,
                http.get(stack.gateway_url, headers={"Host": "web.shop"}) as r,
            ):
                return r.status == 200
        except aiohttp.ClientError:
            return False

    await poll_until(routed, within=15)
    watch = Watch(stack.gateway_url, stack.envoy, stack.hosts)
    tasks = [asyncio.create_task(watch.traffic()), asyncio.create_task(watch.envoy_side())]
    try:
        await watch.more(requests=50, samples=10)  # traffic before the edit: the baseline

        # The typo: a number without a unit.
        _write(stack.root / "web.yaml", DEPLOYMENT, _policy(100))

        async def reported_invalid() -> dict[str, Any] | None:
            view = await _policy_view(stack.admin_url)
            return view if _accepted(view)["status"] == "False" else None

        bad = await poll_until(reported_invalid, within=10)
        # Long enough for several directory scans (0.4 s), probe rounds (0.2 s), reweighs
        # and debounced publishes (0.25 s) on the invalid spec.
        await asyncio.sleep(2.5)
        await watch.more(requests=50, samples=10)
        still = await _policy_view(stack.admin_url)

        # The repair: a valid spec (a different one, so it is a real change).
        _write(stack.root / "web.yaml", DEPLOYMENT, _policy("80ms"))

        async def repaired() -> dict[str, Any] | None:
            view = await _policy_view(stack.admin_url)
            return view if _accepted(view)["status"] == "True" else None

        good = await poll_until(repaired, within=10)
        await watch.more(requests=50, samples=10)  # traffic after the repair
    finally:
        watch.stop.set()
        await asyncio.gather(*tasks)

    failed = [s for s in watch.statuses if s[1] != 200]
    print(f"{len(watch.statuses)} requests, {len(failed)} failed; {len(watch.samples)} samples")
    assert failed == [], f"{len(failed)} failed requests, e.g. {failed[:3]}"
    missing = [s for s in watch.samples if not s[1] or s[2] != stack.hosts]
    assert missing == [], (
        f"Envoy lost the cluster or hosts in {len(missing)} samples: {missing[:3]}"
    )
    stats = await stack.envoy.admin.stats()
    assert stats["cluster_manager.cds.update_rejected"] == 0

    # What the admin port said meanwhile.
    accepted = _accepted(bad)
    assert accepted["reason"] == "Invalid"
    assert "spec.latencyThreshold" in accepted["message"]
    assert "duration string" in accepted["message"]  # what is allowed
    assert "last valid spec" in accepted["message"]
    assert "resourceVersion" in accepted["message"]
    assert bad.get("servingLastValid") is True, bad
    assert bad["serving"] is True
    assert bad["spec"]["latencyThreshold"] == "50ms"  # the spec being served
    assert _accepted(still) == accepted
    assert still["servingLastValid"] is True
    assert good.get("servingLastValid") is False
    assert good["spec"]["latencyThreshold"] == "80ms"

"""End to end, issue 12 wired: ``aviator run --source kubernetes`` writes what users read.

On the real API server (tests/kubeapi), with the shipped ServiceAccount's credentials, real
HTTP backends on the pods' 127.0.0.x addresses and a real Envoy gateway from
``aviator bootstrap``:

- a valid policy → Accepted, ResolvedRefs, Programmed True, each with the policy's
  observedGeneration, and ``kubectl get avp`` shows them; an edit → observedGeneration
  follows; a policy on a missing target → TargetNotFound; a minute of steady probing writes
  no status and no Event (the writes that remain are the Lease renewals, counted);
- an Envoy that NACKs the endpoints (forged: Aviator never builds such) → Programmed False,
  reason Rejected, with Envoy's message; the real endpoints again → Programmed True;
- two replicas: one leads and writes, the other writes nothing but its own ACK report, and
  the leader counts the other's proxies; SIGKILL the leader → the other leads within the
  lease duration (plus the retry periods it takes to notice) and keeps the status right.

Component-level behaviour (conflicts, merges, 409s, rate limits) is tested on the operator
itself in tests/integration/kubeapi/test_operator_*.py; this proves the product.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from envoy.config.endpoint.v3 import endpoint_pb2

from aviator.controlplane import ControlPlane, Settings
from aviator.envoy.bootstrap import render_bootstrap
from aviator.envoy.process import EnvoyProcess, free_port
from aviator.testbed.backend import BACKEND_HEADER, BackendSpec
from aviator.testbed.fleet import Fleet
from aviator.testbed.fleetserver import FleetSpec
from aviator.testbed.kubeapi import KubeTestEnv
from aviator.testbed.profile import Profile
from aviator.xds import resources as r
from aviator.xds.resources import GatewayConfig
from aviator.xds.snapshot import ResourceEntry, Snapshot
from tests.integration.kubeapi.operator_support import deployment, policy, ready_pods
from tests.kubeapi.fixtures import AviatorInstall

from .status_support import (
    aviator_run,
    conditions,
    eventually,
    gateway,
    grant_operator_namespace,
    stand_in_pod,
    status_of,
)

pytestmark = pytest.mark.envoy

LEASE_DURATION_S, RETRY_PERIOD_S = 15.0, 2.0  # the shipped defaults (ElectionTiming)


def _fleet(ips: list[str], port: int) -> Fleet:
    return Fleet(
        FleetSpec(
            backends=tuple(
                BackendSpec(f"web-{i}", host=ip, port=port, profile=Profile.constant(0.002))
                for i, ip in enumerate(ips)
            )
        )
    )


def _true_with_generation(obj: dict[str, Any], *types: str) -> bool:
    """Every condition in ``types`` is True and computed from the current generation."""
    generation = obj["metadata"]["generation"]
    c = conditions(obj)
    return all(
        t in c and c[t]["status"] == "True" and c[t].get("observedGeneration") == generation
        for t in types
    )


async def _get(url: str, host: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url, headers={"Host": host}) as r:
        await r.read()
        return r.status, r.headers.get(BACKEND_HEADER, "")


def _writes(requests: dict[str, int]) -> int:
    return sum(n for method, n in requests.items() if method != "GET")


async def test_aviator_run_reports_status_users_can_read(
    aviator_install: AviatorInstall, kube_env: KubeTestEnv, kube_namespace: str, tmp_path: Path
) -> None:
    env, ns = kube_env, kube_namespace
    await asyncio.to_thread(grant_operator_namespace, env, ns)
    ips = ["127.0.0.61", "127.0.0.62"]
    port = free_port(ips[0])
    await asyncio.to_thread(env.apply, deployment("web", ns, replicas=2, port=port))
    await asyncio.to_thread(ready_pods, env, ns, "web", 2, first_ip=61)
    await asyncio.to_thread(env.apply, policy("web", ns, target="web"))
    listen = free_port()
    async with (
        _fleet(ips, port),
        aviator_run(
            aviator_install.kubeconfig, namespace=ns, operator_namespace=ns,
            identity="aviator-e2e-solo", gateway_port=listen, workdir=tmp_path,
        ) as run,
        gateway(run, node_id="gw-status", listen_port=listen, workdir=tmp_path),
    ):  # fmt: skip

        async def web() -> dict[str, Any]:
            return await asyncio.to_thread(status_of, env, ns, "web")

        async def programmed() -> dict[str, Any] | None:
            obj = await web()
            return (
                obj
                if _true_with_generation(obj, "Accepted", "ResolvedRefs", "Programmed")
                else None
            )

        obj = await eventually(programmed, within=60, what="web Accepted, ResolvedRefs, Programmed")
        assert obj["status"]["endpoints"] == 2
        assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"] == 1
        assert conditions(obj)["Programmed"]["reason"] == "Programmed"
        # Programmed means the gateway serves it: a request goes through.
        status, backend = await _get(f"http://127.0.0.1:{listen}/", f"web.{ns}")
        assert (status, backend.startswith("web-")) == (200, True)

        table = await asyncio.to_thread(env.kubectl, "get", "avp", "-n", ns)
        header, row = table.stdout.splitlines()
        assert header.split() == [
            "NAME", "TARGET", "THRESHOLD", "INTERVAL", "ACCEPTED", "PROGRAMMED", "ENDPOINTS", "AGE",
        ]  # fmt: skip
        assert row.split()[:7] == ["web", "web", "100ms", "1s", "True", "True", "2"]

        # A policy on a target that does not exist.
        await asyncio.to_thread(env.apply, policy("orphan", ns, target="nowhere"))

        async def orphaned() -> dict[str, Any] | None:
            c = conditions(await asyncio.to_thread(status_of, env, ns, "orphan"))
            accepted = c.get("Accepted", {})
            ok = (accepted.get("status"), accepted.get("reason")) == ("False", "TargetNotFound")
            return c if ok else None

        c = await eventually(orphaned, within=30, what="orphan Accepted=False TargetNotFound")
        assert "nowhere" in c["Accepted"]["message"]

        # An edit: observedGeneration follows on every condition.
        await asyncio.to_thread(env.apply, policy("web", ns, target="web", threshold="150ms"))

        async def followed() -> dict[str, Any] | None:
            obj = await web()
            generation_2 = obj["metadata"]["generation"] == 2
            types = ("Accepted", "ResolvedRefs", "Programmed")
            return obj if generation_2 and _true_with_generation(obj, *types) else None

        obj = await eventually(followed, within=30, what="observedGeneration 2")
        assert obj["status"]["observedGeneration"] == 2

        # Steady state: a minute of probing and serving. Count every write this replica
        # sends (its own counter, by method) and the objects' resourceVersions.
        await asyncio.sleep(6)  # past the status writer's 5 s settle of anything pending
        before = await run.view("operator")
        versions = {
            n: (await asyncio.to_thread(status_of, env, ns, n))["metadata"]["resourceVersion"]
            for n in ("web", "orphan")
        }
        events = await asyncio.to_thread(env.get, "events", namespace=ns)
        started = time.monotonic()
        await asyncio.sleep(60)
        after = await run.view("operator")
        elapsed = time.monotonic() - started
        events_after = await asyncio.to_thread(env.get, "events", namespace=ns)
        for name, version in versions.items():
            now = (await asyncio.to_thread(status_of, env, ns, name))["metadata"]["resourceVersion"]
            assert now == version, f"{name} was written during steady state"
        assert after["status"]["writes"] == before["status"]["writes"]
        assert after["status"]["events"] == before["status"]["events"]
        assert len(events_after["items"]) == len(events["items"])
        writes = Counter(after["requests"]) - Counter(before["requests"])
        per_minute = _writes(dict(writes)) * 60 / elapsed
        print(f"\nsteady state: {dict(writes)} in {elapsed:.1f}s = {per_minute:.1f} writes/min")
        # What remains is the leader's Lease renewal every retry period (2 s): ~30 a minute.
        assert writes["PUT"] <= 60 / RETRY_PERIOD_S + 2
        assert writes["POST"] == writes["PATCH"] == writes["DELETE"] == 0
        assert after["leading"] is True
        assert after["lastError"] is None


async def test_two_replicas_one_writes_and_the_other_takes_over_after_sigkill(
    aviator_install: AviatorInstall, kube_env: KubeTestEnv, kube_namespace: str, tmp_path: Path
) -> None:
    env, ns = kube_env, kube_namespace
    await asyncio.to_thread(grant_operator_namespace, env, ns)
    first, second = "aviator-e2e-a", "aviator-e2e-b"
    for i, name in enumerate((first, second)):
        await asyncio.to_thread(stand_in_pod, env, ns, name, f"10.3.0.{i + 1}")
    ips = ["127.0.0.71"]
    port = free_port(ips[0])
    await asyncio.to_thread(env.apply, deployment("web", ns, replicas=1, port=port))
    await asyncio.to_thread(ready_pods, env, ns, "web", 1, first_ip=71)
    await asyncio.to_thread(env.apply, policy("web", ns, target="web"))
    listen = free_port()
    common: dict[str, Any] = {
        "namespace": ns, "operator_namespace": ns, "gateway_port": listen, "workdir": tmp_path,
    }  # fmt: skip
    async with (
        _fleet(ips, port),
        aviator_run(aviator_install.kubeconfig, identity=first, **common) as a,
    ):

        async def leads(run: Any) -> bool:
            return bool((await run.view("operator"))["leading"])

        await eventually(lambda: leads(a), within=30, what=f"{first} leads")
        async with (
            aviator_run(aviator_install.kubeconfig, identity=second, **common) as b,
            # The gateway talks to the follower: the leader must count it through b's report.
            gateway(b, node_id="gw-ha", listen_port=listen, workdir=tmp_path),
        ):

            async def programmed() -> bool:
                obj = await asyncio.to_thread(status_of, env, ns, "web")
                return _true_with_generation(obj, "Accepted", "ResolvedRefs", "Programmed")

            await eventually(programmed, within=60, what="Programmed, counted from b's report")
            view_a, view_b = await a.view("operator"), await b.view("operator")
            assert view_a["leading"]
            assert not view_b["leading"]
            assert view_a["peers"] == [second]
            assert view_a["leader"] == view_b["leader"] == first
            # The follower wrote no status and no Event; its writes are its report Lease.
            assert view_b["status"]["writes"] == 0
            assert view_b["status"]["events"] == 0
            assert view_a["status"]["writes"] >= 1
            events = (await asyncio.to_thread(env.get, "events", namespace=ns))["items"]
            aviator_events = [
                e for e in events if e.get("reportingComponent") == "aviator.io/operator"
            ]
            assert aviator_events, "no Event from the leader"
            assert {e.get("reportingInstance") for e in aviator_events} == {first}

            # The leader dies without releasing its lease.
            a.proc.kill()
            await a.proc.wait()
            killed = time.monotonic()
            await eventually(lambda: leads(b), within=LEASE_DURATION_S + 3 * RETRY_PERIOD_S + 5,
                             what=f"{second} leads after {first} was killed")  # fmt: skip
            took = time.monotonic() - killed
            print(f"\ntakeover after SIGKILL: {took:.1f}s (lease {LEASE_DURATION_S:g}s)")
            # Client-go's rule: the lease expires lease-duration after the follower *saw* the
            # last renewal, which it sees within one of its own retry periods (+20% jitter).
            assert took <= LEASE_DURATION_S + 2 * RETRY_PERIOD_S * 1.2 + 1

            # The new leader keeps the status right: an edit is observed.
            await asyncio.to_thread(env.apply, policy("web", ns, target="web", threshold="150ms"))

            async def followed() -> bool:
                obj = await asyncio.to_thread(status_of, env, ns, "web")
                types = ("Accepted", "ResolvedRefs", "Programmed")
                return obj["metadata"]["generation"] == 2 and _true_with_generation(obj, *types)

            await eventually(followed, within=30, what="observedGeneration 2 from the new leader")
            view_b = await b.view("operator")
            assert view_b["leading"]
            assert view_b["status"]["writes"] >= 1
            lease = await asyncio.to_thread(
                env.get, "leases", "aviator-leader", namespace=ns, group="coordination.k8s.io"
            )
            assert lease["spec"]["holderIdentity"] == second
    print(f"new leader's requests: {json.dumps(view_b['requests'])}")


async def test_an_envoy_that_rejects_the_endpoints_makes_programmed_false_with_its_message(
    aviator_install: AviatorInstall,
    kube_env: KubeTestEnv,
    kube_namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Aviator never builds endpoints Envoy rejects (the snapshot check refuses weight 0), so
    this test forges one into the running control plane's cache, in-process (the same wiring
    ``aviator run`` has): a real Envoy NACKs it, and its message reaches the status."""
    env, ns = kube_env, kube_namespace
    await asyncio.to_thread(grant_operator_namespace, env, ns)
    ip = "127.0.0.81"
    port = free_port(ip)
    await asyncio.to_thread(env.apply, deployment("web", ns, replicas=1, port=port))
    await asyncio.to_thread(ready_pods, env, ns, "web", 1, first_ip=81)
    await asyncio.to_thread(env.apply, policy("web", ns, target="web"))
    listen = free_port()
    settings = Settings(
        source="kubernetes", kubeconfig=str(aviator_install.kubeconfig), namespaces=(ns,),
        operator_namespace=ns, xds_address="127.0.0.1:0", admin_address="127.0.0.1:0",
        gateway=GatewayConfig(address="127.0.0.1", port=listen), allow_probe_loopback=True,
    )  # fmt: skip
    async with _fleet([ip], port):
        cp = ControlPlane(settings)
        started = asyncio.Event()
        task = asyncio.create_task(cp.run(started=started))
        try:
            await asyncio.wait_for(started.wait(), 30)
            assert cp.xds_port is not None
            bootstrap = render_bootstrap(
                xds_host="127.0.0.1", xds_port=cp.xds_port, node_id="gw-nack",
                listen_port=listen, listen_address="127.0.0.1", admin_port=free_port(),
            )  # fmt: skip
            async with EnvoyProcess(bootstrap, workdir=tmp_path / "envoy") as envoy:
                await asyncio.wait_for(envoy.wait_live(), 30)

                async def programmed(reason: str) -> dict[str, Any] | None:
                    obj = await asyncio.to_thread(status_of, env, ns, "web")
                    p = conditions(obj).get("Programmed", {})
                    return p if p.get("reason") == reason else None

                await eventually(lambda: programmed("Programmed"), within=60, what="Programmed")

                # Forge a CLA with a second endpoint of weight 0, and let nothing replace it.
                monkeypatch.setattr(cp, "_submit", lambda: None)
                cp.publisher.publish_now()  # whatever was queued goes now, not over the forgery
                cluster = f"{ns}/web"
                good = cp.cache.snapshot
                cla = endpoint_pb2.ClusterLoadAssignment()
                entry = good.of_type(r.ENDPOINT_TYPE)[cluster]
                cla.CopyFrom(entry.message)
                extra = cla.endpoints[0].lb_endpoints.add()
                extra.CopyFrom(cla.endpoints[0].lb_endpoints[0])
                extra.endpoint.address.socket_address.address = "127.0.0.82"
                extra.load_balancing_weight.value = 0
                kept = [
                    e
                    for t, es in good.resources.items()
                    for e in es.values()
                    if not (t == r.ENDPOINT_TYPE and e.name == cluster)
                ]
                bad = Snapshot.from_entries(
                    [*kept, ResourceEntry.from_message(r.ENDPOINT_TYPE, cla)]
                )
                cp.cache.publish(bad, check=False)

                rejected = await eventually(
                    lambda: programmed("Rejected"), within=30, what="Programmed=False Rejected"
                )
                assert rejected["status"] == "False"
                (nack,) = cp.ads.nacks()
                assert nack.type == "eds"
                # Envoy's own words, as the journal holds them, reach the status.
                assert " ".join(nack.message.split())[:200] in rejected["message"]
                assert "load_balancing_weight" in rejected["message"].lower().replace(
                    "loadbalancingweight", "load_balancing_weight"
                )
                # Envoy kept serving the endpoints it held.
                status, _ = await _get(f"http://127.0.0.1:{listen}/", f"web.{ns}")
                assert status == 200

                # The real endpoints again: accepted, Programmed again.
                cp.cache.publish(good)
                await eventually(lambda: programmed("Programmed"), within=30, what="recovered")
        finally:
            cp.stop()
            await asyncio.wait_for(task, 30)

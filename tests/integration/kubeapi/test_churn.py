"""Churn through the real API server (issue 14): policies and pods created and deleted in
waves; the Kubernetes source's and the store's memory returns to its baseline, and no task
or file descriptor is left behind.

The source runs in this process, under ``tracemalloc`` (every Python allocation counted,
whatever thread made it); the load runs in a child process (its own Python, so none of its
memory is counted): Deployments with no replicas, one AviatorPolicy each, and bare pods that
their selectors pick (the controller-manager would make pods one ReplicaSet at a time; bare
pods are as many objects to the source, made 32 requests at a time over keep-alive
connections), each made Running and Ready with an IP, as a kubelet would; then everything
deleted with one ``deletecollection`` per kind. A wave ends when the store holds exactly
what the server holds (every policy serving its pods, then nothing).

Sizes: 100 policies x 1,000 pods, three waves, by default; ``AVIATOR_CHURN=full`` runs
issue 14's 1,000 policies x 10,000 pods (about ten minutes here), and prints the same
figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import ssl
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aviator.k8s.resolve import resolve_state
from aviator.k8s.state import ClusterState
from aviator.source.kubernetes import InformerOptions, KubernetesSource
from aviator.source.store import Store
from aviator.testbed.kubeapi import ROOT, KubeTestEnv
from tests.kubeapi.fixtures import AviatorInstall

FULL = os.environ.get("AVIATOR_CHURN") == "full"
POLICIES, PODS, WAVES = (1000, 10_000, 3) if FULL else (100, 1000, 3)
if (_size := os.environ.get("AVIATOR_CHURN_SIZE")) is not None:  # "policies,pods,waves"
    POLICIES, PODS, WAVES = (int(n) for n in _size.split(","))

pytestmark = pytest.mark.timeout(3600 if FULL else 600)


# --- the load, in a child process --------------------------------------------------------------


async def _load(server: str, token: str, ca: str, ns: str, action: str, policies: int,
                pods: int) -> None:  # fmt: skip
    """Create (``up``) or delete (``down``) one wave's objects, 32 requests at a time."""
    import aiohttp

    context = ssl.create_default_context(cafile=ca)
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    connector = aiohttp.TCPConnector(ssl=context, limit=32)
    async with aiohttp.ClientSession(server, headers=headers, connector=connector) as http:
        gate = asyncio.Semaphore(32)

        async def send(method: str, path: str, body: Any = None, content_type: str = "") -> None:
            async with gate:
                for attempt in range(20):
                    kwargs: dict[str, Any] = {}
                    if body is not None:
                        kwargs["data"] = json.dumps(body)
                        kwargs["headers"] = {"Content-Type": content_type or "application/json"}
                    async with http.request(method, path, **kwargs) as resp:
                        text = await resp.text()
                        if resp.status < 300:
                            return
                        # 504: a deletecollection of 10,000 pods outlasts the server's
                        # request timeout on a busy machine; it goes on, and is idempotent.
                        if resp.status in (409, 429, 500, 503, 504) and attempt < 19:
                            await asyncio.sleep(min(2.0, 0.2 * (attempt + 1)))
                            continue
                        raise RuntimeError(f"{method} {path}: {resp.status} {text[:300]}")

        apps = f"/apis/apps/v1/namespaces/{ns}/deployments"
        avp = f"/apis/aviator.io/v1alpha1/namespaces/{ns}/aviatorpolicies"
        core = f"/api/v1/namespaces/{ns}/pods"
        if action == "down":
            for path in (avp, core, apps):
                await send("DELETE", f"{path}?labelSelector=churn%3Dyes")
            return
        names = [f"w{i:04d}" for i in range(policies)]
        await asyncio.gather(*(send("POST", apps, _deployment(n)) for n in names))
        await asyncio.gather(*(send("POST", avp, _policy(n)) for n in names))
        pod_names = [(f"{names[j % policies]}-{j:05d}", names[j % policies]) for j in range(pods)]
        await asyncio.gather(*(send("POST", core, _pod(p, app)) for p, app in pod_names))
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        await asyncio.gather(
            *(
                send("PATCH", f"{core}/{p}/status", _ready(j, now),
                     "application/merge-patch+json")
                for j, (p, _) in enumerate(pod_names)
            )
        )  # fmt: skip


def _deployment(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"churn": "yes"}},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "main", "image": "example/web",
                                         "ports": [{"name": "http", "containerPort": 8080}]}]},
            },
        },
    }  # fmt: skip


def _policy(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "aviator.io/v1alpha1",
        "kind": "AviatorPolicy",
        "metadata": {"name": name, "labels": {"churn": "yes"}},
        "spec": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "latencyThreshold": "100ms",
            "pingInterval": "5s",
        },
    }


def _pod(name: str, app: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": app, "churn": "yes"}},
        "spec": {"containers": [{"name": "main", "image": "example/web",
                                 "ports": [{"name": "http", "containerPort": 8080}]}]},
    }  # fmt: skip


def _ready(j: int, now: str) -> dict[str, Any]:
    ip = f"10.{80 + j // 65536}.{j // 256 % 256}.{j % 256}"
    conditions = [{"type": t, "status": "True", "lastTransitionTime": now}
                  for t in ("Ready", "ContainersReady")]  # fmt: skip
    return {
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": conditions,
        }
    }


def load_main(argv: list[str]) -> None:
    """The child: ``load_main([server, token, ca, ns, up|down, policies, pods])``."""
    server, token, ca, ns, action, policies, pods = argv
    asyncio.run(_load(server, token, ca, ns, action, int(policies), int(pods)))


async def load(env: KubeTestEnv, ns: str, action: str) -> float:
    """Run one half of a wave in a child process; the seconds it took."""
    started = time.monotonic()
    args = [env.server, env.admin_token, str(env.ca_file), ns, action, str(POLICIES), str(PODS)]
    code = (
        "import sys; from tests.integration.kubeapi.test_churn import load_main; "
        "load_main(sys.argv[1:])"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, *args, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-3000:]
    return time.monotonic() - started


# --- measuring -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    traced: int  # bytes tracemalloc counts, after a full collection
    tasks: int
    fds: int
    rss: int  # bytes resident (for the record: the allocator keeps freed arenas)


def sample() -> Sample:
    gc.collect()
    traced, _ = tracemalloc.get_traced_memory()
    rss = 0
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return Sample(traced, len(asyncio.all_tasks()), len(os.listdir("/proc/self/fd")), rss)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@contextlib.asynccontextmanager
async def source_in(kubeconfig: Path, ns: str) -> AsyncIterator[tuple[KubernetesSource, Store]]:
    # The production informer options (watches of 5-10 min): with the tests' 2-4 s watches,
    # every new watch URL fills a bounded cache of yarl's (128 URLs, ~1.5 KB each), which
    # is a real but bounded cost, and larger than 10% of this small baseline.
    source = KubernetesSource(kubeconfig=kubeconfig, namespaces=(ns,), options=InformerOptions())
    store = Store()
    task = asyncio.create_task(source.run(store), name="kubernetes source")
    try:
        yield source, store
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(store: Store, check: Any, what: str, within: float) -> ClusterState:
    deadline = time.monotonic() + within
    while True:
        if store.synced and check(store.current):
            return store.current
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.1 if PODS < 5000 else 1.0)


def _full(state: ClusterState) -> bool:
    if len(state.policies) != POLICIES or len(state.pods) != PODS:
        return False
    return sum(len(r.endpoints) for r in resolve_state(state)) == PODS


def _empty(state: ClusterState) -> bool:
    return not state.policies and not state.pods and not state.workloads


async def test_waves_of_policies_and_pods_leave_memory_tasks_and_fds_at_their_baseline(
    aviator_install: AviatorInstall, kube_namespace: str
) -> None:
    env, ns = aviator_install.env, kube_namespace
    tracemalloc.start()
    try:
        async with source_in(aviator_install.kubeconfig, ns) as (source, store):
            await until(store, _empty, "synced on the empty namespace", 30)
            await asyncio.sleep(1.0)  # the first watches open
            base = sample()
            base_snapshot = tracemalloc.take_snapshot()
            rows = [f"baseline: traced {_mb(base.traced)}, rss {_mb(base.rss)}, tasks "
                    f"{base.tasks}, fds {base.fds}"]  # fmt: skip
            after: list[Sample] = []
            for wave in range(WAVES):
                up = await load(env, ns, "up")
                state = await until(store, _full, f"wave {wave}: everything in", 600)
                counts = f"{len(state.policies)} policies, {len(state.pods)} pods"
                del state  # the test must hold none of it
                seen = time.monotonic()
                full = sample()
                down = await load(env, ns, "down")
                await until(store, _empty, f"wave {wave}: everything gone", 600)
                gone = time.monotonic() - seen
                await asyncio.sleep(1.0)
                after.append(end := sample())
                if wave == 0:
                    first_snapshot = tracemalloc.take_snapshot()
                rows.append(
                    f"wave {wave}: {counts} "
                    f"(created and ready in {up:.0f} s) traced {_mb(full.traced)}, rss "
                    f"{_mb(full.rss)}; deleted ({down:.0f} s, empty after {gone:.0f} s) traced "
                    f"{_mb(end.traced)} ({end.traced / base.traced - 1:+.1%}), rss "
                    f"{_mb(end.rss)}, tasks {end.tasks}, fds {end.fds}"
                )
            print("\n" + "\n".join(rows))
            last_snapshot = tracemalloc.take_snapshot()
            for what, since in (("the baseline", base_snapshot), ("wave 0", first_snapshot)):
                print(f"grown most since {what}:")
                for diff in last_snapshot.compare_to(since, "lineno")[:8]:
                    print(f"  {diff}")
            stats = [(i.resource.kind, i.stats.lists, i.stats.events) for i in source.informers]
            print(f"informers (kind, lists, events): {stats}")
            final = after[-1]
            assert abs(final.traced - base.traced) <= 0.10 * base.traced, rows
            # Each wave grew nothing that the next one kept.
            assert after[-1].traced <= after[0].traced * 1.05, rows
            assert final.tasks == base.tasks, rows
            # Idle connections of the client's pool may stay open; none per wave.
            assert final.fds <= base.fds + 4, rows
            assert after[-1].fds <= after[0].fds, rows
    finally:
        tracemalloc.stop()

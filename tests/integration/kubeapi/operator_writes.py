"""Writes per minute to the API server by the Operator at 1,000 pods under steady load.

Not a test (no assertion on timing): a measurement, run by hand on the real API server of
aviator/testbed/kubeapi.py::

    PYTHONPATH=. .venv/bin/python -m tests.integration.kubeapi.operator_writes [WORKDIR]

10 Deployments x 100 pods, one AviatorPolicy each with annotatePods and publishService on;
every 100 ms the weigher weighs each policy's pods from latencies of 5 ms (one pod per policy
300 ms, hot against the 100 ms threshold) times lognormal noise (sigma 0.1, i.e. about
+-10 %), and the Operator gets the weights (weights_changed) and, every second, ACK counts
(acks_changed). Default intervals (lease 15/10/2 s, status 1 s per policy, annotations 30 s
per pod, Services 5 s). Prints the writes by method and resource during a 100 s warm-up and
during the following minute. Figures: docs/kubernetes.md ("Writes to the API server").
"""

from __future__ import annotations

import asyncio
import collections
import functools
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

from aviator.k8s.resolve import resolve_state
from aviator.model import EndpointAddress, WorkloadKey
from aviator.operator.acks import ClusterAcks
from aviator.operator.kube import KubeApi, api_client_from_kubeconfig
from aviator.operator.runtime import Operator, OperatorSettings
from aviator.probing.estimator import EndpointStats
from aviator.probing.weigher import WeighResult, weigh
from aviator.testbed.kubeapi import ROOT, KubeTestEnv
from tests.integration.kubeapi.operator_support import read_state

WORKLOADS, PODS = 10, 100
NS = "bench"


class Counting(KubeApi):
    """Counts mutating requests by (method, resource)."""

    by: ClassVar[collections.Counter[tuple[str, str]]] = collections.Counter()

    async def request(self, method: str, url_path: str, body: Any = None, **kw: Any) -> Any:
        if method != "GET":
            kinds = ("leases", "events", "pods", "services", "endpoints")
            kind = (
                "status"
                if url_path.endswith("/status")
                else next((k for k in kinds if f"/{k}" in url_path), url_path)
            )
            self.by[(method, kind)] += 1
        return await super().request(method, url_path, body, **kw)


def setup(env: KubeTestEnv) -> None:
    env.apply(ROOT / "deploy" / "crd")
    env.wait_established("aviatorpolicies.aviator.io")
    env.kubectl("create", "namespace", "aviator-system")
    env.kubectl("create", "namespace", NS)
    for w in range(WORKLOADS):
        env.apply(f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web{w}, namespace: {NS}}}
spec:
  replicas: {PODS}
  selector: {{matchLabels: {{app: web{w}}}}}
  template:
    metadata: {{labels: {{app: web{w}}}}}
    spec:
      containers:
        - {{name: main, image: example/web:1, ports: [{{name: http, containerPort: 8080}}]}}
---
apiVersion: aviator.io/v1alpha1
kind: AviatorPolicy
metadata: {{name: web{w}, namespace: {NS}}}
spec:
  targetRef: {{apiVersion: apps/v1, kind: Deployment, name: web{w}}}
  latencyThreshold: 100ms
  pingInterval: 1s
  annotatePods: true
  publishService: true
""")  # fmt: skip
    jobs = []
    for w in range(WORKLOADS):
        pods = env.wait_for_pods(NS, f"app=web{w}", PODS, within=300)
        for i, p in enumerate(pods):
            jobs.append((p["metadata"]["name"], f"10.{10 + w}.{i // 250}.{i % 250 + 1}"))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda j: env.set_pod_status(NS, j[0], ip=j[1], ready=True), jobs))


def _lookup(
    table: dict[tuple[WorkloadKey, EndpointAddress], float], key: WorkloadKey, a: EndpointAddress
) -> float | None:
    return table.get((key, a))


def _stats(latency_s: float) -> EndpointStats:
    return EndpointStats(latency_s, latency_s, None, None, 0.0, 50, 0.1, 0)


async def measure(workdir: Path) -> None:
    env = KubeTestEnv(workdir, controller_manager=True)
    await asyncio.to_thread(env.start)
    try:
        started = time.monotonic()
        await asyncio.to_thread(setup, env)
        print(f"setup: {time.monotonic() - started:.0f} s", flush=True)
        res = resolve_state(await asyncio.to_thread(read_state, env, NS))
        client = await api_client_from_kubeconfig(str(env.kubeconfig))
        op = Operator(Counting(client), OperatorSettings(namespace="aviator-system",
                                                         identity="bench-0"))  # fmt: skip
        task = asyncio.create_task(op.run())
        op.state_changed(res)
        rng = random.Random(1)
        previous: dict[WorkloadKey, WeighResult] = {}
        loop = asyncio.get_running_loop()

        async def feed(seconds: float) -> None:
            end, tick = loop.time() + seconds, 0
            while loop.time() < end:
                latency: dict[tuple[WorkloadKey, EndpointAddress], float] = {}
                for r in res:
                    assert r.key is not None
                    assert r.policy is not None
                    stats = {}
                    for j, e in enumerate(r.endpoints):
                        s = _stats((0.3 if j == 0 else 0.005) * rng.lognormvariate(0, 0.1))
                        stats[e.address] = s
                        latency[(r.key, e.address)] = s.latency_s
                    previous[r.key] = weigh(stats, knobs=r.policy.weigher,
                                            latency_threshold_s=0.1,
                                            previous=previous.get(r.key))  # fmt: skip
                op.weights_changed(previous, functools.partial(_lookup, latency), loop.time())
                if tick % 10 == 0:
                    op.acks_changed({r.key.cluster_name: ClusterAcks(2, 2) for r in res if r.key})
                tick += 1
                await asyncio.sleep(0.1)

        await feed(100)
        print("warm-up (100 s):", sorted(Counting.by.items()), flush=True)
        Counting.by.clear()
        await feed(60)
        print("steady minute:", sorted(Counting.by.items()), flush=True)
        print("writes in the steady minute:", sum(Counting.by.values()), flush=True)
        op.stop()
        await asyncio.wait_for(task, 10)
        await client.close()  # type: ignore[no-untyped-call]
    finally:
        env.close()


if __name__ == "__main__":
    where = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="opw-"))
    where.mkdir(parents=True, exist_ok=True)
    asyncio.run(measure(where))

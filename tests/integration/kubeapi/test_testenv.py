"""The real-API-server test environment itself (aviator/testbed/kubeapi.py) does what the
Kubernetes tests rely on: controllers make Pods, set_pod_status plays the kubelet, forced 410s
happen, the API server can go away and come back, ServiceAccount tokens authenticate."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from aviator.testbed.kubeapi import (
    KUBE_VERSION,
    KubeBinaries,
    KubeTestEnv,
    KubeTestEnvError,
    ensure_binaries,
)


def _watch_events(env: KubeTestEnv, path: str, resource_version: str) -> list[dict[str, Any]]:
    """The events of a 1-second watch from ``resource_version`` (raw HTTP, as admin)."""
    url = (
        f"{env.server}{path}?watch=1&resourceVersion={resource_version}"
        "&allowWatchBookmarks=true&timeoutSeconds=1"
    )
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {env.admin_token}"})
    ctx = ssl.create_default_context(cafile=str(env.ca_file))
    with urllib.request.urlopen(req, context=ctx, timeout=10) as response:
        return [json.loads(line) for line in response.read().splitlines()]


def test_the_server_is_the_real_one(kube_env: KubeTestEnv) -> None:
    version = kube_env.request("GET", "/version")
    assert version["gitVersion"] == f"v{KUBE_VERSION}"
    assert kube_env.server.startswith("https://127.0.0.1:")
    # RBAC is on: an unknown token is refused, an authenticated user without bindings is denied.
    with pytest.raises(KubeTestEnvError) as unknown:
        kube_env.request("GET", "/api/v1/pods", token="not-a-token")
    assert unknown.value.status == 401


def test_a_deployment_gets_pods_and_set_pod_status_makes_one_ready(
    kube_env: KubeTestEnv, kube_namespace: str
) -> None:
    ns = kube_namespace
    kube_env.kubectl(
        "create", "deployment", "web", "--image=example/web:1", "--replicas=3", "--port=8080",
        "-n", ns,
    )  # fmt: skip
    pods = kube_env.wait_for_pods(ns, "app=web", 3)
    assert all(p["status"]["phase"] == "Pending" for p in pods)
    assert all("podIP" not in p["status"] for p in pods)
    assert all(not p["spec"].get("nodeName") for p in pods)  # no scheduler

    first = pods[0]["metadata"]["name"]
    updated = kube_env.set_pod_status(ns, first, ip="127.0.0.11", ready=True)
    assert updated["status"]["podIP"] == "127.0.0.11"
    assert updated["status"]["podIPs"] == [{"ip": "127.0.0.11"}]
    assert updated["status"]["phase"] == "Running"
    ready = {c["type"]: c["status"] for c in updated["status"]["conditions"]}
    assert ready["Ready"] == "True"
    assert ready["ContainersReady"] == "True"

    # What kubectl and the Deployment controller make of it.
    wide = kube_env.kubectl("get", "pod", first, "-n", ns, "-o", "wide", "--no-headers").stdout
    assert wide.split()[1:3] == ["1/1", "Running"]
    assert "127.0.0.11" in wide
    deadline = time.monotonic() + 30
    deployment = {"group": "apps", "namespace": ns}
    while kube_env.get("deployments", "web", **deployment)["status"].get("readyReplicas") != 1:
        assert time.monotonic() < deadline, "the Deployment never counted the ready pod"
        time.sleep(0.1)

    # NotReady keeps the IP; lastTransitionTime moves only on a change.
    before = {c["type"]: c for c in updated["status"]["conditions"]}
    again = kube_env.set_pod_status(ns, first, ready=True)
    after = {c["type"]: c for c in again["status"]["conditions"]}
    assert after["Ready"]["lastTransitionTime"] == before["Ready"]["lastTransitionTime"]
    not_ready = kube_env.set_pod_status(ns, first, ready=False)
    assert not_ready["status"]["podIP"] == "127.0.0.11"
    assert {c["type"]: c["status"] for c in not_ready["status"]["conditions"]}["Ready"] == "False"

    # Scaling down deletes pods at once (unscheduled pods need no kubelet to go away).
    kube_env.kubectl("scale", "deployment", "web", "--replicas=1", "-n", ns)
    assert len(kube_env.wait_for_pods(ns, "app=web", 1)) == 1


def test_a_statefulset_gets_its_pods_one_by_one(kube_env: KubeTestEnv, kube_namespace: str) -> None:
    # OrderedReady (the default): db-1 comes only once db-0 is Running and Ready.
    ns = kube_namespace
    kube_env.apply(
        f"""
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: db, namespace: {ns}}}
spec:
  replicas: 2
  serviceName: db
  selector: {{matchLabels: {{app: db}}}}
  template:
    metadata: {{labels: {{app: db}}}}
    spec:
      containers: [{{name: db, image: example/db:1, ports: [{{name: http, containerPort: 80}}]}}]
"""
    )
    (db0,) = kube_env.wait_for_pods(ns, "app=db", 1)
    assert db0["metadata"]["name"] == "db-0"
    kube_env.set_pod_status(ns, "db-0", ip="127.0.0.21")
    pods = kube_env.wait_for_pods(ns, "app=db", 2)
    assert [p["metadata"]["name"] for p in pods] == ["db-0", "db-1"]


def test_compact_expires_old_reads_and_a_restart_expires_old_watches(
    kube_env: KubeTestEnv, kube_namespace: str
) -> None:
    ns = kube_namespace
    path = f"/api/v1/namespaces/{ns}/configmaps"
    kube_env.kubectl("create", "configmap", "a", "-n", ns)
    old = kube_env.get("configmaps", namespace=ns)["metadata"]["resourceVersion"]
    for i in range(3):
        kube_env.kubectl("create", "configmap", f"b{i}", "-n", ns)

    revision = kube_env.compact()
    assert revision > int(old)
    with pytest.raises(KubeTestEnvError) as gone:
        kube_env.request("GET", f"{path}?resourceVersion={old}&resourceVersionMatch=Exact")
    assert gone.value.status == 410
    # The watch cache still holds those events: a watch from `old` is served from it. (Only
    # ours: the controller-manager's root-CA publisher adds `kube-root-ca.crt` to a new
    # namespace when it gets to it, after `old` when it has just been restarted.)
    events = _watch_events(kube_env, path, old)
    ours = [
        (e["type"], e["object"]["metadata"]["name"])
        for e in events
        if e["type"] != "BOOKMARK" and e["object"]["metadata"]["name"] != "kube-root-ca.crt"
    ]
    assert ours == [("ADDED", f"b{i}") for i in range(3)]

    kube_env.stop_apiserver()
    with pytest.raises(urllib.error.URLError):
        kube_env.request("GET", "/version", timeout=2)
    kube_env.start_apiserver()
    # A new watch cache starts at etcd's current revision: `old` is gone for watches too.
    (event,) = _watch_events(kube_env, path, old)
    assert event["type"] == "ERROR"
    assert event["object"]["code"] == 410
    # Nothing was lost: etcd kept every object.
    names = [c["metadata"]["name"] for c in kube_env.get("configmaps", namespace=ns)["items"]]
    assert {"a", "b0", "b1", "b2"} <= set(names)


def test_service_account_kubeconfig_authenticates_as_the_account_across_restarts(
    kube_env: KubeTestEnv, kube_namespace: str
) -> None:
    ns = kube_namespace
    kube_env.kubectl("create", "serviceaccount", "reader", "-n", ns)
    kubeconfig = kube_env.service_account_kubeconfig(ns, "reader")

    def can_i(*args: str) -> str:
        return kube_env.kubectl("auth", "can-i", *args, kubeconfig=kubeconfig, check=False).stdout

    assert can_i("list", "pods").strip() == "no"  # RBAC: no binding yet
    # The same TokenRequest API through kubectl, as the docs say to use it on 1.20.
    token = kube_env.kubectl("create", "token", "reader", "-n", ns).stdout.strip()
    assert token.count(".") == 2  # a JWT
    kube_env.kubectl(
        "create", "rolebinding", "reader", "--clusterrole=view", f"--serviceaccount={ns}:reader",
        "-n", ns,
    )  # fmt: skip
    assert can_i("list", "pods").strip() == "yes"  # in the context's namespace, ns
    assert can_i("list", "pods", "-n", "default").strip() == "no"
    whoami = kube_env.kubectl("get", "pods", kubeconfig=kubeconfig)
    assert whoami.returncode == 0
    # The same signing key after a restart: the token stays valid.
    kube_env.stop_apiserver(kill=True)
    kube_env.start_apiserver()
    assert can_i("list", "pods").strip() == "yes"


def test_admin_kubeconfig_sets_the_default_namespace(
    kube_env: KubeTestEnv, kube_namespace: str
) -> None:
    kubeconfig = kube_env.admin_kubeconfig(kube_namespace)
    kube_env.kubectl("create", "configmap", "here", kubeconfig=kubeconfig)
    assert kube_env.get("configmaps", "here", namespace=kube_namespace)["metadata"]["name"]


def test_a_server_that_cannot_start_fails_with_its_log(tmp_path: Path) -> None:
    real = ensure_binaries()
    broken = KubeBinaries(
        apiserver=Path("/bin/false"),
        controller_manager=real.controller_manager,
        etcd=real.etcd,
        etcdctl=real.etcdctl,
        kubectl=real.kubectl,
    )
    env = KubeTestEnv(tmp_path, binaries=broken)
    with pytest.raises(KubeTestEnvError, match=r"kube-apiserver died before it was ready"):
        env.start()
    # close() ran: etcd is gone too.
    assert not any(
        str(tmp_path) in line
        for line in subprocess.run(
            ["ps", "-eo", "args"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        if "etcd" in line
    )


async def test_restarting_from_a_worker_thread_outlives_the_thread(
    kube_env: KubeTestEnv, kube_namespace: str
) -> None:
    # PR_SET_PDEATHSIG fires when the *thread* that forked a child exits: a server restarted
    # from asyncio.to_thread must not die with that worker thread.
    await asyncio.to_thread(kube_env.stop_apiserver)
    worker = threading.Thread(target=kube_env.start_apiserver)
    worker.start()
    await asyncio.to_thread(worker.join)
    await asyncio.sleep(1)
    assert kube_env.apiserver_running
    version = await asyncio.to_thread(kube_env.request, "GET", "/version")
    assert version["gitVersion"] == f"v{KUBE_VERSION}"

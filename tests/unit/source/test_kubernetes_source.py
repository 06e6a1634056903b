"""KubernetesSource without a server: what it keeps of an object, how problems are named,
and the credential errors users see (one line each, at construction). ``aviator run`` with
bad Kubernetes flags is in tests/integration/test_run_kubernetes_cli.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from aviator.k8s.objects import Pod
from aviator.k8s.policy import AviatorPolicy, InvalidPolicy
from aviator.source.kubernetes.source import (
    KubernetesConfigError,
    KubernetesSource,
    _object_path,
    _transform,
    decode,
)

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
  - name: c
    cluster: {server: "https://127.0.0.1:1"}
users:
  - name: u
    user: {token: abc}
contexts:
  - name: dev
    context: {cluster: c, user: u, namespace: shop}
current-context: dev
"""


def pod(name: str = "web-1", **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": "u1", "resourceVersion": "5",
                     "creationTimestamp": "2024-05-01T12:00:00Z", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "web", "ports": [{"containerPort": 8080}]}]},
        "status": status,
    }  # fmt: skip


def test_decode_keeps_the_typed_value_with_the_server_metadata() -> None:
    d = decode(pod(phase="Running", podIP="10.0.0.5"), "/api/v1/namespaces/shop/pods/web-1")
    assert isinstance(d.obj, Pod)
    assert (d.obj.pod_ip, d.obj.meta.uid, d.obj.meta.resource_version) == ("10.0.0.5", "u1", "5")
    assert d.problems == ()


def test_an_object_that_does_not_parse_is_a_problem_named_by_its_api_path() -> None:
    doc = pod(podIP="not-an-ip")
    d = _transform("/api/v1/pods")(doc)
    assert d.obj is None
    (problem,) = d.problems
    assert problem.source == "/api/v1/namespaces/shop/pods/web-1"
    assert problem.field == "status.podIP"
    assert "not an IPv4 or IPv6 address" in problem.message


def test_an_invalid_policy_is_kept_with_its_problems() -> None:
    doc = {
        "apiVersion": "aviator.io/v1alpha1",
        "kind": "AviatorPolicy",
        "metadata": {"name": "web", "namespace": "shop", "uid": "p", "resourceVersion": "3"},
        # The CRD schema on 1.20 cannot check that the timeout is below the ping interval.
        "spec": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
            "latencyThreshold": "100ms",
            "pingInterval": "1s",
            "probe": {"timeout": "2s"},
        },
    }
    path = "/apis/aviator.io/v1alpha1/namespaces/shop/aviatorpolicies/web"
    d = decode(doc, path)
    assert isinstance(d.obj, InvalidPolicy)
    assert d.problems
    assert all(p.source == path and p.object == d.obj.ref for p in d.problems)
    doc["spec"]["probe"] = {"timeout": "500ms"}
    assert isinstance(decode(doc, path).obj, AviatorPolicy)


@pytest.mark.parametrize(
    ("collection", "expected"),
    [
        ("/api/v1/pods", "/api/v1/namespaces/shop/pods/web-1"),
        ("/api/v1/namespaces/shop/pods", "/api/v1/namespaces/shop/pods/web-1"),
        (
            "/apis/aviator.io/v1alpha1/aviatorpolicies",
            "/apis/aviator.io/v1alpha1/namespaces/shop/aviatorpolicies/web-1",
        ),
    ],
)
def test_object_paths(collection: str, expected: str) -> None:
    assert _object_path(collection, pod()) == expected


# --- credentials and flags --------------------------------------------------------------------


def test_a_kubeconfig_and_context_are_checked_at_construction(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text(KUBECONFIG)
    source = KubernetesSource(kubeconfig=path, namespaces=["shop", "shop", "web"])
    assert source.namespaces == ("shop", "web")
    assert source.name == "kubernetes (namespaces shop, web)"
    assert KubernetesSource(kubeconfig=path, context="dev").name == "kubernetes"

    with pytest.raises(KubernetesConfigError, match="context 'prod'"):
        KubernetesSource(kubeconfig=path, context="prod")
    with pytest.raises(KubernetesConfigError, match="no such file"):
        KubernetesSource(kubeconfig=tmp_path / "missing")
    (tmp_path / "bad").write_text("{not: yaml: at all")
    with pytest.raises(KubernetesConfigError, match="cannot be read as a kubeconfig"):
        KubernetesSource(kubeconfig=tmp_path / "bad")
    (tmp_path / "empty").write_text("")
    with pytest.raises(KubernetesConfigError):
        KubernetesSource(kubeconfig=tmp_path / "empty")
    with pytest.raises(ValueError, match="DNS-1123 label"):
        KubernetesSource(kubeconfig=path, namespaces=["Shop"])


def test_in_cluster_credentials_are_required_without_a_kubeconfig(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubernetesConfigError, match=r"not running in a cluster.*--kubeconfig"):
        KubernetesSource()
    with pytest.raises(KubernetesConfigError, match="--context needs --kubeconfig"):
        KubernetesSource(context="dev")

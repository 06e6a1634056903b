"""Kubernetes-style dicts for tests, shaped as the API returns them (small on purpose)."""

from __future__ import annotations

from typing import Any


def workload_doc(
    name: str = "web",
    *,
    kind: str = "Deployment",
    namespace: str = "shop",
    labels: dict[str, str] | None = None,
    ports: list[dict[str, Any]] | None = None,
    expressions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    labels = labels if labels is not None else {"app": name}
    ports = ports if ports is not None else [{"name": "http", "containerPort": 8080}]
    selector: dict[str, Any] = {"matchLabels": labels}
    if expressions:
        selector["matchExpressions"] = expressions
    return {
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "selector": selector,
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "main", "ports": ports}]},
            },
        },
    }


def pod_doc(
    name: str,
    ip: str | None,
    *,
    namespace: str = "shop",
    labels: dict[str, str] | None = None,
    ready: bool = True,
    phase: str = "Running",
    ports: list[dict[str, Any]] | None = None,
    zone: str | None = None,
    node: str | None = None,
    terminating: bool = False,
) -> dict[str, Any]:
    labels = dict(labels if labels is not None else {"app": "web"})
    if zone is not None:
        labels["topology.kubernetes.io/zone"] = zone
    ports = ports if ports is not None else [{"name": "http", "containerPort": 8080}]
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels}
    if terminating:
        meta["deletionTimestamp"] = "2024-05-01T12:00:00Z"
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip is not None:
        status["podIP"] = ip
    spec: dict[str, Any] = {"containers": [{"name": "main", "ports": ports}]}
    if node is not None:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status}


def policy_doc(
    name: str = "web",
    *,
    target: str = "web",
    kind: str = "Deployment",
    namespace: str = "shop",
    created: str | None = None,
    generation: int | None = None,
    **spec: Any,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if created is not None:
        meta["creationTimestamp"] = created
    if generation is not None:
        meta["generation"] = generation
    body: dict[str, Any] = {
        "targetRef": {"apiVersion": "apps/v1", "kind": kind, "name": target},
        "latencyThreshold": "100ms",
        "pingInterval": "1s",
    }
    body.update(spec)
    return {
        "apiVersion": "aviator.io/v1alpha1",
        "kind": "AviatorPolicy",
        "metadata": meta,
        "spec": body,
    }

"""What ``aviator demo`` runs: its workload, pods and slowdown, their loopback addresses, the
backends' profiles and the Kubernetes objects the control plane reads.

Building blocks other code reuses (the inspect tests do): :func:`pick_addresses`,
:func:`demo_backends`, :func:`write_objects`.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog
import yaml

from aviator.model import WorkloadKey
from aviator.testbed.backend import BackendSpec
from aviator.testbed.profile import Phase, Profile

log = structlog.get_logger(__name__)

WORKLOAD = WorkloadKey("shop", "web")
HOST_HEADER = f"{WORKLOAD.name}.{WORKLOAD.namespace}"
DEFAULT_FIRST_ADDRESS = "127.0.0.2"
DEFAULT_BACKEND_PORT = 8080
# Pods and their mean service times. The slowed one is the fastest otherwise, so it starts
# with the largest share and its loss is plain to see; web-b is slower but within
# latencyThreshold, so before the slowdown every weight is equal and Envoy's least request
# balances the three on its own. Capacity 8 each: at the default rate the fleet runs at ~15%
# of its capacity, but the slowed pod (100 ms, 80 req/s at most) would be overloaded with the
# share it had before.
PODS: tuple[tuple[str, float], ...] = (("web-a", 0.015), ("web-b", 0.040), ("web-c", 0.010))
SLOWED_POD = "web-c"
SLOW_FACTOR = 10.0
CAPACITY = 8
LATENCY_THRESHOLD = "50ms"
PING_INTERVAL = "500ms"
# A RIF of 1-3 on pods that serve 8 at once is noise, not load: with the default (1), the pod
# with the highest RIF of three is "hot" most of the time and the floor weight rotates between
# the pods (measured: weights swinging 1000 <-> 50 every second before the slowdown).
MIN_HOT_RIF = 3
LAST_LOOPBACK = 254


def port_free(host: str, port: int) -> bool:
    """True if a server could listen on ``host:port`` now (SO_REUSEADDR, as aiohttp sets it,
    so a socket in TIME_WAIT from an earlier run does not count as busy)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def pick_addresses(
    count: int,
    *,
    first: str = DEFAULT_FIRST_ADDRESS,
    port: int = DEFAULT_BACKEND_PORT,
    is_free: Callable[[str, int], bool] = port_free,
) -> list[str]:
    """``count`` loopback IPs from ``first`` up (127.0.0.N) whose ``port`` is free.

    Busy ones are skipped. Raises ValueError if ``first`` is not a 127.0.0.N address
    or fewer than ``count`` are free up to 127.0.0.254.
    """
    prefix, _, last = first.rpartition(".")
    if prefix != "127.0.0" or not last.isdigit() or not 1 <= int(last) <= LAST_LOOPBACK:
        raise ValueError(f"--first-address must be 127.0.0.N with N in 1..254, got {first!r}")
    found: list[str] = []
    busy: list[str] = []
    for n in range(int(last), LAST_LOOPBACK + 1):
        host = f"127.0.0.{n}"
        if is_free(host, port):
            found.append(host)
            if len(found) == count:
                if busy:
                    log.warning("skipped busy addresses", busy=busy, port=port)
                return found
        else:
            busy.append(host)
    raise ValueError(
        f"need {count} loopback addresses with port {port} free from {first} up; "
        f"busy: {', '.join(busy) or 'none'} (stop what listens there or pass --first-address)"
    )


def demo_backends(
    hosts: Sequence[str],
    *,
    port: int = DEFAULT_BACKEND_PORT,
    slowdown: tuple[float, float] | None = None,
    seed: int = 0,
) -> tuple[BackendSpec, ...]:
    """The demo's backends (``PODS``) at ``hosts``; ``SLOWED_POD`` slows down ``SLOW_FACTOR``
    times from ``slowdown[0]`` to ``slowdown[1]`` seconds after the fleet's clock (re)starts.
    ``slowdown=None``: every backend keeps its speed (the inspect tests want steady weights).
    """
    if len(hosts) != len(PODS):
        raise ValueError(f"need {len(PODS)} hosts, got {len(hosts)}")
    specs = []
    for (name, service_s), host in zip(PODS, hosts, strict=True):
        base = Phase(mean_service_s=service_s, capacity=CAPACITY)
        if name == SLOWED_POD and slowdown is not None:
            profile = Profile.window(
                base, slowdown[0], slowdown[1], mean_service_s=service_s * SLOW_FACTOR
            )
        else:
            profile = Profile((base,))
        specs.append(BackendSpec(name=name, host=host, port=port, profile=profile, seed=seed))
    return tuple(specs)


def demo_objects(backends: Sequence[BackendSpec]) -> dict[str, Any]:
    """File name → YAML document(s): the Deployment, its Pods (one per backend) and the policy."""
    labels = {"app": WORKLOAD.name}
    ports = [{"name": "http", "containerPort": backends[0].port}]
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": WORKLOAD.name, "namespace": WORKLOAD.namespace},
        "spec": {
            "replicas": len(backends),
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "web", "image": "demo", "ports": ports}]},
            },
        },
    }
    pods = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": b.name,
                    "namespace": WORKLOAD.namespace,
                    "labels": {**labels, "topology.kubernetes.io/zone": f"zone-{i}"},
                },
                "spec": {
                    "containers": [
                        {"name": "web", "ports": [{"name": "http", "containerPort": b.port}]}
                    ]
                },
                "status": {
                    "phase": "Running",
                    "podIP": b.host,
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            }
            for i, b in enumerate(backends)
        ],
    }
    policy = {
        "apiVersion": "aviator.io/v1alpha1",
        "kind": "AviatorPolicy",
        "metadata": {"name": WORKLOAD.name, "namespace": WORKLOAD.namespace},
        "spec": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": WORKLOAD.name},
            "latencyThreshold": LATENCY_THRESHOLD,
            "pingInterval": PING_INTERVAL,
            "port": "http",
            "weigher": {"minHotRif": MIN_HOT_RIF},
        },
    }
    return {"deployment.yaml": deployment, "pods.yaml": pods, "policy.yaml": policy}


_FILE_COMMENTS = {
    "deployment.yaml": "# The workload the demo balances. Written by `aviator demo`.",
    "pods.yaml": "# The Deployment's pods: their IPs are loopback addresses where the demo's "
    "backends listen.",
    "policy.yaml": "# Latency-aware balancing for shop/web. minHotRif: a RIF of 1-3 on pods that "
    "serve 8 requests\n# at once is noise, not load (the default, 1, makes the busiest of three "
    "pods hot most of the time).",
}


def write_objects(directory: Path, backends: Sequence[BackendSpec]) -> None:
    """Write :func:`demo_objects` into ``directory`` (created if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, doc in demo_objects(backends).items():
        text = yaml.safe_dump(doc, sort_keys=False)
        (directory / name).write_text(f"{_FILE_COMMENTS[name]}\n{text}")

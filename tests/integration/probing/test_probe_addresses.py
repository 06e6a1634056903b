"""The control plane's real prober contacts pod addresses only (issue 14): a pod on loopback is
not probed unless ``--allow-probe-loopback``, the refusal names the pod and the address in
``/debug/problems`` and the policy's conditions, and the pod keeps being served.

A real HTTP backend on 127.0.0.1. A refused pod gets no probe slot at all (it is in the
prober's ``refused`` map, not in its ``targets``), which the test checks on every machine. Where
the machine has a non-loopback address, a second backend there is the witness that the prober
is running while the loopback pod stays silent; where it has none, the refusal is shown by the
prober's slots alone (the allowed variant proves the same pod is probed once allowed).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest

from aviator.controlplane import ControlPlane, Settings
from aviator.k8s.objects import parse_pod, parse_workload
from aviator.k8s.policy import parse_policy_entry
from aviator.k8s.state import ClusterState
from tests.e2e.test_last_valid_policy import DEPLOYMENT, NoSource, _pod
from tests.envoy_fixtures import Backend, BackendFactory, http_backends, poll_until

__all__ = ["http_backends"]


def _own_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if any."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 9))
        except OSError:
            return None
        ip = str(s.getsockname()[0])
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


def _state(backends: list[Backend]) -> ClusterState:
    policy = {
        "apiVersion": "aviator.io/v1alpha1",
        "kind": "AviatorPolicy",
        "metadata": {"name": "web", "namespace": "shop", "uid": "u1"},
        "spec": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
            "latencyThreshold": "100ms",
            "pingInterval": "100ms",
            "port": "http",
            # A path that looks like another host: still a path on each pod.
            "probe": {"path": "//metadata.google.internal/computeMetadata/v1/"},
        },
    }
    objects = [parse_workload(DEPLOYMENT), parse_policy_entry(policy)]
    objects += [parse_pod(_pod(b.name, b)) for b in backends]
    return ClusterState.build(objects)


@contextlib.asynccontextmanager
async def probing(cp: ControlPlane) -> AsyncIterator[None]:
    task = asyncio.create_task(cp.prober.run())
    await asyncio.sleep(0)  # the prober has started before anything is awaited of it
    try:
        yield
    finally:
        await cp.prober.close()
        await task


@pytest.mark.parametrize("allow", [False, True])
async def test_a_loopback_pod_is_probed_only_when_allowed(
    http_backends: BackendFactory, allow: bool
) -> None:
    own = _own_address()
    local = await http_backends("web-local", "127.0.0.1")
    backends = [local] if own is None else [local, await http_backends("web-remote", own)]
    cp = ControlPlane(Settings(source="none", allow_probe_loopback=allow), source=NoSource())
    cp.apply_state(_state(backends))
    probed_ips = {k.address.ip for k in cp.prober.targets}
    refused_ips = {k.address.ip for k in cp.prober.refused}
    assert ("127.0.0.1" in probed_ips, "127.0.0.1" in refused_ips) == (allow, not allow)
    async with probing(cp):
        for witness in backends[1:]:
            await poll_until(lambda w=witness: _at_least(w, 3))
        if allow:
            await poll_until(lambda: _at_least(local, 3))
    # Every probe went to a pod, on its own port, with the policy's path as a path.
    for backend in backends:
        for headers in backend.seen:
            assert headers["Host"] == f"{backend.host}:{backend.port}"
    # Every pod is served (no probe data is a neutral weight, never a removal).
    [workload] = cp.workloads()
    assert sorted(e.address.ip for e in workload.endpoints) == sorted(b.host for b in backends)
    [policy] = cp.policies_view()
    probed = [c for c in policy["conditions"] if c["type"] == "Probed"]
    if allow:
        assert local.hits >= 3
        assert cp.problems_view() == []
        assert probed == []
        return
    assert local.hits == 0
    message = (
        f"shop/web: pod web-local at 127.0.0.1:{local.port} is not probed: 127.0.0.1 is a "
        "loopback address (this host); it is probed only with aviator run --allow-probe-loopback"
    )
    assert cp.problems_view() == [message]
    assert probed == [
        {
            "type": "Probed",
            "status": "False",
            "reason": "ProbeAddressRefused",
            "message": message,
        }
    ]
    assert policy["serving"] is True


async def _at_least(backend: Backend, n: int) -> bool:
    return backend.hits >= n

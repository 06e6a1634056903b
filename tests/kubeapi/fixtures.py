"""pytest fixtures for tests that run against the real Kubernetes API server
(:mod:`aviator.testbed.kubeapi`).

They are registered once for the whole suite by ``tests/conftest.py`` (so a session starts at
most one API server, whichever directories its tests are in); do not import them again in a
nested conftest.py: pytest would treat that as a second fixture and start a second server.

- ``kube_env`` (session): a started :class:`~aviator.testbed.kubeapi.KubeTestEnv` (etcd,
  kube-apiserver, kube-controller-manager). Builds the binaries first if they are missing
  (``scripts/kube-testenv.sh``; ``make test`` does that before pytest) and fails, never skips,
  if it cannot.
- ``kube_namespace`` (function): the name of a fresh namespace, deleted after the test (without
  waiting for the namespace controller). If the test left the API server stopped, it is started
  again first, so the next test finds it serving.
- ``release_dir`` (session): ``scripts/release.sh`` output (``crd.yaml``, ``operator.yaml``,
  ``gateway.yaml``) in a temporary directory: what ``make release`` writes to ``dist/``.
- ``aviator_crd`` (session): ``crd.yaml`` applied and Established; its name.
- ``aviator_install`` (session): ``crd.yaml`` and ``operator.yaml`` applied (namespace
  ``aviator-system``, ServiceAccount ``aviator`` with the shipped RBAC, the operator
  Deployment, whose Pods stay Pending: nothing runs images here); an :class:`AviatorInstall`
  whose ``kubeconfig`` authenticates as that ServiceAccount. Run Aviator with it to test the
  RBAC that ships.
"""

from __future__ import annotations

import re
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from aviator.testbed.kubeapi import ROOT, KubeTestEnv

__all__ = [
    "CRD_NAME",
    "OPERATOR_NAMESPACE",
    "OPERATOR_SERVICE_ACCOUNT",
    "AviatorInstall",
    "aviator_crd",
    "aviator_install",
    "kube_env",
    "kube_namespace",
    "release_dir",
]

CRD_NAME = "aviatorpolicies.aviator.io"
OPERATOR_NAMESPACE = "aviator-system"
OPERATOR_SERVICE_ACCOUNT = "aviator"


@dataclass(frozen=True, slots=True)
class AviatorInstall:
    """What ``aviator_install`` applied: the operator's namespace and ServiceAccount, and a
    kubeconfig holding that ServiceAccount's token (context namespace ``aviator-system``)."""

    env: KubeTestEnv
    kubeconfig: Path
    namespace: str = OPERATOR_NAMESPACE
    service_account: str = OPERATOR_SERVICE_ACCOUNT


@pytest.fixture(scope="session")
def kube_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeTestEnv]:
    env = KubeTestEnv(tmp_path_factory.mktemp("kube-testenv"), controller_manager=True)
    env.start()
    try:
        yield env
    finally:
        env.close()


def _namespace_name(test_name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")[:40].strip("-")
    return f"t-{slug}-{secrets.token_hex(3)}"


@pytest.fixture
def kube_namespace(kube_env: KubeTestEnv, request: pytest.FixtureRequest) -> Iterator[str]:
    name = _namespace_name(request.node.name)
    kube_env.create_namespace(name)
    yield name
    if not kube_env.apiserver_running:
        kube_env.start_apiserver()
    kube_env.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")


@pytest.fixture(scope="session")
def release_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "release.sh"), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"scripts/release.sh failed:\n{proc.stderr}"
    return out


@pytest.fixture(scope="session")
def aviator_crd(kube_env: KubeTestEnv, release_dir: Path) -> str:
    kube_env.apply(release_dir / "crd.yaml")
    kube_env.wait_established(CRD_NAME)
    return CRD_NAME


@pytest.fixture(scope="session")
def aviator_install(kube_env: KubeTestEnv, release_dir: Path, aviator_crd: str) -> AviatorInstall:
    kube_env.apply(release_dir / "operator.yaml")
    kubeconfig = kube_env.service_account_kubeconfig(OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT)
    return AviatorInstall(env=kube_env, kubeconfig=kubeconfig)

"""The benchmark's Aviator: a directory source describing the fleet, and ``aviator run`` as a
child process (the integration point between the benchmark and the control plane).

:func:`manifests` (pure) describes the benchmark's backends the way Kubernetes would: an
``AviatorPolicy`` on the Deployment ``bench/bench``, the Deployment, and one ready Pod per
backend. Every pod has the IP ``127.0.0.1`` (the backends all listen on loopback) and its own
container port named ``http`` (each backend's own port), so the control plane resolves one
endpoint per backend, exactly as a Service's named ``targetPort`` would.

:class:`ControlPlane` writes those manifests into a directory and runs::

    python -m aviator run --source dir:DIR --xds-address 127.0.0.1:P --admin-address 127.0.0.1:Q \
        --gateway-port 0

It is ready when ``GET /readyz`` on the admin address answers 200 (sources synced, xDS
listening). It is stopped with SIGTERM (SIGKILL after a grace period) and never outlives the
benchmark: Linux kills it if the benchmark dies (``setpriv --pdeathsig``).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import aiohttp
import structlog
import yaml

from aviator.bench.policies import WORKLOAD
from aviator.envoy.process import free_port, parent_death_prefix
from aviator.probing.results import DEFAULT_PROBE_PATH

__all__ = ["ControlPlane", "ControlPlaneError", "ControlPlaneSettings", "manifests"]

log = structlog.get_logger(__name__)

PORT_NAME: Final = "http"
_LABELS: Final = {"app": "bench"}


class ControlPlaneError(Exception):
    """``aviator run`` could not be started, exited, or never became ready."""


@dataclass(frozen=True, slots=True)
class ControlPlaneSettings:
    """The AviatorPolicy knobs the benchmark sets (``spec.pingInterval``,
    ``spec.latencyThreshold``, ``spec.probe.timeout``, ``spec.weigher``)."""

    ping_interval_ms: int = 100
    latency_threshold_ms: int = 100
    probe_timeout_ms: int = 100
    weigher: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.ping_interval_ms < 10:
            raise ValueError(f"ping interval must be >= 10 ms, got {self.ping_interval_ms}")
        if self.latency_threshold_ms < 1:
            raise ValueError(f"latency threshold must be >= 1 ms, got {self.latency_threshold_ms}")
        if not 1 <= self.probe_timeout_ms <= self.ping_interval_ms:
            raise ValueError("probe timeout must be in 1 ms .. ping interval")

    def to_json(self) -> dict[str, Any]:
        return {
            "ping_interval_ms": self.ping_interval_ms,
            "latency_threshold_ms": self.latency_threshold_ms,
            "probe_timeout_ms": self.probe_timeout_ms,
            "weigher": dict(self.weigher) if self.weigher else None,
        }


def manifests(
    ports: Mapping[str, int], settings: ControlPlaneSettings | None = None
) -> list[dict[str, Any]]:
    """Policy, Deployment and one ready Pod per backend (``{backend name: port}``)."""
    settings = settings or ControlPlaneSettings()
    if not ports:
        raise ValueError("the workload needs at least one pod")
    spec: dict[str, Any] = {
        "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": WORKLOAD.name},
        "latencyThreshold": f"{settings.latency_threshold_ms}ms",
        "pingInterval": f"{settings.ping_interval_ms}ms",
        "port": PORT_NAME,
        "probe": {"path": DEFAULT_PROBE_PATH, "timeout": f"{settings.probe_timeout_ms}ms"},
    }
    if settings.weigher:
        spec["weigher"] = dict(settings.weigher)
    meta = {"name": WORKLOAD.name, "namespace": WORKLOAD.namespace}
    policy = {
        "apiVersion": "aviator.io/v1alpha1",
        "kind": "AviatorPolicy",
        "metadata": dict(meta),
        "spec": spec,
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": dict(meta),
        "spec": {
            "replicas": len(ports),
            "selector": {"matchLabels": dict(_LABELS)},
            "template": {
                "metadata": {"labels": dict(_LABELS)},
                "spec": {
                    "containers": [
                        {
                            "name": "backend",
                            "image": "aviator/testbed-backend",
                            # Each pod declares its own port under this name (see the pods).
                            "ports": [{"name": PORT_NAME, "containerPort": 8080}],
                        }
                    ]
                },
            },
        },
    }
    pods = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{WORKLOAD.name}-{name}",
                "namespace": WORKLOAD.namespace,
                "labels": dict(_LABELS),
            },
            "spec": {
                "containers": [
                    {
                        "name": "backend",
                        "ports": [{"name": PORT_NAME, "containerPort": port}],
                    }
                ]
            },
            "status": {
                "phase": "Running",
                "podIP": "127.0.0.1",
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }
        for name, port in sorted(ports.items())
    ]
    return [policy, deployment, *pods]


def write_manifests(directory: Path, docs: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``docs`` as one multi-document YAML file in ``directory``; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "bench.yaml"
    path.write_text(yaml.safe_dump_all([dict(d) for d in docs], sort_keys=False))
    return path


class ControlPlane:
    """``aviator run`` on a directory source describing ``ports`` (``{backend: port}``).

    Use as ``async with ControlPlane(ports) as cp:``; ``cp.xds_address`` is what the sidecar
    bootstraps point at. Invariant: after :meth:`stop` (or leaving the ``async with``, also on
    error) the process has exited and been reaped, and its temporary directory is removed.
    """

    def __init__(
        self,
        ports: Mapping[str, int],
        *,
        settings: ControlPlaneSettings | None = None,
        python: str = sys.executable,
        log_level: str = "warning",
        ready_timeout_s: float = 20.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        self._ports = dict(ports)
        self._settings = settings or ControlPlaneSettings()
        self._python = python
        self._log_level = log_level
        self._ready_timeout_s = ready_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._proc: asyncio.subprocess.Process | None = None
        self._dir: Path | None = None
        self.xds_address: tuple[str, int] = ("127.0.0.1", 0)
        self.admin_url = ""

    @property
    def log_path(self) -> Path:
        assert self._dir is not None, "not started"
        return self._dir / "aviator.log"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (FileNotFoundError, AssertionError):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("control plane already started")
        self._dir = Path(tempfile.mkdtemp(prefix="aviator-bench-cp-"))
        source = self._dir / "source"
        write_manifests(source, manifests(self._ports, self._settings))
        self.xds_address = ("127.0.0.1", free_port())
        admin = ("127.0.0.1", free_port())
        self.admin_url = f"http://{admin[0]}:{admin[1]}"
        args = [
            self._python,
            "-m",
            "aviator",
            "--log-level",
            self._log_level,
            "run",
            "--source",
            f"dir:{source}",
            "--xds-address",
            f"{self.xds_address[0]}:{self.xds_address[1]}",
            "--admin-address",
            f"{admin[0]}:{admin[1]}",
            # Sidecars only: no gateway listener over LDS.
            "--gateway-port",
            "0",
            "--allow-probe-loopback",  # the benchmark's backends are on loopback
        ]
        with self.log_path.open("wb") as out:
            self._proc = await asyncio.create_subprocess_exec(
                *parent_death_prefix(),
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )
        log.info("bench control plane started", pid=self._proc.pid, xds=self.xds_address)
        try:
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise

    async def _wait_ready(self) -> None:
        assert self._proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._ready_timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
            while True:
                if self._proc.returncode is not None:
                    raise ControlPlaneError(
                        f"aviator run exited with code {self._proc.returncode} while starting; "
                        f"log tail:\n{self.log_tail()}"
                    )
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(self.admin_url + "/readyz") as resp:
                        if resp.status == 200:
                            return
                if loop.time() > deadline:
                    raise ControlPlaneError(
                        f"aviator run was not ready (GET /readyz) within "
                        f"{self._ready_timeout_s} s; log tail:\n{self.log_tail()}"
                    )
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after the grace period; reap; remove the directory."""
        proc = self._proc
        if proc is not None:
            try:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.terminate()
                    try:
                        await asyncio.wait_for(proc.wait(), self._stop_timeout_s)
                    except TimeoutError:
                        log.warning("bench control plane slow to stop; killing", pid=proc.pid)
                        with contextlib.suppress(ProcessLookupError):
                            proc.kill()
                        await proc.wait()
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                raise
            finally:
                self._proc = None
            log.info("bench control plane stopped", pid=proc.pid, code=proc.returncode)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

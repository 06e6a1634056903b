"""A real Kubernetes API server for tests: etcd, kube-apiserver and kube-controller-manager.

Not an emulation: the binaries are Kubernetes 1.20.2 built from Debian's source package by
``scripts/kube-testenv.sh`` (cached in ``~/.cache/aviator/kubernetes-1.20.2/``), and etcd is
Debian's ``etcd-server``. Each :class:`KubeTestEnv` runs its own processes on free loopback
ports, with a fresh etcd data dir, a CA, serving certificate and service-account signing key
made with openssl for that run, RBAC authorization on, and a static token file holding one
admin token (user ``aviator-test-admin``, group ``system:masters``) for the test's own kubectl.

Usage (the fixtures in ``tests/kubeapi/fixtures.py`` do this once per test session)::

    env = KubeTestEnv(tmp_dir, controller_manager=True).start()   # ready: /readyz answered ok
    env.kubectl("create", "deployment", "web", "--image=example/web", "-n", ns)
    env.apply(Path("deploy/crd"))                  # a file, a kustomize dir, or YAML text
    pods = env.wait_for_pods(ns, "app=web", 1)     # made by the controller-manager
    env.set_pod_status(ns, pods[0]["metadata"]["name"], ip="127.0.0.11", ready=True)
    kubeconfig = env.service_account_kubeconfig("aviator-system", "aviator")
    env.stop_apiserver(); env.start_apiserver()    # same port, same etcd
    env.close()

The API (all blocking):

- ``KubeTestEnv(workdir, *, controller_manager=True, binaries=None,
  extra_apiserver_flags=())``; ``start() -> Self``; ``close()``; also a context manager.
- Attributes: ``server`` (``https://127.0.0.1:PORT``), ``port``, ``kubeconfig`` (admin,
  context namespace ``default``), ``ca_file``, ``admin_token``, ``etcd_url``, ``workdir`` (logs
  ``etcd.log``, ``kube-apiserver.log``, ``kube-controller-manager.log`` stay there),
  ``startup_seconds`` (cumulative, per step), ``binaries``.
- ``kubectl(*args, input=None, check=True, timeout=120, kubeconfig=None) ->
  CompletedProcess[str]``: the machine's kubectl as admin (or with ``kubeconfig``); with
  ``check`` a non-zero exit raises :class:`KubeTestEnvError` with stdout and stderr.
- ``apply(manifest, *kubectl_args, namespace=None, check=True) -> CompletedProcess[str]``:
  ``kubectl apply`` of a file, a kustomize directory or YAML text.
- ``request(method, path, body=None, *, content_type="application/json", token=None,
  timeout=30) -> Any``: one REST call as admin (or ``token``), JSON in and out;
  :class:`KubeTestEnvError` with ``.status`` on an HTTP error.
- ``get(resource, name=None, *, namespace=None, group="", version="v1") -> Any``.
- ``set_pod_status(namespace, name, *, ip=None, ready=True, phase="Running") -> dict``:
  the kubelet's part (below).
- ``wait_for_pods(namespace, selector, count, *, within=30) -> list[dict]``: poll until exactly
  ``count`` live Pods match the label selector; sorted by name.
- ``create_namespace(name)``; ``wait_established(crd, *, within=30)``.
- ``admin_kubeconfig(namespace) -> Path``: admin, with that default namespace.
- ``service_account_kubeconfig(namespace, name, *, expiration_seconds=86400) -> Path``: a
  TokenRequest token for that ServiceAccount, context namespace ``namespace``.
- ``etcd_revision() -> int``; ``compact() -> int`` (below).
- ``stop_apiserver(*, kill=False)``; ``start_apiserver()``; ``apiserver_running``.
- Module level: ``ensure_binaries() -> KubeBinaries`` (builds them if missing, or raises),
  ``KubeTestEnvError``, ``KUBE_VERSION``.

What it is, and what it is not:

- The controller-manager, when on, runs every controller that needs no nodes or cloud
  (Deployments → ReplicaSets → Pods, StatefulSets → Pods, garbage collection, namespace
  deletion, default ServiceAccounts). There is no scheduler and no kubelet: Pods stay
  unscheduled (``spec.nodeName`` empty, so deleting one removes it at once, as the API server
  does for unscheduled Pods) and Pending until :meth:`KubeTestEnv.set_pod_status` gives them an
  IP, a phase and a Ready condition through the ``pods/status`` subresource, as a kubelet would.
  A StatefulSet (OrderedReady, the default) makes ``NAME-1`` only once ``NAME-0`` is Running
  and Ready. Scaling down removes Pods at once.
- The ``ServiceAccount`` admission plugin is always off (with it, a Pod created in a namespace
  a moment old fails until the controller-manager has made its ``default`` ServiceAccount; with
  no kubelet nothing would mount the token anyway). TokenRequest (``kubectl create token``,
  :meth:`KubeTestEnv.service_account_kubeconfig`) works: the issuer and signing-key flags are
  set, and tokens stay valid across an API server restart.
- Processes die with the test run (``setpriv --pdeathsig KILL``, and an atexit hook); a process
  that fails to start raises :class:`KubeTestEnvError` with the tail of its log.
- The watch cache is on, as in a cluster: it sends bookmarks, and it serves watches from its own
  window, so a watch from an old resourceVersion gets 410 Gone when that version is older than
  the cache's window: after :meth:`KubeTestEnv.stop_apiserver` / :meth:`start_apiserver` (the
  new cache starts at etcd's current revision) or, for reads served by etcd (lists with
  ``resourceVersionMatch=Exact``, continue tokens), after :meth:`KubeTestEnv.compact`.
  For a 410 from compaction alone, start an environment of its own with
  ``extra_apiserver_flags=("--watch-cache=false",)``: every watch is then served by etcd, and
  one from a compacted resourceVersion gets an ERROR event 410 "The resourceVersion for the
  provided watch is too old" (no bookmarks either: they come from the cache);
  ``tests/e2e/kubernetes/test_faults.py`` does so.

Blocking calls (subprocesses, HTTP); from async code, wrap them in ``asyncio.to_thread``: the
child processes are spawned from a long-lived thread, so that the death signal (tied to the
spawning thread) never fires when a short-lived worker thread exits.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Self

__all__ = [
    "ADMIN_USER",
    "KUBE_VERSION",
    "KubeBinaries",
    "KubeTestEnv",
    "KubeTestEnvError",
    "ensure_binaries",
]

KUBE_VERSION = "1.20.2"
ADMIN_USER = "aviator-test-admin"
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "kube-testenv.sh"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
# Controllers that need nodes, a cloud or CSR signing keys, none of which exist here.
_CONTROLLERS = "*,-nodeipam,-nodelifecycle,-ttl,-bootstrapsigner,-tokencleaner,-csrsigning"


class KubeTestEnvError(RuntimeError):
    """The test environment could not be had, or a command against it failed; ``status`` is
    the HTTP status of a failed :meth:`KubeTestEnv.request`, else None."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _cache_dir() -> Path:
    default = Path.home() / ".cache" / "aviator" / f"kubernetes-{KUBE_VERSION}"
    return Path(os.environ.get("AVIATOR_KUBE_CACHE", default))


@dataclass(frozen=True, slots=True)
class KubeBinaries:
    """Where the programs are: ``KUBE_APISERVER``, ``KUBE_CONTROLLER_MANAGER``, ``ETCD``,
    ``ETCDCTL`` and ``KUBECTL`` override the defaults (the build cache, then ``$PATH``)."""

    apiserver: Path
    controller_manager: Path
    etcd: Path
    etcdctl: Path
    kubectl: Path

    @classmethod
    def locate(cls) -> tuple[KubeBinaries | None, list[str]]:
        """The binaries, or None and what is missing."""
        cache = _cache_dir()
        wanted = {
            "apiserver": os.environ.get("KUBE_APISERVER", str(cache / "kube-apiserver")),
            "controller_manager": os.environ.get(
                "KUBE_CONTROLLER_MANAGER", str(cache / "kube-controller-manager")
            ),
            "etcd": os.environ.get("ETCD", "etcd"),
            "etcdctl": os.environ.get("ETCDCTL", "etcdctl"),
            "kubectl": os.environ.get("KUBECTL", "kubectl"),
        }
        found: dict[str, Path] = {}
        missing: list[str] = []
        for field, name in wanted.items():
            path = shutil.which(name)
            if path is None:
                missing.append(name)
            else:
                found[field] = Path(path)
        for tool in ("openssl", "setpriv"):
            if shutil.which(tool) is None:
                missing.append(tool)
        if missing:
            return None, missing
        return cls(**found), []


def ensure_binaries() -> KubeBinaries:
    """The binaries; runs ``scripts/kube-testenv.sh`` (install etcd, build once) if any is
    missing. Raises :class:`KubeTestEnvError` if they still cannot be had: callers must fail,
    never skip."""
    binaries, missing = KubeBinaries.locate()
    if binaries is not None:
        return binaries
    proc = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, check=False, timeout=3600
    )
    binaries, missing = KubeBinaries.locate()
    if binaries is None:
        raise KubeTestEnvError(
            f"the Kubernetes test environment is not available (missing: {', '.join(missing)});"
            f" {SCRIPT.name} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
        )
    return binaries


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


# --- processes --------------------------------------------------------------------------------

_running: dict[int, subprocess.Popen[bytes]] = {}
_spawner: concurrent.futures.ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _kill_leftovers() -> None:
    for proc in list(_running.values()):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


def _spawn(argv: Sequence[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    """Start ``argv`` with PR_SET_PDEATHSIG=SIGKILL, from the main thread or one long-lived
    spawner thread (the signal fires when the *thread* that forked the child exits)."""
    global _spawner
    prefix = [shutil.which("setpriv") or "setpriv", "--pdeathsig", "KILL"]
    if not sys.platform.startswith("linux"):
        prefix = []

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [*prefix, *argv], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )

    if threading.current_thread() is threading.main_thread():
        proc = start()
    else:
        with _spawner_lock:
            if _spawner is None:
                _spawner = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="kube-testenv-spawner"
                )
        proc = _spawner.submit(start).result()
    if not _running:
        atexit.register(_kill_leftovers)
    _running[proc.pid] = proc
    return proc


def _stop(proc: subprocess.Popen[bytes], *, kill: bool = False, grace: float = 15.0) -> None:
    if proc.poll() is None:
        if kill:
            proc.kill()
        else:
            proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _running.pop(proc.pid, None)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class _Process:
    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = _spawn(self.argv, log)

    def stop(self, *, kill: bool = False, grace: float = 15.0) -> None:
        if self.proc is not None:
            _stop(self.proc, kill=kill, grace=grace)
            self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def failure(self, why: str) -> KubeTestEnvError:
        code = None if self.proc is None else self.proc.poll()
        state = "running" if code is None else f"exited {code}"
        return KubeTestEnvError(
            f"{self.name} {why} ({state}); log {self.log_path}:\n{_tail(self.log_path)}"
        )


def _wait(process: _Process, check: Callable[[], bool], *, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while True:
        if not process.running:
            raise process.failure(f"died before it was {what}")
        with contextlib.suppress(Exception):
            if check():
                return
        if time.monotonic() > deadline:
            raise process.failure(f"not {what} within {within:.0f}s")
        time.sleep(0.1)


def _retry_on_port_clash(
    start: Callable[[], None], process: Callable[[], _Process | None], attempts: int = 3
) -> None:
    """``start()``; again (it picks new free ports) if the process died because another one
    took its port between ``free_port`` and its bind."""
    for attempt in range(attempts):
        try:
            start()
            return
        except KubeTestEnvError:
            proc = process()
            if proc is None or attempt == attempts - 1:
                raise
            if "address already in use" not in _tail(proc.log_path, 20):
                raise
            proc.stop()


def _run(argv: Sequence[str], *, cwd: Path | None = None) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=cwd)
    if proc.returncode != 0:
        raise KubeTestEnvError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr}")


# --- the environment --------------------------------------------------------------------------


class KubeTestEnv:
    """etcd + kube-apiserver (+ kube-controller-manager) on loopback; see the module docstring.

    ``workdir`` must be an empty or fresh directory: certificates, data and logs go there.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        controller_manager: bool = True,
        binaries: KubeBinaries | None = None,
        extra_apiserver_flags: Sequence[str] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.binaries = binaries or ensure_binaries()
        self.with_controller_manager = controller_manager
        self.extra_apiserver_flags = tuple(extra_apiserver_flags)
        self.admin_token = secrets.token_hex(24)
        self.host = "127.0.0.1"
        self.port = 0
        self.etcd_url = ""
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        self.ca_file = self.workdir / "pki" / "ca.crt"
        self._etcd: _Process | None = None
        self._apiserver: _Process | None = None
        self._controller_manager: _Process | None = None
        self._ssl: ssl.SSLContext | None = None
        self.startup_seconds: dict[str, float] = {}

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def server(self) -> str:
        return f"https://{self.host}:{self.port}"

    def start(self) -> Self:
        """Start everything and wait until it serves; raises :class:`KubeTestEnvError`."""
        try:
            t0 = time.monotonic()
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._make_pki()
            self.startup_seconds["pki"] = time.monotonic() - t0
            _retry_on_port_clash(self._start_etcd, lambda: self._etcd)
            self.startup_seconds["etcd"] = time.monotonic() - t0
            _retry_on_port_clash(self._first_apiserver_start, lambda: self._apiserver)
            self.startup_seconds["kube-apiserver"] = time.monotonic() - t0
            if self.with_controller_manager:
                self._start_controller_manager()
                self.startup_seconds["kube-controller-manager"] = time.monotonic() - t0
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop every process (controller-manager, API server, etcd); logs stay in workdir,
        etcd's data (64 MB of preallocated log at least) does not."""
        for process in (self._controller_manager, self._apiserver, self._etcd):
            if process is not None:
                process.stop()
        if self._etcd is not None:
            shutil.rmtree(self.workdir / "etcd", ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def apiserver_running(self) -> bool:
        return self._apiserver is not None and self._apiserver.running

    def stop_apiserver(self, *, kill: bool = False) -> None:
        """Stop kube-apiserver (SIGTERM, or SIGKILL with ``kill``); etcd and the
        controller-manager keep running. Clients see connections refused until
        :meth:`start_apiserver`.

        After SIGTERM the server stops listening and ends its watches at once, then waits for
        long requests it never gets; it is killed after 2 s of that.
        """
        if self._apiserver is not None:
            self._apiserver.stop(kill=kill, grace=2.0)

    def start_apiserver(self) -> None:
        """(Re)start kube-apiserver on the same port with the same etcd, certificates and
        tokens (issued ServiceAccount tokens stay valid); returns once ``/readyz`` is ok.

        A running controller-manager is restarted with it. It is the tests' means of making
        pods, not what they test, and its 1.20 informers were seen to stall for minutes after
        the API server came back: a CI run scaled a Deployment up and got no pod (and every
        later test no Deployment's pods) for three minutes."""
        if self.apiserver_running:
            return
        if self._apiserver is None:
            self._apiserver = _Process(
                "kube-apiserver", self._apiserver_argv(), self.workdir / "kube-apiserver.log"
            )
        self._apiserver.start()
        _wait(self._apiserver, self._ready, within=90, what="ready (/readyz)")
        if self._controller_manager is not None:
            self._controller_manager.stop(grace=5.0)
            self._start_controller_manager()

    def _first_apiserver_start(self) -> None:
        self.port = free_port(self.host)
        self._apiserver = None  # a new port: new arguments
        self._write_kubeconfig(self.kubeconfig, token=self.admin_token, namespace="default")
        self.start_apiserver()

    # -- talking to it ---------------------------------------------------------------------

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 120,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the machine's kubectl as admin (or with ``kubeconfig``); output as text.

        With ``check`` (the default) a non-zero exit raises :class:`KubeTestEnvError` holding
        the command, its stdout and its stderr.
        """
        argv = [
            str(self.binaries.kubectl),
            f"--kubeconfig={kubeconfig or self.kubeconfig}",
            f"--cache-dir={self.workdir / 'kubectl-cache'}",
            *args,
        ]
        proc = subprocess.run(
            argv, input=input, capture_output=True, text=True, check=False, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise KubeTestEnvError(
                f"kubectl {' '.join(args)} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def apply(
        self,
        manifest: str | Path,
        *args: str,
        namespace: str | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """``kubectl apply``: ``manifest`` is a file, a kustomize directory (``-k``) or YAML
        text; ``args`` are more kubectl flags (``--dry-run=server``, ``--server-side``)."""
        ns = ["-n", namespace] if namespace else []
        if isinstance(manifest, Path) or "\n" not in manifest:
            path = Path(manifest)
            if path.is_dir():
                return self.kubectl("apply", "-k", str(path), *ns, *args, check=check)
            if not path.is_file():
                raise KubeTestEnvError(f"no manifest at {path}")
            return self.kubectl("apply", "-f", str(path), *ns, *args, check=check)
        return self.kubectl("apply", "-f", "-", *ns, *args, input=manifest, check=check)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        token: str | None = None,
        timeout: float = 30,
    ) -> Any:
        """One REST call as admin (or with ``token``); the decoded JSON answer.

        Raises :class:`KubeTestEnvError` with the status and the server's message on an
        HTTP error (``.status`` holds the code).
        """
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {token or self.admin_token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self._ssl_context(), timeout=timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise KubeTestEnvError(
                f"{method} {path}: HTTP {exc.code}: {detail}", status=exc.code
            ) from exc
        return json.loads(raw) if raw else None

    def get(
        self,
        resource: str,
        name: str | None = None,
        *,
        namespace: str | None = None,
        group: str = "",
        version: str = "v1",
    ) -> Any:
        """GET one object or a list: ``get("pods", namespace="shop")``,
        ``get("deployments", "web", namespace="shop", group="apps")``."""
        return self.request("GET", _path(resource, name, namespace, group, version))

    def set_pod_status(
        self,
        namespace: str,
        name: str,
        *,
        ip: str | None = None,
        ready: bool = True,
        phase: str = "Running",
    ) -> dict[str, Any]:
        """Do what a kubelet would: patch the Pod's ``status`` subresource.

        Sets ``phase``, the ``Ready`` and ``ContainersReady`` conditions and every container's
        status (``ready``; ``kubectl get pods`` then shows ``1/1 Running``) and, when ``ip`` is
        given, ``podIP``/``podIPs`` (and ``hostIP`` 127.0.0.1); an IP already set stays when
        ``ip`` is None. Returns the updated Pod. Conditions are merged by type, as
        the kubelet's strategic-merge patches are; ``lastTransitionTime`` moves only when the
        status changes.
        """
        pod = self.get("pods", name, namespace=namespace)
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        old = {c["type"]: c for c in pod.get("status", {}).get("conditions", [])}
        wanted = "True" if ready else "False"
        conditions = []
        for type_ in ("Ready", "ContainersReady"):
            previous = old.get(type_, {})
            unchanged = previous.get("status") == wanted and "lastTransitionTime" in previous
            conditions.append(
                {
                    "type": type_,
                    "status": wanted,
                    "lastTransitionTime": previous["lastTransitionTime"] if unchanged else now,
                }
            )
        old_containers = {c["name"]: c for c in pod.get("status", {}).get("containerStatuses", [])}
        containers = []
        for container in pod["spec"]["containers"]:
            previous = old_containers.get(container["name"], {})
            running = previous.get("state", {}).get("running") or {"startedAt": now}
            containers.append(
                {
                    "name": container["name"],
                    "image": container["image"],
                    "imageID": "",
                    "ready": ready,
                    "started": phase == "Running",
                    "restartCount": 0,
                    "state": (
                        {"running": running}
                        if phase == "Running"
                        else {"waiting": {"reason": "ContainerCreating"}}
                    ),
                }
            )
        status: dict[str, Any] = {
            "phase": phase,
            "conditions": conditions,
            "containerStatuses": containers,
        }
        if ip is not None:
            status.update(podIP=ip, podIPs=[{"ip": ip}], hostIP="127.0.0.1")
        result: dict[str, Any] = self.request(
            "PATCH",
            _path("pods", name, namespace) + "/status",
            {"status": status},
            content_type="application/strategic-merge-patch+json",
        )
        return result

    def wait_for_pods(
        self, namespace: str, selector: str, count: int, *, within: float = 30
    ) -> list[dict[str, Any]]:
        """Poll until exactly ``count`` Pods match the label ``selector`` (the
        controller-manager creates them); returns them sorted by name."""
        deadline = time.monotonic() + within
        query = urllib.parse.urlencode({"labelSelector": selector})
        while True:
            items = self.request("GET", f"/api/v1/namespaces/{namespace}/pods?{query}")["items"]
            live = [p for p in items if not p["metadata"].get("deletionTimestamp")]
            if len(live) == count:
                return sorted(live, key=lambda p: p["metadata"]["name"])
            if time.monotonic() > deadline:
                names = [p["metadata"]["name"] for p in live]
                raise KubeTestEnvError(
                    f"{len(live)} pods match {selector!r} in {namespace} after {within}s, "
                    f"wanted {count}: {names}"
                )
            time.sleep(0.1)

    def create_namespace(self, name: str) -> None:
        self.request(
            "POST",
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
        )

    def wait_established(self, crd: str, *, within: float = 30) -> None:
        """Wait until the CRD ``crd`` (e.g. ``aviatorpolicies.aviator.io``) is Established."""
        self.kubectl(
            "wait", "--for=condition=Established", f"--timeout={within:.0f}s", f"crd/{crd}"
        )

    def admin_kubeconfig(self, namespace: str) -> Path:
        """An admin kubeconfig whose context namespace is ``namespace`` (where kubectl puts
        objects that name none). Written under workdir."""
        path = self.workdir / "kubeconfigs" / f"admin.{namespace}.kubeconfig"
        path.parent.mkdir(exist_ok=True)
        self._write_kubeconfig(path, token=self.admin_token, namespace=namespace)
        return path

    def service_account_kubeconfig(
        self, namespace: str, name: str, *, expiration_seconds: int = 86400
    ) -> Path:
        """A kubeconfig that authenticates as ServiceAccount ``namespace/name`` with a token
        from the TokenRequest API (what ``kubectl create token`` asks for; called directly, so
        any kubectl version works), its context namespace ``namespace`` (as in a Pod). The
        ServiceAccount must exist. Written under workdir."""
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": expiration_seconds},
        }
        answer = self.request("POST", _path("serviceaccounts", name, namespace) + "/token", request)
        token: str = answer["status"]["token"]
        path = self.workdir / "kubeconfigs" / f"{namespace}.{name}.kubeconfig"
        path.parent.mkdir(exist_ok=True)
        self._write_kubeconfig(path, token=token, namespace=namespace, user=f"{namespace}-{name}")
        return path

    def etcd_revision(self) -> int:
        out = self._etcdctl("endpoint", "status", "-w", "json")
        (status,) = json.loads(out)
        revision: int = status["Status"]["header"]["revision"]
        return revision

    def compact(self) -> int:
        """Compact etcd at its current revision (``etcdctl compact``); returns the revision.

        Afterwards every read that etcd serves from an older revision answers 410 Gone
        (``Expired``): a list with ``resourceVersion=OLD&resourceVersionMatch=Exact``, a
        list's continue token, and watches that bypass the watch cache. A watch from an old
        resourceVersion that the watch cache still holds is served from the cache; to get a
        410 there, restart the API server (:meth:`stop_apiserver`, :meth:`start_apiserver`).
        """
        revision = self.etcd_revision()
        self._etcdctl("compact", str(revision), "--physical")
        return revision

    # -- internals -------------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=str(self.ca_file))
        return self._ssl

    def _ready(self) -> bool:
        req = urllib.request.Request(self.server + "/readyz")
        req.add_header("Authorization", f"Bearer {self.admin_token}")
        with urllib.request.urlopen(req, context=self._ssl_context(), timeout=2) as r:
            return bool(r.status == 200 and r.read().strip() == b"ok")

    def _etcdctl(self, *args: str) -> str:
        proc = subprocess.run(
            [str(self.binaries.etcdctl), f"--endpoints={self.etcd_url}", *args],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "ETCDCTL_API": "3"},
            timeout=30,
        )
        if proc.returncode != 0:
            raise KubeTestEnvError(
                f"etcdctl {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}"
            )
        return proc.stdout

    def _make_pki(self) -> None:
        pki = self.workdir / "pki"
        pki.mkdir(exist_ok=True)
        (pki / "server.ext").write_text(
            "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,"
            "DNS:kubernetes.default,DNS:kubernetes.default.svc\n"
            "extendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        )
        days = "7"
        for argv in (
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                days,
                "-subj",
                "/CN=aviator-test-ca",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
            [
                "openssl",
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=kube-apiserver",
            ],
            [
                "openssl",
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                days,
                "-extfile",
                "server.ext",
            ],
            ["openssl", "genrsa", "-out", "sa.key", "2048"],
            ["openssl", "rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"],
        ):
            _run(argv, cwd=pki)
        # user,uid,"groups": the only credential the test itself uses.
        (pki / "tokens.csv").write_text(
            f'{self.admin_token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n'
        )

    def _start_etcd(self) -> None:
        client, peer = free_port(self.host), free_port(self.host)
        shutil.rmtree(self.workdir / "etcd", ignore_errors=True)  # a retry starts afresh
        self.etcd_url = f"http://{self.host}:{client}"
        peer_url = f"http://{self.host}:{peer}"
        self._etcd = _Process(
            "etcd",
            [
                str(self.binaries.etcd),
                "--name=default",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--logger=zap",
                "--log-outputs=stderr",
            ],
            self.workdir / "etcd.log",
        )
        self._etcd.start()

        def healthy() -> bool:
            with urllib.request.urlopen(self.etcd_url + "/health", timeout=2) as r:
                return bool(json.loads(r.read()).get("health") == "true")

        _wait(self._etcd, healthy, within=30, what="healthy (/health)")

    def _apiserver_argv(self) -> list[str]:
        pki = self.workdir / "pki"
        return [
            str(self.binaries.apiserver),
            f"--etcd-servers={self.etcd_url}",
            f"--bind-address={self.host}",
            f"--advertise-address={self.host}",
            f"--secure-port={self.port}",
            "--insecure-port=0",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'server.crt'}",
            f"--tls-private-key-file={pki / 'server.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={pki / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--api-audiences=https://kubernetes.default.svc",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--enable-priority-and-fairness=false",
            "--disable-admission-plugins=ServiceAccount",
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            *self.extra_apiserver_flags,
        ]

    def _start_controller_manager(self) -> None:
        pki = self.workdir / "pki"
        kubeconfig = str(self.kubeconfig)
        self._controller_manager = _Process(
            "kube-controller-manager",
            [
                str(self.binaries.controller_manager),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                f"--bind-address={self.host}",
                "--port=0",
                "--secure-port=0",
                "--leader-elect=false",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--controllers={_CONTROLLERS}",
            ],
            self.workdir / "kube-controller-manager.log",
        )
        self._controller_manager.start()

        def default_service_account() -> bool:
            self.get("serviceaccounts", "default", namespace="default")
            return True

        _wait(
            self._controller_manager,
            default_service_account,
            within=60,
            what="running its controllers (no default ServiceAccount yet)",
        )

    def _write_kubeconfig(
        self, path: Path, *, token: str, namespace: str, user: str = ADMIN_USER
    ) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "aviator-test",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority": str(self.ca_file),
                    },
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [
                {
                    "name": "aviator-test",
                    "context": {"cluster": "aviator-test", "user": user, "namespace": namespace},
                }
            ],
            "current-context": "aviator-test",
        }
        path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
        path.chmod(0o600)


def _path(
    resource: str,
    name: str | None = None,
    namespace: str | None = None,
    group: str = "",
    version: str = "v1",
) -> str:
    base = f"/apis/{group}/{version}" if group else f"/api/{version}"
    if namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{resource}"
    return f"{base}/{name}" if name else base

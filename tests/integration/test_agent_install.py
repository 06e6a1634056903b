"""The agent on its own, as an app author installs it: ``pip install agent/`` into a fresh venv
that has nothing else, then the ASGI middleware, the probe path and the ORCA header used there.
"""

from __future__ import annotations

import base64
import json
import shutil
import textwrap
from email.parser import Parser
from pathlib import Path

import pytest
from xds.data.orca.v3 import orca_load_report_pb2

from tests.venvs import Venv, make_venv

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parents[2]

# Runs inside the agent's venv: the standard library and aviator_agent, nothing else.
APP = textwrap.dedent(
    """
    import asyncio, json, sys

    import aviator_agent
    from aviator_agent import AviatorASGIMiddleware, LoadTracker
    from aviator_agent.orca import ORCA_HEADER, parse_orca_header

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"hello"})

    async def call(asgi, path):
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": path, "headers": []}
        await asgi(scope, receive, send)
        headers = {k.decode(): v.decode() for k, v in sent[0].get("headers", [])}
        return sent[0]["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])

    async def main():
        tracker = LoadTracker(capacity=4)
        asgi = AviatorASGIMiddleware(app, tracker=tracker)
        status, headers, body = await call(asgi, "/")
        report = parse_orca_header(headers[ORCA_HEADER])
        probe_status, probe_headers, probe_body = await call(asgi, aviator_agent.DEFAULT_PROBE_PATH)
        try:
            import aiohttp  # noqa: F401
            aiohttp_missing = False
        except ModuleNotFoundError:
            aiohttp_missing = True
        try:
            aviator_agent.aiohttp_middleware(tracker)
            middleware_error = None
        except ModuleNotFoundError as exc:
            middleware_error = exc.name
        return {
            "status": status,
            "body": body.decode(),
            "header": headers[ORCA_HEADER],
            "rif_during_request": report.rif,
            "utilization": report.application_utilization,
            "rif_after": tracker.rif,
            "probe_status": probe_status,
            "probe": json.loads(probe_body),
            "probe_has_header": ORCA_HEADER in probe_headers,
            "bin": parse_orca_header("BIN " + sys.argv[1]).named_metrics["rif"],
            "aiohttp_missing": aiohttp_missing,
            "middleware_error": middleware_error,
            "foreign_modules": sorted(
                m.split(".")[0] for m in sys.modules
                if m.split(".")[0] in {"aviator", "aiohttp", "google", "grpc", "yaml", "xds"}
            ),
            "version": aviator_agent.__version__,
        }

    print(json.dumps(asyncio.run(main())))
    """
)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    source = tmp_path_factory.mktemp("agent-source") / "agent"
    shutil.copytree(
        ROOT / "agent", source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    )
    return make_venv(tmp_path_factory.mktemp("agent-venv") / "venv", source)


def test_installs_alone_with_no_dependency(agent: Venv) -> None:
    assert "SetuptoolsDeprecationWarning" not in agent.pip_log
    installed = agent.run("python", "-m", "pip", "list", "--format=freeze").stdout.split()
    names = {line.split("==")[0].lower() for line in installed}
    assert names <= {"aviator-agent", "aviator_agent", "pip", "setuptools"}, names
    metadata = agent.run(
        "python", "-c", "import importlib.metadata as m; print(m.metadata('aviator-agent'))"
    ).stdout
    fields = Parser().parsestr(metadata)
    assert fields["License-Expression"] == "Apache-2.0"
    assert fields.get_all("Requires-Dist") == ['aiohttp>=3.9; extra == "aiohttp"']


def test_the_asgi_middleware_and_the_probe_path_work_with_the_standard_library_only(
    agent: Venv,
) -> None:
    bin_value = orca_load_report_pb2.OrcaLoadReport(named_metrics={"rif": 7.0})
    encoded = base64.b64encode(bin_value.SerializeToString()).decode()
    result = agent.run("python", "-c", APP, encoded)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["status"] == 200
    assert seen["body"] == "hello"
    assert seen["header"].startswith("TEXT ")
    assert seen["rif_during_request"] == 1.0  # counted while the app answered
    assert seen["utilization"] == 0.25  # RIF 1 of capacity 4
    assert seen["rif_after"] == 0
    assert seen["probe_status"] == 200
    assert seen["probe"]["rif"] == 0
    assert seen["probe_has_header"] is True
    assert seen["bin"] == 7.0  # the BIN form, decoded without protobuf
    assert seen["aiohttp_missing"] is True  # nothing but the standard library here
    assert seen["middleware_error"] == "aiohttp"  # the aiohttp middleware needs aiohttp
    assert seen["foreign_modules"] == []
    assert seen["version"] == "0.1.0"

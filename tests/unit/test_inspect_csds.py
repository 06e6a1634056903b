"""``aviator inspect --csds``: the table and JSON of a CSDS answer, and its one-line errors."""

from __future__ import annotations

import re

import pytest
from envoy.admin.v3 import config_dump_shared_pb2 as dump_pb2
from envoy.service.status.v3 import csds_pb2

from aviator.cli import build_parser
from aviator.cli import inspect as inspect_cli
from aviator.cli.usage import UsageError
from aviator.envoy.inspect import CsdsNode, CsdsResource, csds_nodes, render_csds
from aviator.envoy.process import free_port

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


def _response() -> csds_pb2.ClientStatusResponse:
    Config = csds_pb2.ClientConfig.GenericXdsConfig  # noqa: N806 - a protobuf class
    nacked = Config(
        type_url=CDS, name="shop/web", version_info="v1", client_status=dump_pb2.NACKED,
        config_status=csds_pb2.ERROR,
    )  # fmt: skip
    nacked.error_state.details = "Proto constraint validation failed:\n  seconds: -1"
    return csds_pb2.ClientStatusResponse(
        config=[
            csds_pb2.ClientConfig(
                node={"id": "gw-1"},
                generic_xds_configs=[
                    nacked,
                    Config(
                        type_url=EDS,
                        name="shop/web",
                        version_info="e1",
                        client_status=dump_pb2.ACKED,
                        config_status=csds_pb2.SYNCED,
                    ),
                    Config(
                        type_url=EDS,
                        name="shop/new",
                        client_status=dump_pb2.REQUESTED,
                        config_status=csds_pb2.NOT_SENT,
                    ),
                ],
            )
        ]
    )


def test_nodes_table_and_json() -> None:
    nodes = csds_nodes(_response())
    assert nodes == [
        CsdsNode(
            "gw-1",
            (
                CsdsResource(
                    "cds", "shop/web", "NACKED", "ERROR", "v1",
                    "Proto constraint validation failed:\n  seconds: -1",
                ),
                CsdsResource("eds", "shop/web", "ACKED", "SYNCED", "e1"),
                CsdsResource("eds", "shop/new", "REQUESTED", "NOT_SENT", ""),
            ),
        )
    ]  # fmt: skip
    lines = render_csds(nodes, source="127.0.0.1:18000").splitlines()
    assert lines[0].split() == ["node", "type", "name", "status", "server", "version"]
    assert lines[1].split() == ["gw-1", "cds", "shop/web", "NACKED", "ERROR", "v1"]
    # Envoy's message on one line, below the resource it rejected.
    assert lines[2] == "    rejected: Proto constraint validation failed: seconds: -1"
    assert lines[4].split() == ["gw-1", "eds", "shop/new", "REQUESTED", "NOT_SENT", "-"]
    assert lines[-1] == "1 proxy of 127.0.0.1:18000, 3 resources, 1 rejected"
    assert nodes[0].to_json()["resources"][1] == {
        "type": "eds", "name": "shop/web", "status": "ACKED", "config_status": "SYNCED",
        "version": "e1", "error": None,
    }  # fmt: skip
    assert render_csds([], source="x:1") == "no proxy is connected to x:1 (or none matches --node)"


def _run(*argv: str) -> int:
    args = build_parser(["inspect"]).parse_args(["inspect", *argv])
    code: int = inspect_cli.run(args)
    return code


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give --envoy-admin URL"),
        (["--csds", "http://127.0.0.1:18000"], "--csds must be HOST:PORT"),
        (["--csds", "h:1", "--envoy-admin", "http://e:1"], "no --envoy-admin"),
        (["--csds", "h:1", "--csds-cert", "c"], "--csds-cert and --csds-key go together"),
        (["--csds", "h:1", "--csds-cert", "c", "--csds-key", "k"], "--csds-cert needs --csds-ca"),
        (["--envoy-admin", "http://e:1", "--node", "gw"], "--node and --csds-* go with --csds"),
    ],
)
def test_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        _run(*argv)


def test_unreachable_csds_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{free_port()}"
    assert _run("--csds", address, "--timeout", "2") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"aviator inspect: cannot reach CSDS at {address}")
    assert captured.err.count("\n") == 1

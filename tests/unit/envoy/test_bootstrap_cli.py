from __future__ import annotations

import argparse
import re

import pytest
import yaml

from aviator.cli import main
from aviator.cli.bootstrap import parse_host_port, parse_workload
from aviator.envoy.bootstrap import render_bootstrap
from aviator.model import WorkloadKey


@pytest.fixture(autouse=True)
def _keep_logging_config(monkeypatch: pytest.MonkeyPatch) -> None:
    # main() configures structlog to write to the sys.stderr of the moment, which under capsys
    # is a capture closed after the test: later tests' logs would then fail.
    monkeypatch.setattr("aviator.log.configure", lambda *args, **kwargs: None)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["bootstrap", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_gateway_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--xds", "127.0.0.1:18000", "--node-id", "gw-1")
    assert (code, err) == (0, "")
    assert yaml.safe_load(out) == render_bootstrap(
        xds_host="127.0.0.1", xds_port=18000, node_id="gw-1"
    )


def test_sidecar_with_workloads(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        "--xds=aviator.aviator-system.svc:18000",
        "--node-id=pod-1",
        "--mode=sidecar",
        "--listen=15001",
        "--admin=15000",
        "--workload=shop/cart",
        "--workload=shop/api",
        "--delta",
    )
    assert code == 0
    assert yaml.safe_load(out) == render_bootstrap(
        xds_host="aviator.aviator-system.svc",
        xds_port=18000,
        node_id="pod-1",
        mode="sidecar",
        listen_port=15001,
        admin_port=15000,
        workloads=[WorkloadKey("shop", "cart"), WorkloadKey("shop", "api")],
        delta=True,
    )


@pytest.mark.parametrize(
    ("xds", "reason"),
    [
        ("localhost", "expected HOST:PORT, got 'localhost'"),
        ("localhost:", "expected HOST:PORT"),
        (":18000", "expected HOST:PORT"),
        ("localhost:http", "expected HOST:PORT"),
        ("localhost:70000", "port must be in 1..65535, got 'localhost:70000'"),
        ("localhost:0", "port must be in 1..65535"),
        ("::1:18000", "an IPv6 address needs brackets"),
        ("[nope]:18000", "expected [IPv6]:PORT"),
    ],
)
def test_bad_xds_address_is_one_line(
    capsys: pytest.CaptureFixture[str], xds: str, reason: str
) -> None:
    code, out, err = run(capsys, "--xds", xds, "--node-id", "n")
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("aviator bootstrap: --xds: ")
    assert reason in err


def test_workload_needs_sidecar_mode(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--xds", "h:1", "--node-id", "n", "--workload", "a/b")
    assert code == 2
    assert "--workload needs --mode sidecar" in err


@pytest.mark.parametrize("workload", ["cart", "shop/", "/cart", "shop/cart/x"])
def test_bad_workload(capsys: pytest.CaptureFixture[str], workload: str) -> None:
    code, _, err = run(
        capsys, "--xds", "h:1", "--node-id", "n", "--mode", "sidecar", "--workload", workload
    )
    assert code == 2
    assert f"--workload: expected NAMESPACE/NAME, got {workload!r}" in err


def test_empty_node_id(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--xds", "h:1", "--node-id", "")
    assert code == 2
    assert "--node-id must not be empty" in err


def test_gateway_asks_for_its_listener(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, "--xds", "h:1", "--node-id", "gw", "--listen", "44639", "--listen-address", "::"
    )
    assert (code, err) == (0, "")
    assert yaml.safe_load(out)["node"]["metadata"] == {
        "aviator.io/mode": "gateway",
        "aviator.io/listen-port": 44639,
        "aviator.io/listen-address": "::",
    }


def test_bad_listen_address_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--xds", "h:1", "--node-id", "n", "--listen-address", "gw.local")
    assert (code, out) == (2, "")
    assert err == (
        "aviator bootstrap: --listen-address must be an IP address such as 0.0.0.0, "
        "127.0.0.1 or ::, got 'gw.local'\n"
    )


def test_help_says_what_the_listener_defaults_are(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bootstrap", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: aviator run's --gateway-port, 10000 unless told" in text
    assert "default: aviator run's --gateway-address, 0.0.0.0 = every interface" in text


def test_bad_listen_port_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bootstrap", "--xds", "h:1", "--node-id", "n", "--listen", "99999"])
    assert exc.value.code == 2
    assert "port must be in 1..65535, got '99999'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:18000", ("127.0.0.1", 18000)),
        ("xds.example:1", ("xds.example", 1)),
        ("[::1]:18000", ("::1", 18000)),
        ("[fd00::5]:65535", ("fd00::5", 65535)),
    ],
)
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


def test_parse_workload() -> None:
    assert parse_workload("shop/cart") == WorkloadKey("shop", "cart")


def test_run_help_gives_every_address_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    """The other side of the listener interface: ``aviator run``'s defaults, stated."""
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "where the ADS (gRPC) server listens for Envoys" in text
    assert "(default 127.0.0.1:18000: this machine only)" in text
    assert "where the admin HTTP server listens" in text
    assert "(default 127.0.0.1:18001)" in text
    assert "to gateways whose bootstrap names none" in text
    assert "(default 10000)" in text
    assert "(default 0.0.0.0: every interface)" in text


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--gateway-address", "gw.local"], "--gateway-address must be an IP, got 'gw.local'"),
        (["--gateway-port", "70000"], "argument --gateway-port: port must be in 0..65535"),
    ],
)
def test_run_rejects_a_bad_gateway_default(
    capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    from aviator.cli.run import configure, settings_from
    from aviator.cli.usage import UsageError

    parser = argparse.ArgumentParser()
    configure(parser)
    try:
        args = parser.parse_args(["--source", "dir:.", *flags])
    except SystemExit:  # checked by argparse (the port's type), named after the flag
        assert message in capsys.readouterr().err
        return
    with pytest.raises(UsageError, match=re.escape(message)):
        settings_from(args)

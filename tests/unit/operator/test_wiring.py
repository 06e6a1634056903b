"""The control plane's operator settings (issue 12): wired only with --source kubernetes;
the Lease namespace from --operator-namespace, else $POD_NAMESPACE, else aviator-system; the
identity $POD_NAME, else a host name no other process shares; bad input is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from aviator.controlplane import ControlPlane, Settings
from aviator.source.directory import DirectorySource


def _plane(tmp_path: Path, **kw: object) -> ControlPlane:
    settings = Settings(source="kubernetes", **kw)  # type: ignore[arg-type]
    return ControlPlane(settings, source=DirectorySource(str(tmp_path)))


def test_namespace_and_identity_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    monkeypatch.delenv("POD_NAME", raising=False)
    plane = _plane(tmp_path)
    assert plane.operates
    assert plane.operator_settings().namespace == "aviator-system"
    other = _plane(tmp_path)
    assert plane.operator_identity != other.operator_identity  # two processes, one host
    monkeypatch.setenv("POD_NAMESPACE", "ops")
    monkeypatch.setenv("POD_NAME", "aviator-7d9-x2")
    plane = _plane(tmp_path)
    assert plane.operator_settings().namespace == "ops"
    assert plane.operator_settings().identity == "aviator-7d9-x2"
    assert _plane(tmp_path, operator_namespace="lb").operator_settings().namespace == "lb"


def test_directory_source_runs_no_operator(tmp_path: Path) -> None:
    plane = ControlPlane(Settings(source=f"dir:{tmp_path}"))
    assert not plane.operates
    assert "operator" not in plane.admin._views


def test_operator_namespace_is_checked() -> None:
    with pytest.raises(ValueError, match="needs --source kubernetes"):
        Settings(source="dir:/tmp", operator_namespace="ops")
    with pytest.raises(ValueError, match="--operator-namespace 'Ops_1'"):
        Settings(source="kubernetes", operator_namespace="Ops_1")

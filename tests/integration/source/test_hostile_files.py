"""The directory source against big or hostile files: bounded, reported, nothing lost."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from aviator.k8s.state import ClusterState
from aviator.source.directory import DirectorySource, load_directory
from tests.unit.k8s.builders import pod_doc, workload_doc

MiB = 1024 * 1024


def write(path: Path, *docs: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def bomb(levels: int) -> str:
    """~500 bytes whose ``spec.containers[0].args`` expands to 10**levels strings."""
    lines = ["apiVersion: v1", "kind: Pod", "metadata: {name: bomb, namespace: shop}", "x:"]
    lines.append("  l0: &l0 [" + ",".join(['"lol"'] * 10) + "]")
    for i in range(1, levels):
        lines.append(f"  l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 10) + "]")
    lines.append(f"spec: {{containers: [{{name: main, args: *l{levels - 1}}}]}}")
    lines.append("status: {phase: Running, podIP: 10.0.0.9}")
    return "\n".join(lines) + "\n"


def pod_names(state: ClusterState) -> list[str]:
    return [p.meta.name for p in state.pods]


@pytest.fixture
def good(tmp_path: Path) -> Path:
    write(tmp_path / "web.yaml", workload_doc(), pod_doc("web-1", "10.0.0.1"))
    return tmp_path


@pytest.mark.parametrize("levels", [6, 8])  # a million strings; a hundred million
def test_an_alias_bomb_is_refused_with_a_problem(good: Path, levels: int) -> None:
    path = good / "bomb.yaml"
    path.write_text(bomb(levels))
    state = load_directory(good)
    assert pod_names(state) == ["web-1"]
    (problem,) = state.problems
    assert problem.source == str(path)
    assert problem.message.startswith("YAML aliases expand too far: document 1 is ")
    assert "a file's aliases may add at most 1,000,000 nodes" in problem.message
    assert problem.message.endswith("; not parsed; none of its objects are served")


def test_a_file_that_becomes_a_bomb_keeps_its_last_good_objects(good: Path) -> None:
    path = good / "web.yaml"
    source = DirectorySource(good)
    first = source.scan()
    assert first is not None
    path.write_text(path.read_text() + "---\n" + bomb(8))
    state = source.scan()
    assert state is not None
    assert pod_names(state) == ["web-1"]
    (problem,) = state.problems
    assert problem.message.endswith(
        "; not parsed; serving the 2 object(s) of its last good version until fixed"
    )


def test_a_recursive_alias_is_a_problem_not_a_crash(good: Path) -> None:
    (good / "loop.yaml").write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: loop, namespace: shop}\n"
        "spec: {containers: &c [{name: main, args: *c}]}\n"
    )
    state = load_directory(good)
    assert pod_names(state) == ["web-1"]
    (problem,) = state.problems
    assert problem.line == 4
    assert "a YAML alias refers to a node that contains it" in problem.message


def test_deep_nesting_is_a_problem_not_a_crash(good: Path) -> None:
    (good / "deep.yaml").write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: deep, namespace: shop}\n"
        "spec: {x: " + "[" * 990 + "]" * 990 + "}\n"
    )
    state = load_directory(good)
    assert pod_names(state) == ["web-1"]
    (problem,) = state.problems
    assert (problem.document, str(problem.object), problem.message) == (
        1,
        "Pod shop/deep",
        "nested too deeply to read",
    )


def test_a_file_above_the_size_limit_is_not_read_and_keeps_its_last_objects(good: Path) -> None:
    path = good / "web.yaml"
    source = DirectorySource(good)
    source.scan()
    parsed = source.parse_count
    text = path.read_text()
    # A valid file, just too big: the default limit is 10 MiB.
    path.write_text(text + "# " + "x" * (10 * MiB) + "\n")
    size = path.stat().st_size
    state = source.scan()
    assert state is not None
    assert pod_names(state) == ["web-1"]
    (problem,) = state.problems
    assert problem.source == str(path)
    assert problem.message == (
        f"file too large to read: 10.0 MiB ({size:,} bytes), the limit is 10.0 MiB; split it "
        "into smaller files (or raise --max-file-size); serving the 2 object(s) of its last "
        "good version until fixed"
    )
    assert source.parse_count == parsed  # not parsed
    path.write_text(text.replace("10.0.0.1", "10.0.0.2"))
    state = source.scan()
    assert state is not None
    assert state.problems == ()
    assert [p.pod_ip for p in state.pods] == ["10.0.0.2"]


def test_an_unchanged_directory_builds_no_state(
    good: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cause of "50% CPU for as long as the file stays": every scan rebuilt, re-stamped and
    # re-hashed the whole state (10,000 pods: about 0.2 s of CPU every 0.4 s), only to find
    # its version unchanged.
    write(good / "more.yaml", *(pod_doc(f"web-{i}", f"10.0.1.{i}") for i in range(2, 50)))
    source = DirectorySource(good)
    assert source.scan() is not None
    builds = 0
    real_build = ClusterState.build.__func__  # type: ignore[attr-defined]

    def counting_build(cls: type[ClusterState], *args: Any, **kwargs: Any) -> ClusterState:
        nonlocal builds
        builds += 1
        state: ClusterState = real_build(cls, *args, **kwargs)
        return state

    monkeypatch.setattr(ClusterState, "build", classmethod(counting_build))
    for _ in range(5):
        assert source.scan() is None
    os.utime(good / "more.yaml")  # a touch: re-read and re-hashed, same bytes
    assert source.scan() is None
    assert builds == 0
    write(good / "more.yaml", pod_doc("web-2", "10.0.1.2"))  # a real change builds once
    assert source.scan() is not None
    assert builds == 1

"""The directory source on real files: edits, new files, deletions, broken input, the watcher."""

from __future__ import annotations

import asyncio
import contextlib
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from aviator.k8s.fields import ObjectRef
from aviator.k8s.objects import Pod
from aviator.k8s.policy import AviatorPolicy, InvalidPolicy
from aviator.k8s.resolve import resolve_state, serving
from aviator.k8s.state import ClusterState, Problem
from aviator.model import WorkloadKey
from aviator.source.directory import DirectorySource, SourceError, load_directory
from aviator.source.store import Store
from tests.unit.k8s.builders import pod_doc, policy_doc, workload_doc

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def write(path: Path, *docs: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def pod_ref(name: str, namespace: str = "shop") -> ObjectRef:
    return ObjectRef("Pod", namespace, name)


def names(state: ClusterState) -> dict[str, list[str]]:
    return {
        "policies": [p.meta.name for p in state.policies],
        "workloads": [w.meta.name for w in state.workloads],
        "pods": [p.meta.name for p in state.pods],
    }


def scan(source: DirectorySource) -> ClusterState:
    state = source.scan()
    assert state is not None, "expected a new state"
    return state


def pod_ip(state: ClusterState, name: str) -> str | None:
    obj = state.get(pod_ref(name))
    assert isinstance(obj, Pod)
    return obj.pod_ip


@pytest.fixture
def manifests(tmp_path: Path) -> Path:
    root = tmp_path / "manifests"
    write(root / "policy.yaml", policy_doc())
    write(root / "apps" / "web.yaml", workload_doc(), pod_doc("web-1", "10.0.0.1"))
    write(
        root / "apps" / "pods.yml",
        {"apiVersion": "v1", "kind": "List", "items": [pod_doc("web-2", "10.0.0.2")]},
    )
    return root


def test_reads_every_kind_recursively(manifests: Path) -> None:
    # Not read: other suffixes, hidden files and directories (a ConfigMap volume's ..data),
    # and kinds Aviator does not use.
    write(manifests / "notes.txt", pod_doc("txt", "10.0.0.9"))
    write(manifests / ".web.yaml.swp", pod_doc("swap", "10.0.0.9"))
    write(manifests / "..2024_05_01" / "dup.yaml", pod_doc("hidden", "10.0.0.9"))
    write(
        manifests / "svc.yaml", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}}
    )
    state = load_directory(manifests)
    assert names(state) == {"policies": ["web"], "workloads": ["web"], "pods": ["web-1", "web-2"]}
    assert state.problems == ()
    (r,) = resolve_state(state)
    assert r.serving
    assert [str(e.address) for e in r.endpoints] == ["10.0.0.1:8080", "10.0.0.2:8080"]


def test_fills_server_set_metadata(manifests: Path) -> None:
    state = DirectorySource(manifests, wall_clock=lambda: T0).scan()
    assert state is not None
    for obj in state.objects:
        assert obj.meta.creation_timestamp == T0
        assert len(obj.meta.uid) == 36
        assert len(obj.meta.resource_version) == 16
    assert len({o.meta.uid for o in state.objects}) == len(state.objects)


def test_unchanged_directory_gives_no_new_state(manifests: Path) -> None:
    source = DirectorySource(manifests)
    first = scan(source)
    parsed = source.parse_count
    assert parsed == 3
    assert source.scan() is None
    # A touch (new mtime, same bytes) is re-read and hashed, but not parsed or published.
    os.utime(manifests / "policy.yaml")
    assert source.scan() is None
    assert source.parse_count == parsed
    assert source.state is first


def test_settled_files_are_trusted_by_their_stat(manifests: Path) -> None:
    path = manifests / "apps" / "web.yaml"
    source = DirectorySource(manifests)
    scan(source)
    # A file last modified long before it was read is not read again while its stat stays
    # the same: rewrite it (same size) and put the old mtime back, and the scan misses it.
    old_ns = int((datetime.now(UTC) - timedelta(minutes=5)).timestamp() * 1e9)
    os.utime(path, ns=(old_ns, old_ns))
    assert source.scan() is None  # new mtime: re-read once, same bytes
    write(path, workload_doc(), pod_doc("web-1", "10.0.0.3"))
    os.utime(path, ns=(old_ns, old_ns))
    assert source.scan() is None
    assert pod_ip(source.state, "web-1") == "10.0.0.1"  # type: ignore[arg-type]
    # Any change of the stat (here the mtime) makes it read again.
    os.utime(path, ns=(old_ns + 1, old_ns + 1))
    assert pod_ip(scan(source), "web-1") == "10.0.0.3"


def test_edit_takes_effect_and_only_the_edited_object_changes_version(manifests: Path) -> None:
    source = DirectorySource(manifests)
    before = scan(source)
    write(manifests / "apps" / "web.yaml", workload_doc(), pod_doc("web-1", "10.0.0.7"))
    after = scan(source)
    assert pod_ip(after, "web-1") == "10.0.0.7"
    assert after.version != before.version
    changed = {
        o.ref
        for o in after.objects
        if (b := before.get(o.ref)) is not None
        and b.meta.resource_version != o.meta.resource_version
    }
    assert changed == {pod_ref("web-1")}
    # The edited pod keeps its identity: same uid and creation time.
    assert after.get(pod_ref("web-1")).meta.uid == before.get(pod_ref("web-1")).meta.uid  # type: ignore[union-attr]


def test_same_size_edit_within_one_mtime_tick_is_seen(manifests: Path) -> None:
    path = manifests / "apps" / "web.yaml"
    source = DirectorySource(manifests)
    scan(source)
    st = path.stat()
    write(path, workload_doc(), pod_doc("web-1", "10.0.0.3"))  # same length as 10.0.0.1
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime
    assert path.stat().st_size == st.st_size
    assert pod_ip(scan(source), "web-1") == "10.0.0.3"


def test_new_files_and_deletions(manifests: Path) -> None:
    source = DirectorySource(manifests)
    scan(source)
    write(manifests / "more" / "web-3.yaml", pod_doc("web-3", "10.0.0.3"))
    assert names(scan(source))["pods"] == ["web-1", "web-2", "web-3"]
    (manifests / "apps" / "pods.yml").unlink()
    assert names(scan(source))["pods"] == ["web-1", "web-3"]
    (manifests / "policy.yaml").unlink()
    state = scan(source)
    assert state.policies == ()
    assert resolve_state(state) == ()


def test_broken_yaml_keeps_the_files_last_good_objects(manifests: Path) -> None:
    path = manifests / "apps" / "web.yaml"
    source = DirectorySource(manifests)
    good = scan(source)
    path.write_text(path.read_text().replace("podIP: 10.0.0.1", "podIP: [10.0.0.1"))
    broken = scan(source)
    assert names(broken) == names(good)
    assert pod_ip(broken, "web-1") == "10.0.0.1"
    (problem,) = broken.problems
    assert problem.source == str(path)
    assert problem.line is not None
    assert problem.message.startswith("YAML does not parse: ")
    assert problem.message.endswith(
        "; serving the 2 object(s) of its last good version until fixed"
    )
    # Fixed: the new content is served and the problem is gone.
    write(path, workload_doc(), pod_doc("web-1", "10.0.0.5"))
    fixed = scan(source)
    assert fixed.problems == ()
    assert pod_ip(fixed, "web-1") == "10.0.0.5"


def test_a_file_that_never_parsed_serves_nothing(manifests: Path) -> None:
    path = manifests / "bad.yaml"
    path.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: x\n")
    state = load_directory(manifests)
    assert names(state)["pods"] == ["web-1", "web-2"]
    (problem,) = state.problems
    assert str(problem).startswith(f"{path}:4: YAML does not parse: while parsing a flow mapping")
    assert problem.message.endswith("none of its objects are served")


POD = """\
apiVersion: v1
kind: Pod
metadata: {name: @NAME@, namespace: shop, labels: {app: web}}
status: {phase: Running, podIP: @IP@, conditions: [{type: Ready, status: "True"}]}
"""


def pod_text(name: str, ip: str) -> str:
    return POD.replace("@NAME@", name).replace("@IP@", ip)


def test_a_broken_object_is_skipped_and_its_neighbours_served(tmp_path: Path) -> None:
    path = tmp_path / "pods.yaml"
    path.write_text(
        pod_text("web-1", "10.0.0.1")  # lines 1-4
        + "---\n"
        + pod_text("web-3", "10.0.0.300")  # lines 6-9
        + "---\n"
        + pod_text("web-4", "10.0.0.4").replace("name: web-4, ", "")  # lines 11-14
        + "---\njust text\n"  # line 16
    )
    state = load_directory(tmp_path)
    assert names(state)["pods"] == ["web-1"]
    assert [
        (p.source, p.document, p.line, p.object, p.field, p.message) for p in state.problems
    ] == [
        (
            str(path),
            2,
            6,
            pod_ref("web-3"),
            "status.podIP",
            "'10.0.0.300' is not an IPv4 or IPv6 address",
        ),
        (
            str(path),
            3,
            11,
            pod_ref("<unnamed>"),
            "metadata.name",
            "required field is missing: the object's name",
        ),
        (str(path), 4, 16, None, None, "must be an object (a YAML mapping), got str"),
    ]
    assert str(state.problems[0]) == (
        f"{path}:6, document 2, Pod shop/web-3: status.podIP: '10.0.0.300' is not an IPv4 or "
        "IPv6 address"
    )


def test_problems_are_logged_with_file_document_object_and_field(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        pod_text("web-1", "10.0.0.1") + "---\n" + yaml.safe_dump(policy_doc(pingInterval="2h"))
    )
    with structlog.testing.capture_logs() as logs:
        source = DirectorySource(tmp_path)
        scan(source)
        assert source.scan() is None
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert warnings == [
        {
            "event": "k8s.dirsource.problem",
            "log_level": "warning",
            "file": str(path),
            "document": 2,
            "item": None,
            "line": 6,
            "object": "AviatorPolicy shop/web",
            "field": "spec.pingInterval",
            "message": "2h0m0s is out of range; allowed: 10ms to 5m0s",
        }
    ]  # logged once, when it appears, not at every scan


def test_an_invalid_policy_is_kept_for_its_status(tmp_path: Path) -> None:
    write(tmp_path / "p.yaml", policy_doc(latencyThreshold="fast"), workload_doc())
    state = load_directory(tmp_path)
    (entry,) = state.policies
    assert isinstance(entry, InvalidPolicy)
    assert state.invalid_policies == (entry,)
    (problem,) = state.problems
    assert (problem.object, problem.field) == (entry.ref, "spec.latencyThreshold")
    (r,) = resolve_state(state)
    assert not r.serving


def test_list_items_are_located_by_item_index_and_line(tmp_path: Path) -> None:
    items = pod_text("web-1", "10.0.0.1") + pod_text("web-2", "10.0.0.2").replace(
        'conditions: [{type: Ready, status: "True"}]', "conditions: Ready"
    )
    indented = "".join(
        ("- " if line.startswith("apiVersion") else "  ") + line + "\n"
        for line in items.splitlines()
    )
    (tmp_path / "list.yaml").write_text("apiVersion: v1\nkind: List\nitems:\n" + indented)
    state = load_directory(tmp_path)
    assert names(state)["pods"] == ["web-1"]
    (p,) = state.problems
    assert (p.document, p.item, p.line, p.field) == (1, 1, 8, "status.conditions")
    assert p.message == "must be a list, got a string ('Ready')"


def test_the_first_of_two_identical_objects_wins(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", pod_doc("web-1", "10.0.0.1"))
    write(tmp_path / "b.yaml", pod_doc("web-1", "10.0.0.2"))
    state = load_directory(tmp_path)
    assert pod_ip(state, "web-1") == "10.0.0.1"
    (p,) = state.problems
    assert p.source == str(tmp_path / "b.yaml")
    assert p.message == (
        f"duplicate: Pod shop/web-1 is already defined in {tmp_path / 'a.yaml'} document 1; "
        "this one is ignored"
    )


def test_duplicate_yaml_keys_make_the_file_invalid(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  name: b\n")
    state = load_directory(tmp_path)
    assert state.pods == ()
    (p,) = state.problems
    assert p.line == 5
    assert "found duplicate key 'name' (first at line 4)" in p.message


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "x-meta: &meta {name: web-1, namespace: shop}\n---\n"
        "apiVersion: v1\nkind: Pod\nmetadata:\n  <<: {name: base, namespace: shop}\n  name: web-1\n"
        "status: {phase: Running, podIP: 10.0.0.1}\n"
    )
    state = load_directory(tmp_path)
    assert names(state)["pods"] == ["web-1"]


def test_non_utf8_file(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_bytes(b"kind: Pod\nname: \xff\n")
    (p,) = load_directory(tmp_path).problems
    assert (
        p.message == "not UTF-8 text: invalid start byte at byte 16; none of its objects are served"
    )


def test_missing_directory_at_start_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"cannot read directory .*nope"):
        DirectorySource(tmp_path / "nope").scan()
    (tmp_path / "file").write_text("")
    with pytest.raises(SourceError):
        DirectorySource(tmp_path / "file").scan()


def test_a_vanished_directory_keeps_the_last_state(manifests: Path, tmp_path: Path) -> None:
    source = DirectorySource(manifests)
    good = scan(source)
    moved = tmp_path / "moved"
    manifests.rename(moved)
    gone = scan(source)
    assert names(gone) == names(good)
    (p,) = gone.problems
    assert p == Problem(
        str(manifests),
        "cannot read the directory (not a directory (or missing)); "
        "serving the last state read from it",
    )
    moved.rename(manifests)
    back = scan(source)
    assert back.problems == ()
    assert back.version == good.version


def test_an_unreadable_subdirectory_keeps_its_last_objects(
    manifests: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = DirectorySource(manifests)
    good = scan(source)
    apps = manifests / "apps"
    real_scandir = os.scandir

    def scandir(path: Any) -> Any:  # root cannot chmod its way out of reading: fake it
        if Path(path) == apps:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    denied = scan(source)
    assert names(denied) == names(good)
    assert denied.problems == (
        Problem(
            str(apps),
            "cannot read the directory (Permission denied); serving the last objects read from it",
        ),
    )
    monkeypatch.undo()
    back = scan(source)
    assert back.problems == ()
    assert back.version == good.version


def test_first_seen_time_keeps_the_older_policy_winning(manifests: Path) -> None:
    now = [T0]
    source = DirectorySource(manifests, wall_clock=lambda: now[0])
    scan(source)
    now[0] = T0 + timedelta(minutes=1)
    # "a-rival" sorts before "web" by name, but arrived later: "web" keeps the workload.
    write(manifests / "rival.yaml", policy_doc("a-rival"))
    state = scan(source)
    assert [p.meta.creation_timestamp for p in state.policies] == [T0 + timedelta(minutes=1), T0]
    assert serving(resolve_state(state))[WorkloadKey("shop", "web")].ref.name == "web"
    # An explicit creationTimestamp in the file is respected.
    write(manifests / "rival.yaml", policy_doc("a-rival", created="2020-01-01T00:00:00Z"))
    state = scan(source)
    assert serving(resolve_state(state))[WorkloadKey("shop", "web")].ref.name == "a-rival"


def test_deleted_and_recreated_object_is_new(manifests: Path) -> None:
    now = [T0]
    source = DirectorySource(manifests, wall_clock=lambda: now[0])
    first = scan(source)
    (manifests / "policy.yaml").unlink()
    scan(source)
    now[0] = T0 + timedelta(hours=1)
    write(manifests / "policy.yaml", policy_doc())
    again = scan(source)
    (old,), (new,) = first.policies, again.policies
    assert isinstance(new, AviatorPolicy)
    assert new.meta.creation_timestamp == T0 + timedelta(hours=1)
    assert new.meta.uid != old.meta.uid


# --- the watcher, on fake loop time (so on the loop's thread: offload=False) --------------


@pytest.mark.looptime
async def test_watcher_publishes_changes_within_an_interval(manifests: Path) -> None:
    store = Store()
    source = DirectorySource(manifests, interval=0.4, offload=False)
    task = asyncio.create_task(source.run(store))
    try:
        await asyncio.sleep(0)
        assert store.synced
        assert names(store.current)["pods"] == ["web-1", "web-2"]
        first = store.current
        write(manifests / "web-3.yaml", pod_doc("web-3", "10.0.0.3"))
        await asyncio.sleep(0.5)
        assert names(store.current)["pods"] == ["web-1", "web-2", "web-3"]
        (manifests / "web-3.yaml").unlink()
        await asyncio.sleep(0.5)
        assert names(store.current)["pods"] == ["web-1", "web-2"]
        assert store.current.version == first.version
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.looptime
async def test_states_yields_only_changes_and_uses_the_injected_sleep(manifests: Path) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 3:  # after two idle scans, edit a file
            write(manifests / "apps" / "web.yaml", workload_doc(), pod_doc("web-1", "10.0.0.8"))
        await asyncio.sleep(seconds)

    source = DirectorySource(manifests, interval=0.3, sleep=sleep, offload=False)
    states = source.states()
    first = await anext(states)
    second = await anext(states)
    await states.aclose()
    assert pod_ip(first, "web-1") == "10.0.0.1"
    assert pod_ip(second, "web-1") == "10.0.0.8"
    assert slept == [0.3, 0.3, 0.3]
    assert asyncio.get_running_loop().time() == pytest.approx(0.9)


def test_interval_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="interval must be positive"):
        DirectorySource(tmp_path, interval=0)

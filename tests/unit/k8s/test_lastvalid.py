"""The last valid spec of a policy (issue 9, item 2): the keeper, and resolve serving from it.

An invalid update of a serving policy must not take its workload offline: the policy is
reported Accepted=False/Invalid and its last valid spec keeps being served, until the policy
(or its target) is deleted or a valid edit replaces it. Conflicts keep being decided by age.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from aviator.k8s.fields import ObjectRef
from aviator.k8s.lastvalid import LastValid
from aviator.k8s.objects import Pod, Workload, parse_pod, parse_workload
from aviator.k8s.policy import AviatorPolicy, InvalidPolicy, PolicyEntry, parse_policy_entry
from aviator.k8s.resolve import (
    ACCEPTED,
    RESOLVED_REFS,
    ConditionStatus,
    PolicyResolution,
    Reason,
    resolve,
    resolve_state,
    serving,
)
from aviator.k8s.state import ClusterState, decode_object
from aviator.model import WorkloadKey

from .builders import pod_doc, policy_doc, workload_doc

WEB = ObjectRef("AviatorPolicy", "shop", "web")
TYPO = {"latencyThreshold": 100}  # a number without a unit


def entry(
    name: str = "web",
    *,
    uid: str = "uid-web",
    rv: str = "1",
    generation: int = 1,
    created: str = "2024-05-01T00:00:00Z",
    **spec: Any,
) -> PolicyEntry:
    doc = policy_doc(name, created=created, generation=generation, **spec)
    doc["metadata"].update(uid=uid, resourceVersion=rv)
    return parse_policy_entry(doc)


def valid(name: str = "web", **kw: Any) -> AviatorPolicy:
    e = entry(name, **kw)
    assert isinstance(e, AviatorPolicy)
    return e


def invalid(name: str = "web", **kw: Any) -> InvalidPolicy:
    kw.setdefault("latencyThreshold", 100)
    e = entry(name, **kw)
    assert isinstance(e, InvalidPolicy)
    return e


WORKLOADS: list[Workload] = [parse_workload(workload_doc()), parse_workload(workload_doc("api"))]
PODS: list[Pod] = [
    parse_pod(pod_doc("web-1", "10.0.0.1")),
    parse_pod(pod_doc("api-1", "10.0.1.1", labels={"app": "api"})),
]


def keep(*states: list[PolicyEntry]) -> LastValid:
    """The keeper after seeing each state in turn (as the control plane does)."""
    memory = LastValid()
    for policies in states:
        memory = memory.update(policies)
    return memory


def cond(r: PolicyResolution, type_: str) -> tuple[ConditionStatus, Reason, str, int]:
    c = r.condition(type_)
    assert c is not None
    return c.status, c.reason, c.message, c.observed_generation


# --- the keeper ------------------------------------------------------------------------------


def test_a_valid_policy_is_remembered_and_an_invalid_update_falls_back_to_it() -> None:
    good, bad = valid(rv="1"), invalid(rv="2", generation=2)
    memory = keep([good], [bad])
    assert memory.specs == {WEB: good}
    assert memory.fallback(bad) is good


def test_a_policy_invalid_from_its_first_sight_has_no_last_valid_spec() -> None:
    bad = invalid()
    memory = keep([bad], [bad])
    assert len(memory) == 0
    assert memory.fallback(bad) is None


def test_a_valid_edit_replaces_the_memory() -> None:
    first, second = valid(rv="1"), valid(rv="3", target="api")
    memory = keep([first], [invalid(rv="2")], [second], [invalid(rv="4")])
    assert memory.specs == {WEB: second}


def test_a_deleted_policy_is_forgotten() -> None:
    memory = keep([valid()], [invalid(rv="2")], [])
    assert len(memory) == 0
    # Created again, invalid from the start: nothing of the old one is served.
    assert memory.update([invalid(rv="5")]).fallback(invalid(rv="5")) is None


def test_a_recreated_policy_with_another_uid_does_not_inherit_the_old_spec() -> None:
    # The deletion was missed (a relist after a watch gap): the uid tells the two apart.
    bad = invalid(uid="uid-web-2", rv="9")
    memory = keep([valid(uid="uid-web-1")], [bad])
    assert memory.fallback(bad) is None
    assert len(memory) == 0


def test_policies_are_remembered_each_on_its_own() -> None:
    memory = keep([valid("a", uid="a"), valid("b", uid="b")], [invalid("a", uid="a"), valid("b")])
    assert set(memory.specs) == {
        ObjectRef("AviatorPolicy", "shop", "a"),
        ObjectRef("AviatorPolicy", "shop", "b"),
    }


def test_an_unchanged_update_returns_the_same_value() -> None:
    memory = keep([valid()])
    assert memory.update([valid()]) is memory


def test_the_keys_must_be_the_specs_references() -> None:
    with pytest.raises(ValueError, match="maps to the spec of"):
        LastValid({ObjectRef("AviatorPolicy", "shop", "other"): valid()})


# --- resolve from the last valid spec -------------------------------------------------------


def test_an_invalid_update_keeps_serving_the_last_valid_spec() -> None:
    good = valid(rv="41", generation=2)
    bad = invalid(rv="42", generation=3)
    (r,) = resolve([bad], WORKLOADS, PODS, last_valid=keep([good], [bad]))
    assert r.serving
    assert r.last_valid
    assert r.policy is good
    assert r.key == WorkloadKey("shop", "web")
    assert [str(e.address) for e in r.endpoints] == ["10.0.0.1:8080"]
    status, reason, message, generation = cond(r, ACCEPTED)
    assert (status, reason, generation) == (ConditionStatus.FALSE, Reason.INVALID, 3)
    assert message == (
        '1 validation error: spec.latencyThreshold: must be a duration string such as "500ms" '
        'or "1m30s", got a number (100); the last valid spec (resourceVersion 41, generation 2) '
        "keeps being served until the policy is fixed or deleted"
    )
    # ResolvedRefs is the served spec's, observed at its generation.
    assert cond(r, RESOLVED_REFS) == (
        ConditionStatus.TRUE,
        Reason.RESOLVED_REFS,
        "Deployment shop/web selects 1 pod(s): 1 endpoint(s) (last valid spec)",
        2,
    )
    assert serving([r]) == {WorkloadKey("shop", "web"): r}


def test_without_the_memory_an_invalid_policy_serves_nothing() -> None:
    (r,) = resolve([invalid()], WORKLOADS, PODS)
    assert not r.serving
    assert not r.last_valid
    assert r.endpoints == ()
    assert cond(r, ACCEPTED)[2].endswith(
        "; nothing is served: there is no last valid spec to fall back on"
    )


def test_deleting_the_target_withdraws_a_policy_on_its_last_valid_spec() -> None:
    good, bad = valid(), invalid(rv="2")
    (r,) = resolve([bad], WORKLOADS[1:], PODS, last_valid=keep([good], [bad]))
    assert not r.serving
    assert r.endpoints == ()
    assert cond(r, RESOLVED_REFS)[:2] == (ConditionStatus.FALSE, Reason.TARGET_NOT_FOUND)
    assert (
        "its last valid spec (resourceVersion 1, generation 1) is not served either"
        in (cond(r, ACCEPTED)[2])
    )


def test_an_older_policy_on_its_last_valid_spec_keeps_winning_its_workload() -> None:
    old_good = valid("z-old", uid="old", created="2024-05-01T00:00:00Z")
    old_bad = invalid("z-old", uid="old", rv="2", created="2024-05-01T00:00:00Z")
    new = valid("a-new", uid="new", created="2024-05-02T00:00:00Z")
    memory = keep([old_good, new], [old_bad, new])
    new_r, old_r = resolve([old_bad, new], WORKLOADS, PODS, last_valid=memory)
    assert old_r.serving
    assert old_r.last_valid
    assert not new_r.serving
    assert new_r.conflicts_with == old_bad.ref
    assert cond(new_r, ACCEPTED)[1] is Reason.CONFLICTED
    # Deleting the old one hands the workload to the other, as without the typo.
    (after,) = resolve([new], WORKLOADS, PODS, last_valid=memory.update([new]))
    assert after.serving


def test_a_newer_policy_on_its_last_valid_spec_stays_conflicted() -> None:
    old = valid("z-old", uid="old", created="2024-05-01T00:00:00Z")
    new_good = valid("a-new", uid="new", created="2024-05-02T00:00:00Z")
    new_bad = invalid("a-new", uid="new", rv="2", created="2024-05-02T00:00:00Z")
    memory = keep([old, new_good], [old, new_bad])
    new_r, old_r = resolve([old, new_bad], WORKLOADS, PODS, last_valid=memory)
    assert old_r.serving
    assert not new_r.serving
    assert new_r.last_valid
    assert new_r.endpoints == ()
    assert new_r.conflicts_with == old.ref
    status, reason, message, _ = cond(new_r, ACCEPTED)
    assert (status, reason) == (ConditionStatus.FALSE, Reason.INVALID)
    assert "is not served either: workload shop/web is already balanced by" in message
    assert serving([new_r, old_r]) == {WorkloadKey("shop", "web"): old_r}


def test_the_winner_does_not_depend_on_which_policy_is_being_edited_or_input_order() -> None:
    created = {"p1": "2024-05-03T00:00:00Z", "p2": "2024-05-01T00:00:00Z"}
    good: dict[str, PolicyEntry] = {n: valid(n, uid=n, created=c) for n, c in created.items()}
    good["p3"] = parse_policy_entry(policy_doc("p3"))  # no timestamp: sorts last
    for broken in ([], ["p1"], ["p2"], ["p1", "p2"]):
        now = [
            invalid(n, uid=n, rv="2", created=created[n]) if n in broken else e
            for n, e in good.items()
        ]
        memory = keep(list(good.values()), now)
        winners = {
            tuple(
                r.ref.name for r in resolve(perm, WORKLOADS, PODS, last_valid=memory) if r.serving
            )
            for perm in itertools.permutations(now)
        }
        assert winners == {("p2",)}, broken


def test_objects_decoded_as_the_kubernetes_source_does_keep_their_last_valid_spec() -> None:
    # The Kubernetes source decodes API objects with decode_object; the API server sets uid,
    # resourceVersion and generation (incremented by each spec change).
    def api_state(generation: int, rv: str, **spec: Any) -> ClusterState:
        doc = policy_doc(created="2024-05-01T00:00:00Z", generation=generation, **spec)
        doc["metadata"].update(uid="8d3c-api", resourceVersion=rv)
        objects = [decode_object(d) for d in (doc, workload_doc(), pod_doc("web-1", "10.0.0.1"))]
        return ClusterState.build(o for o in objects if o is not None)

    first, typo = api_state(1, "1200"), api_state(2, "1207", latencyThreshold=100)
    assert isinstance(typo.policies[0], InvalidPolicy)
    memory = keep(list(first.policies), list(typo.policies))
    (r,) = resolve_state(typo, last_valid=memory)
    assert r.serving
    status, reason, message, generation = cond(r, ACCEPTED)
    assert (status, reason, generation) == (ConditionStatus.FALSE, Reason.INVALID, 2)
    assert "the last valid spec (resourceVersion 1200, generation 1) keeps being served" in message
    assert cond(r, RESOLVED_REFS)[3] == 1

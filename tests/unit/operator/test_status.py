"""The desired status of a policy and its merge into what the API server holds (pure)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from aviator.k8s.objects import parse_pod, parse_workload
from aviator.k8s.policy import parse_policy_entry
from aviator.k8s.resolve import PolicyResolution, resolve
from aviator.operator.acks import ClusterAcks
from aviator.operator.status import (
    PolicyStatus,
    StatusCondition,
    desired_status,
    event_body,
    merge_status,
    rfc3339,
)
from tests.unit.k8s.builders import pod_doc, policy_doc, workload_doc

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def resolved(
    policies: list[dict[str, Any]] | None = None,
    *,
    workloads: list[dict[str, Any]] | None = None,
    pods: int = 2,
) -> tuple[PolicyResolution, ...]:
    policies = policies if policies is not None else [policy_doc(generation=3)]
    workloads = workloads if workloads is not None else [workload_doc()]
    pod_docs = [pod_doc(f"web-{i}", f"10.0.0.{i + 1}") for i in range(pods)]
    return resolve(
        [parse_policy_entry(d) for d in policies],
        [parse_workload(d) for d in workloads],
        [parse_pod(d) for d in pod_docs],
    )


def cond(s: PolicyStatus, t: str) -> tuple[str, str]:
    c = s.condition(t)
    assert c is not None
    return c.status, c.reason


def test_a_serving_policy_acked_by_every_proxy_is_programmed() -> None:
    (r,) = resolved()
    s = desired_status(r, ClusterAcks(proxies=3, current=3))
    assert [c.type for c in s.conditions] == ["Accepted", "ResolvedRefs", "Programmed"]
    assert cond(s, "Accepted") == ("True", "Accepted")
    assert cond(s, "ResolvedRefs") == ("True", "ResolvedRefs")
    assert cond(s, "Programmed") == ("True", "Programmed")
    assert s.endpoints == 2
    assert s.observed_generation == 3
    assert {c.observed_generation for c in s.conditions} == {3}


@pytest.mark.parametrize(
    ("acks", "expected", "in_message"),
    [
        (None, ("Unknown", "NoProxies"), "no connected proxy subscribes to cluster shop/web"),
        (ClusterAcks(), ("Unknown", "NoProxies"), "no connected proxy"),
        (ClusterAcks(3, 2), ("False", "Pending"), "2 of 3 proxies hold the current endpoints"),
        (
            ClusterAcks(3, 1, 1, ("bad weight",)),
            ("False", "Rejected"),
            "1 of 3 proxies rejected the endpoints of cluster shop/web: bad weight",
        ),
    ],
)
def test_programmed_follows_the_proxies(
    acks: ClusterAcks | None, expected: tuple[str, str], in_message: str
) -> None:
    (r,) = resolved()
    s = desired_status(r, acks)
    assert cond(s, "Programmed") == expected
    programmed = s.condition("Programmed")
    assert programmed is not None
    assert in_message in programmed.message


def test_proxy_counts_do_not_change_a_programmed_status() -> None:
    # A message with the count in it would be a status write each time a proxy connects.
    (r,) = resolved()
    assert desired_status(r, ClusterAcks(2, 2)) == desired_status(r, ClusterAcks(7, 7))


def test_a_missing_target_is_not_accepted_as_gep_713_says() -> None:
    (r,) = resolved([policy_doc(target="nowhere")])
    s = desired_status(r, ClusterAcks(1, 1))
    assert cond(s, "Accepted") == ("False", "TargetNotFound")
    assert cond(s, "ResolvedRefs") == ("False", "TargetNotFound")
    assert cond(s, "Programmed") == ("False", "NotServing")
    accepted = s.condition("Accepted")
    assert accepted is not None
    assert "Deployment shop/nowhere not found" in accepted.message
    assert s.endpoints == 0


def test_the_newer_of_two_policies_is_conflicted() -> None:
    older = policy_doc("a", created="2024-01-01T00:00:00Z")
    newer = policy_doc("b", created="2024-02-01T00:00:00Z")
    a, b = resolved([older, newer])
    assert cond(desired_status(a, ClusterAcks(1, 1)), "Accepted") == ("True", "Accepted")
    sb = desired_status(b, ClusterAcks(1, 1))
    assert cond(sb, "Accepted") == ("False", "Conflicted")
    assert cond(sb, "Programmed") == ("False", "NotServing")
    programmed = sb.condition("Programmed")
    assert programmed is not None
    assert "Accepted is False (Conflicted)" in programmed.message


def test_an_invalid_policy_is_invalid() -> None:
    (r,) = resolved([policy_doc(pingInterval="10m", generation=4)])
    s = desired_status(r, None)
    assert cond(s, "Accepted") == ("False", "Invalid")
    assert cond(s, "ResolvedRefs") == ("Unknown", "Invalid")
    assert s.observed_generation == 4
    assert s.uid == ""


def obj_with(status: dict[str, Any] | None = None, generation: int = 3) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "aviator.io/v1alpha1",
        "kind": "AviatorPolicy",
        "metadata": {"name": "web", "namespace": "shop", "generation": generation, "uid": "u1"},
        "spec": {},
    }
    if status is not None:
        obj["status"] = status
    return obj


def desired(programmed: tuple[str, str] = ("True", "Programmed"), gen: int = 3) -> PolicyStatus:
    from aviator.k8s.fields import ObjectRef

    return PolicyStatus(
        ref=ObjectRef("AviatorPolicy", "shop", "web"),
        observed_generation=gen,
        conditions=(
            StatusCondition("Accepted", "True", "Accepted", "accepted", gen),
            StatusCondition("Programmed", *programmed, "m", gen),
        ),
        endpoints=2,
    )


def test_merge_into_an_empty_status_stamps_every_condition_and_reports_transitions() -> None:
    m = merge_status(obj_with(), desired(), T0)
    assert m.changed
    assert not m.stale
    assert m.status["observedGeneration"] == 3
    assert m.status["endpoints"] == 2
    assert [c["lastTransitionTime"] for c in m.status["conditions"]] == [rfc3339(T0)] * 2
    assert [(t.condition.type, t.previous_status) for t in m.transitions] == [
        ("Accepted", None),
        ("Programmed", None),
    ]


def test_merge_keeps_foreign_conditions_and_other_fields_in_place() -> None:
    foreign = {"type": "example.com/X", "status": "True", "reason": "R", "message": "",
               "lastTransitionTime": "2020-01-01T00:00:00Z"}  # fmt: skip
    current = {"conditions": [foreign], "somethingElse": {"kept": True}}
    obj = obj_with(current)
    before = copy.deepcopy(obj)
    m = merge_status(obj, desired(), T0)
    assert m.status["conditions"][0] == foreign
    assert m.status["somethingElse"] == {"kept": True}
    assert obj == before  # not mutated


def test_merge_moves_transition_times_only_when_the_status_changes() -> None:
    first = merge_status(obj_with(), desired(("False", "Pending")), T0).status
    later = T0 + timedelta(minutes=5)
    # Reason changes, status stays False: the time stays, a transition is reported (Event).
    m = merge_status(obj_with(first), desired(("False", "Rejected")), later)
    programmed = m.status["conditions"][1]
    assert programmed["reason"] == "Rejected"
    assert programmed["lastTransitionTime"] == rfc3339(T0)
    assert [t.condition.reason for t in m.transitions] == ["Rejected"]
    # Status changes: the time moves.
    m2 = merge_status(obj_with(m.status), desired(("True", "Programmed")), later)
    assert m2.status["conditions"][1]["lastTransitionTime"] == rfc3339(later)


def test_merging_the_same_desire_again_changes_nothing() -> None:
    first = merge_status(obj_with(), desired(), T0).status
    m = merge_status(obj_with(first), desired(), T0 + timedelta(hours=1))
    assert not m.changed
    assert m.transitions == ()


def test_a_newer_generation_on_the_server_is_not_overwritten() -> None:
    # Aviator resolved generation 3; the object is at 4 already: its view is stale.
    m = merge_status(obj_with(generation=4), desired(gen=3), T0)
    assert m.stale
    assert not m.changed
    # A condition written from a newer view is left alone; the others are merged.
    newer = {"type": "Programmed", "status": "False", "reason": "Rejected", "message": "x",
             "observedGeneration": 5, "lastTransitionTime": "2020-01-01T00:00:00Z"}  # fmt: skip
    m2 = merge_status(obj_with({"conditions": [newer]}, generation=3), desired(gen=3), T0)
    assert m2.status["conditions"][0] == newer
    assert [c["type"] for c in m2.status["conditions"]] == ["Programmed", "Accepted"]


def test_another_object_of_the_same_name_is_not_written() -> None:
    d = desired()
    d = PolicyStatus(d.ref, d.observed_generation, d.conditions, d.endpoints, uid="other")
    assert merge_status(obj_with(), d, T0).stale


def test_event_body_names_the_object_by_uid_and_says_what_changed() -> None:
    m = merge_status(obj_with(), desired(("False", "Rejected")), T0)
    obj = obj_with()
    obj["metadata"]["resourceVersion"] = "42"
    event = event_body(obj, m.transitions[1], T0, instance="aviator-0", sequence=1)
    assert event["involvedObject"] == {
        "apiVersion": "aviator.io/v1alpha1", "kind": "AviatorPolicy", "name": "web",
        "namespace": "shop", "uid": "u1", "resourceVersion": "42",
    }  # fmt: skip
    assert event["type"] == "Warning"
    assert event["reason"] == "Rejected"
    assert event["message"] == "Programmed=False: m"
    assert event["metadata"]["namespace"] == "shop"
    other = event_body(obj, m.transitions[0], T0, instance="aviator-0", sequence=0)
    assert other["metadata"]["name"] != event["metadata"]["name"]
    assert other["type"] == "Normal"


def test_long_messages_are_cut_to_the_api_limits() -> None:
    c = StatusCondition("Accepted", "False", "Invalid", "x" * 40000, 1)
    assert len(c.message) == 32768
    with pytest.raises(ValueError, match="bad status"):
        StatusCondition("Accepted", "Maybe", "Invalid", "", 1)


def test_an_invalid_edit_keeps_the_last_valid_spec_serving_and_says_so() -> None:
    from aviator.k8s.lastvalid import LastValid

    valid = policy_doc(generation=1)
    valid["metadata"]["uid"] = "u1"
    broken = policy_doc(generation=2, pingInterval="10m")
    broken["metadata"]["uid"] = "u1"
    workloads = [parse_workload(workload_doc())]
    pods = [parse_pod(pod_doc("web-0", "10.0.0.1"))]
    memory = LastValid().update([parse_policy_entry(valid)])
    entries = [parse_policy_entry(broken)]
    (r,) = resolve(entries, workloads, pods, last_valid=memory.update(entries))
    s = desired_status(r, ClusterAcks(1, 1))
    assert cond(s, "Accepted") == ("False", "Invalid")
    accepted = s.condition("Accepted")
    assert accepted is not None
    assert "spec.pingInterval" in accepted.message
    assert "the last valid spec (generation 1) keeps being served" in accepted.message
    assert cond(s, "ResolvedRefs") == ("True", "ResolvedRefs")
    assert cond(s, "Programmed") == ("True", "Programmed")  # the last valid spec is served
    assert s.observed_generation == 2
    generations = {c.type: c.observed_generation for c in s.conditions}
    assert generations == {"Accepted": 2, "ResolvedRefs": 1, "Programmed": 1}
    assert s.endpoints == 1

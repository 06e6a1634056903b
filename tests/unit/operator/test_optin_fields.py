"""The opt-in fields of AviatorPolicy that turn on the operator's writes to the cluster."""

from __future__ import annotations

from typing import Any

import pytest

from aviator.k8s.policy import PolicyError, parse_policy
from tests.unit.k8s.builders import policy_doc


def test_both_are_off_unless_asked_for() -> None:
    p = parse_policy(policy_doc())
    assert p.annotate_pods is False
    assert p.publish_service is False
    assert p.spec_dict()["annotatePods"] is False  # every default written out


def test_both_parse_and_round_trip() -> None:
    p = parse_policy(policy_doc(annotatePods=True, publishService=True))
    assert p.annotate_pods is True
    assert p.publish_service is True
    again = parse_policy(policy_doc(**p.spec_dict()))
    assert again.annotate_pods is True
    assert again.publish_service is True


@pytest.mark.parametrize("field", ["annotatePods", "publishService"])
def test_a_string_is_not_a_boolean(field: str) -> None:
    spec: dict[str, Any] = {field: "true"}
    with pytest.raises(PolicyError) as err:
        parse_policy(policy_doc(**spec))
    (e,) = err.value.errors
    assert e.path == f"spec.{field}"
    assert e.message == "must be true or false, got a string ('true')"

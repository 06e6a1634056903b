"""The policy parser and the object decoders on arbitrary input (issue 14).

Documents are valid objects with random parts replaced, removed or added (deep in the tree,
with any JSON value: wrong types, huge and non-finite numbers, odd strings), and arbitrary
JSON. Whatever comes in, the only outcomes are the documented ones: a typed object, None (a
kind Aviator does not read), an :class:`InvalidPolicy`, or an :class:`ObjectError` (its
:class:`PolicyError` too), and every error names a field.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aviator.k8s.fields import FieldError, ObjectError
from aviator.k8s.policy import AviatorPolicy, InvalidPolicy, PolicyError, parse_policy_entry
from aviator.k8s.state import decode_object
from tests.unit.k8s.builders import pod_doc, policy_doc, workload_doc

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["0s", "-1s", "1h", "100ms", "9999999999h", "1e3ms", "http", "", " ", "/x"]),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=250, max_size=400),  # oversized
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)

BASES = [
    policy_doc(),
    policy_doc(
        port="http",
        probe={"path": "/p", "port": 9090, "timeout": "200ms"},
        weigher={"maxWeightRatio": 10},
    ),
    workload_doc(),
    workload_doc(kind="StatefulSet"),
    pod_doc("web-1", "10.0.0.1", zone="z1", node="n1"),
]


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    doc = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(doc) if p]
        path = draw(st.sampled_from(paths))
        parent: Any = doc
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(json_values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=10))] = draw(json_values)
        if not isinstance(doc, dict):
            break
    return doc


def _check_errors(errors: tuple[FieldError, ...]) -> None:
    assert errors, "an error without a field"
    for e in errors:
        assert isinstance(e, FieldError)
        assert e.path, f"an error names no field: {e.message!r}"
        assert e.message


def _check_policy(doc: Any) -> None:
    try:
        result = parse_policy_entry(doc)
    except PolicyError as exc:
        _check_errors(exc.errors)
        return
    if isinstance(result, InvalidPolicy):
        _check_errors(result.errors)
    else:
        assert isinstance(result, AviatorPolicy)
        assert math.isfinite(result.latency_threshold.seconds)
        assert result.ping_interval.seconds > 0


def _check_object(doc: Any) -> None:
    try:
        decode_object(doc)
    except ObjectError as exc:
        _check_errors(exc.errors)


@FUZZ
@given(mutated())
def test_mutated_objects_decode_or_name_the_bad_field(doc: dict[str, Any]) -> None:
    _check_object(doc)
    if doc.get("kind") == "AviatorPolicy" or "spec" in doc:
        _check_policy(doc)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["apiVersion", "kind", "metadata", "spec", "status"]), json_values
    )
)
def test_arbitrary_documents_decode_or_name_the_bad_field(doc: dict[str, Any]) -> None:
    _check_object(doc)
    _check_policy(doc)

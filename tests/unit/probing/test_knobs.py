"""WeigherKnobs: defaults, parsing of spec.weigher, and precise errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aviator.model import MAX_WEIGHT
from aviator.probing.weigher import DEFAULT_HOT_QUANTILE, KnobError, WeigherKnobs


def test_defaults_are_prequal_and_safe() -> None:
    knobs = WeigherKnobs.from_spec(None)
    assert knobs == WeigherKnobs.from_spec({}) == WeigherKnobs()
    assert knobs.hot_quantile == pytest.approx(2**-0.25)
    assert pytest.approx(0.8409, abs=1e-4) == DEFAULT_HOT_QUANTILE
    assert 1 < knobs.max_weight_ratio <= MAX_WEIGHT
    assert 0 < knobs.min_change < 1
    assert knobs.degrade_hot is False


def test_parses_camel_case_fields() -> None:
    knobs = WeigherKnobs.from_spec(
        {
            "hotQuantile": 0.8,
            "maxWeightRatio": 10,
            "minChange": 0.2,
            "degradeHot": True,
            "hysteresis": 0.05,
            "smoothing": 1,
            "latencyExponent": 2,
            "minHotRif": 0,
            "standOut": 2,
        }
    )
    assert knobs == WeigherKnobs(
        hot_quantile=0.8,
        max_weight_ratio=10.0,
        min_change=0.2,
        degrade_hot=True,
        hysteresis=0.05,
        smoothing=1.0,
        latency_exponent=2.0,
        min_hot_rif=0.0,
        stand_out=2.0,
    )


@pytest.mark.parametrize(
    ("spec", "field", "allowed"),
    [
        ({"hotQuantile": 0}, "hotQuantile", "(0, 1]"),
        ({"hotQuantile": 1.5}, "hotQuantile", "(0, 1]"),
        ({"maxWeightRatio": 0.5}, "maxWeightRatio", "[1, 1000]"),
        ({"maxWeightRatio": "20"}, "maxWeightRatio", "[1, 1000]"),
        ({"minChange": 1}, "minChange", "[0, 1)"),
        ({"hysteresis": -0.1}, "hysteresis", "[0, 1)"),
        ({"smoothing": 0}, "smoothing", "(0, 1]"),
        ({"smoothing": float("nan")}, "smoothing", "finite"),
        ({"latencyExponent": 5}, "latencyExponent", "[0, 4]"),
        ({"minHotRif": float("inf")}, "minHotRif", "finite"),
        ({"minHotRif": True}, "minHotRif", "[0, inf)"),
        ({"standOut": 0.9}, "standOut", "[1, 100]"),
        ({"standOut": 101}, "standOut", "[1, 100]"),
        ({"degradeHot": "yes"}, "degradeHot", "boolean"),
        ({"hot_quantile": 0.8}, "hot_quantile", "allowed fields: degradeHot, hotQuantile"),
    ],
)
def test_errors_name_the_field_and_what_is_allowed(
    spec: dict[str, object], field: str, allowed: str
) -> None:
    with pytest.raises(KnobError) as info:
        WeigherKnobs.from_spec(spec)
    assert info.value.field == field
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"spec.weigher.{field}: ")
    assert allowed in info.value.message


def test_rejects_a_non_mapping() -> None:
    with pytest.raises(KnobError, match="must be a mapping"):
        WeigherKnobs.from_spec([1, 2])  # type: ignore[arg-type]


@given(
    st.builds(
        WeigherKnobs,
        hot_quantile=st.floats(min_value=0.001, max_value=1.0),
        max_weight_ratio=st.floats(min_value=1.0, max_value=1000.0),
        min_change=st.floats(min_value=0.0, max_value=0.999),
        degrade_hot=st.booleans(),
        hysteresis=st.floats(min_value=0.0, max_value=0.999),
        smoothing=st.floats(min_value=0.001, max_value=1.0),
        latency_exponent=st.floats(min_value=0.0, max_value=4.0),
        min_hot_rif=st.floats(min_value=0.0, max_value=1e6),
        stand_out=st.floats(min_value=1.0, max_value=100.0),
    )
)
def test_to_spec_round_trips(knobs: WeigherKnobs) -> None:
    assert WeigherKnobs.from_spec(knobs.to_spec()) == knobs

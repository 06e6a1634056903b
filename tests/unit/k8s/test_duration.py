"""Go duration strings: what parses, to how many nanoseconds, and what the errors say."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aviator.k8s.duration import Duration, DurationError, parse_duration

NS, US, MS, S, M, H = 1, 10**3, 10**6, 10**9, 60 * 10**9, 3600 * 10**9


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("100ms", 100 * MS),
        ("5s", 5 * S),
        ("1m30s", 90 * S),
        ("1.5h", 90 * M),
        ("2h45m0.5s", 2 * H + 45 * M + S // 2),
        (".5s", S // 2),
        ("1.s", S),
        ("250us", 250 * US),
        ("42ns", 42 * NS),
        ("1s1s", 2 * S),  # Go adds repeated components up
        ("30s1m", 90 * S),  # ... in any order
        ("1.0000000009s", S),  # fractions of a nanosecond are truncated, as in Go
        ("0", 0),
        ("0s", 0),
    ],
)
def test_parses_like_go(text: str, ns: int) -> None:
    assert parse_duration(text) == Duration(ns)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-5s", "'-5s' is negative; durations must be positive"),
        (
            "5",
            "'5' has no unit: write numbers with units (ns, us, ms, s, m, h), "
            'e.g. "500ms", "5s", "1m30s"',
        ),
        (
            "1.5",
            "'1.5' has no unit: write numbers with units (ns, us, ms, s, m, h), "
            'e.g. "500ms", "5s", "1m30s"',
        ),
        (
            "5sec",
            "'5sec' is not a duration: write numbers with units (ns, us, ms, s, m, h), "
            'e.g. "500ms", "5s", "1m30s"',
        ),
    ],
)
def test_error_messages(text: str, message: str) -> None:
    with pytest.raises(DurationError) as exc:
        parse_duration(text)
    assert str(exc.value) == message


@pytest.mark.parametrize(
    "text",
    ["", " 5s", "5s ", "5 s", "+5s", "5S", "1e3s", "µs", "5µs", "1h-5m", ".s", "s", "abc", "1m1"],
)
def test_rejects_garbage(text: str) -> None:
    with pytest.raises(DurationError, match=r"is not a duration|has no unit"):
        parse_duration(text)


def test_rejects_overflow() -> None:
    with pytest.raises(DurationError, match="too long"):
        parse_duration("2562048h")
    assert parse_duration("2562047h") == Duration(2562047 * H)


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "0s"),
        (1, "1ns"),
        (1500, "1.5µs"),
        (250 * MS, "250ms"),
        (S, "1s"),
        (1500 * MS, "1.5s"),
        (90 * S, "1m30s"),
        (H, "1h0m0s"),
        (2 * H + 45 * M + S // 2, "2h45m0.5s"),
    ],
)
def test_prints_like_go(ns: int, text: str) -> None:
    assert str(Duration(ns)) == text


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_printed_form_parses_back(ns: int) -> None:
    assert parse_duration(str(Duration(ns)).replace("µs", "us")) == Duration(ns)


def test_of_and_seconds() -> None:
    assert Duration.of(seconds=1.5) == Duration(1500 * MS)
    assert Duration.of(milliseconds=10).seconds == pytest.approx(0.01)
    with pytest.raises(ValueError, match="out of range"):
        Duration(-1)

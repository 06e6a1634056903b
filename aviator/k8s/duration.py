"""Go / Kubernetes duration strings (``100ms``, ``5s``, ``1m30s``, ``1.5h``) as exact values.

Kubernetes serialises ``metav1.Duration`` with Go's ``time.ParseDuration``; users write policy
durations the same way. This parser follows Go's grammar (decimal numbers with optional
fraction, each followed by a unit; components may repeat and add up; exact integer
nanoseconds, fractions truncated) with two restrictions that fit a policy field:

* no sign: ``-5s`` is rejected as negative, ``+5s`` as not a duration;
* units are ``ns``, ``us``, ``ms``, ``s``, ``m``, ``h`` (Go's ``µs`` spellings are left out
  so that the CRD's pattern and CEL's ``duration()`` accept exactly the same strings).

Zero (``0``, ``0s``) parses; whether zero is allowed is the caller's business.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

__all__ = ["DURATION_PATTERN", "UNITS", "Duration", "DurationError", "parse_duration"]

UNITS: dict[str, int] = {
    "ns": 1,
    "us": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_MAX_NS = 2**63 - 1  # Go's time.Duration is an int64 of nanoseconds

_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_UNIT = r"(?:ns|us|ms|s|m|h)"
# The same regular expression is in the CRD (deploy/crd/...): tests check they agree.
DURATION_PATTERN = rf"^(?:0|(?:{_NUMBER}{_UNIT})+)$"
_COMPONENT = re.compile(rf"({_NUMBER})({_UNIT})")
_WHOLE = re.compile(DURATION_PATTERN)

_HINT = 'write numbers with units (ns, us, ms, s, m, h), e.g. "500ms", "5s", "1m30s"'


class DurationError(ValueError):
    """Text that is not a duration; the message says why and what is allowed."""


@dataclass(frozen=True, slots=True, order=True)
class Duration:
    """A non-negative span of time in integer nanoseconds; prints as Go prints it."""

    nanoseconds: int

    def __post_init__(self) -> None:
        if not 0 <= self.nanoseconds <= _MAX_NS:
            raise ValueError(f"duration out of range: {self.nanoseconds}ns")

    @classmethod
    def of(cls, *, seconds: float = 0, milliseconds: float = 0) -> Duration:
        total = Fraction(seconds) * UNITS["s"] + Fraction(milliseconds) * UNITS["ms"]
        return cls(int(total))

    @property
    def seconds(self) -> float:
        return self.nanoseconds / 1e9

    def __str__(self) -> str:
        return _go_string(self.nanoseconds)


def parse_duration(text: str) -> Duration:
    """Parse a Go duration string; raises :class:`DurationError` with a precise message."""
    if not isinstance(text, str):
        raise DurationError(f"must be a duration string, {_HINT}")
    stripped = text.strip()
    if stripped != text or not text:
        raise DurationError(f"{text!r} is not a duration: {_HINT}")
    if text.startswith("-"):
        raise DurationError(f"{text!r} is negative; durations must be positive")
    if not _WHOLE.fullmatch(text):
        if re.fullmatch(rf"{_NUMBER}", text):
            raise DurationError(f"{text!r} has no unit: {_HINT}")
        raise DurationError(f"{text!r} is not a duration: {_HINT}")
    if text == "0":
        return Duration(0)
    total = sum(
        (Fraction(num) * UNITS[unit] for num, unit in _COMPONENT.findall(text)), Fraction(0)
    )
    ns = int(total)  # truncates toward zero, as Go does for fractional nanoseconds
    if ns > _MAX_NS:
        raise DurationError(f"{text!r} is too long: at most about 2562047h")
    return Duration(ns)


def _fmt_frac(value: int, precision: int) -> str:
    """``value / 10**precision`` without trailing zeros (Go's fmtFrac + fmtInt)."""
    whole, frac = divmod(value, 10**precision)
    if not frac:
        return str(whole)
    digits = f"{frac:0{precision}d}".rstrip("0")
    return f"{whole}.{digits}"


def _go_string(ns: int) -> str:
    """Go's ``time.Duration.String``: ``1h0m0s``, ``1m30s``, ``1.5s``, ``250ms``, ``0s``."""
    if ns == 0:
        return "0s"
    if ns < UNITS["us"]:
        return f"{ns}ns"
    if ns < UNITS["ms"]:
        return f"{_fmt_frac(ns, 3)}µs"
    if ns < UNITS["s"]:
        return f"{_fmt_frac(ns, 6)}ms"
    hours, rest = divmod(ns, UNITS["h"])
    minutes, rest = divmod(rest, UNITS["m"])
    seconds = f"{_fmt_frac(rest, 9)}s"
    if hours:
        return f"{hours}h{minutes}m{seconds}"
    if minutes:
        return f"{minutes}m{seconds}"
    return seconds

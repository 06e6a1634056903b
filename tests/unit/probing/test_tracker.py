"""LoadTracker on an explicit fake clock: exact RIF, latency by RIF at arrival, rates."""

from __future__ import annotations

import pytest
from aviator_agent.orca import parse_orca_header
from aviator_agent.tracker import LoadTracker, _bucket
from hypothesis import given
from hypothesis import strategies as st


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def serve(tracker: LoadTracker, clock: FakeClock, latency: float, *, error: bool = False) -> None:
    ticket = tracker.begin()
    clock.now += latency
    ticket.error = error
    tracker.end(ticket)


def test_rif_counts_requests_in_flight_and_end_is_idempotent() -> None:
    tracker = LoadTracker(clock=FakeClock())
    tickets = [tracker.begin() for _ in range(5)]
    assert tracker.rif == 5
    assert [t.rif_at_arrival for t in tickets] == [0, 1, 2, 3, 4]
    tracker.end(tickets[0])
    tracker.end(tickets[0])
    assert tracker.rif == 4
    for t in tickets[1:]:
        tracker.end(t)
    assert tracker.rif == 0


def test_track_decrements_on_error_and_on_cancellation() -> None:
    clock = FakeClock()
    tracker = LoadTracker(clock=clock, rate_window_s=10)
    with pytest.raises(ValueError, match="boom"), tracker.track():
        raise ValueError("boom")
    assert tracker.rif == 0
    with pytest.raises(KeyboardInterrupt), tracker.track():  # a BaseException, like cancellation
        raise KeyboardInterrupt
    assert tracker.rif == 0

    def not_found() -> None:
        with tracker.track() as ticket:
            ticket.error = False  # e.g. a raised 404: a response, not a server error
            raise LookupError

    with pytest.raises(LookupError):
        not_found()
    assert tracker.rif == 0
    clock.now += 4.5  # rates are over the tracker's 4.5 s of life so far
    report = tracker.report()
    assert report.eps == pytest.approx(1 / 4.5)  # only the ValueError counted as an error
    assert report.rps_fractional == pytest.approx(2 / 4.5)  # the cancelled one did not complete
    assert tracker.latency_estimate_s() is not None  # from the non-error LookupError request


def test_latency_is_kept_by_rif_at_arrival() -> None:
    clock = FakeClock()
    tracker = LoadTracker(clock=clock, min_samples=4)
    for _ in range(8):  # alone: 10 ms
        serve(tracker, clock, 0.010)
    background = [tracker.begin() for _ in range(5)]
    for _ in range(8):  # arriving at RIF 5: 100 ms
        serve(tracker, clock, 0.100)
    for t in background:
        tracker.end(t)
    assert tracker.latency_estimate_s(0) == pytest.approx(0.010)
    assert tracker.latency_estimate_s(5) == pytest.approx(0.100)
    assert tracker.latency_estimate_s(6) == pytest.approx(0.100)  # nearest bucket with data
    assert tracker.latency_estimate_s(1) == pytest.approx(0.010)
    assert tracker.latency_estimate_s() == pytest.approx(0.010)  # current RIF is 0


def test_errors_add_no_latency_and_old_samples_age_out() -> None:
    clock = FakeClock()
    tracker = LoadTracker(clock=clock, max_sample_age_s=60)
    serve(tracker, clock, 0.001, error=True)
    assert tracker.latency_estimate_s() is None  # fast failures are not fast service
    serve(tracker, clock, 0.050)
    assert tracker.latency_estimate_s() == pytest.approx(0.050)
    clock.now += 61
    assert tracker.latency_estimate_s() is None


def test_memory_is_bounded() -> None:
    clock = FakeClock()
    tracker = LoadTracker(clock=clock, samples_per_bucket=4)
    held = []
    for i in range(3000):
        if i % 3 == 0:
            held.append(tracker.begin())
        serve(tracker, clock, 0.001)
    stored = sum(len(b) for b in tracker._latencies)
    assert stored <= 4 * len(tracker._latencies)
    assert len(tracker._ring) == 11
    # Tickets ended behind the held ones are let go; completions only for the flow window.
    assert len(tracker._arrivals) <= 2 * tracker.rif + 65
    assert len(tracker._completions) <= 501  # 1 ms each: 0.5 s of them


def test_a_slowdown_shows_in_the_latency_before_any_slow_request_completes() -> None:
    clock = FakeClock()
    tracker = LoadTracker(clock=clock)
    for _ in range(50):  # 100 per second at 10 ms, for half a second
        serve(tracker, clock, 0.010)
    assert parse_orca_header(tracker.header_value()).latency_s == pytest.approx(0.010)
    stuck = [tracker.begin() for _ in range(3)]  # the server slows: nothing completes
    clock.now += 0.205
    # The median of completed requests still says 10 ms; the 30 completions of the last
    # half second and RIF 3 say 50 ms (Little's law), within the oldest's 205 ms.
    assert tracker.latency_estimate_s() == pytest.approx(0.010)
    assert tracker.in_flight_latency_s() == pytest.approx(3 * 0.5 / 30)
    assert parse_orca_header(tracker.header_value()).latency_s == pytest.approx(0.050)
    clock.now += 0.2  # 10 completions left in the window
    assert parse_orca_header(tracker.header_value()).latency_s == pytest.approx(0.150)
    clock.now += 0.2  # none left: the age of the oldest
    assert parse_orca_header(tracker.header_value()).latency_s == pytest.approx(0.605)
    for t in stuck:
        tracker.end(t)
    assert tracker.in_flight_latency_s() is None


def test_a_quiet_server_with_a_request_in_flight_is_not_called_slow() -> None:
    clock = FakeClock()
    tracker = LoadTracker(clock=clock)
    serve(tracker, clock, 0.010)
    clock.now += 10  # nothing completed in the window, the old sample aged out
    ticket = tracker.begin()
    clock.now += 0.005
    assert tracker.in_flight_latency_s() == pytest.approx(0.005)  # its age, not the window
    assert parse_orca_header(tracker.header_value()).latency_s == pytest.approx(0.005)
    tracker.end(ticket)


def test_a_long_request_in_flight_does_not_make_the_server_slow() -> None:
    clock = FakeClock()
    tracker = LoadTracker(clock=clock)
    websocket = tracker.begin()
    clock.now += 3600
    for _ in range(100):
        serve(tracker, clock, 0.010)
    clock.now += 0.005  # off the window's edge
    # RIF 1 (the hour-long one) over 50 completions in the last half second: 10 ms.
    assert tracker.in_flight_latency_s() == pytest.approx(0.010)
    assert parse_orca_header(tracker.header_value()).latency_s == pytest.approx(0.010)
    tracker.end(websocket)


def test_rates_over_the_window() -> None:
    clock = FakeClock(0.0)
    tracker = LoadTracker(clock=clock, rate_window_s=10)
    for _ in range(200):  # 20 requests per second for 10 s
        serve(tracker, clock, 0.05)
    assert tracker.requests_per_second() == pytest.approx(20, rel=0.1)
    clock.now += 30
    assert tracker.requests_per_second() == 0.0


def test_report_and_header() -> None:
    clock = FakeClock()
    tracker = LoadTracker(clock=clock, capacity=8)
    serve(tracker, clock, 0.020)
    tickets = [tracker.begin() for _ in range(2)]
    report = parse_orca_header(tracker.header_value())
    assert report.rif == 2
    assert report.application_utilization == pytest.approx(2 / 8)
    assert report.latency_s == pytest.approx(0.020)
    assert report.rps_fractional > 0
    for t in tickets:
        tracker.end(t)
    no_capacity = LoadTracker(clock=clock)
    assert parse_orca_header(no_capacity.header_value()).application_utilization == 0.0


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="capacity"):
        LoadTracker(capacity=0)
    with pytest.raises(ValueError, match="min_samples"):
        LoadTracker(min_samples=0)
    with pytest.raises(ValueError, match="flow_window_s"):
        LoadTracker(flow_window_s=0)


@given(st.integers(min_value=0, max_value=10**7), st.integers(min_value=0, max_value=10**7))
def test_buckets_are_monotone_and_bounded(a: int, b: int) -> None:
    lo, hi = min(a, b), max(a, b)
    assert 0 <= _bucket(lo) <= _bucket(hi) <= 47

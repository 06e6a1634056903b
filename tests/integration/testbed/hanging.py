"""A test backend whose requests never end while a test runs."""

from __future__ import annotations

from aviator.testbed.backend import Backend, BackendSpec
from aviator.testbed.profile import Distribution, Profile


def hanging(name: str = "hang", slots: int = 1) -> Backend:
    """A backend serving every request in 3,600 s, exactly: an exponential service time with
    that mean ended one request of 41 in 0.42 s once (test_openloop's flake)."""
    return Backend(
        BackendSpec(name, Profile.constant(3600.0, slots), distribution=Distribution.CONSTANT)
    )

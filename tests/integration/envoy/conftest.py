"""Make the real-Envoy fixtures of tests/envoy_fixtures.py available to these tests."""

from tests.envoy_fixtures import envoy_factory, http_backends

__all__ = ["envoy_factory", "http_backends"]

"""Aviator's error vocabulary at the Envoy edge (the binary, its process, its admin endpoint).

Library errors (aiohttp, OSError, JSON decoding) are chained with ``raise … from`` so the cause
stays visible; callers catch these types only.
"""

from __future__ import annotations


class EnvoyError(Exception):
    """Base of every error about a local Envoy."""


class EnvoyNotFoundError(EnvoyError):
    """No Envoy binary could be found (permanent until one is installed)."""


class EnvoyConfigError(EnvoyError):
    """Envoy rejected a configuration; the message is Envoy's own reason."""


class EnvoyStartError(EnvoyError):
    """An Envoy process exited or never answered on its admin endpoint while starting."""


class EnvoyAdminError(EnvoyError):
    """The admin endpoint could not be reached, answered with an error, or sent unparsable data.

    Usually retryable: Envoy may be starting, restarting or overloaded.
    """

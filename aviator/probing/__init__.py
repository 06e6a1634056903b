"""Probing: measure each endpoint's latency and load, turn it into EDS weights and health.

Layers (each imports only those above it):

- ``results``: ``ProbeTarget``, ``ProbeResult``, ``ProbeOutcome``, ``ProbeKey`` (pure values).
- ``estimator``: probe results → per-endpoint ``EndpointStats`` (pure; time is an argument).
- ``weigher``: ``EndpointStats`` → ``WeightedEndpoint`` weights/health, ``WeigherKnobs`` (pure).
- ``prober``: the asyncio prober (I/O: aiohttp), feeding any sink.

The ORCA ``endpoint-load-metrics`` header (format and parser, pure) and the server half that
writes it (``LoadTracker``, ASGI and aiohttp middlewares) are the agent's: ``aviator_agent``,
its own distribution in ``agent/``, which the prober and the testbed import.

Nothing here runs at import time; the pure modules import no HTTP library.
"""

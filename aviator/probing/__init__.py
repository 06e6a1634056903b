"""Probing: measure each endpoint's latency and load, turn it into EDS weights and health.

Layers (each imports only those above it):

- ``orca``: ORCA ``endpoint-load-metrics`` header parse/format (pure).
- ``results``: ``ProbeTarget``, ``ProbeResult``, ``ProbeOutcome``, ``ProbeKey`` (pure values).
- ``estimator``: probe results → per-endpoint ``EndpointStats`` (pure; time is an argument).
- ``weigher``: ``EndpointStats`` → ``WeightedEndpoint`` weights/health, ``WeigherKnobs`` (pure).
- ``prober``: the asyncio prober (I/O: aiohttp), feeding any sink.
- ``agent``: the server half (``LoadTracker``, ASGI and aiohttp middlewares) for backends.

Nothing here runs at import time; the pure modules import no HTTP library.
"""

"""Everything about the Envoy side: bootstraps, the admin API, and running a real Envoy.

- ``bootstrap``: pure builders of gateway and sidecar bootstraps (``aviator bootstrap``).
- ``admin``: async client of an Envoy admin endpoint (stats, clusters, config dump).
- ``process``: ``EnvoyProcess`` (start, wait, stop a real Envoy) and ``validate``.
- ``inspect``: what an Envoy holds (admin API) joined with what Aviator measured (its admin).

Importing this package imports nothing else; import the submodule you need.
"""

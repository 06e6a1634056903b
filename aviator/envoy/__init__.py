"""Everything about the Envoy side: bootstraps, the admin API, and running a real Envoy.

- ``bootstrap``: pure builders of gateway and sidecar bootstraps (``aviator bootstrap``).
- ``admin``: async client of an Envoy admin endpoint (stats, clusters, config dump).
- ``process``: ``EnvoyProcess`` (start, wait, stop a real Envoy) and ``validate``.

Importing this package imports nothing else; import the submodule you need.
"""

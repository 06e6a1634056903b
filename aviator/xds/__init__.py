"""xDS: pure resource builders, self-checking snapshots, the cache, and the ADS server.

Layers (each imports only those above it):
- ``resources``: weighted workloads → Envoy protos (pure); type URLs.
- ``snapshot``: frozen, consistency-checked sets of resources, serialised once (pure).
- ``cache``: the current snapshot and who watches which name (no gRPC).
- ``protocol``: the per-stream SotW/delta state machine (no gRPC).
- ``server``: grpc.aio transport, connected-proxies view; ``publisher``: debouncing.

Import the submodules directly; this package imports nothing at import time.
"""

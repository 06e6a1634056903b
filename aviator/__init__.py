"""Aviator: a latency-aware xDS control plane for Envoy.

Layers (imports only go downwards):

- ``aviator.cli``, ``aviator.controlplane``, ``aviator.demo``, ``aviator.bench``:
  wiring and commands.
- ``aviator.k8s``: Kubernetes-style objects (AviatorPolicy, workloads, pods), their sources and
  the pure resolution of a policy to endpoints.
- ``aviator.probing``: probes (I/O), the estimator and the weigher (pure), server-side agents.
- ``aviator.xds``: pure Envoy resource builders, snapshots, the cache (no gRPC) and the ADS server.
- ``aviator.envoy``: Envoy bootstrap, admin client and process helper.
- ``aviator.model``: the small value types every layer shares.
"""

__version__ = "0.1.0"

"""Aviator: a latency-aware xDS control plane for Envoy.

The packages, in the order the data flows (imports only go downwards; the contracts in
pyproject.toml check it, see docs/design.md):

- ``aviator.cli``: the ``aviator`` command, one module per subcommand (top).
- ``aviator.controlplane``, ``aviator.admin``: the composition root and its admin HTTP server.
- ``aviator.demo``, ``aviator.bench``, ``aviator.testbed``: the demo, the benchmarks and the
  backends and load they run; never imported by production code.
- ``aviator.source``: state sources (directory, Kubernetes API) and the store they fill.
- ``aviator.k8s``: Kubernetes-style objects, the AviatorPolicy model, cluster state and the pure
  resolution of a policy to endpoints.
- ``aviator.probing``: probes (I/O), the estimator and the weigher (pure).
- ``aviator.xds``: pure Envoy resource builders, snapshots, the cache (no gRPC) and the ADS server.
- ``aviator.envoy``: Envoy bootstrap, admin client, process helper, inspect.
- ``aviator.model``: the small value types every layer shares (bottom).

Beside it, ``aviator_agent`` (``agent/``, its own distribution, the standard library only): the
middleware users put in their apps, and the ORCA header format the prober reads.
"""

__version__ = "0.1.0"

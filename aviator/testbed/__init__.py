"""Testbed for the demo and the latency benchmark: backends with private capacity and an
open-loop load generator. Test equipment: no production code imports it (import contracts in
pyproject.toml), and it never imports the demo or the benchmarks, which sit above it. Of
Aviator it uses only the probing agent (its backends report their load with it, as users'
apps do) and ``aviator.log``.

Backends:

- :mod:`aviator.testbed.profile` — pure values: a backend's phases over time (service time,
  capacity, fast-fail rate, hidden load) and service-time sampling.
- :mod:`aviator.testbed.gate` — the FIFO capacity gate a backend admits requests through.
- :mod:`aviator.testbed.backend` — one backend: aiohttp server, profile schedule, hidden load.
- :mod:`aviator.testbed.fleetserver` — the fleet process: many backends and a control API in
  one process (``python -m aviator.testbed.fleetserver --spec JSON``).
- :mod:`aviator.testbed.fleet` — starts that process, changes its backends' phases while they
  run, and always stops it.

Load:

- :mod:`aviator.testbed.loadspec` — pure: what load to offer (``LoadSpec``) and its Poisson
  timeline, fixed before the run.
- :mod:`aviator.testbed.openloop` — the one open-loop mechanism (the load generator's and the
  demo's): each request at its intended time, latency from that time, error kinds.
- :mod:`aviator.testbed.loadresult` — pure: what a run measured (HDR histograms, per-second
  buckets, ``LoadResult`` and its JSON).
- :mod:`aviator.testbed.loadgen` — runs a spec and records it, in-process or in its own process
  (``python -m aviator.testbed.loadgen``).
- :mod:`aviator.testbed.capacity` — measures what rate the load generator keeps up with here.

Kubernetes:

- :mod:`aviator.testbed.kubeapi` — a real API server (etcd, kube-apiserver,
  kube-controller-manager on loopback) for the tests and ``aviator bench k8s``.
"""

"""Testbed for the demo and the latency benchmark: backends with private capacity and an
open-loop load generator.

- :mod:`aviator.testbed.profile` — pure values: a backend's phases over time (service time,
  capacity, fast-fail rate, hidden load) and service-time sampling.
- :mod:`aviator.testbed.backend` — one backend (aiohttp server, capacity gate, hidden load) and
  the fleet process entry point ``python -m aviator.testbed.backend --spec JSON``.
- :mod:`aviator.testbed.fleet` — starts N backends in one child process, changes their phases
  while they run, and always stops the child.
- :mod:`aviator.testbed.loadspec` — pure: what load to offer (``LoadSpec``) and its Poisson
  timeline, fixed before the run.
- :mod:`aviator.testbed.loadresult` — pure: what a run measured (HDR histograms, per-second
  buckets, ``LoadResult`` and its JSON).
- :mod:`aviator.testbed.loadgen` — runs a spec and records it, in-process or in its own process
  (``python -m aviator.testbed.loadgen``).

This package is test equipment: nothing in the control plane imports it.
"""

"""``aviator demo``: backends, the control plane, a real Envoy and load on one machine.

- :mod:`aviator.demo.scenario` — what runs: the workload, its pods and their slowdown, the
  loopback addresses, the backends' profiles and the objects the control plane reads.
- :mod:`aviator.demo.stack` — starts the backends (testbed), the control plane and Envoy in
  order, and always stops them in reverse.
- :mod:`aviator.demo.session` — the run: the load (the testbed's open loop), the live table
  and the summary.
- :mod:`aviator.demo.view` — pure: frames and the summary table from what was measured.

Sits above the control plane and the testbed, which it wires together; only the ``aviator
demo`` command imports it. Needs the ``demo`` extra (the testbed's histograms and the Envoy
binary); production code never imports this package (import contracts in pyproject.toml).
"""

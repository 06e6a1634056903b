"""``aviator demo``: backends, the control plane, a real Envoy and load on one machine.

- :mod:`aviator.demo.session` — starts the stack (testbed backends, control plane, Envoy),
  drives the load and collects frames.
- :mod:`aviator.demo.view` — pure: frames and the summary table from what was measured.

Needs the ``demo`` extra (the testbed's histograms and the Envoy binary); production code
never imports this package.
"""

"""State sources: producers of :class:`~aviator.k8s.state.ClusterState` values.

- :mod:`aviator.source.store` — the :class:`~aviator.source.store.Store` every source publishes
  to, and the ``StateSource`` protocol.
- :mod:`aviator.source.directory` — ``--source dir:PATH``: a polled directory of manifests.
- :mod:`aviator.source.kubernetes` — ``--source kubernetes``: informers on the API server.

Sources do I/O; what they produce is pure values from :mod:`aviator.k8s`. Nothing downstream
of the store knows which source is running.
"""

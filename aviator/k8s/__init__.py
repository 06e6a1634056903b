"""The Kubernetes-object layer: typed objects, the AviatorPolicy model, state sources, resolve.

- :mod:`aviator.k8s.objects` — frozen ObjectMeta, label selectors, Deployment/StatefulSet
  (:class:`~aviator.k8s.objects.Workload`) and Pod values parsed from API dicts.
- :mod:`aviator.k8s.policy` — the ``aviator.io/v1alpha1`` AviatorPolicy: defaults and strict
  validation that reports every error with its field path.
- :mod:`aviator.k8s.state` — :class:`~aviator.k8s.state.ClusterState` snapshots, the
  :class:`~aviator.k8s.state.Store` they are published to, and the ``StateSource`` protocol.
- :mod:`aviator.k8s.dirsource` — ``--source dir:PATH``: a polled directory of manifests.
- :mod:`aviator.k8s.resolve` — pure: policies + workloads + pods → endpoints and conditions.

This package must not import gRPC, Envoy protobufs or an HTTP library, and only the
directory source does I/O; everything else is pure and reads no clock.
"""

"""The Kubernetes object model: typed objects, the AviatorPolicy model, cluster state, resolve.

- :mod:`aviator.k8s.fields` — the vocabulary every parser here speaks: ObjectRef, FieldError and
  ObjectError, the error-collecting field reader, apimachinery's name and label syntax.
- :mod:`aviator.k8s.objects` — frozen ObjectMeta, labels, label selectors, Deployment/StatefulSet
  (:class:`~aviator.k8s.objects.Workload`) and Pod values parsed from API dicts.
- :mod:`aviator.k8s.duration` — Kubernetes-style durations (``500ms``, ``1m30s``).
- :mod:`aviator.k8s.policy` — the ``aviator.io/v1alpha1`` AviatorPolicy: defaults and strict
  validation that reports every error with its field path.
- :mod:`aviator.k8s.state` — :class:`~aviator.k8s.state.ClusterState` snapshots (what every
  source in :mod:`aviator.source` produces) and the decoder of API dicts into typed objects.
- :mod:`aviator.k8s.resolve` — pure: policies + workloads + pods → endpoints and conditions.

Everything here is pure: no gRPC, no Envoy protobufs, no HTTP or Kubernetes client, no file
or network I/O, no clock (enforced by the import contracts in pyproject.toml).
"""

"""``--source kubernetes``: Aviator's cluster state from the Kubernetes API server.

- :mod:`.informer` — a generic asyncio informer with client-go's reflector semantics (list,
  watch from the list's resourceVersion, bookmarks, 410 → relist, back-off, watchdog) over
  ``kubernetes.aio``, keeping only a transformed value per object.
- :mod:`.source` — :class:`KubernetesSource`: informers for AviatorPolicies, Deployments,
  StatefulSets and Pods, publishing whole :class:`~aviator.k8s.state.ClusterState` values.

The only package of Aviator that imports the ``kubernetes`` client.
"""

from aviator.source.kubernetes.informer import Backoff, Informer, InformerOptions, Resource
from aviator.source.kubernetes.source import KubernetesConfigError, KubernetesSource, SourceError

__all__ = [
    "Backoff",
    "Informer",
    "InformerOptions",
    "KubernetesConfigError",
    "KubernetesSource",
    "Resource",
    "SourceError",
]

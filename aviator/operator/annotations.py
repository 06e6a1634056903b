"""Pod annotations: each pod's weight, latency and deletion cost, decided (pure).

For a policy with ``spec.annotatePods: true``, each of its ready pods that has a weight gets:

- ``aviator.io/weight``: the EDS weight Aviator publishes for it (1..1000);
- ``aviator.io/latency-ms``: the latency the weigher ranks it by, in milliseconds;
- ``controller.kubernetes.io/pod-deletion-cost``: the weight again. A ReplicaSet scaling
  down deletes the pods of lowest cost first (after unscheduled and unready pods), and the
  slowest or hottest pods have the lowest weights, so a scale-down removes them first.
  The ReplicaSet controller reads this annotation from Kubernetes 1.22 (beta, on by
  default; 1.21 behind the ``PodDeletionCost`` feature gate); on 1.20 it is ignored.
  The weight, not a rank, because weights already move only on a material change
  (the weigher's ``minChange``, smoothing and hysteresis); a rank would reorder on noise.

and the label ``aviator.io/annotated: "true"``, so that a new leader finds the pods it must
clean up (annotations cannot be selected on) when a policy is deleted or the option turned
off while no replica was leading.

A change is *material* (:func:`material`) when the weight changes, annotations appear or
go, or the latency moves by more than :data:`LATENCY_CHANGE` (relative) and
:data:`LATENCY_FLOOR_MS`; the writer also writes each pod at most once per 30 s. The latency
is informational and noisy, and any threshold on a noisy value is crossed sooner or later:
:func:`hold_latency` keeps the written latency (so nothing is material) until either it moves
by a factor of :data:`LATENCY_JUMP` or a refresh is due, and the annotator makes a refresh
due once per ``latency_refresh`` (10 min) per pod, as one comparison at that moment.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from aviator.k8s.resolve import PolicyResolution
from aviator.model import EndpointAddress
from aviator.probing.weigher import WeighResult

__all__ = [
    "DELETION_COST_ANNOTATION",
    "LATENCY_ANNOTATION",
    "LATENCY_CHANGE",
    "LATENCY_FLOOR_MS",
    "MANAGED_LABEL",
    "WEIGHT_ANNOTATION",
    "PodAnnotations",
    "PodKey",
    "desired_annotations",
    "hold_latency",
    "material",
    "patch_body",
]

WEIGHT_ANNOTATION: Final = "aviator.io/weight"
LATENCY_ANNOTATION: Final = "aviator.io/latency-ms"
DELETION_COST_ANNOTATION: Final = "controller.kubernetes.io/pod-deletion-cost"
MANAGED_LABEL: Final = "aviator.io/annotated"
LATENCY_CHANGE: Final = 0.25  # relative move of the latency that is worth a write
LATENCY_FLOOR_MS: Final = 1.0  # ... and never less than this many milliseconds
LATENCY_JUMP: Final = 2.0  # a move by this factor is written without waiting for a refresh


@dataclass(frozen=True, slots=True, order=True)
class PodKey:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class PodAnnotations:
    """What one pod should carry. ``latency_ms`` None: no measurement yet."""

    weight: int
    latency_ms: float | None
    deletion_cost: int

    def __post_init__(self) -> None:
        if self.weight < 1:
            raise ValueError(f"weight must be >= 1, got {self.weight}")
        if not -(2**31) <= self.deletion_cost < 2**31:  # an int32, as the API validates it
            raise ValueError(f"deletion cost must be an int32, got {self.deletion_cost}")
        if self.latency_ms is not None and not (
            math.isfinite(self.latency_ms) and self.latency_ms >= 0
        ):
            raise ValueError(f"latency must be finite and >= 0, got {self.latency_ms}")

    def annotations(self) -> dict[str, str]:
        out = {
            WEIGHT_ANNOTATION: str(self.weight),
            DELETION_COST_ANNOTATION: str(self.deletion_cost),
        }
        if self.latency_ms is not None:
            out[LATENCY_ANNOTATION] = f"{self.latency_ms:g}"
        return out


def desired_annotations(
    resolution: PolicyResolution,
    weights: WeighResult | None,
    latency_s: Mapping[EndpointAddress, float | None],
) -> dict[PodKey, PodAnnotations]:
    """The annotations each pod of one policy should carry (empty unless the policy serves
    and opted in). ``latency_s``: the latency the weigher ranks each endpoint by."""
    policy = resolution.policy
    if policy is None or not policy.annotate_pods or not resolution.serving or weights is None:
        return {}
    out: dict[PodKey, PodAnnotations] = {}
    for e in resolution.endpoints:
        weighted = weights.endpoints.get(e.address)
        if weighted is None:
            continue
        latency = latency_s.get(e.address)
        out[PodKey(resolution.ref.namespace, e.pod)] = PodAnnotations(
            weight=weighted.weight,
            latency_ms=None if latency is None else round(latency * 1000.0, 1),
            deletion_cost=weighted.weight,
        )
    return out


def material(old: PodAnnotations | None, new: PodAnnotations | None) -> bool:
    """Whether going from ``old`` (written) to ``new`` (desired) is worth a write."""
    if old is None or new is None:
        return old is not new
    if old.weight != new.weight or old.deletion_cost != new.deletion_cost:
        return True
    if old.latency_ms is None or new.latency_ms is None:
        return old.latency_ms != new.latency_ms
    moved = abs(new.latency_ms - old.latency_ms)
    return moved > LATENCY_FLOOR_MS and moved > LATENCY_CHANGE * old.latency_ms


def hold_latency(
    written: PodAnnotations | None, desired: PodAnnotations, *, refresh_due: bool
) -> PodAnnotations:
    """``desired`` with the written latency kept, unless the weight changed, the latency
    jumped by :data:`LATENCY_JUMP` (and :data:`LATENCY_FLOOR_MS`), or a refresh is due."""
    if written is None or refresh_due or written.weight != desired.weight:
        return desired
    old, new = written.latency_ms, desired.latency_ms
    if old is None or new is None:
        return desired
    low, high = sorted((old, new))
    if high - low > LATENCY_FLOOR_MS and high > LATENCY_JUMP * low:
        return desired
    return PodAnnotations(desired.weight, old, desired.deletion_cost)


def patch_body(new: PodAnnotations | None) -> dict[str, Any]:
    """A JSON merge patch setting (or, for None, removing) Aviator's annotations and label
    on a pod; nothing else of the pod is touched."""
    keys = (WEIGHT_ANNOTATION, LATENCY_ANNOTATION, DELETION_COST_ANNOTATION)
    annotations: dict[str, str | None] = dict.fromkeys(keys)
    if new is not None:
        annotations.update(new.annotations())
    return {
        "metadata": {
            "annotations": annotations,
            "labels": {MANAGED_LABEL: "true" if new is not None else None},
        }
    }

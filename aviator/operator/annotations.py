"""Pod annotations: each pod's weight, latency and deletion cost, decided (pure).

For a policy with ``spec.annotatePods: true``, each of its ready pods that has a weight gets:

- ``aviator.io/weight``: the EDS weight Aviator publishes for it (1..1000);
- ``aviator.io/latency-ms``: the latency the weigher ranks it by, in milliseconds;
- ``controller.kubernetes.io/pod-deletion-cost``: the weight's bucket on a log scale
  (:func:`deletion_cost`: weights within a factor :data:`COST_BASE` share a cost). A
  ReplicaSet scaling down deletes the pods of lowest cost first (after unscheduled and
  unready pods), and the slowest or hottest pods have the lowest weights, so a scale-down
  removes them first. The ReplicaSet controller reads this annotation from Kubernetes 1.22
  (beta, on by default; 1.21 behind the ``PodDeletionCost`` feature gate); 1.20 ignores it.

and the label ``aviator.io/annotated: "true"``, so that a new leader finds the pods it must
clean up (annotations cannot be selected on) when a policy is deleted or the option turned
off while no replica was leading.

Only material changes are written, and every value here is noisy: at 1,000 pods a weigher
fed noisy latencies moved almost every weight by a few units several times a minute (each
move within ``minChange`` of traffic share, but a write per pod), and any threshold on a
noisy value is crossed sooner or later. So :func:`settle` holds what was written unless it
moved *a lot*: the cost changes only when the weight leaves its written bucket by a margin
(:data:`COST_MARGIN`, hysteresis), the weight only by a factor :data:`WEIGHT_JUMP` (or with
the cost), the latency only by :data:`LATENCY_JUMP` and :data:`LATENCY_FLOOR_MS`. Once per
``refresh`` (10 min) per pod the annotator makes a *refresh* due: one comparison at that
moment with the finer factor :data:`REFRESH_CHANGE`. The writer also writes each pod at most
once per 30 s. A pod turning hot (weight to the floor) changes its cost at once.

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
    "COST_BASE",
    "DELETION_COST_ANNOTATION",
    "LATENCY_ANNOTATION",
    "LATENCY_FLOOR_MS",
    "MANAGED_LABEL",
    "WEIGHT_ANNOTATION",
    "PodAnnotations",
    "PodKey",
    "deletion_cost",
    "desired_annotations",
    "material",
    "patch_body",
    "settle",
]

WEIGHT_ANNOTATION: Final = "aviator.io/weight"
LATENCY_ANNOTATION: Final = "aviator.io/latency-ms"
DELETION_COST_ANNOTATION: Final = "controller.kubernetes.io/pod-deletion-cost"
MANAGED_LABEL: Final = "aviator.io/annotated"
COST_BASE: Final = 1.25  # weights within this factor share a deletion cost
COST_MARGIN: Final = 1.1  # the cost changes once the weight is this far out of its bucket
WEIGHT_JUMP: Final = 1.5  # a weight that moved by this factor is written at once
LATENCY_JUMP: Final = 2.0  # a latency that moved by this factor is written at once
LATENCY_FLOOR_MS: Final = 1.0  # ... and by at least this many milliseconds
REFRESH_CHANGE: Final = 1.25  # at a refresh, weight and latency moved by this factor


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


def deletion_cost(weight: int) -> int:
    """The cost for ``weight`` (≥ 1): its bucket, ``floor(log(weight) / log(COST_BASE))``
    (weight 1 → 0, the floor 50 → 17, 1000 → 30)."""
    return math.floor(math.log(weight) / math.log(COST_BASE) + 1e-9)


def _bucket(cost: int) -> tuple[float, float]:
    return COST_BASE**cost, COST_BASE ** (cost + 1)


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
            deletion_cost=deletion_cost(weighted.weight),
        )
    return out


def _moved(old: float, new: float, factor: float, floor: float = 0.0) -> bool:
    low, high = sorted((old, new))
    return high - low > floor and high > factor * low


def settle(
    written: PodAnnotations | None, desired: PodAnnotations, *, refresh_due: bool
) -> PodAnnotations:
    """What to write given what is written: ``desired`` where it moved enough, the written
    values elsewhere (the rules in the module docstring). Equal to ``written`` when nothing
    is worth a write."""
    if written is None:
        return desired
    low, high = _bucket(written.deletion_cost)
    in_bucket = low / COST_MARGIN <= desired.weight < high * COST_MARGIN
    cost = written.deletion_cost if in_bucket else desired.deletion_cost
    weight_factor = REFRESH_CHANGE if refresh_due else WEIGHT_JUMP
    weight = written.weight
    if cost != written.deletion_cost or _moved(written.weight, desired.weight, weight_factor):
        weight = desired.weight
    latency = written.latency_ms
    old, new = written.latency_ms, desired.latency_ms
    if old is None or new is None:
        latency = new if new is not None else old
    else:
        latency_factor = REFRESH_CHANGE if refresh_due else LATENCY_JUMP
        if _moved(old, new, latency_factor, LATENCY_FLOOR_MS):
            latency = new
    return PodAnnotations(weight, latency, cost)


def material(old: PodAnnotations | None, new: PodAnnotations | None) -> bool:
    """Whether going from ``old`` (written) to ``new`` is a write: after :func:`settle`,
    any difference is one."""
    return old != new


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

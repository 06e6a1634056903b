"""The last valid spec of each policy, so that an invalid update never takes a workload offline.

Kubernetes controllers keep acting on the last spec they accepted when an update of an object
does not validate; Aviator does the same (issue 9): a policy edited into an invalid one
(``latencyThreshold: 100``, no unit) keeps serving its last valid spec, reported as
Accepted=False, reason Invalid. :class:`LastValid` is that memory, between the store and
:func:`~aviator.k8s.resolve.resolve`, and the same for every state source (a directory, the
Kubernetes API): both produce :class:`~aviator.k8s.policy.InvalidPolicy` values for an invalid
policy that has a name.

The rules, per policy (keyed by reference, checked by uid):

- a valid policy is remembered as it is (a valid edit replaces the memory, also when it
  retargets the policy);
- an invalid policy keeps the spec remembered for it, if it is the same object: same uid
  (when both carry one), so a policy deleted and created again under the same name never
  inherits the spec of its predecessor, even if the deletion was never seen;
- a policy that was invalid from its first sight has no last valid spec: it serves nothing;
- a policy that is gone from the state is forgotten (deleting a policy withdraws its cluster).

Pure: no I/O, no clock; :meth:`LastValid.update` returns a new value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from aviator.k8s.fields import ObjectRef
from aviator.k8s.objects import ObjectMeta
from aviator.k8s.policy import AviatorPolicy, InvalidPolicy, PolicyEntry

__all__ = ["LastValid", "same_object"]

_EMPTY: Mapping[ObjectRef, AviatorPolicy] = MappingProxyType({})


def same_object(a: ObjectMeta, b: ObjectMeta) -> bool:
    """Whether two versions of metadata are one object's (a uid differs only across a delete
    and re-create; a source that sets no uid cannot tell, and is trusted by name)."""
    return not a.uid or not b.uid or a.uid == b.uid


@dataclass(frozen=True, slots=True)
class LastValid:
    """The last valid spec of every policy in the last state seen (a value).

    Invariant: every key is the reference of its spec; after :meth:`update` with a state's
    policies, the keys are exactly the policies of that state that have a valid spec, now or
    since they were first seen.
    """

    specs: Mapping[ObjectRef, AviatorPolicy] = field(default_factory=lambda: _EMPTY)

    def __post_init__(self) -> None:
        for ref, spec in self.specs.items():
            if spec.ref != ref:
                raise ValueError(f"LastValid: {ref} maps to the spec of {spec.ref}")
        object.__setattr__(self, "specs", MappingProxyType(dict(self.specs)))

    def update(self, policies: Iterable[PolicyEntry]) -> LastValid:
        """The memory after seeing ``policies`` (every policy of one state)."""
        out: dict[ObjectRef, AviatorPolicy] = {}
        for entry in policies:
            if isinstance(entry, AviatorPolicy):
                out[entry.ref] = entry
            elif (last := self.fallback(entry)) is not None:
                out[entry.ref] = last
        if out == self.specs:
            return self
        return LastValid(out)

    def fallback(self, entry: InvalidPolicy) -> AviatorPolicy | None:
        """The spec to serve for an invalid policy: its last valid one, if any."""
        last = self.specs.get(entry.ref)
        if last is None or not same_object(last.meta, entry.meta):
            return None
        return last

    def __len__(self) -> int:
        return len(self.specs)

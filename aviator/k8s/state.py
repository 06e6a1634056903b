"""One consistent view of the cluster: the value every state source produces.

A state source (:mod:`aviator.source`) turns what it reads into a :class:`ClusterState`
snapshot and publishes it to a :class:`~aviator.source.store.Store`; resolve, the prober and
xDS read only snapshots, so every source looks the same downstream.

Pure values: no I/O, no clock, no asyncio.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from aviator.k8s import policy as _policy
from aviator.k8s.fields import FieldError, ObjectError, ObjectRef, ref_of
from aviator.k8s.objects import Pod, Workload, WorkloadKind, parse_pod, parse_workload
from aviator.k8s.policy import InvalidPolicy, PolicyEntry, parse_policy_entry

__all__ = [
    "EMPTY_STATE",
    "KINDS",
    "ClusterObject",
    "ClusterState",
    "Problem",
    "decode_object",
]

ClusterObject = PolicyEntry | Workload | Pod

# (apiVersion, kind) of every object Aviator reads; anything else is ignored.
KINDS: Final = frozenset(
    {
        (_policy.API_VERSION, _policy.KIND),
        ("apps/v1", WorkloadKind.DEPLOYMENT.value),
        ("apps/v1", WorkloadKind.STATEFUL_SET.value),
        ("v1", "Pod"),
    }
)
_KIND_NAMES: Final = frozenset(kind for _, kind in KINDS)


def decode_object(doc: Mapping[str, Any]) -> ClusterObject | None:
    """Parse one API object dict into its typed value.

    Returns None for kinds Aviator does not read (Services, ConfigMaps...). Raises
    :class:`ObjectError` for an object of a kind it reads that does not parse, and for one
    without ``apiVersion``/``kind``. An AviatorPolicy that has a name but is invalid comes
    back as :class:`InvalidPolicy` (its status must say why), not as an error.
    """
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str) or not api_version or not kind:
        raise ObjectError(
            ref_of(doc, str(kind) if isinstance(kind, str) and kind else "<no kind>"),
            (FieldError("apiVersion", "every object needs a string apiVersion and kind"),),
        )
    if (api_version, kind) not in KINDS:
        group = api_version.partition("/")[0] if "/" in api_version else ""
        if kind in _KIND_NAMES or group == "aviator.io":
            # A kind Aviator reads, in a version it does not: a typo worth reporting.
            allowed = sorted(f"{v} {k}" for v, k in KINDS)
            raise ObjectError(
                ref_of(doc, kind),
                (
                    FieldError(
                        "apiVersion",
                        f"{api_version} {kind} is not a kind Aviator reads; allowed: "
                        + ", ".join(allowed),
                    ),
                ),
            )
        return None
    if kind == _policy.KIND:
        return parse_policy_entry(doc)
    if kind == "Pod":
        return parse_pod(doc)
    return parse_workload(doc)


@dataclass(frozen=True, slots=True)
class Problem:
    """Something a source could not use, and why.

    ``source`` is the file (directory source) or API path; ``document`` is the 1-based
    YAML document number in the file, ``item`` the 0-based index in a ``kind: List``'s
    items, ``line`` the 1-based line where the document (or error) is, ``field`` the field
    path inside the object.
    """

    source: str
    message: str
    document: int | None = None
    item: int | None = None
    line: int | None = None
    object: ObjectRef | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = self.source
        if self.line is not None:
            where += f":{self.line}"
        parts = [where]
        if self.document is not None:
            doc = f"document {self.document}"
            if self.item is not None:
                doc += f" item {self.item}"
            parts.append(doc)
        if self.object is not None:
            parts.append(str(self.object))
        head = ", ".join(parts)
        what = f"{self.field}: {self.message}" if self.field else self.message
        return f"{head}: {what}"


def _sort_key(obj: ClusterObject) -> ObjectRef:
    return obj.ref


@dataclass(frozen=True, slots=True)
class ClusterState:
    """Everything Aviator knows about the cluster at one moment.

    Invariants: each tuple is sorted by object reference and holds no two objects with the
    same reference; ``version`` is a content hash (equal versions ⇒ same objects, same
    resourceVersions, same problems), computed by :meth:`build`.
    """

    policies: tuple[PolicyEntry, ...] = ()
    workloads: tuple[Workload, ...] = ()
    pods: tuple[Pod, ...] = ()
    problems: tuple[Problem, ...] = ()
    version: str = ""

    def __post_init__(self) -> None:
        for group in (self.policies, self.workloads, self.pods):
            refs = [o.ref for o in group]
            if refs != sorted(refs) or len(set(refs)) != len(refs):
                raise ValueError("ClusterState objects must be sorted by reference and unique")

    @classmethod
    def build(
        cls,
        objects: Iterable[ClusterObject],
        problems: Iterable[Problem] = (),
    ) -> ClusterState:
        """Sort, check and version a set of objects (the version hashes each object's
        reference, uid, resourceVersion and creationTimestamp, and every problem: a source
        must give each object a resourceVersion that changes when it changes)."""
        policies: list[PolicyEntry] = []
        workloads: list[Workload] = []
        pods: list[Pod] = []
        for obj in objects:
            if isinstance(obj, Workload):
                workloads.append(obj)
            elif isinstance(obj, Pod):
                pods.append(obj)
            else:
                policies.append(obj)
        probs = tuple(problems)
        h = hashlib.sha256()
        for group in (policies, workloads, pods):
            group.sort(key=_sort_key)
            for o in group:
                m = o.meta
                created = m.creation_timestamp.isoformat() if m.creation_timestamp else ""
                h.update(f"{o.ref}\0{m.uid}\0{m.resource_version}\0{created}\n".encode())
        for p in probs:
            h.update(f"problem\0{p!s}\n".encode())
        return cls(tuple(policies), tuple(workloads), tuple(pods), probs, h.hexdigest()[:16])

    @property
    def objects(self) -> tuple[ClusterObject, ...]:
        return (*self.policies, *self.workloads, *self.pods)

    def get(self, ref: ObjectRef) -> ClusterObject | None:
        """The object with this reference, if present (linear: for tests and debug views)."""
        return next((o for o in self.objects if o.ref == ref), None)

    @property
    def invalid_policies(self) -> tuple[InvalidPolicy, ...]:
        return tuple(p for p in self.policies if isinstance(p, InvalidPolicy))


EMPTY_STATE: Final = ClusterState.build(())

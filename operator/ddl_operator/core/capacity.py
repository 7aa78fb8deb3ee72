"""GPUs in use per node, counted the way the kube-scheduler counts them, plus our reservations.

The scheduler charges a pod to the node it is bound to (spec.nodeName), with the pod's
effective request: the containers' requests summed, or the largest init container's if
that is more (sidecars, restartable init containers, run beside both). On top, the
operator counts the workers it has placed but the scheduler has not bound yet, so two
jobs never take the same GPUs. Only pods the operator made may reserve a node that way:
any pod can carry an annotation, and a stranger's must not make a node look full.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from ddl_operator.api import constants as c
from ddl_operator.core.render import ANNOTATION_NODE

_SUFFIXES: Final = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}
_QUANTITY: Final = re.compile(r"(\d{1,15})(k|M|G|T|Ki|Mi|Gi|Ti)?")


@dataclass(frozen=True)
class OwnerRef:
    """The fields of an ownerReference that say who controls a pod."""

    api_version: str
    kind: str
    name: str
    controller: bool = False


@dataclass(frozen=True)
class Container:
    """One container's GPUs (its request, or its limit: the API server copies a limit of an
    extended resource into the request) and whether it is a sidecar init container."""

    gpus: int
    sidecar: bool = False


@dataclass(frozen=True)
class PodClaim:
    """What decides whether, where and how many GPUs a pod holds."""

    node_name: str | None = None
    containers: Sequence[Container] = ()
    init_containers: Sequence[Container] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    owners: Sequence[OwnerRef] = ()


def gpu_quantity(value: object) -> int:
    """An extended-resource quantity as a count: whole numbers, which the API server may
    write with a suffix ("1k"); 0 if unreadable."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(0, value)
    match = _QUANTITY.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return 0
    return int(match.group(1)) * _SUFFIXES[match.group(2) or ""]


def effective_gpus(claim: PodClaim) -> int:
    """The pod's GPU request as the scheduler computes it (Kubernetes' PodRequests)."""
    sidecars = 0
    init_peak = 0
    for container in claim.init_containers:
        if container.sidecar:
            sidecars += container.gpus
            init_peak = max(init_peak, sidecars)
        else:
            init_peak = max(init_peak, sidecars + container.gpus)
    regular = sum(container.gpus for container in claim.containers) + sidecars
    return max(init_peak, regular)


def our_worker(claim: PodClaim) -> bool:
    """A worker the operator made: controlled by a DDLJob whose name is its job label."""
    owner = next(
        (
            ref
            for ref in claim.owners
            if ref.controller and ref.kind == c.KIND and ref.api_version.split("/", 1)[0] == c.GROUP
        ),
        None,
    )
    return (
        owner is not None
        and claim.labels.get(c.LABEL_JOB) == owner.name
        and claim.labels.get(c.LABEL_ROLE) == "worker"
    )


def charged_node(claim: PodClaim) -> str | None:
    """The node a pod's GPUs count against: where it is bound, else where we placed it."""
    if claim.node_name:
        return claim.node_name
    reserved = claim.annotations.get(ANNOTATION_NODE)
    return reserved if reserved and our_worker(claim) else None


def gpus_in_use(claims: Iterable[PodClaim]) -> dict[str, int]:
    """GPUs held per node by pods that have not finished (the caller leaves finished out)."""
    used: dict[str, int] = {}
    for claim in claims:
        node = charged_node(claim)
        gpus = effective_gpus(claim) if node else 0
        if node and gpus:
            used[node] = used.get(node, 0) + gpus
    return used

"""Placed workers that span several domains of the level a job requires, and who stays.

Placement keeps a gang inside one domain of `topology.required`, but a gang can end up
spread anyway: `required` set on a running job, or nodes relabelled under it. Running
workers are not moved for that alone (a label change does not evict pods, as with a pod's
requiredDuringSchedulingIgnoredDuringExecution affinity); new workers join the biggest
group, and the others leave at the next membership change, which interrupts training anyway.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ddl_operator.core.topology import NodeInfo, domain_key, level_name


@dataclass(frozen=True)
class Split:
    """The required level, the domain whose workers stay, and those that leave."""

    level: str
    domain: str
    spans: int
    inside: frozenset[str]
    outside: tuple[str, ...]

    def describe(self) -> str:
        name = level_name(self.level)
        return (
            f"placed workers span {self.spans} {self.level} domains; the {len(self.inside)} in "
            f"{name} {self.domain} stay and new workers join them, the other "
            f"{len(self.outside)} leave at the next membership change"
        )


def find_split(
    placed: Mapping[str, str],
    nodes: Mapping[str, NodeInfo],
    levels: Sequence[str],
    required: str | None,
    members: Sequence[str],
) -> Split | None:
    """The split of `placed` (pod -> node) across domains of `required`, or None.

    The group that stays is the biggest, then the one with most current members, then the
    first by domain path, so the choice holds from pass to pass. Pods on nodes missing from
    `nodes` are the caller's losses and are left out.
    """
    if required is None or required not in levels:
        return None
    outer = levels[levels.index(required) :]
    groups: dict[tuple[str, ...], list[str]] = {}
    for pod, node_name in placed.items():
        node = nodes.get(node_name)
        if node is None:
            continue
        path = tuple(domain_key(node.name, node.labels, level) for level in outer)
        groups.setdefault(path, []).append(pod)
    if len(groups) < 2:
        return None
    current = set(members)
    path, inside = min(
        groups.items(),
        key=lambda item: (-len(item[1]), -sum(p in current for p in item[1]), item[0][::-1]),
    )
    outside = sorted(p for group, pods in groups.items() if group != path for p in pods)
    return Split(
        level=required,
        domain=path[0],
        spans=len(groups),
        inside=frozenset(inside),
        outside=tuple(outside),
    )

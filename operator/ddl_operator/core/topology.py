"""Cluster topology as a tree of domains built from node labels, for placement to walk."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from ddl_operator.api.constants import LABEL_HOSTNAME

# Label values may not contain "/", so this prefix never collides with a real domain name.
_OWN_DOMAIN_PREFIX: Final = "node/"


@dataclass(frozen=True)
class NodeInfo:
    """One node of a snapshot, with capacity in abstract units of the job's resource.

    The I/O edge converts: GPUs for a GPU job, pod slots (or similar) for a CPU job.
    """

    name: str
    labels: Mapping[str, str]
    allocatable: int
    used: int
    ready: bool = True
    schedulable: bool = True

    @property
    def usable(self) -> bool:
        """Whether new pods may land here (ready and not cordoned)."""
        return self.ready and self.schedulable

    @property
    def free(self) -> int:
        """Units a new pod could get; a node that is not usable has none."""
        if not self.usable:
            return 0
        return max(0, self.allocatable - self.used)


def level_name(level: str) -> str:
    """The short name of a level for messages: `topology.kubernetes.io/rack` -> `rack`."""
    return level.rsplit("/", 1)[-1]


def domain_key(node: str, labels: Mapping[str, str], level: str) -> str:
    """A node's domain name at one level, from its name and labels.

    The node level is keyed by the node's name (what a pod binds to), whatever its hostname
    label says. A node without a level's label is a domain of its own at that level: nothing
    says it shares that tier with anyone, so placement must not assume it does.
    """
    if level == LABEL_HOSTNAME:
        return node
    value = labels.get(level)
    return value if value is not None else _OWN_DOMAIN_PREFIX + node


def domain_path(node: str, labels: Mapping[str, str], levels: Sequence[str]) -> tuple[str, ...]:
    """A node's domain names from the outermost level inwards, ending with the node itself.

    Domains are identified by this path, so rack `r1` in zone `a` and rack `r1` in zone `b`
    are different racks (label values are only unique under their parent, as in Kueue).
    """
    own = _OWN_DOMAIN_PREFIX + node  # inlined domain_key: this runs for every node
    return tuple(
        [node if level == LABEL_HOSTNAME else labels.get(level, own) for level in reversed(levels)]
    )


@dataclass(eq=False, slots=True)
class Domain:
    """A subtree of the topology: the whole cluster, a zone, a rack, ... or one node.

    `depth` counts from the root (0, the cluster) to the nodes (len(levels)); `path` is the
    domain's identity, outermost name first. Children are sorted by name for determinism.
    """

    depth: int
    path: tuple[str, ...]
    level: str | None
    children: list[Domain] = field(default_factory=list)
    node: NodeInfo | None = None

    @property
    def name(self) -> str:
        """The domain's own name at its level; the cluster is `cluster`."""
        return self.path[-1] if self.path else "cluster"

    def nodes(self) -> Iterator[NodeInfo]:
        """Every node in the subtree, in tree order."""
        for domain in self.walk():
            if domain.node is not None:
                yield domain.node

    def walk(self) -> Iterator[Domain]:
        """This domain and all below it, parents before children, children in order."""
        stack = [self]
        while stack:
            domain = stack.pop()
            yield domain
            stack.extend(reversed(domain.children))


def build_tree(nodes: Sequence[NodeInfo], levels: Sequence[str]) -> Domain:
    """The topology tree of a snapshot: cluster -> outermost level -> ... -> nodes.

    `levels` are label keys innermost first and start with the node level.
    """
    if not levels or levels[0] != LABEL_HOSTNAME:
        raise ValueError(f"levels must start with {LABEL_HOSTNAME}, got {list(levels)}")
    outer_first = list(reversed(levels))
    root = Domain(depth=0, path=(), level=None)
    names = [node.name for node in nodes]
    if len(set(names)) != len(names):
        raise ValueError("a node appears twice in the snapshot")
    # In path order a domain's nodes come together: keep the open domains of the previous
    # node (one per depth) and open only those where this node's path differs. Paths end
    # with the node's unique name, so no two are equal.
    placed = sorted(
        ((domain_path(node.name, node.labels, levels), node) for node in nodes),
        key=lambda entry: entry[0],
    )
    open_domains = [root]
    depths = len(levels)  # every path has one name per level
    previous: tuple[object, ...] = (object(),) * depths  # shares nothing with the first path
    for path, node in placed:
        shared = 0
        while shared < depths and previous[shared] == path[shared]:
            shared += 1
        del open_domains[shared + 1 :]
        for depth in range(shared + 1, depths + 1):
            domain = Domain(depth=depth, path=path[:depth], level=outer_first[depth - 1])
            open_domains[-1].children.append(domain)
            open_domains.append(domain)
        open_domains[-1].node = node
        previous = path
    return root

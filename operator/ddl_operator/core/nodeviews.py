"""Free capacity per node as each job's scheduling constraints see it, kept current per change.

A pass reads every node's free GPUs, narrowed by its template's tolerations, nodeSelector and
required node affinity, and a claiming pass reads it again under the claim lock. Rebuilding
that view from the node facts and the ledger's totals costs O(nodes) each time: 10 ms a
read at 5,000 nodes on a slow core, twice per claim, while claims wait on one lock. Here a
view is built once per distinct set of constraints and then patched node by node as node
events and usage changes arrive, the way kube-scheduler updates its snapshot from its cache
instead of rebuilding it per pod. A read is then a copy of references.

Pure and not thread-safe: the cache calls it under its own lock.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ddl_operator.core.ledger import NodeFacts, node_info
from ddl_operator.core.topology import NodeInfo

# Distinct constraint sets kept (most recently read first out last); a cluster's jobs use a
# handful (GPU pool selectors, a toleration or two), and one more costs O(nodes) to build.
VIEW_LIMIT: Final = 32


@dataclass(frozen=True)
class Constraints:
    """What narrows the nodes one job's workers may use (its pod template's)."""

    tolerations: Sequence[Mapping[str, Any]] = ()
    node_selector: Mapping[str, str] | None = None
    node_terms: Sequence[Mapping[str, Any]] = ()

    def key(self) -> str:
        """Equal for constraints that allow the same nodes written the same way."""
        return json.dumps(
            [list(self.tolerations), self.node_selector or {}, list(self.node_terms)],
            sort_keys=True,
            default=str,
        )

    def info(self, facts: NodeFacts, used: int) -> NodeInfo:
        return node_info(facts, used, self.tolerations, self.node_selector, self.node_terms)


class NodeViews:
    """Views of every node for the constraint sets read lately, each in the order of the
    node facts it was built from (placement breaks ties by name, never by this order)."""

    def __init__(self, limit: int = VIEW_LIMIT) -> None:
        self.limit = limit
        self._views: OrderedDict[str, tuple[Constraints, dict[str, NodeInfo]]] = OrderedDict()
        self.builds = 0  # views built from scratch so far (a relist drops them all)

    def read(
        self, constraints: Constraints, facts: Mapping[str, NodeFacts], usage: Mapping[str, int]
    ) -> list[NodeInfo]:
        """Every node as a job with `constraints` sees it; `facts` and `usage` are the
        cache's own, which this view has followed since it was built."""
        key = constraints.key()
        held = self._views.get(key)
        if held is None:
            view = {name: constraints.info(f, usage.get(name, 0)) for name, f in facts.items()}
            held = self._views[key] = (constraints, view)
            self.builds += 1
            while len(self._views) > self.limit:
                self._views.popitem(last=False)
        else:
            self._views.move_to_end(key)
        return list(held[1].values())

    def node_changed(self, name: str, facts: NodeFacts | None, used: int) -> None:
        """A node was added, changed (labels, taints, readiness, allocatable) or deleted
        (`facts` None)."""
        for constraints, view in self._views.values():
            if facts is None:
                view.pop(name, None)
            else:
                view[name] = constraints.info(facts, used)

    def usage_changed(
        self, nodes: Iterable[str], facts: Mapping[str, NodeFacts], usage: Mapping[str, int]
    ) -> None:
        """GPUs in use moved on `nodes` (a pod bound, finished or was assumed elsewhere)."""
        for name in nodes:
            node = facts.get(name)
            if node is None:
                continue  # a pod on a node the node watch has not shown yet (or no longer)
            for constraints, view in self._views.values():
                view[name] = constraints.info(node, usage.get(name, 0))

    def clear(self) -> None:
        """Forget every view (after a node relist: rebuilding is simpler than diffing)."""
        self._views.clear()

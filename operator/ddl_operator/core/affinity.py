"""Required node affinity as kube-scheduler reads it: terms ORed, requirements ANDed.

Pure, on plain JSON from the user's template or a pod: what is not shaped like terms reads
as none, and a malformed requirement holds for no node.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def requires(term: Mapping[str, Any]) -> bool:
    """Whether a term requires anything: an empty one matches no node (and takes no
    additions on a gated pod)."""
    return bool(term.get("matchExpressions") or term.get("matchFields"))


def required_terms(spec: Mapping[str, Any]) -> tuple[Mapping[str, Any], ...]:
    """A pod spec's required node-affinity terms (ORed; a pin is ANDed into each). The
    template is the user's: what is not shaped like terms reads as none."""
    found: Any = spec
    for key in ("affinity", "nodeAffinity", "requiredDuringSchedulingIgnoredDuringExecution"):
        found = found.get(key) if isinstance(found, Mapping) else None
    terms = found.get("nodeSelectorTerms") if isinstance(found, Mapping) else None
    return tuple(t for t in terms if isinstance(t, Mapping)) if isinstance(terms, list) else ()


def affinity_allows(
    name: str, labels: Mapping[str, str], terms: Sequence[Mapping[str, Any]]
) -> bool:
    """Whether a node matches a pod's required node-affinity terms, as kube-scheduler reads
    them: any term (ORed) whose every expression on labels and field (metadata.name) holds
    (ANDed); an empty term matches no node; no terms, every node."""
    if not terms:
        return True
    fields = {"metadata.name": name}
    return any(
        requires(term)
        and all(_holds(e, labels) for e in term.get("matchExpressions") or [])
        and all(_holds(e, fields) for e in term.get("matchFields") or [])
        for term in terms
    )


def _holds(requirement: object, values: Mapping[str, str]) -> bool:
    """One node selector requirement (In, NotIn, Exists, DoesNotExist, Gt, Lt); a malformed
    one (the template is the user's) holds for no node, as the API server would refuse it."""
    if not isinstance(requirement, Mapping):
        return False
    key, op = requirement.get("key"), requirement.get("operator")
    wanted = [str(v) for v in requirement.get("values") or []]
    present = isinstance(key, str) and key in values
    value = values.get(key, "") if isinstance(key, str) else ""
    if op == "In":
        return present and value in wanted
    if op == "NotIn":
        return not present or value not in wanted
    if op == "Exists":
        return present
    if op == "DoesNotExist":
        return not present
    if op in ("Gt", "Lt") and present and len(wanted) == 1:
        try:
            have, bound = int(value), int(wanted[0])
        except ValueError:
            return False
        return have > bound if op == "Gt" else have < bound
    return False

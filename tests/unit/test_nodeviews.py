"""Node views patched per change read the same as views rebuilt from scratch."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ddl_operator.core.ledger import Ledger, NodeFacts, PodCharge, Taint, free_nodes
from ddl_operator.core.nodeviews import Constraints, NodeViews

NODES = [f"n{i}" for i in range(6)]
CONSTRAINTS = [
    Constraints(),
    Constraints(node_selector={"pool": "a"}),
    Constraints(tolerations=({"key": "gpu", "operator": "Exists"},)),
    Constraints(
        node_terms=({"matchExpressions": [{"key": "pool", "operator": "NotIn", "values": ["b"]}]},)
    ),
]

node_facts = st.builds(
    NodeFacts,
    name=st.sampled_from(NODES),
    labels=st.fixed_dictionaries({"pool": st.sampled_from(["a", "b"])}),
    allocatable=st.integers(0, 8),
    ready=st.booleans(),
    unschedulable=st.booleans(),
    taints=st.sampled_from([(), (Taint("gpu", "", "NoSchedule"),)]),
)
pods = st.sampled_from([("ml", f"p{i}") for i in range(5)])
ops = st.one_of(
    st.tuples(st.just("node"), node_facts),
    st.tuples(st.just("drop-node"), st.sampled_from(NODES)),
    st.tuples(st.just("observe"), pods, st.sampled_from(NODES), st.integers(0, 8)),
    st.tuples(st.just("delete"), pods),
    st.tuples(st.just("assume"), pods, st.sampled_from(NODES), st.integers(1, 8)),
    st.tuples(st.just("forget"), pods),
    st.tuples(
        st.just("expire"),
    ),
    st.tuples(st.just("read"), st.integers(0, len(CONSTRAINTS) - 1)),
    st.tuples(
        st.just("relist-nodes"),
    ),
)


def apply(
    op: tuple[Any, ...], facts: dict[str, NodeFacts], ledger: Ledger, views: NodeViews
) -> None:
    """One cache step, the way cache.py drives the ledger and the views."""
    kind = op[0]
    if kind == "node":
        new: NodeFacts = op[1]
        if facts.get(new.name) != new:
            facts[new.name] = new
            views.node_changed(new.name, new, ledger.used(new.name))
    elif kind == "drop-node":
        if facts.pop(op[1], None) is not None:
            views.node_changed(op[1], None, ledger.used(op[1]))
    elif kind == "relist-nodes":
        views.clear()
    else:
        if kind == "observe":
            charge = PodCharge(op[2], op[3], "u") if op[3] else None
            change = ledger.observe(op[1], charge)
        elif kind == "delete":
            change = ledger.delete(op[1], "u")
        elif kind == "assume":
            change = ledger.assume(op[1], PodCharge(op[2], op[3], "u2"), now=0.0, ttl=1.0)
        elif kind == "forget":
            change = ledger.forget(op[1])
        elif kind == "expire":
            change = ledger.expire(now=5.0)
        else:
            views.read(CONSTRAINTS[op[1]], facts, ledger.totals)
            return
        views.usage_changed(change.freed | change.taken, facts, ledger.totals)


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=40))
def test_patched_views_equal_rebuilt_ones(steps: list[tuple[Any, ...]]) -> None:
    facts = {name: NodeFacts(name, {"pool": "a"}, 8, True) for name in NODES[:4]}
    # Every set is read after every step, so each view is built once (and after a relist)
    # and patched from then on: what is checked is the patching.
    ledger, views = Ledger(), NodeViews(limit=len(CONSTRAINTS))
    for step in steps:
        apply(step, facts, ledger, views)
        for constraints in CONSTRAINTS:
            expected = free_nodes(
                facts.values(),
                ledger.usage(),
                constraints.tolerations,
                constraints.node_selector,
                constraints.node_terms,
            )
            assert views.read(constraints, facts, ledger.totals) == expected


def test_a_view_is_built_once_per_constraint_set_and_then_patched() -> None:
    facts = {name: NodeFacts(name, {"pool": "a"}, 8, True) for name in NODES}
    ledger, views = Ledger(), NodeViews()
    views.read(Constraints(node_selector={"pool": "a"}), facts, ledger.totals)
    change = ledger.observe(("ml", "p"), PodCharge("n1", 8, "u"))
    views.usage_changed(change.freed | change.taken, facts, ledger.totals)
    same = Constraints(node_selector={"pool": "a"})  # an equal set, another object
    assert {n.name: n.free for n in views.read(same, facts, ledger.totals)}["n1"] == 0
    assert views.builds == 1
    views.clear()
    views.read(same, facts, ledger.totals)
    assert views.builds == 2


def test_the_least_recently_read_view_goes_first() -> None:
    facts = {name: NodeFacts(name, {"pool": "a"}, 8, True) for name in NODES}
    ledger, views = Ledger(), NodeViews(limit=2)
    first, second, third = CONSTRAINTS[:3]
    for constraints in (first, second, first, third):  # `second` is the oldest read now
        views.read(constraints, facts, ledger.totals)
    assert views.builds == 3
    views.read(first, facts, ledger.totals)
    assert views.builds == 3
    views.read(second, facts, ledger.totals)
    assert views.builds == 4

"""Tests of the topology tree that placement walks: node capacity, domain identity, nesting."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddl_operator.api.constants import (
    DEFAULT_TOPOLOGY_LEVELS,
    LABEL_HOSTNAME,
    LABEL_NVLINK_DOMAIN,
    LABEL_RACK,
    LABEL_ZONE,
)
from ddl_operator.core.topology import (
    NodeInfo,
    build_tree,
    domain_key,
    domain_path,
    level_name,
)

LEVELS = (LABEL_HOSTNAME, LABEL_RACK, LABEL_ZONE)


def node(name: str, zone: str | None = None, rack: str | None = None, **kw: bool) -> NodeInfo:
    labels = {LABEL_HOSTNAME: name}
    if zone is not None:
        labels[LABEL_ZONE] = zone
    if rack is not None:
        labels[LABEL_RACK] = rack
    return NodeInfo(name=name, labels=labels, allocatable=8, used=2, **kw)


@pytest.mark.parametrize(
    ("ready", "schedulable", "allocatable", "used", "free"),
    [
        (True, True, 8, 2, 6),
        (False, True, 8, 2, 0),
        (True, False, 8, 2, 0),
        (True, True, 8, 9, 0),  # over-used (e.g. allocatable shrank): no room, not negative
    ],
)
def test_free_counts_only_ready_schedulable_room(
    ready: bool, schedulable: bool, allocatable: int, used: int, free: int
) -> None:
    info = NodeInfo("n", {}, allocatable, used, ready=ready, schedulable=schedulable)
    assert info.free == free
    assert info.usable == (ready and schedulable)


def test_level_name_is_the_last_segment() -> None:
    assert level_name(LABEL_RACK) == "rack"
    assert level_name(LABEL_NVLINK_DOMAIN) == "nvlink-domain"
    assert level_name("plain") == "plain"


def test_node_level_is_the_node_name_even_if_the_hostname_label_differs() -> None:
    assert domain_key("node-a", {LABEL_HOSTNAME: "host-a"}, LABEL_HOSTNAME) == "node-a"


def test_missing_label_makes_the_node_its_own_domain() -> None:
    a = domain_key("a", {}, LABEL_RACK)
    b = domain_key("b", {}, LABEL_RACK)
    assert a != b
    # No real label value can collide with it: label values cannot contain "/".
    assert "/" in a
    assert domain_key("a", {LABEL_RACK: "r1"}, LABEL_RACK) == "r1"


def test_domain_path_runs_outermost_first() -> None:
    path = domain_path("n1", {LABEL_ZONE: "z", LABEL_RACK: "r"}, LEVELS)
    assert path == ("z", "r", "n1")


def test_same_rack_name_in_two_zones_is_two_racks() -> None:
    tree = build_tree([node("a", "z1", "r1"), node("b", "z2", "r1")], LEVELS)
    racks = [d for d in tree.walk() if d.level == LABEL_RACK]
    assert [r.path for r in racks] == [("z1", "r1"), ("z2", "r1")]


def test_tree_nests_levels_and_sorts_children_by_name() -> None:
    nodes = [
        node("c", "z2", "r1"),
        node("a", "z1", "r2"),
        node("b", "z1", "r1"),
        node("d", "z1", "r1"),
    ]
    tree = build_tree(nodes, LEVELS)
    assert tree.depth == 0 and tree.level is None and tree.name == "cluster"
    assert [z.name for z in tree.children] == ["z1", "z2"]
    zone1 = tree.children[0]
    assert [r.name for r in zone1.children] == ["r1", "r2"]
    assert [n.name for n in zone1.children[0].nodes()] == ["b", "d"]
    # Tree order visits a rack's nodes together, racks of a zone together.
    assert [n.name for n in tree.nodes()] == ["b", "d", "a", "c"]
    leaves = [d for d in tree.walk() if d.node is not None]
    assert all(leaf.depth == len(LEVELS) and leaf.level == LABEL_HOSTNAME for leaf in leaves)


def test_nodes_without_labels_sit_alone_under_the_cluster() -> None:
    tree = build_tree([node("a"), node("b")], DEFAULT_TOPOLOGY_LEVELS)
    assert len(tree.children) == 2
    for zone in tree.children:
        assert len(list(zone.nodes())) == 1


def test_duplicate_node_is_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        build_tree([node("a", "z1"), node("a", "z2")], LEVELS)


def test_levels_must_start_with_the_node_level() -> None:
    with pytest.raises(ValueError, match=LABEL_HOSTNAME):
        build_tree([node("a")], (LABEL_RACK, LABEL_HOSTNAME))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([None, "a", "b"]),
            st.sampled_from([None, "r1", "r2", "r3"]),
        ),
        max_size=30,
    )
)
def test_every_node_sits_once_under_its_own_path_in_one_sorted_tree(
    labels: list[tuple[str | None, str | None]],
) -> None:
    nodes = [node(f"n{i}", zone, rack) for i, (zone, rack) in enumerate(labels)]
    root = build_tree(nodes, LEVELS)
    domains = list(root.walk())
    assert len({d.path for d in domains}) == len(domains), "a domain appears twice"
    for domain in domains:
        assert [c.path for c in domain.children] == sorted(c.path for c in domain.children)
        assert all(
            c.path[:-1] == domain.path and c.depth == domain.depth + 1 for c in domain.children
        )
        assert (domain.node is not None) == (domain.depth == len(LEVELS))
    leaves = {d.node.name: d.path for d in domains if d.node is not None}
    assert leaves == {n.name: domain_path(n.name, n.labels, LEVELS) for n in nodes}

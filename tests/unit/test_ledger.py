"""The cache's pure accounting: pod charges, node facts, assumed reservations, relists."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddl_operator.api import constants as c
from ddl_operator.core.ledger import (
    Change,
    Ledger,
    NodeFacts,
    PodCharge,
    Taint,
    node_facts,
    node_info,
    pod_charge,
    tolerated,
    worker_job,
)

from fakeapi import make_node, make_pod

# -- what a pod holds -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pod", "expected"),
    [
        (make_pod(node="n1"), PodCharge("n1", 8, "u1")),
        (make_pod(node="n1", gpus=None), None),
        (make_pod(), None),  # pending, nowhere yet
        (make_pod(node="n1", gpus=2, init_gpus=4), PodCharge("n1", 4, "u1")),
        # Our worker, placed but not bound: reserved where placement put it.
        (
            make_pod(worker_of="train", reserved_on="n2"),
            PodCharge("n2", 8, "u1", ("ml", "train")),
        ),
        (
            make_pod(worker_of="train", reserved_on="n2", node="n3"),
            PodCharge("n3", 8, "u1", ("ml", "train")),
        ),
        # A stranger's copy of our annotation reserves nothing.
        (make_pod(reserved_on="n2"), None),
    ],
)
def test_pod_charge(pod: dict[str, Any], expected: PodCharge | None) -> None:
    assert pod_charge(pod) == expected


def test_worker_job_reads_labels_even_without_gpus() -> None:
    assert worker_job(make_pod(worker_of="cpu-job", gpus=None)) == ("ml", "cpu-job")
    assert worker_job(make_pod()) is None


# -- what a node offers -----------------------------------------------------------------------


def test_node_facts_keep_what_placement_reads() -> None:
    taint = {"key": "gpu", "value": "a100", "effect": "NoSchedule"}
    facts = node_facts(make_node("n1", gpus="8", taints=[taint], zone="z1"))
    assert facts == NodeFacts(
        name="n1",
        labels={c.LABEL_HOSTNAME: "n1", "zone": "z1"},
        allocatable=8,
        ready=True,
        unschedulable=False,
        taints=(Taint("gpu", "a100", "NoSchedule"),),
    )
    assert not node_facts(make_node(ready="Unknown")).ready
    assert node_facts(make_node(gpus="garbage")).allocatable == 0
    assert node_facts({"metadata": {"name": "bare"}}).allocatable == 0


def test_heartbeats_do_not_change_the_facts() -> None:
    node = make_node()
    beat = make_node()
    beat["status"]["conditions"][1]["lastHeartbeatTime"] = "2026-01-01T00:00:00Z"
    assert node_facts(node) == node_facts(beat)


NO_SCHEDULE = Taint("gpu", "a100", "NoSchedule")


@pytest.mark.parametrize(
    ("taint", "tolerations", "expected"),
    [
        (NO_SCHEDULE, [], False),
        (Taint("gpu", "a100", "PreferNoSchedule"), [], True),
        (NO_SCHEDULE, [{"key": "gpu", "operator": "Exists"}], True),
        (NO_SCHEDULE, [{"operator": "Exists"}], True),
        (NO_SCHEDULE, [{"key": "gpu", "value": "a100"}], True),
        (NO_SCHEDULE, [{"key": "gpu", "value": "h100"}], False),
        (NO_SCHEDULE, [{"key": "gpu", "operator": "Exists", "effect": "NoExecute"}], False),
        (NO_SCHEDULE, [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}], True),
    ],
)
def test_tolerations(taint: Taint, tolerations: list[dict[str, str]], expected: bool) -> None:
    assert tolerated(taint, tolerations) is expected


def test_node_info_applies_selector_taints_and_cordon() -> None:
    facts = node_facts(make_node(zone="z1"))
    assert node_info(facts, used=3).free == 5
    assert node_info(facts, used=3, node_selector={"zone": "z1"}).free == 5
    assert node_info(facts, used=3, node_selector={"zone": "z2"}).free == 0
    tainted = node_facts(make_node(taints=[{"key": "k", "effect": "NoSchedule"}]))
    assert node_info(tainted, used=0).free == 0
    assert node_info(tainted, used=0, tolerations=[{"operator": "Exists"}]).free == 8
    assert node_info(node_facts(make_node(unschedulable=True)), used=0).free == 0


# -- the ledger -------------------------------------------------------------------------------

A = ("ml", "a")
B = ("ml", "b")
TRAIN = ("ml", "train")


def test_observed_pods_add_up_and_leave() -> None:
    ledger = Ledger()
    ledger.observe(A, PodCharge("n1", 8, "ua"))
    ledger.observe(B, PodCharge("n1", 2, "ub"))
    assert ledger.usage() == {"n1": 10}
    assert ledger.delete(A, "ua") == Change(freed=frozenset({"n1"}))
    assert ledger.usage() == {"n1": 2}
    assert ledger.observe(B, None) == Change(freed=frozenset({"n1"}))
    assert ledger.usage() == {} and len(ledger) == 0


def test_foreign_counts_only_pods_that_are_not_our_workers() -> None:
    ledger = Ledger()
    ledger.observe(A, PodCharge("n1", 8, "ua", TRAIN))
    ledger.observe(B, PodCharge("n1", 2, "ub"))
    assert ledger.usage() == {"n1": 10} and ledger.foreign() == {"n1": 2}
    ledger.observe(B, PodCharge("n2", 4, "ub"))  # moved: counted on its new node only
    assert ledger.foreign() == {"n2": 4}
    ledger.delete(B, "ub")
    assert ledger.foreign() == {} and ledger.usage() == {"n1": 8}


def test_an_assumption_counts_at_once_and_the_event_confirms_it() -> None:
    ledger = Ledger()
    charge = PodCharge("n1", 8, "ua", TRAIN)
    assert ledger.assume(A, charge, now=0) == Change(taken=frozenset({"n1"}))
    assert ledger.used("n1") == 8 and ledger.jobs_on("n1") == {TRAIN}
    # The creation event (gated, nowhere) arrives after the assumption: it still holds.
    ledger.observe(A, None)
    assert ledger.used("n1") == 8
    # The patch's event: same pod, same node. Confirmed, and counted once.
    assert ledger.observe(A, charge) == Change()
    assert ledger.assumed() == {} and ledger.used("n1") == 8
    # Expiry no longer applies to it.
    ledger.expire(now=1e9)
    assert ledger.used("n1") == 8


def test_an_event_that_came_first_leaves_nothing_to_assume() -> None:
    ledger = Ledger()
    charge = PodCharge("n1", 8, "ua", TRAIN)
    ledger.observe(A, charge)
    assert ledger.assume(A, charge, now=0) == Change()
    assert ledger.assumed() == {} and ledger.used("n1") == 8


def test_the_old_incarnations_deletion_keeps_the_new_ones_reservation() -> None:
    ledger = Ledger()
    ledger.observe(A, PodCharge("n1", 8, "old", TRAIN))
    ledger.assume(A, PodCharge("n2", 8, "new", TRAIN), now=0)
    ledger.delete(A, "old")
    assert ledger.usage() == {"n2": 8}
    ledger.delete(A, "new")
    assert ledger.usage() == {}


def test_forget_and_expire_release_unconfirmed_reservations() -> None:
    ledger = Ledger()
    ledger.assume(A, PodCharge("n1", 8, "ua"), now=0, ttl=10)
    ledger.assume(B, PodCharge("n1", 4, "ub"), now=5, ttl=10)
    assert ledger.forget(A) == Change(freed=frozenset({"n1"}))
    assert ledger.forget(A) == Change()
    assert ledger.expire(now=14) == Change()
    assert ledger.expire(now=15) == Change(freed=frozenset({"n1"}))
    assert ledger.usage() == {}


def test_assumption_overrides_what_was_observed_until_confirmed() -> None:
    ledger = Ledger()
    ledger.observe(A, PodCharge("n1", 8, "ua", TRAIN))
    ledger.assume(A, PodCharge("n2", 8, "ua", TRAIN), now=0)
    assert ledger.usage() == {"n2": 8}
    assert ledger.jobs_on("n1") == set() and ledger.jobs_on("n2") == {TRAIN}


def test_a_relist_replaces_what_was_observed_and_confirms_assumptions() -> None:
    ledger = Ledger()
    ledger.observe(A, PodCharge("n1", 8, "ua"))
    ledger.assume(B, PodCharge("n2", 8, "ub"), now=0)
    ledger.assume(("ml", "c"), PodCharge("n3", 8, "uc"), now=0)
    change = ledger.replace({B: PodCharge("n2", 8, "ub"), ("ml", "d"): PodCharge("n1", 1, "ud")})
    assert ledger.usage() == {"n1": 1, "n2": 8, "n3": 8}
    assert set(ledger.assumed()) == {("ml", "c")}
    assert change.freed == {"n1"}


# Operations on a few pods and nodes, in any order: the totals always equal a recount.
_keys = st.sampled_from([A, B, ("ml", "c")])
_charges = st.builds(
    PodCharge,
    node=st.sampled_from(["n1", "n2"]),
    gpus=st.integers(1, 8),
    uid=st.sampled_from(["u1", "u2"]),
    job=st.sampled_from([None, TRAIN]),
)
_ops = st.one_of(
    st.tuples(st.just("observe"), _keys, st.one_of(st.none(), _charges)),
    st.tuples(st.just("delete"), _keys, st.sampled_from(["u1", "u2", ""])),
    st.tuples(st.just("assume"), _keys, _charges),
    st.tuples(st.just("forget"), _keys, st.none()),
    st.tuples(st.just("expire"), _keys, st.floats(0, 100)),
    st.tuples(st.just("replace"), st.dictionaries(_keys, _charges), st.none()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_ops, max_size=30))
def test_totals_always_equal_a_recount(ops: list[tuple[Any, Any, Any]]) -> None:
    ledger = Ledger()
    clock = 0.0
    for op, key, arg in ops:
        clock += 1
        if op == "observe":
            ledger.observe(key, arg)
        elif op == "delete":
            ledger.delete(key, arg)
        elif op == "assume":
            ledger.assume(key, arg, now=clock, ttl=20)
        elif op == "forget":
            ledger.forget(key)
        elif op == "expire":
            ledger.expire(now=arg)
        else:
            ledger.replace(key)
        effective = {**ledger.observed(), **{k: a.charge for k, a in ledger.assumed().items()}}
        recount: dict[str, int] = {}
        jobs: dict[str, set[tuple[str, str]]] = {}
        for charge in effective.values():
            recount[charge.node] = recount.get(charge.node, 0) + charge.gpus
            if charge.job:
                jobs.setdefault(charge.node, set()).add(charge.job)
        assert ledger.usage() == recount
        for node in ("n1", "n2"):
            assert ledger.jobs_on(node) == jobs.get(node, set())


def test_a_templates_required_node_affinity_narrows_where_its_workers_may_go() -> None:
    """As kube-scheduler reads it: terms ORed, expressions ANDed, an empty term matches no
    node; placement must not pin a worker to a node the scheduler will not bind it to."""
    facts = node_facts(make_node("n1", gpu="h100", gen="9"))
    gpu = {"key": "gpu", "operator": "In", "values": ["h100", "h200"]}
    spot = {"key": "spot", "operator": "Exists"}
    cases: list[tuple[list[dict[str, object]], bool]] = [
        ([], True),
        ([{"matchExpressions": [gpu]}], True),
        ([{"matchExpressions": [gpu, spot]}], False),
        ([{"matchExpressions": [spot]}, {"matchExpressions": [gpu]}], True),
        ([{"matchExpressions": [{"key": "gpu", "operator": "NotIn", "values": ["h100"]}]}], False),
        ([{"matchExpressions": [{"key": "spot", "operator": "DoesNotExist"}]}], True),
        ([{"matchExpressions": [{"key": "gen", "operator": "Gt", "values": ["8"]}]}], True),
        ([{"matchExpressions": [{"key": "gen", "operator": "Lt", "values": ["9"]}]}], False),
        ([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}], True),
        ([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n2"]}]}], False),
        ([{}], False),
        ([{"matchExpressions": ["not a requirement"]}], False),
    ]
    for terms, allowed in cases:
        assert (node_info(facts, used=0, node_terms=terms).free == 8) is allowed, terms

"""Property: whatever workers write in their reports and whatever a valid spec asks, a pass
never raises, and the status it returns is strict JSON with a documented phase."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any, get_args

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ddl_operator.api import constants as c
from ddl_operator.api.models import DDLJobStatus, Phase, Topology
from ddl_operator.core.topology import NodeInfo

from builders import Cluster, make_ddljob, rack_nodes

PHASES = set(get_args(Phase))
MAX_DIGITS = 400  # json.dumps cannot print integers past ~4300 digits; 400 overflow a float

numbers = st.one_of(
    st.integers(-3, 5),
    st.integers(min_value=-(10**MAX_DIGITS), max_value=10**MAX_DIGITS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 2.0**53, 1e308, 5e-324]),
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
KEYS = ["epoch", "state", "step", "throughput", "syncWaitRatio", "stepSeconds", "restarts"]
STATES = ["Waiting", "Running", "Succeeded", "Failed"]


def plausible(epoch: int) -> st.SearchStrategy[dict[str, Any]]:
    """What an agent writes: the current epoch (mostly) and values in range."""
    return st.fixed_dictionaries(
        {"epoch": st.just(epoch) | st.integers(0, epoch + 1), "state": st.sampled_from(STATES)},
        optional={
            "step": st.integers(0, 2**53 - 1),
            "throughput": st.floats(0, 1e15),
            "syncWaitRatio": st.floats(0, 1),
            "stepSeconds": st.floats(0, 1e6),
            "restarts": st.integers(0, 10),
            "message": st.text(max_size=50),
        },
    )


extreme = st.sampled_from(
    [float("nan"), float("inf"), -float("inf"), 10**MAX_DIGITS, -1, 2**53, 1e308, 5e-324, "1", True]
)


def one_bad_field(epoch: int) -> st.SearchStrategy[dict[str, Any]]:
    """A plausible report with one field replaced: by an extreme number, or by anything."""
    return st.tuples(
        plausible(epoch), st.sampled_from([*KEYS, "message"]), extreme | numbers | json_values
    ).map(lambda t: {**t[0], t[1]: t[2]})


def reports(epoch: int) -> st.SearchStrategy[str]:
    """A report annotation's value: mostly near-misses of a real report, then any text."""
    near_miss = one_bad_field(epoch).map(json.dumps)  # json.dumps writes NaN as a bare word
    return st.one_of(
        plausible(epoch).map(json.dumps),
        near_miss,
        near_miss,
        near_miss,
        st.dictionaries(st.sampled_from(KEYS), json_values).map(json.dumps),
        json_values.map(json.dumps),
        st.text(any_chars, max_size=200),
        st.binary(max_size=200).map(lambda raw: raw.decode("latin-1")),
        st.integers(1, 6000).map(lambda depth: "[" * depth + "]" * depth),
        st.integers(1, 6000).map(lambda depth: '{"a":' * depth),
        st.just(json.dumps({"epoch": epoch, "state": "Failed", "message": "x" * 100_000})),
    )


def progress_near_miss(epoch: int) -> st.SearchStrategy[str]:
    """A report at the current epoch whose progress numbers (what reaches the status) are
    extreme: NaN, infinities, overflowing integers, out of range."""
    progress = st.sampled_from(["step", "throughput", "syncWaitRatio", "stepSeconds"])
    return st.tuples(
        plausible(epoch), st.dictionaries(progress, extreme | numbers, min_size=1)
    ).map(lambda t: json.dumps({**t[0], "epoch": epoch, **t[1]}))


any_chars = st.characters(codec=None, exclude_categories=())

LEVELS = [c.LABEL_NVLINK_DOMAIN, c.LABEL_RACK, c.LABEL_ZONE]
prefixed = st.sampled_from(
    [
        c.LABEL_JOB,
        c.LABEL_RANK,
        c.ANNOTATION_REPORT,
        "ddl-operator.dev/node",
        "x.ddl-operator.dev/y",
    ]
)
template_keys = st.dictionaries(prefixed | st.sampled_from(["app", "team"]), st.text(max_size=30))


@st.composite
def specs(draw: st.DrawFn) -> dict[str, Any]:
    """A DDLJob the API server accepts (OpenAPI schema and CEL rules of the CRD)."""
    replicas = draw(st.integers(1, 5))
    spec: dict[str, Any] = {}
    if draw(st.booleans()):
        low = draw(st.integers(1, replicas))
        spec["elastic"] = {
            "minReplicas": low,
            "maxReplicas": draw(st.integers(replicas, 8)),
            "waitForCapacitySeconds": draw(st.sampled_from([0, 5, 60, 1800])),
        }
    levels = [c.LABEL_HOSTNAME, *draw(st.lists(st.sampled_from(LEVELS), unique=True))]
    spec["topology"] = {"levels": levels}
    if draw(st.booleans()):
        spec["topology"]["required"] = draw(st.sampled_from(levels))
    spec["failurePolicy"] = {
        "maxRestarts": draw(st.integers(0, 4)),
        "backoffSeconds": draw(st.sampled_from([0, 3, 30])),
        "nonRetryableExitCodes": draw(st.lists(st.integers(0, 255), max_size=3, unique=True)),
    }
    manifest = make_ddljob(replicas=replicas, gpus=draw(st.sampled_from([0, 1, 4, 8])), **spec)
    manifest["spec"]["template"]["metadata"] = {
        "labels": draw(template_keys),
        "annotations": draw(template_keys),
    }
    return manifest


@st.composite
def clusters(draw: st.DrawFn) -> list[NodeInfo]:
    nodes = []
    for index in range(draw(st.integers(1, 8))):
        labels = {c.LABEL_HOSTNAME: f"n{index}"}
        for level in LEVELS:
            if draw(st.booleans()):
                labels[level] = f"{level.rsplit('/', 1)[-1]}-{draw(st.integers(0, 2))}"
        nodes.append(
            NodeInfo(
                name=f"n{index}",
                labels=labels,
                allocatable=draw(st.sampled_from([0, 4, 16, 16, 32, 32])),
                used=draw(st.sampled_from([0, 0, 0, 4])),
                ready=draw(st.sampled_from([True, True, True, False])),
                schedulable=draw(st.sampled_from([True, True, True, False])),
            )
        )
    return nodes


actions = st.one_of(
    st.tuples(st.just("report-all"), st.integers(0, 9), st.none()),
    st.tuples(st.just("exit"), st.integers(0, 9), st.sampled_from([0, 1, 42, 137])),
    st.tuples(st.just("delete"), st.integers(0, 9), st.none()),
    st.tuples(st.just("node"), st.integers(0, 9), st.sampled_from(["down", "up", "gone"])),
    st.tuples(st.just("relabel"), st.integers(0, 9), st.sampled_from(LEVELS)),
    st.tuples(st.just("scale"), st.integers(1, 8), st.none()),
    st.tuples(st.just("require"), st.integers(0, 3), st.none()),
    st.tuples(st.just("require"), st.integers(0, 3), st.none()),
    st.tuples(st.just("tick"), st.sampled_from([1, 10, 100, 4000]), st.none()),
)


def _act(cl: Cluster, action: tuple[str, int, Any], data: st.DataObject) -> None:
    kind, index, arg = action
    pods = sorted(cl.pods)
    if kind == "report-all":
        raw = data.draw(reports(cl.job.status.epoch))
        cl.pods = {name: replace(pod, report=raw) for name, pod in cl.pods.items()}
    elif kind in ("exit", "delete") and pods:
        name = pods[index % len(pods)]
        pod = cl.pods[name]
        if kind == "exit":
            phase = "Succeeded" if arg == 0 else "Failed"
            cl.pods[name] = replace(pod, phase=phase, exit_code=arg)
        else:
            cl.pods[name] = replace(pod, deleting=True)
    elif kind == "node" and cl.base_nodes:
        node = cl.base_nodes[index % len(cl.base_nodes)]
        if arg == "gone":
            cl.base_nodes = [n for n in cl.base_nodes if n is not node]
        else:
            cl.base_nodes = [
                replace(n, ready=arg == "up") if n is node else n for n in cl.base_nodes
            ]
    elif kind == "relabel" and cl.base_nodes:
        node = cl.base_nodes[index % len(cl.base_nodes)]
        labels = {**node.labels, arg: f"moved-{index}"}
        cl.base_nodes = [replace(n, labels=labels) if n is node else n for n in cl.base_nodes]
    elif kind == "scale":
        spec = cl.job.spec
        replicas = min(max(index, spec.min_replicas), spec.max_replicas)
        cl.job = cl.job.model_copy(update={"spec": spec.model_copy(update={"replicas": replicas})})
    elif kind == "require":
        topology = cl.job.spec.topology
        levels = topology.levels
        required = levels[index] if index < len(levels) else None
        spec = cl.job.spec.model_copy(
            update={"topology": Topology(levels=list(levels), required=required)}
        )
        cl.job = cl.job.model_copy(update={"spec": spec})
    elif kind == "tick":
        cl.now += dt.timedelta(seconds=index)


Reports = Callable[[int], st.SearchStrategy[str]]


def _report(cl: Cluster, data: st.DataObject, strategy: Reports = reports) -> None:
    """Some workers write a new report: members first, in rank order (rank 0 matters most)."""
    names = [*cl.members(), *sorted(set(cl.pods) - set(cl.members()))]
    names = [name for name in names if name in cl.pods]
    for name in names[: data.draw(st.integers(0, len(names)))]:
        raw = data.draw(strategy(cl.job.status.epoch))
        cl.pods[name] = replace(cl.pods[name], report=raw)


def _check(status: DDLJobStatus) -> None:
    wire = json.dumps(
        status.model_dump(by_alias=True, exclude_none=True, mode="json"), allow_nan=False
    )
    again = DDLJobStatus.model_validate_json(wire)
    assert again.phase in PHASES
    assert again.ready_replicas >= 0 and again.restarts >= 0
    assert again.step < 2**63, "the API server stores int64"
    event(f"phase {again.phase}")
    for condition in again.conditions:
        if condition.status == "True" and condition.type in ("ReportRejected", "DomainSplit"):
            event(condition.type)
    if again.restarts:
        event("restarted")


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(manifest=specs(), nodes=clusters(), script=st.lists(actions, max_size=10), data=st.data())
def test_no_report_or_valid_spec_breaks_a_pass(
    manifest: dict[str, Any],
    nodes: list[NodeInfo],
    script: list[tuple[str, int, Any]],
    data: st.DataObject,
) -> None:
    cl = Cluster(manifest, nodes)
    _check(cl.settle(passes=3).status)
    for action in script:
        _act(cl, action, data)
        _report(cl, data)
        _check(cl.step().status)
        cl.run_bound()
        _check(cl.step().status)


def _steps(cl: Cluster, data: st.DataObject, passes: int, strategy: Reports = reports) -> None:
    for _ in range(passes):
        _report(cl, data, strategy)
        _check(cl.step().status)
        cl.run_bound()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    replicas=st.integers(2, 4),
    gpus=st.sampled_from([0, 4, 8]),
    policy=st.fixed_dictionaries(
        {"maxRestarts": st.integers(0, 3), "backoffSeconds": st.sampled_from([0, 30])}
    ),
    data=st.data(),
)
def test_reports_on_a_running_job_never_break_a_pass(
    replicas: int, gpus: int, policy: dict[str, int], data: st.DataObject
) -> None:
    """A job that trains, whose members (rank 0 first) keep writing anything at all."""
    manifest = make_ddljob(
        replicas=replicas, min_replicas=1, max_replicas=4, gpus=gpus, failurePolicy=policy
    )
    cl = Cluster(manifest, rack_nodes(racks=2, per_rack=2, gpus=16))
    cl.settle(passes=3)
    assert cl.job.status.phase == "Running"
    _steps(cl, data, passes=8, strategy=lambda epoch: progress_near_miss(epoch) | reports(epoch))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    nodes=clusters(),
    replicas=st.integers(2, 5),
    level=st.sampled_from([c.LABEL_HOSTNAME, *LEVELS]),
    moves=st.lists(st.tuples(st.integers(0, 9), st.sampled_from(LEVELS)), max_size=3),
    losses=st.lists(st.integers(0, 9), min_size=1, max_size=3),
    data=st.data(),
)
def test_a_required_level_set_late_never_breaks_a_pass(
    nodes: list[NodeInfo],
    replicas: int,
    level: str,
    moves: list[tuple[int, str]],
    losses: list[int],
    data: st.DataObject,
) -> None:
    """Workers placed freely, then `required` set and nodes relabelled; then members fail."""
    levels = [c.LABEL_HOSTNAME, *LEVELS]
    manifest = make_ddljob(
        replicas=replicas,
        min_replicas=1,
        max_replicas=5,
        gpus=8,
        topology={"levels": levels},
        failurePolicy={"backoffSeconds": 0},
    )
    cl = Cluster(manifest, nodes)
    cl.settle(passes=3)
    _act(cl, ("require", levels.index(level), None), data)
    for index, moved in moves:
        _act(cl, ("relabel", index, moved), data)
    for victim in losses:
        _act(cl, ("exit", victim, 1), data)
        _steps(cl, data, passes=3)

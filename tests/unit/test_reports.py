"""Worker reports are untrusted: one strict parser, typed results, reasons in our words."""

from __future__ import annotations

import json

import pytest

from ddl_operator.core.reports import (
    MAX_MESSAGE_CHARS,
    MAX_REPORT_BYTES,
    Rejected,
    WorkerReport,
    parse_report,
)


def _report(**fields: object) -> str:
    return json.dumps({"epoch": 3, **fields})


def test_the_agents_own_report_reads_back_typed() -> None:
    raw = (
        '{"epoch":3,"state":"Running","step":1200,"throughput":512.125,'
        '"syncWaitRatio":0.1234,"stepSeconds":0.25,"restarts":2,"message":"training in epoch 3"}'
    )
    assert parse_report(raw) == WorkerReport(
        epoch=3,
        state="Running",
        step=1200,
        throughput=512.125,
        sync_wait_ratio=0.1234,
        step_seconds=0.25,
        restarts=2,
        message="training in epoch 3",
    )


def test_absent_fields_stay_unknown_and_unknown_keys_are_ignored() -> None:
    parsed = parse_report('{"epoch":1,"future":{"x":[1,2]}}')
    assert parsed == WorkerReport(epoch=1)
    assert isinstance(parsed, WorkerReport) and parsed.throughput is None


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "not JSON"),
        ("{", "not JSON"),
        ("\x00\xff", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('"epoch"', "not a JSON object"),
        ("NaN", "NaN is not a JSON number"),
        ('{"epoch": 1, "throughput": NaN}', "NaN is not a JSON number"),
        ('{"epoch": 1, "throughput": Infinity}', "Infinity is not a JSON number"),
        ('{"epoch": 1, "throughput": -Infinity}', "-Infinity is not a JSON number"),
        ('{"epoch": 1, "throughput": 1e999}', "out of range"),
        ('{"epoch": 1, "step": -1e400}', "out of range"),
        ('{"epoch": ' + "9" * 400 + "}", "out of range"),
        ('{"epoch": ' + "9" * 4000 + "}", "out of range"),
        ('{"epoch": 1, "epoch": 2}', "a key appears twice"),
        ("[" * 3000 + "]" * 3000, "larger than"),
        ("[" * 2000, "nests too deeply"),
        ("{}", "no epoch"),
        ('{"epoch": null}', "no epoch"),
        (_report(epoch=-1), "epoch must be an integer"),
        (_report(epoch=1.0), "epoch must be an integer"),
        (_report(epoch=True), "epoch must be an integer"),
        (_report(epoch="3"), "epoch must be an integer"),
        (_report(epoch=2**53), "epoch must be an integer"),
        (_report(step=2**53), "step must be an integer"),
        (_report(step=-5), "step must be an integer"),
        (_report(step=[1]), "step must be an integer"),
        (_report(throughput=-0.5), "throughput must be a number"),
        (_report(throughput="fast"), "throughput must be a number"),
        (_report(throughput=1e300), "throughput must be a number"),
        (_report(syncWaitRatio=1.5), "syncWaitRatio must be a number in [0, 1]"),
        (_report(syncWaitRatio=-0.1), "syncWaitRatio must be a number in [0, 1]"),
        (_report(stepSeconds=1e9), "stepSeconds must be a number"),
        (_report(restarts=10**7), "restarts must be an integer"),
        (_report(state="Exploded"), "state must be one of Waiting, Running, Succeeded, Failed"),
        (_report(state=1), "state must be one of"),
        (_report(message=5), "message must be a string"),
        ('{"epoch": 1, "message": "\\ud800"}', "not valid Unicode"),
        (_report(message="x" * MAX_REPORT_BYTES), f"larger than {MAX_REPORT_BYTES} bytes"),
        (_report(message="é" * (MAX_REPORT_BYTES // 2)), "larger than"),
    ],
)
def test_bad_reports_are_rejected_with_a_reason(raw: str, reason: str) -> None:
    parsed = parse_report(raw)
    assert isinstance(parsed, Rejected), parsed
    assert reason in parsed.reason
    assert "; " not in parsed.reason, "reasons are joined with '; ' in the condition"
    assert len(parsed.reason) < 120, "the reason never echoes the input"


def test_a_long_message_is_cut_not_refused() -> None:
    parsed = parse_report(_report(state="Failed", message="m" * (MAX_MESSAGE_CHARS + 500)))
    assert isinstance(parsed, WorkerReport) and parsed.state == "Failed"
    assert len(parsed.message) == MAX_MESSAGE_CHARS and parsed.message.endswith("…")


def test_bounds_are_inclusive() -> None:
    parsed = parse_report(_report(step=2**53 - 1, syncWaitRatio=1, throughput=0, restarts=0))
    assert isinstance(parsed, WorkerReport)
    assert (parsed.step, parsed.sync_wait_ratio, parsed.throughput) == (2**53 - 1, 1.0, 0.0)

"""Worker reports: the JSON an agent writes on its pod, parsed as the untrusted input it is.

Anyone who can patch a worker pod can write its report annotation, and a buggy agent can
write anything, so the operator never folds raw JSON into its decisions or its status. One
parser turns the annotation into a typed `WorkerReport`, or a `Rejected` that says why in
the operator's own words (never echoing the input). Accepted reports hold only finite
numbers inside documented ranges, so a status built from them is always strict JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

AgentState = Literal["Waiting", "Running", "Succeeded", "Failed"]
AGENT_STATES: Final[tuple[str, ...]] = get_args(AgentState)

MAX_REPORT_BYTES: Final = 4096
MAX_MESSAGE_CHARS: Final = 1024
# Integers beyond 2**53 do not survive a round trip through a JSON reader that uses doubles.
MAX_INTEGER: Final = 2**53 - 1
_MAX_DIGITS: Final = len(str(MAX_INTEGER))
MAX_RESTARTS: Final = 1_000_000
MAX_THROUGHPUT: Final = 1e15  # samples/s
MAX_STEP_SECONDS: Final = 1e6


@dataclass(frozen=True)
class WorkerReport:
    """A validated report. Optional fields are None when the agent did not send them."""

    epoch: int
    state: AgentState | None = None
    step: int | None = None
    throughput: float | None = None
    sync_wait_ratio: float | None = None
    step_seconds: float | None = None
    restarts: int | None = None
    message: str = ""


@dataclass(frozen=True)
class Rejected:
    """Why a report was ignored: one short sentence without "; " (conditions join them)."""

    reason: str


class _Invalid(ValueError):
    """Raised from inside the JSON decoder's hooks."""


def _no_constants(name: str) -> Any:
    raise _Invalid(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Invalid("a number is out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_DIGITS:
        raise _Invalid("a number is out of range")
    return int(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _Invalid("a key appears twice")
    return out


def _strict_json(raw: str) -> Any:
    return json.loads(
        raw,
        parse_constant=_no_constants,
        parse_float=_finite_float,
        parse_int=_bounded_int,
        object_pairs_hook=_unique_keys,
    )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _integer(fields: Mapping[str, Any], key: str, top: int) -> int | None:
    value = fields.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
        raise _Invalid(f"{key} must be an integer in [0, {top}]")
    return value


def _number(fields: Mapping[str, Any], key: str, top: float) -> float | None:
    value = fields.get(key)
    if value is None:
        return None
    if not _is_number(value) or not 0 <= value <= top:
        raise _Invalid(f"{key} must be a number in [0, {top:g}]")
    return float(value)


def _message(fields: Mapping[str, Any]) -> str:
    value = fields.get("message", "")
    if not isinstance(value, str):
        raise _Invalid("message must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid("message is not valid Unicode") from None
    # A long message is cut, not refused: the state it comes with (e.g. Failed) matters more.
    return value if len(value) <= MAX_MESSAGE_CHARS else value[: MAX_MESSAGE_CHARS - 1] + "…"


def _state(fields: Mapping[str, Any]) -> AgentState | None:
    value = fields.get("state")
    if value is None:
        return None
    if value == "Waiting":
        return "Waiting"
    if value == "Running":
        return "Running"
    if value == "Succeeded":
        return "Succeeded"
    if value == "Failed":
        return "Failed"
    raise _Invalid(f"state must be one of {', '.join(AGENT_STATES)}")


def parse_report(raw: str) -> WorkerReport | Rejected:
    """The report in an annotation's value, or why it is ignored. Never raises."""
    if len(raw) > MAX_REPORT_BYTES or len(raw.encode("utf-8", "surrogatepass")) > MAX_REPORT_BYTES:
        return Rejected(f"report is larger than {MAX_REPORT_BYTES} bytes")
    try:
        fields = _strict_json(raw)
    except _Invalid as error:
        return Rejected(f"report is not strict JSON: {error}")
    except RecursionError:
        return Rejected("report nests too deeply")
    except ValueError as error:  # json.JSONDecodeError, or int() of a long digit string
        where = f" at char {error.pos}" if isinstance(error, json.JSONDecodeError) else ""
        return Rejected(f"report is not JSON{where}")
    if not isinstance(fields, dict):
        return Rejected("report is not a JSON object")
    try:
        epoch = _integer(fields, "epoch", MAX_INTEGER)
        if epoch is None:
            return Rejected("report has no epoch")
        return WorkerReport(
            epoch=epoch,
            state=_state(fields),
            step=_integer(fields, "step", MAX_INTEGER),
            throughput=_number(fields, "throughput", MAX_THROUGHPUT),
            sync_wait_ratio=_number(fields, "syncWaitRatio", 1.0),
            step_seconds=_number(fields, "stepSeconds", MAX_STEP_SECONDS),
            restarts=_integer(fields, "restarts", MAX_RESTARTS),
            message=_message(fields),
        )
    except _Invalid as error:
        return Rejected(str(error))


__all__ = [
    "AGENT_STATES",
    "MAX_MESSAGE_CHARS",
    "MAX_REPORT_BYTES",
    "AgentState",
    "Rejected",
    "WorkerReport",
    "parse_report",
]

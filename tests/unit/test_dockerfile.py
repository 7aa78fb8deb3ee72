"""The Dockerfile, read as instructions: targets, pinned bases, non-root users, no torch in the
operator image, and ports and user that agree with the chart (no docker engine needed)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
CHART_VALUES = REPO / "charts" / "ddl-operator" / "values.yaml"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) with continuation lines joined and comments dropped."""
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip():
            logical.append(current.strip())
        current = ""
    out = []
    for entry in logical:
        keyword, _, rest = entry.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def parse(text: str) -> dict[str, Stage]:
    """Stages by name, with global ARG defaults substituted into FROM."""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, rest in instructions(text):
        if keyword == "ARG" and current is None:
            name, _, default = rest.partition("=")
            global_args[name] = default.strip('"')
        elif keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            assert match, f"cannot read FROM {rest}"
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], match.group(1))
            name = match.group(2) or f"stage{len(stages)}"
            current = stages[name] = Stage(name, base)
        else:
            assert current is not None, f"{keyword} before the first FROM"
            current.instructions.append((keyword, rest))
    return stages


STAGES = parse(DOCKERFILE.read_text())
TARGETS = ("operator", "worker")


def lineage(name: str) -> list[Stage]:
    """The stage, the stages it is built FROM, and the stages it copies files from."""
    seen: list[Stage] = []
    todo = [name]
    while todo:
        stage = STAGES[todo.pop()]
        if stage in seen:
            continue
        seen.append(stage)
        if stage.base in STAGES:
            todo.append(stage.base)
        for copy in stage.args("COPY"):
            match = re.search(r"--from=(\S+)", copy)
            if match and match.group(1) in STAGES:
                todo.append(match.group(1))
    return seen


def test_operator_and_worker_targets_exist() -> None:
    assert set(TARGETS) <= set(STAGES)


@pytest.mark.parametrize("stage", sorted(STAGES), ids=str)
def test_base_images_are_pinned(stage: str) -> None:
    base = STAGES[stage].base
    if base in STAGES:
        return
    if "@sha256:" in base:
        return
    image, _, tag = base.rpartition(":")
    assert image and "/" not in tag, f"{stage}: {base} has no tag"
    assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{stage}: {base} is not pinned"


def user_of(stage: Stage) -> str:
    users = stage.args("USER")
    assert users, f"stage {stage.name} sets no USER, so it runs as root"
    return users[-1]


@pytest.mark.parametrize("target", TARGETS)
def test_final_stages_run_as_non_root(target: str) -> None:
    user = user_of(STAGES[target]).split(":")[0]
    assert user not in {"root", "0", ""}
    # Kubernetes' runAsNonRoot can only verify a numeric user.
    assert user.isdigit()


def test_operator_user_is_the_charts_run_as_user() -> None:
    values = yaml.safe_load(CHART_VALUES.read_text())
    user, _, group = user_of(STAGES["operator"]).partition(":")
    assert int(user) == values["podSecurityContext"]["runAsUser"]
    assert int(group) == values["podSecurityContext"]["runAsGroup"]


def test_operator_image_has_no_torch() -> None:
    for stage in lineage("operator"):
        assert "pytorch" not in stage.base, f"{stage.name} builds on {stage.base}"
        for run in stage.args("RUN"):
            assert "torch" not in run and "[worker]" not in run, f"{stage.name}: {run}"
    runs = " ".join(run for stage in lineage("operator") for run in stage.args("RUN"))
    assert '".[operator]"' in runs


def test_worker_builds_the_extension_against_the_images_torch() -> None:
    stages = lineage("worker")
    runs = " ".join(run for stage in stages for run in stage.args("RUN"))
    assert "--no-build-isolation" in runs
    assert "[worker]" in runs
    assert any("pytorch/pytorch" in s.base and "cuda" in s.base for s in stages)
    assert any(
        kw == "COPY" and arg.startswith("native/") for s in stages for kw, arg in s.instructions
    )
    # The worker image carries the torch the project pins (Makefile) for the GPU check.
    makefile = (REPO / "Makefile").read_text()
    torch_pin = re.search(r"torch==([\d.]+)", makefile)
    assert torch_pin
    assert all(torch_pin.group(1) in s.base for s in stages if "pytorch/pytorch" in s.base)


def test_operator_ports_and_healthcheck_match_the_chart() -> None:
    values = yaml.safe_load(CHART_VALUES.read_text())
    operator = STAGES["operator"]
    exposed = {int(p) for arg in operator.args("EXPOSE") for p in arg.split()}
    assert exposed == {values["metrics"]["port"], values["health"]["port"]}
    (healthcheck,) = operator.args("HEALTHCHECK")
    assert f":{values['health']['port']}/healthz" in healthcheck
    (entrypoint,) = operator.args("ENTRYPOINT")
    assert entrypoint == '["ddl-operator"]'


def test_worker_exposes_the_metrics_port_the_operator_declares() -> None:
    from ddl_operator.core.render import METRICS_PORT

    assert STAGES["worker"].args("EXPOSE") == [str(METRICS_PORT)]


def test_dockerignore_keeps_the_build_context_small() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    ignored = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "build", "tests"} <= ignored
    # Everything the Dockerfile copies must survive .dockerignore.
    for stage in STAGES.values():
        for copy in stage.args("COPY"):
            if "--from=" in copy:
                continue
            sources = [s for s in copy.split() if not s.startswith("--")][:-1]
            for source in sources:
                assert source.rstrip("/") not in ignored, f"{source} is copied but ignored"

"""Tests of how the node agent turns a pod's container spec into an environment, argv, hosts."""

from __future__ import annotations

import base64
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from ddl_localcluster.nodeagent.containerspec import (
    ConfigError,
    base_env,
    container_argv,
    container_env,
    expand,
    field_value,
    hosts_file,
    pod_hostname,
    resolve_executable,
)

POD_IP, HOST_IP = "10.213.0.2", "10.213.0.1"


def make_pod(
    name: str = "job-w0",
    namespace: str = "team",
    uid: str = "0f0e-uid",
    node: str | None = "gpu-r0-n0",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "uid": uid}
    if labels is not None:
        metadata["labels"] = labels
    if annotations is not None:
        metadata["annotations"] = annotations
    body: dict[str, Any] = {"containers": [{"name": "main", "command": ["true"]}], **spec}
    if node is not None:
        body["nodeName"] = node
    return {"metadata": metadata, "spec": body}


def field(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def secret(data: dict[str, str]) -> dict[str, Any]:
    return {"data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


class FakeObjects:
    """ConfigMaps and Secrets by (resource, namespace, name); records what was looked up."""

    def __init__(self, objects: dict[tuple[str, str, str], dict[str, Any]] | None = None) -> None:
        self.objects = objects or {}
        self.asked: list[tuple[str, str, str]] = []

    def __call__(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.asked.append((resource, namespace, name))
        return self.objects.get((resource, namespace, name))


def env_of(
    env: list[dict[str, Any]], lookup: FakeObjects | None = None, **kw: Any
) -> dict[str, str]:
    pod = make_pod(**kw)
    container = {"name": "main", "command": ["true"], "env": env}
    return container_env(pod, container, POD_IP, HOST_IP, lookup or FakeObjects())


# -- $(VAR) expansion -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "env", "expanded"),
    [
        ("$(A)", {"A": "1"}, "1"),
        ("x-$(A)-y", {"A": "1"}, "x-1-y"),
        ("$(A)$(B)", {"A": "1", "B": "2"}, "12"),
        ("$(UNDEFINED)", {}, "$(UNDEFINED)"),  # undefined names stay as written
        ("a $(UNDEFINED) b $(A)", {"A": "1"}, "a $(UNDEFINED) b 1"),
        ("$$(A)", {"A": "1"}, "$(A)"),  # $$ escapes the reference
        ("$$$(A)", {"A": "1"}, "$1"),
        ("cost: $$5", {}, "cost: $5"),
        ("$$$$", {}, "$$"),
        ("$(A", {"A": "1"}, "$(A"),  # unterminated: literal
        ("$A ${A}", {"A": "1"}, "$A ${A}"),  # only $(...) is a reference
        ("$()", {}, "$()"),
        ("$(A)", {"A": "$(B)", "B": "2"}, "$(B)"),  # a value is not expanded again
        ("$(A)", {"A": ""}, ""),
        ("", {"A": "1"}, ""),
    ],
)
def test_expand_replaces_defined_references_and_unescapes_dollars(
    text: str, env: dict[str, str], expanded: str
) -> None:
    assert expand(text, env) == expanded


# -- downward API -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("metadata.name", "job-w0"),
        ("metadata.namespace", "team"),
        ("metadata.uid", "0f0e-uid"),
        ("spec.nodeName", "gpu-r0-n0"),
        ("spec.serviceAccountName", "trainer"),
        ("status.podIP", POD_IP),
        ("status.podIPs", POD_IP),
        ("status.hostIP", HOST_IP),
        ("status.hostIPs", HOST_IP),
        ("metadata.labels['app']", "trainer"),
        ("metadata.labels['ddl-operator.dev/rank']", "3"),
        ("metadata.labels['missing']", ""),
        ("metadata.annotations['note']", "hello"),
        ("metadata.annotations['missing']", ""),
    ],
)
def test_field_refs_resolve_like_a_kubelet(path: str, value: str) -> None:
    pod = make_pod(
        labels={"app": "trainer", "ddl-operator.dev/rank": "3"},
        annotations={"note": "hello"},
        serviceAccountName="trainer",
    )
    assert field_value(pod, path, POD_IP, HOST_IP) == value


def test_field_refs_of_a_pod_without_labels_node_or_account_have_defaults() -> None:
    pod = make_pod(node=None)
    assert field_value(pod, "metadata.labels['app']", POD_IP, HOST_IP) == ""
    assert field_value(pod, "spec.nodeName", POD_IP, HOST_IP) == ""
    assert field_value(pod, "spec.serviceAccountName", POD_IP, HOST_IP) == "default"


@pytest.mark.parametrize(
    "path",
    [
        "metadata.generateName",
        "metadata.labels",  # the whole map is not a string a kubelet hands over
        "metadata.labels['app'",
        "metadata.labels[app]",
        "status.phase",
        "spec.containers",
        "",
    ],
)
def test_unsupported_field_refs_fail_naming_the_path(path: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"fieldRef {path!r} is not supported")):
        field_value(make_pod(), path, POD_IP, HOST_IP)


# -- env --------------------------------------------------------------------------------------


def test_env_values_see_only_the_variables_defined_before_them() -> None:
    env = env_of(
        [
            {"name": "FIRST", "value": "one"},
            {"name": "BOTH", "value": "$(FIRST)+$(LATER)"},
            {"name": "LATER", "value": "two"},
            {"name": "EMPTY"},
        ]
    )
    assert env == {"FIRST": "one", "BOTH": "one+$(LATER)", "LATER": "two", "EMPTY": ""}


def test_env_field_refs_and_expansion_of_them() -> None:
    env = env_of(
        [
            field("POD_NAME", "metadata.name"),
            field("POD_IP", "status.podIP"),
            {"name": "ADDR", "value": "$(POD_NAME)@$(POD_IP) $$(POD_NAME)"},
        ]
    )
    assert env == {"POD_NAME": "job-w0", "POD_IP": POD_IP, "ADDR": f"job-w0@{POD_IP} $(POD_NAME)"}


def test_env_from_config_maps_and_secrets_with_prefix_then_env_overrides() -> None:
    lookup = FakeObjects(
        {
            ("configmaps", "team", "settings"): {"data": {"MODE": "fast", "LEVEL": "2"}},
            ("secrets", "team", "creds"): secret({"TOKEN": "s3cr3t"}),
        }
    )
    pod = make_pod()
    container = {
        "name": "main",
        "envFrom": [
            {"configMapRef": {"name": "settings"}},
            {"secretRef": {"name": "creds"}, "prefix": "APP_"},
        ],
        "env": [{"name": "LEVEL", "value": "$(LEVEL)0"}],
    }
    env = container_env(pod, container, POD_IP, HOST_IP, lookup)
    assert env == {"MODE": "fast", "LEVEL": "20", "APP_TOKEN": "s3cr3t"}
    assert lookup.asked == [("configmaps", "team", "settings"), ("secrets", "team", "creds")]


def test_env_key_refs_decode_secrets_and_read_config_maps() -> None:
    lookup = FakeObjects(
        {
            ("configmaps", "team", "settings"): {"data": {"mode": "fast"}},
            ("secrets", "team", "creds"): secret({"token": "s3cr3t"}),
        }
    )
    env = env_of(
        [
            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
        ],
        lookup,
    )
    assert env == {"MODE": "fast", "TOKEN": "s3cr3t"}


@pytest.mark.parametrize(
    ("var", "message"),
    [
        (
            {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "absent", "key": "k"}}},
            "configmap 'absent' not found",
        ),
        (
            {"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}},
            "secret 'absent' not found",
        ),
        (
            {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "nope"}}},
            "key 'nope' not in 'settings'",
        ),
        (
            {"name": "X", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
            "env X: only fieldRef, configMapKeyRef and secretKeyRef",
        ),
        (
            {"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "status.phase"}}},
            "fieldRef 'status.phase' is not supported",
        ),
    ],
)
def test_env_that_cannot_be_resolved_is_a_config_error(var: dict[str, Any], message: str) -> None:
    lookup = FakeObjects({("configmaps", "team", "settings"): {"data": {"mode": "fast"}}})
    with pytest.raises(ConfigError, match=message):
        env_of([var], lookup)


def test_optional_sources_and_keys_that_are_missing_are_left_out() -> None:
    lookup = FakeObjects({("configmaps", "team", "settings"): {"data": {"mode": "fast"}}})
    pod = make_pod()
    container = {
        "name": "main",
        "envFrom": [{"configMapRef": {"name": "absent", "optional": True}}],
        "env": [
            {
                "name": "A",
                "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k", "optional": True}},
            },
            {
                "name": "B",
                "valueFrom": {
                    "configMapKeyRef": {"name": "settings", "key": "nope", "optional": True}
                },
            },
        ],
    }
    assert container_env(pod, container, POD_IP, HOST_IP, lookup) == {}


def test_env_from_a_missing_required_source_fails() -> None:
    container = {"name": "main", "envFrom": [{"secretRef": {"name": "absent"}}]}
    with pytest.raises(ConfigError, match="secret 'absent' not found"):
        container_env(make_pod(), container, POD_IP, HOST_IP, FakeObjects())


# -- argv and program -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "args", "argv"),
    [
        (["sh", "-c", "echo $(MSG)"], None, ["sh", "-c", "echo hi"]),
        (["train"], ["--lr", "$(LR)", "$$(LR)"], ["train", "--lr", "0.1", "$(LR)"]),
        (None, ["sleep", "5"], ["sleep", "5"]),  # args alone: the first one is the program
        (["python", "-m", "ddl_worker"], None, ["/venv/bin/python", "-m", "ddl_worker"]),
        (["python3", "x.py"], None, ["/venv/bin/python", "x.py"]),
        (["python3.11", "x.py"], None, ["python3.11", "x.py"]),  # only the bare names
        (["/usr/bin/python3"], None, ["/usr/bin/python3"]),
        # The interpreter is swapped in after expansion; an undefined reference stays.
        (["$(PROG)"], ["$(UNSET)"], ["/venv/bin/python", "$(UNSET)"]),
    ],
)
def test_argv_is_command_then_args_expanded(
    command: list[str] | None, args: list[str] | None, argv: list[str]
) -> None:
    container: dict[str, Any] = {"name": "main"}
    if command is not None:
        container["command"] = command
    if args is not None:
        container["args"] = args
    env = {"MSG": "hi", "LR": "0.1", "PROG": "python"}
    assert container_argv(container, env, interpreter="/venv/bin/python") == argv


@pytest.mark.parametrize("container", [{"name": "main"}, {"name": "main", "command": []}])
def test_a_container_without_a_command_cannot_run_here(container: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="container 'main' has no command"):
        container_argv(container, {})


def test_programs_with_a_slash_are_found_under_the_root_and_must_be_executable(
    tmp_path: Path,
) -> None:
    script = tmp_path / "scripts" / "run.sh"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    assert resolve_executable("scripts/run.sh", "", root=tmp_path) is None  # not executable
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    assert resolve_executable("scripts/run.sh", "", root=tmp_path) == str(script)
    assert resolve_executable("scripts/other.sh", "", root=tmp_path) is None


def test_bare_program_names_are_looked_up_on_the_path(tmp_path: Path) -> None:
    program = tmp_path / "trainer"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    assert resolve_executable("trainer", f"/nonexistent:{tmp_path}") == str(program)
    assert resolve_executable("trainer", "/nonexistent") is None


# -- hostname, hosts file, base env -----------------------------------------------------------


def test_hostname_prefers_spec_hostname_and_fits_a_dns_label() -> None:
    assert pod_hostname(make_pod()) == "job-w0"
    assert pod_hostname(make_pod(hostname="worker-0")) == "worker-0"
    assert pod_hostname(make_pod(name="x" * 80)) == "x" * 63


def test_hosts_file_names_loopback_and_the_pod_itself() -> None:
    assert hosts_file(make_pod(), POD_IP) == (
        f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{POD_IP}\tjob-w0\n"
    )


def test_hosts_file_with_a_subdomain_has_the_pods_service_name_first() -> None:
    pod = make_pod(hostname="w-0", subdomain="job")
    last = hosts_file(pod, POD_IP).splitlines()[-1]
    assert last == f"{POD_IP}\tw-0.job.team.svc.cluster.local w-0"


def test_base_env_puts_the_interpreter_first_on_the_path() -> None:
    environ = {"PATH": "/usr/bin:/bin", "HOME": "/home/dev", "LANG": "en_US.UTF-8", "X": "1"}
    env = base_env(make_pod(hostname="w-0"), environ, interpreter="/repo/.venv/bin/python")
    assert env == {
        "PATH": "/repo/.venv/bin:/usr/bin:/bin",
        "HOME": "/home/dev",
        "LANG": "en_US.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "HOSTNAME": "w-0",
    }


def test_base_env_has_defaults_where_the_agent_has_none() -> None:
    env = base_env(make_pod(), {}, interpreter="/venv/bin/python")
    assert env["PATH"] == "/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert (env["HOME"], env["LANG"]) == ("/root", "C.UTF-8")

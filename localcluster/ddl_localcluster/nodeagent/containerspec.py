"""What a pod's container is given to run: its environment, argv, program, hostname, hosts file.

Pure translation of a pod's spec, as a kubelet does it before starting a container; the only
outside input is `Lookup` (ConfigMaps and Secrets), which the caller supplies.
"""

from __future__ import annotations

import base64
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from ddl_localcluster.controlplane import REPO_ROOT

# Names a container's command may use for the project's own interpreter.
PYTHON_NAMES: Final = ("python", "python3")
DEFAULT_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOSTNAME_MAX: Final = 63


class ConfigError(Exception):
    """The container cannot be started as written (a kubelet's CreateContainerConfigError)."""


# (resource, namespace, name) -> the object or None; resource is "configmaps" or "secrets".
Lookup = Callable[[str, str, str], dict[str, Any] | None]


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, $$ is a literal $."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        if text.startswith("$(", i) and (end := text.find(")", i + 2)) != -1:
            name = text[i + 2 : end]
            out.append(env.get(name, text[i : end + 1]))
            i = end + 1
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def field_value(pod: Mapping[str, Any], path: str, pod_ip: str, host_ip: str) -> str:
    """A downward-API fieldRef, resolved like a kubelet does."""
    meta, spec = pod["metadata"], pod["spec"]
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
    }
    if path in simple:
        return str(simple[path])
    for kind in ("labels", "annotations"):
        prefix = f"metadata.{kind}['"
        if path.startswith(prefix) and path.endswith("']"):
            return str((meta.get(kind) or {}).get(path[len(prefix) : -2], ""))
    raise ConfigError(f"fieldRef {path!r} is not supported")


def source_data(
    lookup: Lookup, resource: str, namespace: str, ref: Mapping[str, Any]
) -> dict[str, str]:
    """The string data of a ConfigMap or Secret ({} when optional and missing)."""
    obj = lookup(resource, namespace, ref["name"])
    if obj is None:
        if ref.get("optional"):
            return {}
        raise ConfigError(f"{resource[:-1]} {ref['name']!r} not found")
    if resource == "secrets":
        return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
    return dict(obj.get("data") or {})


def container_env(
    pod: Mapping[str, Any], container: Mapping[str, Any], pod_ip: str, host_ip: str, lookup: Lookup
) -> dict[str, str]:
    """envFrom, then env in order; a value sees the variables defined before it."""
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            data = source_data(lookup, "configmaps", namespace, source["configMapRef"])
        else:
            data = source_data(lookup, "secrets", namespace, source["secretRef"])
        env.update({prefix + k: v for k, v in data.items()})
    for var in container.get("env") or []:
        name, value_from = var["name"], var.get("valueFrom")
        if value_from is None:
            env[name] = expand(var.get("value", ""), env)
        elif "fieldRef" in value_from:
            env[name] = field_value(pod, value_from["fieldRef"]["fieldPath"], pod_ip, host_ip)
        elif "configMapKeyRef" in value_from or "secretKeyRef" in value_from:
            secret = "secretKeyRef" in value_from
            ref = value_from["secretKeyRef" if secret else "configMapKeyRef"]
            data = source_data(lookup, "secrets" if secret else "configmaps", namespace, ref)
            if ref["key"] in data:
                env[name] = data[ref["key"]]
            elif not ref.get("optional") and data:
                raise ConfigError(f"key {ref['key']!r} not in {ref['name']!r}")
        else:
            raise ConfigError(f"env {name}: only fieldRef, configMapKeyRef and secretKeyRef")
    return env


def container_argv(
    container: Mapping[str, Any], env: Mapping[str, str], interpreter: str = sys.executable
) -> list[str]:
    """command + args, expanded; `python`/`python3` is the project's interpreter."""
    argv = [
        expand(a, env) for a in [*(container.get("command") or []), *(container.get("args") or [])]
    ]
    if not argv:
        raise ConfigError(
            f"container {container['name']!r} has no command: the local node agent cannot run "
            "an image's entrypoint, so give the container a command"
        )
    if argv[0] in PYTHON_NAMES:
        argv[0] = interpreter
    return argv


def resolve_executable(name: str, path: str, root: Path = REPO_ROOT) -> str | None:
    """Where a container's program is: relative paths are relative to the repository root."""
    if "/" in name:
        candidate = root / name
        return str(candidate) if os.access(candidate, os.X_OK) else None
    return shutil.which(name, path=path)


def pod_hostname(pod: Mapping[str, Any]) -> str:
    """spec.hostname, else the pod's name, cut to a DNS label's 63 characters."""
    return str(pod["spec"].get("hostname") or pod["metadata"]["name"])[:HOSTNAME_MAX]


def hosts_file(pod: Mapping[str, Any], ip: str) -> str:
    """The /etc/hosts a kubelet writes: loopback names and the pod's own name(s)."""
    hostname, subdomain = pod_hostname(pod), pod["spec"].get("subdomain")
    names = hostname
    if subdomain:
        names = (
            f"{hostname}.{subdomain}.{pod['metadata']['namespace']}.svc.cluster.local {hostname}"
        )
    return f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{ip}\t{names}\n"


def base_env(
    pod: Mapping[str, Any],
    environ: Mapping[str, str] = os.environ,
    interpreter: str = sys.executable,
) -> dict[str, str]:
    """What an image would provide: a PATH with the project's interpreter first, a HOME."""
    venv_bin = str(Path(interpreter).parent)
    system = environ.get("PATH", DEFAULT_PATH)
    return {
        "PATH": f"{venv_bin}:{system}",
        "HOME": environ.get("HOME", "/root"),
        "LANG": environ.get("LANG", "C.UTF-8"),
        "PYTHONUNBUFFERED": "1",
        "HOSTNAME": pod_hostname(pod),
    }

"""Test builders: DDLJob manifests as Python dicts, without YAML blobs."""

from __future__ import annotations

import copy
from typing import Any

from ddl_operator.api import constants as c


def make_template(
    image: str = "ddl-worker:dev", command: list[str] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {"labels": {"app": "trainer"}},
        "spec": {
            "containers": [
                {
                    "name": "worker",
                    "image": image,
                    "command": command or ["python", "-m", "ddl_worker", "agent"],
                }
            ]
        },
    }


def make_ddljob(
    name: str = "job",
    replicas: int = 2,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    gpus: int = 0,
    namespace: str | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A valid DDLJob; keyword arguments override top-level spec fields."""
    body: dict[str, Any] = {
        "replicas": replicas,
        "gpusPerWorker": gpus,
        "template": make_template(),
    }
    if min_replicas is not None or max_replicas is not None:
        body["elastic"] = {
            "minReplicas": min_replicas if min_replicas is not None else 1,
            "maxReplicas": max_replicas if max_replicas is not None else replicas,
        }
    body.update(copy.deepcopy(spec))
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": metadata, "spec": body}


def set_path(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Returns a copy with a dotted path set (a value of DELETE removes the key)."""
    out = copy.deepcopy(obj)
    node = out
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {}) if not key.isdigit() else node[int(key)]
    last = keys[-1]
    if value is DELETE:
        node.pop(last, None)
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return out


DELETE: Any = object()

"""The worker's thin edge to the Kubernetes API: read/watch its DDLJob, annotate its own pod."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from ddl_operator.api import constants

# RBAC the worker's service account needs: get/list/watch ddljobs, patch pods (its own).


class KubernetesApi:
    """Implements membership.JobReader and report.PodAnnotator with the kubernetes client."""

    def __init__(self) -> None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self.custom = client.CustomObjectsApi()
        self.core = client.CoreV1Api()

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            job = self.custom.get_namespaced_custom_object(
                constants.GROUP, constants.VERSION, namespace, constants.PLURAL, name
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return dict(job)

    def watch_job(
        self, namespace: str, name: str, resource_version: str, timeout_seconds: int
    ) -> Iterator[dict[str, Any] | None]:
        stream = watch.Watch().stream(
            self.custom.list_namespaced_custom_object,
            constants.GROUP,
            constants.VERSION,
            namespace,
            constants.PLURAL,
            field_selector=f"metadata.name={name}",
            resource_version=resource_version,
            timeout_seconds=timeout_seconds,
        )
        for event in stream:
            kind = event.get("type")
            if kind == "ERROR":
                # Usually 410 Gone: the version is too old; the caller re-lists.
                raise RuntimeError(f"watch error: {event.get('raw_object') or event.get('object')}")
            yield None if kind == "DELETED" else event["object"]

    def annotate_pod(self, namespace: str, pod: str, key: str, value: str) -> None:
        self.core.patch_namespaced_pod(pod, namespace, {"metadata": {"annotations": {key: value}}})

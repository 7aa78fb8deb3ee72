"""The agent's view of the pods bound to any node: a list, then a watch, kept in one cache."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Final

from ddl_localcluster.nodeagent.api import ApiError, KubeApi

BOUND: Final = {"fieldSelector": "spec.nodeName!="}
WATCH_SECONDS: Final = 240
RETRY_SECONDS: Final = 1.0
GONE: Final = 410


class PodCache:
    """Every bound pod by uid, as the last list and watch events left it; safe across threads."""

    def __init__(self, api: KubeApi, say: Callable[[str], None]) -> None:
        self.api, self.say = api, say
        self._pods: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return dict(self._pods)

    def get(self, uid: str) -> dict[str, Any] | None:
        with self._lock:
            return self._pods.get(uid)

    def run(self, stop: threading.Event, changed: Callable[[], None]) -> None:
        """List, then watch, until stop is set; relist when the watch's version is gone.

        `changed` is called after the list and after every event that changed the cache.
        """
        while not stop.is_set():
            try:
                listing = self.api.call("GET", "/api/v1/pods", query=BOUND)
                with self._lock:
                    self._pods = {p["metadata"]["uid"]: p for p in listing["items"]}
                version = listing["metadata"]["resourceVersion"]
                changed()
                while not stop.is_set():
                    version = self._watch(version, changed)
            except (ApiError, OSError, ValueError) as err:
                if not (isinstance(err, ApiError) and err.status == GONE):
                    self.say(f"pod watch: {err}; listing again")
                    stop.wait(RETRY_SECONDS)

    def _watch(self, version: str, changed: Callable[[], None]) -> str:
        """One watch request from version; the version it got to."""
        query = {**BOUND, "resourceVersion": version, "allowWatchBookmarks": "true"}
        for event in self.api.watch("/api/v1/pods", query, WATCH_SECONDS):
            obj = event["object"]
            if event["type"] == "ERROR":
                raise ApiError(int(obj.get("code", 500)), obj.get("message", ""))
            version = obj["metadata"]["resourceVersion"]
            if event["type"] == "BOOKMARK":
                continue
            with self._lock:
                if event["type"] == "DELETED":
                    self._pods.pop(obj["metadata"]["uid"], None)
                else:
                    self._pods[obj["metadata"]["uid"]] = obj
            changed()
        return version

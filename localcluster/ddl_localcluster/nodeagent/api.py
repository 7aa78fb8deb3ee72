"""The node agent's HTTP client of the API server: kubeconfig identity, JSON calls, watches.

Also the API's timestamp formats and the owner-only file writes that kubeconfig material needs.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml


def timestamp() -> str:
    """Now, as the API writes times (RFC 3339, seconds, UTC)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_timestamp() -> str:
    """Now, as a MicroTime (a Lease's renewTime)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def write_private(path: Path, data: bytes) -> None:
    """Atomically replaces path with data readable by the owner only."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


class ApiError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def _named(config: Mapping[str, Any], section: str, name: str) -> dict[str, Any]:
    for entry in config.get(section) or []:
        if entry.get("name") == name:
            value: dict[str, Any] = entry.get(section[:-1]) or {}
            return value
    raise ValueError(f"kubeconfig has no {section[:-1]} named {name!r}")


def _material(section: Mapping[str, Any], key: str, base: Path, dest: Path) -> Path:
    """A file with a kubeconfig's certificate or key, whether inlined (-data) or referenced."""
    if f"{key}-data" in section:
        write_private(dest, base64.b64decode(section[f"{key}-data"]))
        return dest
    if key in section:
        return base / str(section[key])
    raise ValueError(f"kubeconfig has neither {key} nor {key}-data")


class KubeApi:
    """The few JSON calls a kubelet makes, with the identity of one kubeconfig."""

    def __init__(self, kubeconfig: Path, state_dir: Path) -> None:
        config = yaml.safe_load(kubeconfig.read_text())
        context = _named(config, "contexts", config["current-context"])
        cluster = _named(config, "clusters", context["cluster"])
        user = _named(config, "users", context["user"])
        base = kubeconfig.resolve().parent
        self.server: str = str(cluster["server"]).rstrip("/")
        self.ca_file = _material(cluster, "certificate-authority", base, state_dir / "ca.crt")
        self.ssl = ssl.create_default_context(cafile=str(self.ca_file))
        self.headers = {"Accept": "application/json"}
        if "client-certificate" in user or "client-certificate-data" in user:
            cert = _material(user, "client-certificate", base, state_dir / "client.crt")
            key = _material(user, "client-key", base, state_dir / "client.key")
            self.ssl.load_cert_chain(str(cert), str(key))
        elif token := user.get("token"):
            self.headers["Authorization"] = f"Bearer {token}"

    def _request(
        self, method: str, path: str, body: Any, query: Mapping[str, str] | None, kind: str
    ) -> urllib.request.Request:
        url = self.server + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body).encode()
        headers = dict(self.headers)
        if data is not None:
            headers["Content-Type"] = kind
        return urllib.request.Request(url, data=data, method=method, headers=headers)

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        kind: str = "application/json",
    ) -> dict[str, Any]:
        request = self._request(method, path, body, query, kind)
        try:
            with urllib.request.urlopen(request, context=self.ssl, timeout=30) as resp:
                result: dict[str, Any] = json.loads(resp.read() or b"{}")
                return result
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                message = str(json.loads(raw).get("message", raw))
            except ValueError:
                message = raw.decode(errors="replace")
            raise ApiError(err.code, message) from None

    def patch(self, path: str, body: Any) -> dict[str, Any]:
        return self.call("PATCH", path, body, kind="application/merge-patch+json")

    def watch(self, path: str, query: Mapping[str, str], seconds: int) -> Iterator[dict[str, Any]]:
        """The events of one watch request, until the server ends it."""
        q = {**query, "watch": "1", "timeoutSeconds": str(seconds)}
        request = self._request("GET", path, None, q, "")
        try:
            with urllib.request.urlopen(request, context=self.ssl, timeout=seconds + 30) as resp:
                for line in resp:
                    if line.strip():
                        event: dict[str, Any] = json.loads(line)
                        yield event
        except urllib.error.HTTPError as err:
            raise ApiError(err.code, err.reason) from None

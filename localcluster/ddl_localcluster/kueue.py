"""Runs the pinned Kueue manager (built by `make kueue`) against a ControlPlane.

Kueue's CRDs come from the module source (config/components/crd/bases). The manager runs with
the control plane's admin kubeconfig, leader election off, every port a free loopback one, and
its configuration in a file under the control plane's state directory.

Webhooks: the manager always starts its webhook server (its readiness waits for it), but no
ValidatingWebhookConfiguration or MutatingWebhookConfiguration is registered with the API server,
so nothing calls it. Callers create complete objects: what Kueue's mutating webhooks would add
(the resource-in-use finalizer on ClusterQueues and ResourceFlavors; dropping a Workload's
minCount when partial admission is off) is absent or the caller's to set, and what its
validating webhooks refuse (a second podSet with minCount, podSets changed while quota is
reserved) is the caller's to avoid.

Certificates: Kueue's internal certificate management stays on. With it off, the manager reads
its metrics certificate from a fixed /etc/kueue/metrics/certs and exits when it is missing. With
it on, Kueue's certificate rotator writes a self-signed CA and webhook certificate into a Secret
of its namespace and waits until the Secret's keys appear as files in `certDir` (in a cluster,
the Secret volume of Kueue's pod); the metrics server serves a self-signed certificate of its
own. Here the Secret is created empty beforehand (as Kueue's manifests do) and its keys are
copied into `certDir` once Kueue has filled it (the kubelet's part). The rotator also waits
until it has injected the CA into the conversion webhooks of five CRDs, so those five are
applied with `spec.conversion.strategy: Webhook` pointing at a Service that does not exist.
Only the storage version (v1beta2) may then be used: a request for v1beta1 would need the
conversion webhook and fails.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from ddl_localcluster.controlplane import (
    ControlPlane,
    ControlPlaneError,
    _alive,
    cache_dir,
    free_port,
    pinned_versions,
    stop_process_group,
    wait_for,
)
from ddl_operator.api import constants as c
from ddl_operator.core import kueue

BUILD_COMMAND: Final = "make kueue   (or: scripts/build-kueue.sh)"
PROCESS: Final = "kueue"
NAMESPACE: Final = "kueue-system"
CONFIG_API_VERSION: Final = f"config.{kueue.API_VERSION}"
# The DDLJob kind in Kueue's `Kind.version.group` form (integrations.externalFrameworks).
DDLJOB_FRAMEWORK: Final = f"{c.KIND}.{c.VERSION}.{c.GROUP}"
# Kueue's default Job integration; an empty list means this default anyway.
DEFAULT_FRAMEWORKS: Final = ("batch/job",)
# CRDs whose conversion webhook Kueue's certificate rotator injects its CA into
# (pkg/util/cert in the module); it waits for all of them before it reports ready.
CONVERSION_CRDS: Final = (
    "localqueues.kueue.x-k8s.io",
    "clusterqueues.kueue.x-k8s.io",
    "workloads.kueue.x-k8s.io",
    "cohorts.kueue.x-k8s.io",
    "multikueueclusters.kueue.x-k8s.io",
)
WEBHOOK_SERVICE: Final = "kueue-webhook-service"
WEBHOOK_SECRET: Final = "kueue-webhook-server-cert"


def kueue_dir() -> Path:
    """The pinned manager and CRDs: $DDL_KUEUE_DIR, else the versioned cache directory."""
    if env := os.environ.get("DDL_KUEUE_DIR"):
        return Path(env)
    return cache_dir() / "bin" / f"kueue-{pinned_versions()['KUEUE_VERSION']}"


def _missing(what: str, path: Path) -> ControlPlaneError:
    return ControlPlaneError(
        f"{what} not found at {path}. Build the pinned Kueue with: {BUILD_COMMAND}, "
        "or point DDL_KUEUE_DIR at a directory holding `kueue` and `crds/*.yaml`."
    )


def manager_binary() -> Path:
    """The Kueue manager binary, or an error naming the command that builds it."""
    path = kueue_dir() / "kueue"
    if not os.access(path, os.X_OK):
        raise _missing("the Kueue manager", path)
    return path


def crd_files() -> list[Path]:
    """Kueue's CRD manifests as the module ships them."""
    crds = kueue_dir() / "crds"
    files = sorted(crds.glob("*.yaml"))
    if not any(f.name == "kueue.x-k8s.io_workloads.yaml" for f in files):
        raise _missing("Kueue's CRDs", crds)
    return files


def crds(namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """The CRDs to apply: the module's, with a conversion webhook on the five the certificate
    rotator waits for (see the module docstring)."""
    out: list[dict[str, Any]] = []
    for path in crd_files():
        with path.open() as f:
            doc = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
            raise ControlPlaneError(f"{path} is not a CustomResourceDefinition")
        if doc["metadata"]["name"] in CONVERSION_CRDS:
            doc["spec"]["conversion"] = {
                "strategy": "Webhook",
                "webhook": {
                    "clientConfig": {
                        "service": {
                            "name": WEBHOOK_SERVICE,
                            "namespace": namespace,
                            "path": "/convert",
                        }
                    },
                    "conversionReviewVersions": ["v1"],
                },
            }
        out.append(doc)
    return out


def configuration(
    namespace: str,
    ports: dict[str, int],
    cert_dir: Path,
    frameworks: Sequence[str] = DEFAULT_FRAMEWORKS,
    external_frameworks: Sequence[str] = (DDLJOB_FRAMEWORK,),
) -> dict[str, Any]:
    """Kueue's Configuration (config.kueue.x-k8s.io/v1beta2) for a manager on loopback."""
    return {
        "apiVersion": CONFIG_API_VERSION,
        "kind": "Configuration",
        "namespace": namespace,
        "manageJobsWithoutQueueName": False,
        "leaderElection": {"leaderElect": False},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{ports['health']}"},
        "metrics": {"bindAddress": f"127.0.0.1:{ports['metrics']}"},
        "webhook": {"host": "127.0.0.1", "port": ports["webhook"], "certDir": str(cert_dir)},
        "internalCertManagement": {
            "enable": True,
            "webhookServiceName": WEBHOOK_SERVICE,
            "webhookSecretName": WEBHOOK_SECRET,
        },
        "integrations": {
            "frameworks": list(frameworks),
            "externalFrameworks": list(external_frameworks),
        },
        # The on-demand visibility API server would bind a fixed port (8082) and needs an
        # APIService registration; nothing here reads pending workloads through it.
        "featureGates": {"VisibilityOnDemand": False},
    }


@dataclass
class KueueManager:
    """One Kueue manager process against one control plane."""

    control_plane: ControlPlane
    namespace: str = NAMESPACE
    frameworks: tuple[str, ...] = DEFAULT_FRAMEWORKS
    external_frameworks: tuple[str, ...] = (DDLJOB_FRAMEWORK,)
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.control_plane.dir / "kueue"

    @property
    def config_file(self) -> Path:
        return self.dir / "config.json"

    @property
    def log(self) -> Path:
        return self.control_plane.log(PROCESS)

    def install_crds(self, timeout: float = 120) -> None:
        """Applies Kueue's CRDs (server-side: the Workload CRD is too large for the
        last-applied annotation) and waits until they are Established."""
        docs = crds(self.namespace)
        self.control_plane.kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}),
            timeout=timeout,
        )
        names = [f"crd/{d['metadata']['name']}" for d in docs]
        self.control_plane.kubectl(
            "wait", "--for=condition=Established", f"--timeout={timeout:.0f}s", *names
        )

    def write_config(self) -> Path:
        self.ports = {"health": free_port(), "metrics": free_port(), "webhook": free_port()}
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg = configuration(
            self.namespace,
            self.ports,
            self.dir / "certs",
            self.frameworks,
            self.external_frameworks,
        )
        self.config_file.write_text(json.dumps(cfg, indent=2))
        return self.config_file

    def start(self, timeout: float = 120) -> None:
        """CRDs, namespace, config, then the manager; returns once /readyz answers 200
        (Kueue's readiness waits for its certificates and webhook server)."""
        if self.pid() is not None:
            raise ControlPlaneError(f"a Kueue manager is already running from {self.dir}")
        binary = manager_binary()
        self.install_crds()
        # The namespace and the (empty) Secret Kueue's certificate rotator fills: its own
        # manifests ship both, and the rotator fails when the Secret is missing.
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.namespace}}
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": WEBHOOK_SECRET, "namespace": self.namespace},
        }
        self.control_plane.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [namespace, secret]}),
        )
        config = self.write_config()
        # Certificates are copied from the Secret as this start finds it, never kept over.
        shutil.rmtree(self.dir / "certs", ignore_errors=True)
        env = {**os.environ, "KUBECONFIG": str(self.control_plane.kubeconfig)}
        self.control_plane.spawn(
            PROCESS, [str(binary), f"--config={config}", "--zap-log-level=info"], env
        )
        try:
            wait_for("the Kueue manager's /readyz", self._ready, timeout, self.diagnose)
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.pid() is None:
            raise ControlPlaneError(f"the Kueue manager exited\n{self.diagnose()}")
        return self._project_certificates() and self.probe("/readyz")

    def _project_certificates(self) -> bool:
        """Plays the kubelet's part for Kueue's pod: its webhook Secret mounted as files in
        `certDir`. Kueue's certificate rotator writes the Secret, then waits for the files."""
        cert_dir = self.dir / "certs"
        if (cert_dir / "tls.crt").exists():
            return True
        url = (
            f"{self.control_plane.server}/api/v1/namespaces/{self.namespace}"
            f"/secrets/{WEBHOOK_SECRET}"
        )
        try:
            ctx = self.control_plane.ssl_context()
            with urllib.request.urlopen(url, context=ctx, timeout=5) as r:
                data = json.load(r).get("data") or {}
        except (OSError, ValueError):
            return False
        if not {"tls.crt", "tls.key"} <= set(data):
            return False
        cert_dir.mkdir(parents=True, exist_ok=True)
        # The certificate last: the rotator and the webhook server look for it.
        for name in sorted(data, key=lambda n: n == "tls.crt"):
            tmp = cert_dir / f".{name}.tmp"
            tmp.write_bytes(base64.b64decode(data[name]))
            tmp.chmod(0o600)
            tmp.replace(cert_dir / name)
        return True

    def probe(self, path: str) -> bool:
        """Whether the manager's health endpoint (/healthz or /readyz) answers 200."""
        url = f"http://127.0.0.1:{self.ports['health']}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def pid(self) -> int | None:
        pid = self.control_plane.state().get("pids", {}).get(PROCESS)
        return pid if isinstance(pid, int) and _alive(pid) else None

    def stop(self, grace: float = 15.0) -> None:
        """Stops the manager (SIGTERM, then SIGKILL after `grace`) and forgets its pid."""
        state = self.control_plane.state()
        pid = state.get("pids", {}).pop(PROCESS, None)
        if isinstance(pid, int):
            stop_process_group(pid, grace)
        if state:
            self.control_plane.save(state)

    def diagnose(self, lines: int = 40) -> str:
        status = "running" if self.pid() is not None else "not running"
        return (
            f"the Kueue manager is {status}; last lines of {self.log}:\n"
            f"{self.control_plane.log_tail(PROCESS, lines)}"
        )

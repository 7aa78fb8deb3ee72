"""`ddl-operator`: run the operator (kopf) with its metrics endpoint."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

import kopf
from prometheus_client import start_http_server

from ddl_operator import __version__
from ddl_operator import controller as _handlers  # noqa: F401 - registers the kopf handlers
from ddl_operator.leader import LeaseConfig
from ddl_operator.runtime import WORKERS, Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddl-operator", description=__doc__)
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace", action="append", default=[], help="watch this namespace (repeatable)"
    )
    scope.add_argument(
        "--all-namespaces", action="store_true", help="watch every namespace (default)"
    )
    parser.add_argument("--metrics-port", type=int, default=9090, help="0 disables /metrics")
    parser.add_argument(
        "--liveness-port", type=int, default=8080, help="kopf liveness probe at /healthz"
    )
    parser.add_argument(
        "--worker-service-account",
        default=None,
        help="service account for worker pods that set none (the chart creates its RBAC)",
    )
    parser.add_argument(
        "--worker-cluster-role",
        default=os.environ.get("DDL_WORKER_CLUSTER_ROLE"),
        help="ClusterRole to bind to the worker service account in each job namespace "
        "(default: $DDL_WORKER_CLUSTER_ROLE)",
    )
    parser.add_argument("--workers", type=int, default=WORKERS, help="reconcilers")
    parser.add_argument(
        "--leader-elect",
        action="store_true",
        help="reconcile only while holding a coordination.k8s.io Lease (for several replicas)",
    )
    parser.add_argument(
        "--leader-elect-namespace",
        default=os.environ.get("POD_NAMESPACE") or "default",
        help="namespace of the Lease (default: $POD_NAMESPACE, else default)",
    )
    parser.add_argument("--leader-elect-name", default="ddl-operator", help="name of the Lease")
    parser.add_argument(
        "--no-queue-order",
        dest="queue_order",
        action="store_false",
        help="no GPU queue: jobs are not ordered by priority and age and no waiting job holds "
        "GPUs for itself; whichever job's pass claims first takes the free GPUs",
    )
    parser.add_argument(
        "--no-preemption",
        dest="preemption",
        action="store_false",
        help="never shrink or suspend lower-priority jobs for a job that does not fit",
    )
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--version", action="version", version=__version__)
    args = parser.parse_args(argv)
    for noisy in ("kopf.objects", "kopf.activities", "kubernetes.client.rest"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = Settings(
        worker_service_account=args.worker_service_account,
        worker_cluster_role=args.worker_cluster_role,
        workers=args.workers,
        namespaces=tuple(args.namespace),
        queue_order=args.queue_order,
        preemption=args.preemption,
        lease=LeaseConfig(
            namespace=args.leader_elect_namespace,
            identity=os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
            name=args.leader_elect_name,
        )
        if args.leader_elect
        else None,
    )
    if args.metrics_port:
        start_http_server(args.metrics_port)
    kopf.configure(verbose=args.verbose)  # sets up logging for kopf and us
    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=f"http://0.0.0.0:{args.liveness_port}/healthz",
        memo=kopf.Memo(settings=settings),  # the startup handler builds the runtime from it
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`ddl-operator`: run the operator (kopf) with its metrics endpoint."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import kopf
from prometheus_client import start_http_server

from ddl_operator import __version__, controller


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
    parser.add_argument("--workers", type=int, default=controller.WORKERS, help="reconcilers")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--version", action="version", version=__version__)
    args = parser.parse_args(argv)
    for noisy in ("kopf.objects", "kopf.activities", "kubernetes.client.rest"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    controller.SETTINGS.worker_service_account = args.worker_service_account
    controller.SETTINGS.worker_cluster_role = args.worker_cluster_role
    controller.SETTINGS.workers = args.workers
    if args.metrics_port:
        start_http_server(args.metrics_port)
    kopf.configure(verbose=args.verbose)  # sets up logging for kopf and us
    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=f"http://0.0.0.0:{args.liveness_port}/healthz",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Operator metrics (prometheus-client), served on --metrics-port."""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter, Gauge, Histogram

# Finer than the client's default between 0.1 and 2.5 s, where passes that write land: a
# quantile read from the default buckets can be off by half.
PASS_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5,
    5.0, 10.0, 30.0,
)  # fmt: skip
RECONCILE_SECONDS: Final = Histogram(
    "ddl_operator_reconcile_seconds",
    "Time of one reconcile pass of one job.",
    buckets=PASS_BUCKETS,
)
PLACEMENT_SECONDS: Final = Histogram(
    "ddl_operator_placement_seconds",
    "Time of one pass's decision: waiting for the claim lock, then placement and the claim "
    "(pure core and the cache, no API calls).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0),
)
SNAPSHOT_READS: Final = Counter(
    "ddl_operator_snapshot_reads_total",
    "Where passes read their job and its pods: the watch caches, or the API when a cache "
    "had not yet caught up with the operator's own last write or read.",
    ["object", "source"],
)
JOBS: Final = Gauge("ddl_operator_jobs", "DDLJobs by phase.", ["phase"])
PENDING_GPUS: Final = Gauge(
    "ddl_operator_pending_gpus",
    "GPUs a job wants but has not been placed on.",
    ["namespace", "job"],
)
UNSCHEDULABLE: Final = Gauge(
    "ddl_operator_job_unschedulable",
    "1 while a job has workers that cannot be placed, labelled with the reason.",
    ["namespace", "job", "reason"],
)
JOB_EPOCH: Final = Gauge(
    "ddl_operator_job_epoch", "Rendezvous epoch of a job.", ["namespace", "job"]
)
JOB_RESTARTS: Final = Gauge(
    "ddl_operator_job_restarts", "Gang restarts of a job so far.", ["namespace", "job"]
)
CACHE_RELISTS: Final = Counter(
    "ddl_operator_cache_relists_total",
    "Full lists the node/pod cache made (the first, then one per expired watch).",
    ["kind"],
)
CACHE_WATCH_ERRORS: Final = Counter(
    "ddl_operator_cache_watch_errors_total",
    "Node/pod watches of the cache that broke (connection, timeout, server error).",
    ["kind"],
)
RECONCILE_ERRORS: Final = Counter(
    "ddl_operator_reconcile_errors_total",
    "Reconcile passes that failed, by reason: the API's status reason or the exception's "
    "class (Conflict: a write on a stale read, retried soon and not shown on the job).",
    ["reason"],
)
JOB_PASS_FAILURES: Final = Gauge(
    "ddl_operator_job_pass_failures",
    "Passes of a job that failed in a row (its retries back off); 0 once one succeeds.",
    ["namespace", "job"],
)

"""Goodput with real training on the local cluster: a node slowed to half speed gets its worker
replaced inside the rack and the job's samples/s recovers; throughput sizing keeps a
communication-heavy job small and grows a compute-heavy one (ddl_localcluster/goodput.py)."""

from __future__ import annotations

from pathlib import Path

from ddl_localcluster import goodput
from ddl_localcluster.controlplane import ControlPlane


def test_slowed_worker_is_replaced_in_its_rack_and_throughput_recovers(
    local_cluster: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    f = goodput.straggler_run(local_cluster, namespace, tmp_path, print, for_steps=200)
    print(f)
    assert f.slowed.samples_per_second < 0.85 * f.before.samples_per_second, f
    # The watch sees one report per interval: up to two intervals (and the rate window) pass
    # before the first slow one; then the decision comes at the first observation at least
    # forSteps past it, and the third at the earliest: its k-th observation lies (k-1)
    # intervals on, so up to max(forSteps + interval, 2 intervals). A streak that broke on
    # the way restarts its forSteps from a later observation.
    interval = f.slowed.samples_per_second / goodput.GLOBAL_BATCH * goodput.REPORT_SECONDS
    confirm = max(f.for_steps + interval, 2 * interval)
    bound = 2 * interval + goodput.WINDOW_STEPS + confirm
    assert 0 < f.steps_to_replace <= bound, (bound, f)
    assert f.replacement_rack == f.gang_rack and f.replacement_node != f.slow_node, f
    assert f.recovered >= 0.9, f
    assert f.packed, f
    assert f.slow_node in f.message and f.replacement_node in f.message, f


def test_throughput_sizing_stops_where_communication_costs_more_than_it_brings(
    local_cluster: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    comm = goodput.sizing_run(local_cluster, namespace, tmp_path, "communication", print)
    print(comm)
    one, two = comm.at(1), comm.at(2)
    assert one is not None and two is not None and two < one, comm
    assert comm.final_workers == comm.best == 1, comm
    assert not next(t for t in comm.tried if t.workers == 2).kept, comm


def test_throughput_sizing_grows_a_compute_heavy_job_to_its_replicas(
    local_cluster: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    compute = goodput.sizing_run(local_cluster, namespace, tmp_path, "compute", print)
    print(compute)
    rates = [compute.at(w) for w in (1, 2, 3)]
    assert all(r is not None for r in rates), compute
    assert compute.final_workers == compute.replicas == 3, compute
    assert all(t.kept for t in compute.tried), compute

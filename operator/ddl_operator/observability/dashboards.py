"""Grafana dashboards for DDLJobs and the operator, built with the Grafana Foundation SDK.

`python -m ddl_operator.observability.dashboards --write` refreshes
charts/ddl-operator/dashboards/*.json, which the chart ships as ConfigMaps for Grafana's
dashboard sidecar. Edit this file, never the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as grafana
from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DashboardLinkType,
    DataSourceRef,
    DataTransformerConfig,
    DynamicConfigValue,
    Threshold,
    ThresholdsMode,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from ddl_operator.observability import (
    HIGH_SYNC_WAIT_RATIO,
    JOB_LABELS,
    OPERATOR_SCRAPE_JOB,
    STRAGGLER_FACTOR,
    WORKER_POD_REGEX,
    allreduce_bandwidth,
    allreduce_time_share,
    increase_by,
    mean_step_seconds,
    rate_by,
    straggler_ratio,
    sync_wait_ratio,
    throughput,
)

REPO_ROOT: Final = Path(__file__).resolve().parents[3]
DASHBOARD_DIR: Final = REPO_ROOT / "charts" / "ddl-operator" / "dashboards"
DATASOURCE: Final = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE: Final = "$__rate_interval"
JOB: Final = 'namespace="$namespace", job="$job"'
# refIds of queries on NVIDIA's DCGM exporter start with this: they return data only where it
# runs, so a check that every query answers skips them on clusters without it.
DCGM_REF_PREFIX: Final = "DCGM"
TAGS: Final = ["ddl-operator"]


def query(expr: str, legend: str = "", ref_id: str = "A") -> prometheus.Dataquery:
    target = prometheus.Dataquery().expr(expr).ref_id(ref_id).datasource(DATASOURCE)
    return target.legend_format(legend) if legend else target


def instant_table_query(expr: str, ref_id: str = "A") -> prometheus.Dataquery:
    return query(expr, ref_id=ref_id).instant().format(PromQueryFormat.TABLE)


def thresholds(*steps: tuple[float | None, str]) -> grafana.ThresholdsConfig:
    return (
        grafana.ThresholdsConfig()
        .mode(ThresholdsMode.ABSOLUTE)
        .steps([Threshold(value=value, color=color) for value, color in steps])
    )


def legend_table(*calcs: str) -> common_builders.VizLegendOptions:
    return (
        common_builders.VizLegendOptions()
        .display_mode(common.LegendDisplayMode.TABLE)
        .placement(common.LegendPlacement.RIGHT)
        .show_legend(True)
        .calcs(list(calcs))
    )


def graph(
    title: str, unit: str, description: str, *targets: prometheus.Dataquery
) -> timeseries.Panel:
    """A time series panel with a table legend (mean, last, max per series)."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(8)
        .span(12)
        .fill_opacity(10)
        .legend(legend_table("mean", "lastNotNull", "max"))
        .tooltip(
            common_builders.VizTooltipOptions()
            .mode(common.TooltipDisplayMode.MULTI)
            .sort(common.SortOrder.DESCENDING)
        )
    )
    for target in targets:
        panel = panel.with_target(target)
    return panel


def single_stat(title: str, unit: str, description: str, expr: str) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(4)
        .span(4)
        .with_target(query(expr))
        .graph_mode(common.BigValueGraphMode.AREA)
        .color_mode(common.BigValueColorMode.VALUE)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
    )


def datasource_variable() -> grafana.DatasourceVariable:
    return grafana.DatasourceVariable("datasource").label("Data source").type("prometheus")


def label_variable(name: str, label: str, query_text: str) -> grafana.QueryVariable:
    return (
        grafana.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query({"query": query_text, "refId": f"{name}-values"})
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
    )


def link_to(title: str, uid: str) -> grafana.DashboardLink:
    return (
        grafana.DashboardLink(title)
        .type(DashboardLinkType.LINK)
        .url(f"/d/{uid}")
        .include_vars(True)
        .keep_time(True)
        .icon("dashboard")
    )


# What a dashboard is made of, in order: rows and the panels below each.
Item = grafana.Row | timeseries.Panel | stat.Panel | table.Panel


def numbered(builder: grafana.Dashboard, items: list[Item]) -> grafana.Dashboard:
    """Adds rows and panels in order with ids 1..n (Grafana wants them unique and stable)."""
    for number, item in enumerate(items, start=1):
        item.id(number)
        if isinstance(item, grafana.Row):
            builder = builder.with_row(item)
        else:
            builder = builder.with_panel(item)
    return builder


JOB_UID: Final = "ddl-job"
OPERATOR_UID: Final = "ddl-operator"


def job_dashboard() -> grafana.Dashboard:
    """One DDLJob: throughput, step time, sync-wait, tiers, stragglers, GPUs, epochs."""
    straggler_steps = thresholds((None, "green"), (STRAGGLER_FACTOR, "red"))
    sync_steps = thresholds((None, "green"), (HIGH_SYNC_WAIT_RATIO, "orange"))
    dcgm_pods = f'namespace="$namespace", pod=~"{WORKER_POD_REGEX.format(job="$job")}"'
    rank_legend = "rank {{rank}} @ {{node}}"
    items: list[Item] = [
        grafana.Row("Overview"),
        single_stat(
            "Throughput",
            "short",
            "Training samples per second, all ranks together.",
            throughput(JOB, RATE, JOB_LABELS),
        ),
        single_stat(
            "World size",
            "short",
            "Ranks currently reporting steps.",
            f"count by ({JOB_LABELS}) ({throughput(JOB, RATE)})",
        ),
        single_stat(
            "Epoch",
            "short",
            "Rendezvous round: bumps on every membership change (rescale, lost worker).",
            f"max by ({JOB_LABELS}) (ddl_epoch{{{JOB}}})",
        ),
        single_stat(
            "Sync-wait",
            "percentunit",
            "Share of step time blocked on communication that backward compute did not hide.",
            sync_wait_ratio(JOB, RATE, JOB_LABELS),
        ).thresholds(sync_steps),
        single_stat(
            "Stragglers",
            "short",
            f"Ranks whose compute time per step exceeds the job median by more than "
            f"{STRAGGLER_FACTOR - 1:.0%}.",
            f"count by ({JOB_LABELS}) (({straggler_ratio(JOB, RATE)}) > {STRAGGLER_FACTOR:g})"
            f" or on () vector(0)",
        ).thresholds(thresholds((None, "green"), (1, "red"))),
        single_stat(
            "Restarts in range",
            "short",
            "Times the agents restarted their training processes in the selected time range.",
            f"{increase_by('ddl_restarts_total', JOB, '$__range', JOB_LABELS)}",
        ).thresholds(thresholds((None, "green"), (1, "orange"))),
        grafana.Row("Throughput and step time"),
        graph(
            "Throughput per rank",
            "short",
            "Samples per second each rank processes; the sum is the job's throughput.",
            query(throughput(JOB, RATE), rank_legend),
        ).stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL)),
        graph(
            "Step time per rank",
            "s",
            "Mean and 95th percentile wall time of one step (checkpoint writes excluded).",
            query(mean_step_seconds(JOB, RATE), "mean " + rank_legend, "A"),
            query(
                "histogram_quantile(0.95, sum by (namespace, job, rank, node, le) "
                f"(rate(ddl_step_seconds_bucket{{{JOB}}}[{RATE}])))",
                "p95 " + rank_legend,
                "B",
            ),
        ),
        grafana.Row("Communication"),
        graph(
            "Sync-wait ratio per rank",
            "percentunit",
            "Share of each rank's step time blocked on communication that compute did not hide. "
            "Fast ranks wait for slow ones, so a straggler shows the lowest value here.",
            query(sync_wait_ratio(JOB, RATE), rank_legend),
        )
        .thresholds(sync_steps)
        .thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.LINE)
        ),
        graph(
            "Allreduce time per step time, by tier",
            "percentunit",
            "Time allreduces of each network tier (flat, intra-node, inter-node) were in flight "
            "per second of step time, averaged over ranks. Overlapped with compute, so it can "
            "exceed the sync-wait ratio.",
            query(
                f"avg by ({JOB_LABELS}, tier) (\n"
                f"{allreduce_time_share(JOB, RATE, 'namespace, job, rank, node')}\n)",
                "{{tier}}",
            ),
        ),
        graph(
            "Allreduce bandwidth by tier",
            "Bps",
            "Gradient bytes reduced per second of allreduce time in each tier, averaged over "
            "ranks: the inter-node tier is the one DDL keeps small.",
            query(
                f"avg by ({JOB_LABELS}, tier) (\n"
                f"{allreduce_bandwidth(JOB, RATE, 'namespace, job, rank, node')}\n)",
                "{{tier}}",
            ),
        ),
        graph(
            "Allreduce bytes per rank and tier",
            "Bps",
            "Gradient bytes each rank reduces per second of wall time, per tier.",
            query(
                rate_by("ddl_allreduce_bytes_total", JOB, RATE, "namespace, job, rank, node, tier"),
                "rank {{rank}} {{tier}}",
            ),
        ),
        grafana.Row("Stragglers"),
        graph(
            "Compute time relative to the job median",
            "none",
            "Each rank's step time minus its sync-wait, divided by the median rank's. Above "
            f"{STRAGGLER_FACTOR:g} (red) the rank is a straggler: everyone waits for it.",
            query(straggler_ratio(JOB, RATE), rank_legend),
        )
        .thresholds(straggler_steps)
        .thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(
                common.GraphThresholdsStyleMode.LINE_AND_AREA
            )
        ),
        table.Panel()
        .title("Straggler ranks now")
        .description(
            f"Ranks whose compute time per step exceeds the job median by more than "
            f"{STRAGGLER_FACTOR - 1:.0%}, with the ratio."
        )
        .datasource(DATASOURCE)
        .height(8)
        .span(12)
        .with_target(instant_table_query(f"({straggler_ratio(JOB, '5m')}) > {STRAGGLER_FACTOR:g}"))
        .with_transformation(
            DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": {"Time": True},
                    "renameByName": {"Value": "compute time / median"},
                },
            )
        )
        .thresholds(straggler_steps),
        grafana.Row("GPUs"),
        graph(
            "GPU utilisation per rank",
            "percentunit",
            "Busy share of each rank's GPU as the agent reads it from NVML.",
            query(
                f"max by (namespace, job, rank, node) (ddl_gpu_utilization_ratio{{{JOB}}})",
                rank_legend,
            ),
        ).max(1),
        graph(
            "GPU memory per rank",
            "bytes",
            "GPU memory in use on each rank's GPU (NVML).",
            query(
                f"max by (namespace, job, rank, node) (ddl_gpu_memory_used_bytes{{{JOB}}})",
                rank_legend,
            ),
        ),
        graph(
            "GPU utilisation per node",
            "percentunit",
            "Mean over the job's GPUs on each node: the agent's NVML reading and, where NVIDIA's "
            "DCGM exporter runs, its graphics-engine activity (also correct under MIG).",
            query(f"avg by (node) (ddl_gpu_utilization_ratio{{{JOB}}})", "{{node}} (NVML)", "A"),
            query(
                f"avg by (Hostname) (DCGM_FI_PROF_GR_ENGINE_ACTIVE{{{dcgm_pods}}})",
                "{{Hostname}} (DCGM)",
                f"{DCGM_REF_PREFIX}_ENGINE",
            ),
        ).max(1),
        graph(
            "DCGM: GPU utilisation and memory per worker GPU",
            "percentunit",
            "From NVIDIA's DCGM exporter (empty without it): the job's worker pods matched by "
            "name. Memory on the right axis.",
            query(
                f"DCGM_FI_DEV_GPU_UTIL{{{dcgm_pods}}} / 100",
                "{{pod}} GPU {{gpu}} @ {{Hostname}}",
                f"{DCGM_REF_PREFIX}_UTIL",
            ),
            query(
                f"DCGM_FI_DEV_FB_USED{{{dcgm_pods}}} * 1048576",
                "memory {{pod}} GPU {{gpu}}",
                f"{DCGM_REF_PREFIX}_FB",
            ),
        ).override_by_regexp(
            "^memory .*",
            [
                DynamicConfigValue(id_val="unit", value="bytes"),
                DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
            ],
        ),
        grafana.Row("Membership"),
        graph(
            "Epoch and world size",
            "short",
            "Rendezvous epoch (bumps on every rescale or lost worker) and the ranks reporting.",
            query(f"max by ({JOB_LABELS}) (ddl_epoch{{{JOB}}})", "epoch", "A"),
            query(f"count by ({JOB_LABELS}) ({throughput(JOB, RATE)})", "world size", "B"),
        ),
        graph(
            "Restarts per node",
            "short",
            "Times each node's agent restarted its training processes in the interval.",
            query(increase_by("ddl_restarts_total", JOB, RATE, "namespace, job, node"), "{{node}}"),
        ),
    ]
    builder = (
        grafana.Dashboard("DDLJob")
        .uid(JOB_UID)
        .description(
            "One elastic distributed deep-learning job: throughput, step time, "
            "sync-wait per rank and tier, stragglers, GPUs and rescale events."
        )
        .tags(TAGS)
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .time("now-3h", "now")
        .refresh("30s")
        .with_variable(datasource_variable())
        .with_variable(
            label_variable("namespace", "Namespace", "label_values(ddl_epoch, namespace)")
        )
        .with_variable(
            label_variable("job", "DDLJob", 'label_values(ddl_epoch{namespace="$namespace"}, job)')
        )
        .annotation(
            grafana.AnnotationQuery()
            .name("Rescale (epoch change)")
            .datasource(DATASOURCE)
            .enable(True)
            .icon_color("orange")
            .expr(f"changes(max by ({JOB_LABELS}) (ddl_epoch{{{JOB}}})[2m:30s]) > 0")
        )
        .annotation(
            grafana.AnnotationQuery()
            .name("Worker restarts")
            .datasource(DATASOURCE)
            .enable(True)
            .icon_color("red")
            .expr(f"{increase_by('ddl_restarts_total', JOB, '2m', JOB_LABELS)} > 0")
        )
        .link(link_to("Operator", OPERATOR_UID))
    )
    return numbered(builder, items)


def latency_quantiles(histogram: str) -> list[prometheus.Dataquery]:
    """p50, p95 and p99 of a histogram over all its series."""
    return [
        query(
            f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket[{RATE}])))",
            f"p{round(q * 100)}",
            ref_id,
        )
        for q, ref_id in ((0.5, "A"), (0.95, "B"), (0.99, "C"))
    ]


def operator_dashboard() -> grafana.Dashboard:
    """The operator: jobs by phase, pending GPUs and why, reconcile and placement latency."""
    ns = 'namespace=~"$namespace"'
    items: list[Item] = [
        grafana.Row("Jobs"),
        single_stat(
            "Operator up",
            "short",
            "Scrape targets of the operator that answer.",
            f'sum(up{{job="{OPERATOR_SCRAPE_JOB}"}}) or on () vector(0)',
        ).thresholds(thresholds((None, "red"), (1, "green"))),
        single_stat(
            "Running jobs",
            "short",
            "DDLJobs in phase Running.",
            'sum(ddl_operator_jobs{phase="Running"})',
        ),
        single_stat(
            "Pending GPUs",
            "short",
            "GPUs that waiting jobs ask for and cannot get.",
            f"sum(ddl_operator_pending_gpus{{{ns}}}) or on () vector(0)",
        ).thresholds(thresholds((None, "green"), (1, "orange"))),
        single_stat(
            "Unschedulable jobs",
            "short",
            "Jobs the operator could not place.",
            f"sum(ddl_operator_job_unschedulable{{{ns}}}) or on () vector(0)",
        ).thresholds(thresholds((None, "green"), (1, "orange"))),
        graph(
            "Jobs by phase",
            "short",
            "DDLJobs the operator watches, by lifecycle phase.",
            query("sum by (phase) (ddl_operator_jobs)", "{{phase}}"),
        ).stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL)),
        graph(
            "Pending GPUs per job",
            "short",
            "GPUs each waiting job asks for and cannot get.",
            query(
                f"sum by ({JOB_LABELS}) (ddl_operator_pending_gpus{{{ns}}}) > 0",
                "{{namespace}}/{{job}}",
            ),
        ),
        table.Panel()
        .title("Why jobs wait")
        .description("Jobs that cannot be placed now, the reason, and the GPUs they wait for.")
        .datasource(DATASOURCE)
        .height(8)
        .span(24)
        .with_target(
            instant_table_query(
                f"max by ({JOB_LABELS}, reason) (ddl_operator_job_unschedulable{{{ns}}}) == 1",
                "A",
            )
        )
        .with_target(
            instant_table_query(
                f"sum by ({JOB_LABELS}) (ddl_operator_pending_gpus{{{ns}}})",
                "B",
            )
        )
        .with_transformation(DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(
            DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": {"Time": True, "Value #A": True},
                    "renameByName": {"Value #B": "pending GPUs"},
                },
            )
        ),
        grafana.Row("Latency"),
        graph(
            "Reconcile latency",
            "s",
            "Time one reconcile pass takes: read the snapshot, compute, apply, write status.",
            *latency_quantiles("ddl_operator_reconcile_seconds"),
        ),
        graph(
            "Decision latency",
            "s",
            "Time of one pass's decision, without API calls: waiting for the claim lock, "
            "placement on the cluster snapshot and the claim.",
            *latency_quantiles("ddl_operator_placement_seconds"),
        ),
        graph(
            "Reconciles per second",
            "ops",
            "Reconcile passes per second.",
            query(f"sum(rate(ddl_operator_reconcile_seconds_count[{RATE}]))", "reconciles"),
        ),
        graph(
            "Job epochs and restarts",
            "short",
            "Rendezvous epoch and restart count the operator records per job.",
            query(
                f"max by ({JOB_LABELS}) (ddl_operator_job_epoch{{{ns}}})",
                "epoch {{namespace}}/{{job}}",
                "A",
            ),
            query(
                f"max by ({JOB_LABELS}) (ddl_operator_job_restarts{{{ns}}})",
                "restarts {{namespace}}/{{job}}",
                "B",
            ),
        ),
    ]
    builder = (
        grafana.Dashboard("DDL operator")
        .uid(OPERATOR_UID)
        .description(
            "The ddl-operator: jobs by phase, pending GPUs and why, reconcile and "
            "placement latency."
        )
        .tags(TAGS)
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .time("now-6h", "now")
        .refresh("30s")
        .with_variable(datasource_variable())
        .with_variable(
            label_variable(
                "namespace", "Namespace", "label_values(ddl_operator_job_epoch, namespace)"
            )
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
        .link(link_to("DDLJob", JOB_UID))
    )
    return numbered(builder, items)


DASHBOARDS: Final[dict[str, Callable[[], grafana.Dashboard]]] = {
    "ddl-job.json": job_dashboard,
    "ddl-operator.json": operator_dashboard,
}


def render(build: Callable[[], grafana.Dashboard]) -> str:
    """Dashboard JSON with sorted keys, so regeneration is byte-stable."""
    return json.dumps(build().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="write the committed JSON files")
    args = parser.parse_args(argv)
    if not args.write:
        for name, build in DASHBOARDS.items():
            sys.stdout.write(f"--- {name}\n{render(build)}")
        return 0
    DASHBOARD_DIR.mkdir(parents=True, exist_ok=True)
    for name, build in DASHBOARDS.items():
        path = DASHBOARD_DIR / name
        path.write_text(render(build))
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

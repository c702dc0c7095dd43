"""The Grafana dashboard model of the panel specs in ``dashboards.panels``, built with grafana-foundation-sdk:
variables (data source, job, total_progress), the resize annotation, one row after another."""

from __future__ import annotations

import json
from typing import Any

from grafana_foundation_sdk.builders import bargauge, heatmap, stat, timeseries
from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash_b
from grafana_foundation_sdk.builders import prometheus as prom_b
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_m
from grafana_foundation_sdk.models import dashboard as dash_m
from grafana_foundation_sdk.models import prometheus as prom_m

from dashboards.panels import RESIZE_ANNOTATION_EXPR, ROWS, PanelSpec, Query

DASHBOARD_UID = "elastic-job"
DASHBOARD_TITLE = "Elastic training job"
DATASOURCE = dash_m.DataSourceRef(type_val="prometheus", uid="${datasource}")


def _target(query: Query, ref_id: str) -> prom_b.Dataquery:
    t = (prom_b.Dataquery().expr(query.expr).ref_id(ref_id).datasource(DATASOURCE)
         .legend_format(query.legend or "__auto"))
    if query.format != "time_series":
        t = t.format(prom_m.PromQueryFormat(query.format))
    if query.instant:
        t = t.instant()
    else:
        t = t.range()
    return t


def _right_axis(names: tuple[str, ...], unit: str) -> list[tuple[str, list[dash_m.DynamicConfigValue]]]:
    return [(name, [dash_m.DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
                    dash_m.DynamicConfigValue(id_val="unit", value=unit)]) for name in names]


def _panel(spec: PanelSpec, panel_id: int) -> Any:
    if spec.kind in ("timeseries", "bars"):
        b = (timeseries.Panel()
             .legend(common_b.VizLegendOptions().display_mode(common_m.LegendDisplayMode.LIST)
                     .placement(common_m.LegendPlacement.BOTTOM).show_legend(True))
             .tooltip(common_b.VizTooltipOptions().mode(common_m.TooltipDisplayMode.MULTI)
                      .sort(common_m.SortOrder.DESCENDING))
             .line_width(1.5).fill_opacity(10).span_nulls(True))
        if spec.kind == "bars":
            b = b.draw_style(common_m.GraphDrawStyle.BARS).fill_opacity(80)
        if spec.log_scale:
            b = b.scale_distribution(common_b.ScaleDistributionConfig()
                                     .type(common_m.ScaleDistribution.LOG).log(10))
        for name, props in _right_axis(spec.right_axis, spec.right_unit):
            b = b.override_by_name(name, props)
    elif spec.kind == "stat":
        b = (stat.Panel().graph_mode(common_m.BigValueGraphMode.NONE)
             .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    elif spec.kind == "buckets":
        # Histogram buckets as a bar gauge: the standard way to show a distribution over a range.
        b = (bargauge.Panel().orientation(common_m.VizOrientation.VERTICAL)
             .display_mode(common_m.BarGaugeDisplayMode.GRADIENT)
             .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    elif spec.kind == "heatmap":
        b = heatmap.Panel().calculate(False)
    else:
        raise ValueError(f"panel kind {spec.kind!r} unknown")
    b = (b.id(panel_id).title(spec.title).description(spec.description).datasource(DATASOURCE)
         .span(spec.span).height(spec.height).unit(spec.unit))
    if spec.min is not None:
        b = b.min(spec.min)
    if spec.max is not None:
        b = b.max(spec.max)
    for i, query in enumerate(spec.queries):
        b = b.with_target(_target(query, chr(ord("A") + i)))
    return b


def build_dashboard() -> dict[str, Any]:
    job_var = (dash_b.QueryVariable("job_name").label("Job")
               .description("The job_name label of the elastic job (its spec's name).")
               .datasource(DATASOURCE)
               .query({"query": "label_values(elastic_workers, job_name)", "refId": "job_name"})
               .refresh(dash_m.VariableRefresh.ON_TIME_RANGE_CHANGED)
               .sort(dash_m.VariableSort.ALPHABETICAL_ASC))
    total_var = (dash_b.TextBoxVariable("total_progress").label("total_progress (tau)")
                 .description("The job spec's total_progress, used for the ETA.")
                 .default_value("3000"))
    builder = (dash_b.Dashboard(DASHBOARD_TITLE).uid(DASHBOARD_UID)
               .description("Workers, AdaScale gain and progress, throughput, resizes, failures, "
                            "checkpoints and the controller of one elastic training job.")
               .tags(["elastic", "adascale", "ray", "training"])
               .editable().refresh("30s").time("now-3h", "now").timezone("browser")
               .tooltip(dash_m.DashboardCursorSync.CROSSHAIR)
               .with_variable(dash_b.DatasourceVariable("datasource").label("Data source").type("prometheus"))
               .with_variable(job_var)
               .with_variable(total_var)
               .annotation(dash_b.AnnotationQuery().name("Resizes").datasource(DATASOURCE).enable(True)
                           .icon_color("orange").expr(RESIZE_ANNOTATION_EXPR)))
    panel_id = 1
    for row in ROWS:
        builder = builder.with_row(dash_b.Row(row.title).id(panel_id))
        panel_id += 1
        for spec in row.panels:
            builder = builder.with_panel(_panel(spec, panel_id))
            panel_id += 1
    model = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
    # Fields the SDK's AnnotationQuery model does not carry; Grafana's Prometheus annotations use them.
    annotation = model["annotations"]["list"][0]
    annotation.update({"titleFormat": "Resize: {{direction}} ({{cause}})",
                       "tagKeys": "direction,cause", "step": "$__interval"})
    return model


def dashboard_json() -> str:
    return json.dumps(build_dashboard(), indent=2, sort_keys=True) + "\n"

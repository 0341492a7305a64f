"""Monitoring: ``mloop monitor`` and ``mloop monitor rules|dashboard|compare|report``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mloop.cli._common import (
    JsonOpt,
    iso_arg,
    monitoring_config,
    open_project,
    open_project_as,
    report,
    write_text,
)
from mloop.cli.render import err, num, out, table

if TYPE_CHECKING:
    from mloop.project import Project

monitor_app = typer.Typer(invoke_without_command=True,
                          help="Data quality, drift and performance of the inference log's "
                               "windows against the champion's training profile.")


@monitor_app.callback()
def monitor(
    ctx: typer.Context,
    window: Annotated[str | None, typer.Option(help="1d, 6h, 30m or 5000rows (default "
                                                    "monitoring.window).")] = None,
    since: Annotated[str | None, typer.Option(help="ISO time: ignore traffic before.")] = None,
    until: Annotated[str | None, typer.Option(help="ISO time: ignore traffic after.")] = None,
    serve_metrics: Annotated[int | None, typer.Option(
        help="Keep running: expose the monitoring gauges on this port (Prometheus) and "
             "evaluate new windows every --every seconds.")] = None,
    every: Annotated[float, typer.Option(min=1, help="Seconds between evaluations with "
                                                     "--serve-metrics.")] = 60.0,
    json_: JsonOpt = False,
) -> None:
    """Evaluate every new complete window since the last run; print a summary table."""
    if ctx.invoked_subcommand is not None:
        return
    from mloop.monitoring.service import run_monitor

    project = open_project_as("loop")
    if serve_metrics is not None:
        _serve_monitor_metrics(project, serve_metrics, every, window)
        return
    result = run_monitor(project, window=window, since=iso_arg(since, "--since"),
                         until=iso_arg(until, "--until"))
    report(result, json_, _print_monitor_run)


SHOWN = 20  # windows a table shows before it says how many more there are


def _print_monitor_run(result: dict[str, Any]) -> None:
    rows = result["evaluated"] + result["refreshed"]
    if not rows:
        out.print(f"no new complete {result['window']} window since the last run")
        return
    shown = rows[-SHOWN:]
    choice = result.get("reference", "training")
    against = "" if choice == "training" else f", {choice} traffic"
    out.print(window_table(f"{result['model']}: windows of {result['window']} (reference: "
                           f"champion v{result['champion']}{against})", shown))
    fell_back = [w for w in result["evaluated"] if (w.get("reference") or {}).get("fallback")]
    if fell_back:
        out.print(f"{len(fell_back)} window(s) judged against training instead of {choice}: "
                  f"{fell_back[-1]['reference']['fallback']}")
    if len(rows) > len(shown):
        out.print(f"{len(rows) - len(shown):,} more window(s) evaluated in this run, not "
                  f"shown: `mloop monitor windows --window {result['window']} --limit "
                  f"{len(rows)}` lists them, `--json` gives every one")
    if result["refreshed"]:
        out.print(f"{len(result['refreshed'])} earlier window(s) re-scored with late labels")


def span(start: str, end: str) -> str:
    """``2024-03-01 00:00 → 03-02 00:00``: the end without what it shares with the start."""
    a, b = start[:16].replace("T", " "), end[:16].replace("T", " ")
    if a[:10] == b[:10]:
        return f"{a} → {b[11:]}"
    return f"{a} → {b[5:] if a[:4] == b[:4] else b}"


def window_table(title: str, windows: list[dict[str, Any]]) -> Any:
    """One row per window: its id, span and verdicts (the window column is never cut)."""
    return table(title, ["id", "window", "rows", "versions", "drift", "prediction", "quality",
                         "metric", "estimate", "labels"],
                 [[w["id"], span(w["start"], w["end"]), f"{w['rows']:,}",
                   ",".join(f"v{v}" for v in w["versions"] or []),
                   ("[red]drift" if w["drifted"] else "[green]ok") +
                   f" ({(w['drift_share'] or 0):.0%})",
                   "[red]drift" if w["prediction_drifted"] else "ok",
                   str(w["quality_findings"]),
                   "" if w["metric_value"] is None else
                   f"{w['metric']} {w['metric_value']:.4g} (ref {num(w['reference_metric'])})",
                   estimate_cell(w), f"{w['label_coverage']:.0%}"] for w in windows],
                 no_wrap=("id", "window"))


def estimate_cell(window: dict[str, Any]) -> str:
    """``accuracy 0.812 (err +0.011)``: the label-free estimate, its error once labels gave
    the same metric, and ``uncalibrated`` (with the holdout's expected vs realized) when the
    version's probabilities failed the holdout check."""
    est = window.get("estimated")
    if est and est.get("status") == "unavailable":  # e.g. its loss model could not be read
        return f"{est.get('metric')} [yellow]unavailable[/] (see the window's report)"
    if not est or est.get("value") is None:
        return ""
    text = f"{est['metric']} {est['value']:.4g}"
    if window.get("estimate_error") is not None:
        text += f" (err {window['estimate_error']:+.3f})"
    if est.get("status") == "uncalibrated":
        cal = est["calibration"]
        text += (f" [yellow]uncalibrated[/] (holdout {cal['expected']:.3g} est vs "
                 f"{cal['realized']:.3g})")
    return text


def _serve_monitor_metrics(project: Project, port: int, every: float,
                           window: str | None) -> None:
    import time

    from prometheus_client import CollectorRegistry, start_http_server

    from mloop.monitoring.alerts import MonitorCollector
    from mloop.monitoring.service import run_monitor

    registry = CollectorRegistry()
    registry.register(MonitorCollector(project))  # type: ignore[arg-type]
    start_http_server(port, addr="127.0.0.1", registry=registry)
    err.print(f"monitoring gauges on http://127.0.0.1:{port}/metrics; evaluating every "
              f"{every:g} s (Ctrl-C to stop)")
    while True:
        result = run_monitor(project, window=window)
        for w in result["evaluated"]:
            out.print(f"window {w['start'][:16]} → {w['end'][:16]}: {w['rows']:,} rows, "
                      f"{'drift' if w['drifted'] else 'no drift'}")
        time.sleep(every)


@monitor_app.command("rules")
def monitor_rules(
    out_path: Annotated[Path, typer.Option("--out", help="YAML file to write.")] =
    Path("alerts.yml"),
) -> None:
    """Prometheus alerting rules for this project's monitoring policy and its server."""
    from mloop.monitoring.alerts import rules_yaml

    write_text(out_path, rules_yaml(open_project()))


@monitor_app.command("dashboard")
def monitor_dashboard(
    out_path: Annotated[Path, typer.Option("--out", help="JSON file to write.")] =
    Path("grafana-dashboard.json"),
) -> None:
    """A Grafana dashboard (JSON model) over the same metrics."""
    import json

    from mloop.monitoring.alerts import grafana_dashboard

    write_text(out_path, json.dumps(grafana_dashboard(open_project()), indent=2))


@monitor_app.command("compare")
def monitor_compare(
    reference: Annotated[Path, typer.Argument(help="Reference table (Parquet/CSV/folder).")],
    current: Annotated[Path, typer.Argument(help="Current table.")],
    columns: Annotated[str | None, typer.Option(help="Comma-separated columns (default: "
                                                     "every numeric/categorical one).")] = None,
    html_out: Annotated[Path | None, typer.Option("--html", help="Also write a "
                                                  "self-contained HTML report.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Ad-hoc quality and drift of CURRENT against REFERENCE, same engine as `mloop monitor`."""
    from mloop.monitoring.evaluate import compare_files

    cols = [c.strip() for c in columns.split(",")] if columns else None
    result = compare_files(reference, current, monitoring_config(), columns=cols)
    if html_out is not None:
        from mloop.monitoring.report import compare_html

        write_text(html_out, compare_html(result))
    report(result, json_, print_monitor_report,
           to_json=lambda r: {k: v for k, v in r.items() if k != "profile"})


@monitor_app.command("windows")
def monitor_windows(
    window: Annotated[str | None, typer.Option(help="Window size (default "
                                                    "monitoring.window).")] = None,
    limit: Annotated[int, typer.Option(min=1, help="The newest N windows.")] = SHOWN,
    json_: JsonOpt = False,
) -> None:
    """Stored windows, oldest to newest, with their verdicts: drift share, quality findings,
    performance and label coverage. Their ids are what `mloop monitor report` takes."""
    from mloop.monitoring.windows_store import count_windows, list_windows, window_spec

    project = open_project()
    spec = window_spec(project, window)
    rows = list_windows(project, window=spec, limit=limit)
    result = {"model": project.config.model_name, "window": spec,
              "total": count_windows(project, spec), "windows": rows}

    def render(r: dict[str, Any]) -> None:
        if not r["windows"]:
            out.print(f"no {spec} window stored yet: `mloop monitor` evaluates the inference "
                      f"log's complete windows")
            return
        out.print(window_table(f"{r['model']}: windows of {spec} ({len(r['windows'])} of "
                               f"{r['total']:,})", r["windows"]))
        hidden = r["total"] - len(r["windows"])
        if hidden > 0:
            out.print(f"{hidden:,} older window(s) not shown: `--limit {r['total']}` shows "
                      f"every one")

    report(result, json_, render)


@monitor_app.command("report")
def monitor_report(
    window_id: Annotated[int | None, typer.Argument(help="A window id (default: the newest; "
                                                         "`mloop monitor windows` lists "
                                                         "them).")] = None,
    html_out: Annotated[Path, typer.Option("--html", help="HTML file to write.")] =
    Path("monitoring.html"),
    window: Annotated[str | None, typer.Option(help="Window size of the history (default "
                                                    "monitoring.window).")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Windows in the history: the newest N "
                                                   "(the report says how many it leaves "
                                                   "out).")] = 100,
) -> None:
    """Write a self-contained HTML report: history plots and one window in detail."""
    from mloop.monitoring.report import monitor_html
    from mloop.monitoring.windows_store import (
        count_windows,
        get_window,
        list_windows,
        window_spec,
    )

    project = open_project()
    focus = get_window(project, window_id) if window_id is not None else None
    spec = window_spec(project, window or (focus or {}).get("spec"))
    history = list_windows(project, window=spec, limit=limit, with_reports=True)
    reports = [w.pop("report") for w in history]
    if focus is None and history:
        focus = {**history[-1], "report": reports[-1]}
    total = count_windows(project, spec)
    if total > len(history):
        err.print(f"the history shows the newest {len(history):,} of {total:,} windows; "
                  f"`--limit {total}` shows every one")
    write_text(html_out, monitor_html(project.config.model_name, history, reports, focus,
                                      total=total,
                                      more_hint=f"mloop monitor report --window {spec} "
                                                f"--limit {total}"))


def print_monitor_report(result: dict[str, Any]) -> None:
    """One window's (or one comparison's) drift and quality tables."""
    from mloop.monitoring.report import joint_note, temporal_note

    if result["empty"]:
        out.print("the window is empty: nothing to compare")
        return
    drift = result["drift"]
    out.print(table(f"drift ({result['rows']:,} rows; false-alarm rate "
                    f"{drift['false_alarm_rate']:.0%})",
                    ["column", "method", "score", "iid thr", "temporal thr", "min effect",
                     "p", "drift"],
                    [[c["column"], c["method"], f"{c['score']:.4g}", f"{c['threshold']:.4g}",
                      "n/a" if c.get("temporal_threshold") is None
                      else f"{c['temporal_threshold']:.4g}",
                      f"{c['min_effect']:.3g}", f"{c['p_value']:.2g}",
                      "[red]yes" if c["drifted"] else "[green]no"]
                     for c in drift["columns"]]))
    out.print(temporal_note(drift))
    if "multivariate" in result:  # windows of the inference log; not ad-hoc comparisons
        out.print(joint_note(result))
    if result["quality"]:
        out.print(table("quality", ["column", "check", "count", "rate", "examples"],
                        [[f["column"], f["check"], f"{f['count']:,}", f"{f['rate']:.2%}",
                          ", ".join(map(str, f["examples"]))] for f in result["quality"]]))
    verdict = "[red]drifted" if drift["drifted"] else "[green]no drift"
    out.print(f"dataset: {verdict}[/] ({drift['drift_share']:.0%} of columns), "
              f"{len(result['quality'])} quality finding(s), {result['seconds']:.2f} s")

"""The loop's story as one self-contained HTML page: error month by month (the loop vs the
frozen first model), when it retrained, promoted and rolled back, drift and performance over
the same time, and what each retrain cost."""

from __future__ import annotations

import html
from datetime import datetime
from typing import Any

from mloop.loop.state import Retrain
from mloop.monitoring.report import _plt, _svg, _table, history_plots, render


def _history(summary: dict[str, Any]) -> list[Retrain]:
    """The controller's retrains, as the summary holds them (its saved history, in JSON)."""
    return [Retrain.model_validate(h) for h in summary.get("history", [])]


def _months_plot(summary: dict[str, Any]) -> str:
    plt = _plt()
    months = summary["months"]
    if not months:
        return "<p>No traffic was replayed.</p>"
    x = [datetime.strptime(m["month"], "%Y-%m") for m in months]
    fig, ax = plt.subplots(figsize=(9, 3.2))
    ax.plot(x, [m["mae_frozen"] for m in months], marker="o", color="#999",
            label="frozen first model")
    ax.plot(x, [m["mae_loop"] for m in months], marker="o", color="#d9534f",
            label="mloop's loop (what was served)")
    for h in _history(summary):
        when = (h.decided_at or h.triggered_at).replace(tzinfo=None)
        colour = {"promoted": "#137333", "rolled_back": "#b00020"}.get(h.outcome or "",
                                                                         "#f0ad4e")
        ax.axvline(when, color=colour, alpha=0.35, linewidth=1)
    ax.set_ylabel("MAE (rentals/hour)", fontsize=8)
    ax.set_title("Error per month (vertical lines: green promoted, red rolled back, "
                 "orange other retrain outcomes)", fontsize=9)
    ax.legend(fontsize=7)
    fig.autofmt_xdate()
    return _svg(fig)


def loop_html(project: Any, summary: dict[str, Any]) -> str:
    from mloop.monitoring.windows_store import list_windows

    loop = summary.get("loop", {})

    def num(v: Any, fmt: str = ".1f") -> str:
        return "n/a" if v is None else format(v, fmt)

    head = (f"<p>{summary.get('requests', 0):,} hourly requests replayed over HTTP; "
            f"{summary.get('controller_passes', 0)} controller passes; "
            f"{loop.get('retrains', 0)} retrains, {loop.get('promoted', 0)} promoted, "
            f"{loop.get('rolled_back', 0)} rolled back, {loop.get('rejected', 0)} rejected by "
            f"the gates. MAE over 2012: loop <b>{num(summary.get('mae_2012_loop'))}</b> vs "
            f"frozen {num(summary.get('mae_2012_frozen'))}. Time to detect "
            f"{num(loop.get('time_to_detect_hours'))} h, time to deploy "
            f"{num(loop.get('time_to_deploy_hours'))} h (event time); retrain "
            f"{num(loop.get('retrain_seconds'))} s on average, "
            f"{num(loop.get('retrain_cpu_seconds_total'))} CPU-s in all, cost "
            f"{num(loop.get('retrain_cost'), '.4f')} {loop.get('currency', '')}.</p>")
    body = [head, "<h2>Error per month</h2>", f"<div class='card'>{_months_plot(summary)}</div>",
            _table(["month", "hours", "MAE loop", "MAE frozen", "versions"],
                   [[m["month"], m["hours"], f"{m['mae_loop']:.1f}", f"{m['mae_frozen']:.1f}",
                     ", ".join(f"v{v}" for v in m["versions"])] for m in summary["months"]])]
    if summary.get("schedules"):
        setup, cmp = summary["schedule_setup"], summary["loop_vs_schedules"]
        span = "2012" if setup["scored"] == "2012" else "whole replay"
        body += [f"<h2>The loop vs retraining on a fixed schedule ({span} MAE)</h2>",
                 _table(["retrained", "retrains", "MAE"],
                        [["frozen first model", 0,
                          num(summary.get(f"mae_{setup['scored']}_frozen"), ".2f")],
                         *([s["name"], s["retrains"], num(s["mae"], ".2f")]
                           for s in summary["schedules"]),
                         ["mloop's loop", cmp["retrains"], num(cmp["mae"], ".2f")]]),
                 f"<p>The schedules' curve at {cmp['retrains']} retrains: "
                 f"{num(cmp['curve_mae'], '.2f')} (the loop is "
                 f"{'on or below' if cmp['on_or_below_curve'] else 'above'} it).</p>"]
    if summary.get("injected_shift"):
        d = summary["injected_shift"]
        seen = (f"first flagged in the window ending {html.escape(d['detected_at'])}, "
                f"{num(d['time_to_detect_hours'])} h after the onset"
                if d["detected_at"] else "never flagged")
        body += ["<h2>Injected shift</h2>",
                 f"<p>{html.escape(d['column'])} moved {d['sd']:+g} sd ({d['delta']:+.4g}) "
                 f"from {html.escape(d['onset'])}: {seen}; flagged in "
                 f"{d['flagged_before_onset']} of {d['windows_before_onset']} windows before "
                 f"the onset.</p>"]
    windows = list_windows(project, limit=500, with_reports=True)
    reports = [w.pop("report") for w in windows]
    body += ["<h2>Drift and performance over time</h2>", history_plots(windows, reports)]
    rows = []
    for h in _history(summary):
        rows.append([html.escape(h.triggered_at.isoformat()[:16]),
                     html.escape(", ".join(t.trigger for t in h.triggers)),
                     f"v{h.version}" if h.version else "",
                     html.escape(h.outcome or ""), html.escape((h.reason or "")[:200]),
                     num(h.seconds), num(h.cpu_seconds), num(h.peak_memory_mb, ".0f")])
    body += ["<h2>Retrains</h2>", _table(["triggered (event time)", "trigger", "candidate",
                                           "outcome", "why", "seconds", "CPU-s",
                                           "peak MB"], rows)]
    return render(f"mloop loop: {project.config.model_name}", "".join(body))

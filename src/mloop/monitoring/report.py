"""Self-contained HTML monitoring reports: every plot is inline SVG (matplotlib, Agg), no
script or stylesheet is fetched, so the file opens anywhere, offline.

A window report shows, per feature, the reference and window distributions on the same bins
with the drift score, threshold and verdict, then the quality findings. A history report
(``mloop monitor report --html``) adds drift over time, per-feature scores over time, and the
task metric with label coverage over time.
"""

from __future__ import annotations

import html
import io
from datetime import datetime
from typing import Any

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:22px} h2{font-size:18px;margin-top:28px} table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ddd;padding:4px 8px;font-size:13px;text-align:left}
th{background:#f4f4f4} .bad{color:#b00020;font-weight:600} .ok{color:#137333}
.grid{display:flex;flex-wrap:wrap;gap:12px} .card{border:1px solid #e3e3e3;padding:6px}
.muted{color:#666;font-size:12px}
"""


def _svg(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # text stays text: searchable, small, selectable

    return plt


def distribution_plot(col: dict[str, Any]) -> str:
    """Reference vs window share per bin (or category) for one column."""
    plt = _plt()
    labels = col["labels"]
    n = len(labels)
    fig, ax = plt.subplots(figsize=(4.2, 2.4))
    x = list(range(n))
    ax.bar([i - 0.2 for i in x], col["reference_hist"], width=0.4, label="reference",
           color="#9aa9c7")
    ax.bar([i + 0.2 for i in x], col["window_hist"], width=0.4, label="window",
           color="#d9534f" if col["drifted"] else "#5cb85c")
    step = max(1, n // 8)
    ax.set_xticks(x[::step])
    ax.set_xticklabels([str(lbl)[:14] for lbl in labels[::step]], rotation=45, ha="right",
                       fontsize=6)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(f"{col['column']}: {col['method']} {col['score']:.3g}"
                 f" ({'drift' if col['drifted'] else 'no drift'})", fontsize=8)
    ax.legend(fontsize=6)
    return _svg(fig)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def temporal_note(drift: dict[str, Any]) -> str:
    """One line on the temporal calibration of a window's drift: applied (from how many
    chunks of which size) or why not. Reports stored before it existed have none."""
    temporal = drift.get("temporal")
    if not temporal:
        return "iid calibration only (report written before temporal calibration)"
    if temporal.get("applied"):
        return (f"temporal calibration: a column drifts only beyond the reference period's "
                f"own variation over {temporal['chunks']} chunks of {temporal['window']}, the "
                f"iid threshold and the min effect")
    return str(temporal.get("reason") or "iid calibration only")


def reference_note(report: dict[str, Any]) -> str:
    """One line on what the window was compared with (``monitoring.reference``): the training
    profile, the log's traffic over a span, or training in place of the one asked for, and
    why. Reports stored before the choice existed were all against training; an ad-hoc
    comparison (``monitor compare``, whose ``reference`` is a file) has no line."""
    ref = report.get("reference")
    if not ref:
        return "reference: the training profile"
    if "kind" not in ref:
        return ""
    if ref.get("fallback"):
        return f"reference: the training profile of v{ref['version']} instead of " \
               f"{ref['requested']}: {ref['fallback']}"
    if ref["kind"] == "training":
        return f"reference: the training profile of v{ref['version']} ({ref['rows']:,} rows)"
    return (f"reference: {ref['kind']} traffic, {ref['rows']:,} rows logged from "
            f"{ref['since']} to {ref['until']}")
def joint_note(report: dict[str, Any]) -> str:
    """One line on the window's multivariate check (:mod:`mloop.monitoring.joint`): its
    share of rows outside the reference's joint support against both thresholds, or why it
    did not run. Reports stored before it existed have none."""
    joint = report.get("multivariate")
    if not joint:
        return "multivariate check: not run (report written before it existed)"
    if joint.get("skipped"):
        return f"multivariate check skipped: {joint['skipped']}"
    verdict = "joint shift" if joint["drifted"] else "no joint shift"
    temporal = joint.get("threshold_temporal")
    bar = (f"temporal threshold {temporal:.1%}" if temporal is not None
           else str((joint.get("temporal") or {}).get("reason") or "iid bound only"))
    return (f"multivariate check: {verdict}: {joint['value']:.1%} of rows outside the "
            f"reference's joint support (iid threshold {joint['threshold_iid']:.1%}; {bar})")


def _verdict(flag: bool | None) -> str:
    if flag is None:
        return "<span class='muted'>n/a</span>"
    return "<span class='bad'>drift</span>" if flag else "<span class='ok'>no drift</span>"


def window_section(report: dict[str, Any], title: str) -> str:
    parts = [f"<h2>{html.escape(title)}</h2>"]
    if report.get("empty"):
        parts.append("<p>The window is empty: nothing to compare.</p>")
        return "".join(parts)
    drift = report["drift"]
    parts.append(f"<p>{report['rows']:,} rows · dataset {_verdict(drift['drifted'])} "
                 f"({drift['drift_share']:.0%} of columns) · false-alarm rate "
                 f"{drift['false_alarm_rate']:.0%} · {drift['simulations']:,} null draws</p>")
    if note := reference_note(report):
        parts.append(f"<p class='muted'>{html.escape(note)}</p>")
    parts.append(f"<p class='muted'>{html.escape(temporal_note(drift))}</p>")
    parts.append(f"<p>{html.escape(joint_note(report))}</p>")
    parts.append(_table(
        ["column", "method", "score", "iid threshold", "temporal threshold", "min effect",
         "p-value", "verdict"],
        [[html.escape(c["column"]), c["method"], f"{c['score']:.4g}", f"{c['threshold']:.4g}",
          _number(c.get("temporal_threshold")), f"{c['min_effect']:.3g}",
          f"{c['p_value']:.2g}", _verdict(c["drifted"])]
         for c in drift["columns"]]))
    parts.append("<div class='grid'>" + "".join(
        f"<div class='card'>{distribution_plot(c)}</div>" for c in drift["columns"]) + "</div>")
    pred = report.get("prediction_drift")
    if pred:
        c = pred["columns"][0]
        parts.append(f"<h2>Predictions vs the champion's holdout predictions</h2>"
                     f"<div class='card'>{distribution_plot({**c, 'column': 'prediction'})}"
                     f"</div>")
    perf = report.get("performance")
    if perf:
        value = "n/a" if perf.get("value") is None else f"{perf['value']:.4g}"
        ref = "n/a" if perf.get("reference") is None else f"{perf['reference']:.4g}"
        parts.append(f"<p>Performance: {perf.get('metric')} {value} on "
                     f"{perf['labelled_rows']:,} labelled rows ({perf['coverage']:.0%} "
                     f"coverage); holdout {ref}</p>")
    findings = report.get("quality") or []
    parts.append("<h2>Data quality</h2>")
    if findings:
        parts.append(_table(["column", "check", "count", "rate", "message", "examples"],
                            [[html.escape(f["column"]), f["check"], f"{f['count']:,}",
                              f"{f['rate']:.2%}", html.escape(f["message"]),
                              html.escape(", ".join(map(str, f["examples"])))]
                             for f in findings]))
    else:
        parts.append("<p class='ok'>No findings.</p>")
    return "".join(parts)


def history_plots(windows: list[dict[str, Any]], reports: list[dict[str, Any]]) -> str:
    """Drift share, per-feature scores, and metric with label coverage over time."""
    if not windows:
        return "<p>No windows evaluated yet.</p>"
    plt = _plt()
    t = [datetime.fromisoformat(w["start"]) for w in windows]
    out = []
    fig, ax = plt.subplots(figsize=(8, 2.6))
    ax.plot(t, [w["drift_share"] or 0 for w in windows], marker="o", color="#d9534f")
    ax.set_ylabel("drift share", fontsize=8)
    ax.set_title("Share of features drifting per window", fontsize=9)
    fig.autofmt_xdate()
    out.append(_svg(fig))
    scores: dict[str, list[float | None]] = {}
    for i, r in enumerate(reports):
        for c in (r.get("drift") or {}).get("columns", []):
            scores.setdefault(c["column"], [None] * len(reports))[i] = c["score"]
    if scores:
        fig, ax = plt.subplots(figsize=(8, 3))
        for name, values in scores.items():
            ax.plot(t, [v if v is not None else float("nan") for v in values], label=name,
                    marker=".")
        ax.set_title("Drift score per feature", fontsize=9)
        ax.legend(fontsize=6, ncol=4)
        fig.autofmt_xdate()
        out.append(_svg(fig))
    if any(w["metric_value"] is not None for w in windows):
        fig, ax = plt.subplots(figsize=(8, 2.6))
        ax.plot(t, [w["metric_value"] if w["metric_value"] is not None else float("nan")
                    for w in windows], marker="o", label=windows[0]["metric"] or "metric")
        ref = windows[-1]["reference_metric"]
        if ref is not None:
            ax.axhline(ref, linestyle="--", color="#888", label="holdout")
        ax2 = ax.twinx()
        ax2.bar(t, [w["label_coverage"] for w in windows], alpha=0.2, color="#5b8def",
                width=0.6 * (t[1] - t[0]) if len(t) > 1 else 0.5, label="label coverage")
        ax2.set_ylim(0, 1)
        ax.set_title("Performance on labelled traffic (bars: label coverage)", fontsize=9)
        ax.legend(fontsize=6, loc="upper left")
        fig.autofmt_xdate()
        out.append(_svg(fig))
    return "".join(f"<div class='card'>{s}</div>" for s in out)


def render(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"{body}<p class='muted'>Generated by mloop.</p></body></html>")


def compare_html(report: dict[str, Any]) -> str:
    title = f"Drift: {report['current']['path']} vs {report['reference']['path']}"
    return render(title, window_section(report, "Window vs reference"))


def monitor_html(model: str, windows: list[dict[str, Any]], reports: list[dict[str, Any]],
                 focus: dict[str, Any] | None, *, total: int | None = None,
                 more_hint: str | None = None) -> str:
    """The history of ``windows`` (the newest ones; ``total`` is how many are stored, and the
    page says so when it shows fewer, with ``more_hint``, the command that shows them all)
    and ``focus`` in detail."""
    body = ["<h2>Over time</h2>"]
    if total is not None and total > len(windows):
        hint = f": <code>{html.escape(more_hint)}</code> shows every one" if more_hint else ""
        body.append(f"<p class='muted'>The newest {len(windows):,} of {total:,} windows"
                    f"{hint}.</p>")
    body.append(history_plots(windows, reports))
    body.append(_table(["id", "window", "rows", "drift", "share", "prediction", "quality",
                        "metric", "labels"],
                       [[w["id"], f"{w['start'][:16]} → {w['end'][:16]}", f"{w['rows']:,}",
                         _verdict(w["drifted"]), f"{(w['drift_share'] or 0):.0%}",
                         _verdict(w["prediction_drifted"]), w["quality_findings"],
                         "" if w["metric_value"] is None else f"{w['metric_value']:.4g}",
                         f"{w['label_coverage']:.0%}"] for w in windows]))
    if focus is not None:
        body.append(window_section(focus["report"], f"Window {focus['start'][:16]} → "
                                                    f"{focus['end'][:16]}"))
    return render(f"mloop monitoring: {model}", "".join(body))

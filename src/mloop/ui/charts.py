"""Charts drawn as inline SVG on the server: no script, no fetch, every page works offline.

Each drawn datum is one element with a ``mark`` class and a ``<title>`` (the browser shows it
on hover), so a reader can ask "why" of any bar or marker, and a test can count the marks
against the records they come from. matplotlib (what the static reports use) takes ~100 ms a
figure; these are string templates, well under a millisecond per mark.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from markupsafe import Markup

from mloop.loop.timeline import Decision, Stint, Timeline

# a version's colour: stable for the version, distinct for neighbours
PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7",
           "#9c755f", "#e15759", "#bab0ac"]
DECISION_STYLE = {  # kind -> (colour, symbol, label)
    "promote": ("#137333", "▲", "promoted"),
    "override": ("#e37400", "▲", "promoted despite failed gates (override)"),
    "rollback": ("#b00020", "▼", "rolled back"),
    "canary": ("#1a73e8", "●", "canary started"),
    "shadow": ("#1a73e8", "○", "shadow started"),
    "stop": ("#5f6368", "■", "challenger stopped"),
    "rejected": ("#5f6368", "✕", "candidate rejected by the gates"),
    "rolled_back": ("#b00020", "✕", "canary rolled back after probation"),
    "retrain_failed": ("#b00020", "!", "retrain failed"),
    "refused": ("#e37400", "✕", "promotion refused"),
}


def colour(version: int | None) -> str:
    return "#999" if version is None else PALETTE[(version - 1) % len(PALETTE)]


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _day(t: datetime | None) -> str:
    return "now" if t is None else t.strftime("%Y-%m-%d %H:%M")


@dataclass(frozen=True)
class Axis:
    """Event time -> x pixels over [start, end] across ``width`` from ``left``."""

    start: datetime
    end: datetime
    left: float
    width: float

    def x(self, t: datetime) -> float:
        span = (self.end - self.start).total_seconds() or 1.0
        frac = (t - self.start).total_seconds() / span
        return self.left + self.width * min(max(frac, 0.0), 1.0)

    def ticks(self) -> list[tuple[datetime, str]]:
        """Month starts (or days, for a short span), at most ~14 labelled."""
        days = (self.end - self.start).days
        out: list[tuple[datetime, str]] = []
        if days > 60:
            t = self.start.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            step = max(1, days // 30 // 14 + 1)
            while t <= self.end:
                if t >= self.start and (t.month - 1) % step == 0:
                    out.append((t, t.strftime("%Y-%m") if t.month == 1 or not out
                                else t.strftime("%b")))
                t = (t + timedelta(days=32)).replace(day=1)
        else:
            t = self.start.replace(hour=0, minute=0, second=0, microsecond=0)
            step = max(1, days // 14 + 1)
            while t <= self.end:
                if t >= self.start:
                    out.append((t, t.strftime("%m-%d")))
                t += timedelta(days=step)
        return out


def _stint_title(s: Stint, now_share: float | None = None) -> str:
    share = f"{s.traffic:.0%} of traffic" if s.alias == "challenger" else (
        "all traffic" if now_share is None else f"{now_share:.0%} of traffic")
    mode = {"canary": "canary", "shadow": "shadow (scored on a copy, answers nothing)"}.get(
        s.action, s.alias)
    return (f"v{s.version} {mode}, {share}: {_day(s.start)} → {_day(s.end)} (event time). "
            f"Put there by {s.action} ({s.actor}): {s.reason}")


def timeline_svg(tl: Timeline, *, width: int = 1100) -> Markup:
    """Lanes on one event-time axis: champion, challenger, decisions and retrains, drift
    share per window, realized performance per window against the holdout."""
    if tl.start is None or tl.end is None:
        return Markup("<p class='muted'>Nothing has been deployed or monitored yet.</p>")
    ax = Axis(tl.start, tl.end, left=110, width=width - 130)
    parts: list[str] = []
    lanes = {"champion": 24, "challenger": 64, "decisions": 104, "drift": 150,
             "performance": 240}
    lane_h = 32
    labels = [("champion", lanes["champion"] + 20), ("challenger", lanes["challenger"] + 20),
              ("decisions", lanes["decisions"] + 14), ("retrains", lanes["decisions"] + 34),
              ("drift share", lanes["drift"] + 34), (_perf_label(tl), lanes["performance"] + 40)]
    for text, y in labels:
        parts.append(f"<text x='4' y='{y}' class='lane'>{_e(text)}</text>")
    # month grid
    for t, label in ax.ticks():
        x = ax.x(t)
        parts.append(f"<line x1='{x:.1f}' x2='{x:.1f}' y1='18' y2='330' class='grid'/>"
                     f"<text x='{x + 2:.1f}' y='344' class='tick'>{_e(label)}</text>")
    # deployments: one rectangle per stint
    for s in tl.stints:
        if s.alias not in ("champion", "challenger"):
            continue
        x0 = ax.x(s.start)
        x1 = ax.x(s.end or tl.end)
        y = lanes[s.alias]
        h = lane_h if s.alias == "champion" else max(8.0, lane_h * (s.traffic or 0.25))
        style = " shadow" if s.action == "shadow" else ""
        w = max(x1 - x0, 1.5)
        share = ("" if s.alias == "champion" else
                 f" {s.traffic:.0%}" if s.action == "canary" else " shadow")
        parts.append(
            f"<g class='mark stint{style}' data-alias='{s.alias}' data-version='{s.version}'>"
            f"<title>{_e(_stint_title(s))}</title>"
            f"<rect x='{x0:.1f}' y='{y + lane_h - h:.1f}' width='{w:.1f}' height='{h:.1f}' "
            f"fill='{colour(s.version)}' rx='2'/>"
            + (f"<text x='{x0 + 3:.1f}' y='{y + lane_h - 8:.1f}' class='vlabel'>v{s.version}"
               f"{share}</text>" if w > 26 else "")
            + "</g>")
    # decisions: a symbol on the decisions lane and a faint line across the chart
    for d in tl.decisions:
        parts.append(_decision_mark(d, ax.x(d.at), lanes["decisions"] + 14))
    # retrains: a diamond at the trigger time, coloured by outcome
    for r in tl.retrains:
        t = datetime.fromisoformat(r["triggered_at"])
        x = ax.x(t)
        y = lanes["decisions"] + 30
        outcome = r.get("outcome") or "running"
        fill = {"promoted": "#137333", "rolled_back": "#b00020", "rejected": "#5f6368",
                "failed": "#b00020", "canary": "#1a73e8"}.get(outcome, "#999")
        triggers = ", ".join(t_["trigger"] for t_ in r.get("triggers", []))
        secs = f", {r['seconds']:.0f} s" if r.get("seconds") else ""
        title = (f"retrain at {_day(t)} (triggers: {triggers or 'n/a'}) → "
                 f"v{r.get('version') or '?'}: {outcome}{secs}. {r.get('reason') or ''}")
        parts.append(f"<g class='mark retrain' data-outcome='{_e(outcome)}'>"
                     f"<title>{_e(title)}</title><path d='M{x:.1f} {y - 6} l6 6 l-6 6 l-6 -6 z'"
                     f" fill='{fill}'/></g>")
    parts.append(_drift_bars(tl, ax, lanes["drift"], 60))
    parts.append(_performance(tl, ax, lanes["performance"], 80))
    height = 352
    # every text in parts went through _e (html.escape); the rest are numbers and fixed names
    return Markup(f"<svg class='chart timeline' viewBox='0 0 {width} {height}' "  # nosec B704
                  f"role='img' aria-label='deployment timeline'>{''.join(parts)}</svg>")


def _perf_label(tl: Timeline) -> str:
    metric = next((w["metric"] for w in tl.windows if w.get("metric")), None)
    return metric or "performance"


def _decision_mark(d: Decision, x: float, y: float) -> str:
    fill, symbol, label = DECISION_STYLE.get(d.kind, ("#333", "?", d.kind))
    what = f"v{d.version}" if d.version is not None else (
        f"v{d.replaced}" if d.replaced is not None else "")
    replaced = (f" (replacing v{d.replaced})" if d.replaced is not None and d.version is not None
                else "")
    title = f"{_day(d.at)}: {what} {label}{replaced} by {d.actor}: {d.reason}"
    return (f"<g class='mark decision' data-kind='{_e(d.kind)}'><title>{_e(title)}</title>"
            f"<line x1='{x:.1f}' x2='{x:.1f}' y1='20' y2='330' stroke='{fill}' "
            f"class='decision-line'/>"
            f"<text x='{x:.1f}' y='{y + 5:.1f}' fill='{fill}' class='symbol'>{symbol}</text>"
            f"</g>")


def _drift_bars(tl: Timeline, ax: Axis, top: float, height: float) -> str:
    parts = [f"<line x1='{ax.left}' x2='{ax.left + ax.width}' y1='{top + height}' "
             f"y2='{top + height}' class='base'/>"]
    for w in tl.windows:
        t0 = datetime.fromisoformat(w["start"])
        t1 = datetime.fromisoformat(w["end"])
        x0, x1 = ax.x(t0), ax.x(t1)
        share = w["drift_share"] or 0.0
        h = max(share * height, 1.0)
        cls = "drifted" if w["drifted"] else "calm"
        if w.get("windows", 1) > 1:  # a bucket of windows (Timeline.bucketed)
            title = (f"{w['windows']} windows {_day(t0)} → {_day(t1)}: up to {share:.0%} of "
                     f"features drifted; {w['drifted_windows']} with dataset drift; "
                     f"{w['rows']:,} rows")
        else:
            title = (f"window {_day(t0)} → {_day(t1)}: {share:.0%} of features drifted"
                     f"{' (dataset drift)' if w['drifted'] else ''}; {w['rows']:,} rows; "
                     f"served by {', '.join(f'v{v}' for v in w['versions'] or []) or 'n/a'}")
        parts.append(f"<rect class='mark drift {cls}' x='{x0:.1f}' y='{top + height - h:.1f}' "
                     f"width='{max(x1 - x0 - 0.3, 0.6):.1f}' height='{h:.1f}'>"
                     f"<title>{_e(title)}</title></rect>")
    return "".join(parts)


def _estimated(w: dict[str, Any], metric: str | None) -> float | None:
    """The window's estimate of ``metric`` before labels (CBPE or DLE), if it has one
    (a bucket of many windows carries none)."""
    est = w.get("estimated") or {}
    value = est.get("value")
    return float(value) if value is not None and est.get("metric") == metric else None


def _performance(tl: Timeline, ax: Axis, top: float, height: float) -> str:
    pts = [(w, w["metric_value"]) for w in tl.windows if w["metric_value"] is not None]
    metric = next((w["metric"] for w in tl.windows if w.get("metric")), None)
    if metric is None:
        metric = next(((w.get("estimated") or {}).get("metric") for w in tl.windows
                       if (w.get("estimated") or {}).get("metric")), None)
    est = [(w, v) for w in tl.windows if (v := _estimated(w, metric)) is not None]
    if not pts and not est:
        return (f"<text x='{ax.left}' y='{top + height / 2}' class='muted'>no labelled "
                f"windows yet</text>")
    refs = [w["reference_metric"] for w, _ in pts if w["reference_metric"] is not None]
    values = [v for _, v in pts] + refs + [v for _, v in est]
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.1 or abs(hi) * 0.1 or 1.0
    lo, hi = lo - pad, hi + pad

    def y(v: float) -> float:
        return top + height - (v - lo) / (hi - lo) * height

    parts = [f"<text x='{ax.left - 4}' y='{y(hi - pad) + 4:.1f}' class='tick end'>"
             f"{hi - pad:.3g}</text><text x='{ax.left - 4}' y='{y(lo + pad) + 4:.1f}' "
             f"class='tick end'>{lo + pad:.3g}</text>"]
    # the holdout reference of the version serving, as a step line
    prev: tuple[float, float] | None = None
    ref_path = []
    for w, _ in pts:
        if w["reference_metric"] is None:
            continue
        x0 = ax.x(datetime.fromisoformat(w["start"]))
        x1 = ax.x(datetime.fromisoformat(w["end"]))
        yr = y(w["reference_metric"])
        ref_path.append(f"{'M' if prev is None else 'L'}{x0:.1f} {yr:.1f} L{x1:.1f} {yr:.1f}")
        prev = (x1, yr)
    if ref_path:
        parts.append(f"<path d='{' '.join(ref_path)}' class='reference'><title>holdout "
                     f"{_e(pts[0][0]['metric'])} of the serving version (its gate "
                     f"evaluation)</title></path>")
    # the estimate from the served probabilities: there before any label arrives
    if est:
        parts.append("<path d='" + " ".join(
            f"{'M' if i == 0 else 'L'}{ax.x(_mid(w)):.1f} {y(v):.1f}"
            for i, (w, v) in enumerate(est)) + "' class='estimated'/>")
        for w, v in est:
            window_est = w.get("estimated") or {}
            note = " (uncalibrated on the holdout)" \
                if window_est.get("status") == "uncalibrated" else ""
            source = "the served inputs and predictions (DLE)" \
                if window_est.get("method") == "dle" else "the served probabilities"
            parts.append(f"<rect class='mark est' x='{ax.x(_mid(w)) - 2:.1f}' "
                         f"y='{y(v) - 2:.1f}' width='4' height='4'><title>window "
                         f"{_e(w['start'][:16])} → {_e(w['end'][:16])}: estimated {_e(metric)} "
                         f"{v:.4g} from {source}{_e(note)}</title></rect>")
    if not pts:
        return "".join(parts)
    line = " ".join(
        f"{'M' if i == 0 else 'L'}{ax.x(_mid(w)):.1f} {y(v):.1f}" for i, (w, v) in enumerate(pts))
    parts.append(f"<path d='{line}' class='realized'/>")
    for w, v in pts:
        ref = w["reference_metric"]
        if w.get("windows", 1) > 1:  # a bucket: its mean, min and max
            title = (f"{w['windows']} windows {w['start'][:16]} → {w['end'][:16]}: "
                     f"{w['metric']} mean {v:.4g} (min {w['metric_min']:.4g}, max "
                     f"{w['metric_max']:.4g}) on {w['label_coverage']:.0%} labelled rows"
                     + (f" (holdout {ref:.4g})" if ref is not None else ""))
        else:
            title = (f"window {w['start'][:16]} → {w['end'][:16]}: {w['metric']} {v:.4g} on "
                     f"{w['label_coverage']:.0%} labelled rows"
                     + (f" (holdout {ref:.4g})" if ref is not None else ""))
        parts.append(f"<circle class='mark perf' cx='{ax.x(_mid(w)):.1f}' cy='{y(v):.1f}' "
                     f"r='2.2'><title>{_e(title)}</title></circle>")
    return "".join(parts)


def _mid(w: dict[str, Any]) -> datetime:
    t0, t1 = datetime.fromisoformat(w["start"]), datetime.fromisoformat(w["end"])
    return t0 + (t1 - t0) / 2


def heatmap_svg(windows: Sequence[dict[str, Any]], features: Sequence[str],
                scores: dict[tuple[int, str], tuple[float, float, bool]], *,
                cell_w: float | None = None, cell_h: float = 16.0,
                href: Callable[[int, str | None], str] | None = None) -> Markup:
    """Windows (columns, oldest left) x features (rows): each cell's shade is its drift score
    over its threshold (red when drifted). Cells are as wide as ~1000 px allows (6 to 60).

    ``href(window id, feature or None)`` links each cell, each date label (its window) and
    each feature label (the newest window, at that feature) to the window's page."""
    if not windows or not features:
        return Markup("<p class='muted'>No windows evaluated yet.</p>")
    if cell_w is None:
        cell_w = max(6.0, min(60.0, 1000.0 / len(windows)))
    label_every = max(1, round(80 / cell_w))  # a date label every ~80 px
    left, top = 110, 8
    parts = []
    newest = windows[-1]["id"]
    for j, f in enumerate(features):
        parts.append(_link(href, newest, f, f"<text x='4' y='{top + j * cell_h + cell_h - 4}' "
                                            f"class='lane'>{_e(f)}</text>"))
    for i, w in enumerate(windows):
        x = left + i * cell_w
        for j, f in enumerate(features):
            cell = scores.get((w["id"], f))
            if cell is None:
                continue
            score, threshold, drifted = cell
            ratio = min(score / threshold, 2.0) / 2.0 if threshold else 0.0
            fill = (f"rgba(176,0,32,{0.35 + 0.65 * ratio:.2f})" if drifted
                    else f"rgba(78,121,167,{0.08 + 0.5 * ratio:.2f})")
            title = (f"{f} in window {w['start'][:16]} → {w['end'][:16]}: score {score:.3g}, "
                     f"threshold {threshold:.3g}, {'drift' if drifted else 'no drift'}")
            parts.append(_link(href, w["id"], f, (
                f"<rect class='mark cell{' drifted' if drifted else ''}' "
                f"x='{x:.1f}' y='{top + j * cell_h}' width='{cell_w - 0.5:.1f}' "
                f"height='{cell_h - 1}' fill='{fill}'><title>{_e(title)}</title></rect>")))
        if i % label_every == 0:
            parts.append(_link(href, w["id"], None, (
                f"<text x='{x:.1f}' y='{top + len(features) * cell_h + 12}' "
                f"class='tick'>{_e(w['start'][:10])}</text>")))
    width = left + len(windows) * cell_w + 80
    height = top + len(features) * cell_h + 20
    # every text in parts went through _e (html.escape); the rest are numbers and fixed names
    return Markup(f"<svg class='chart heatmap' viewBox='0 0 {width:.0f} {height}' "  # nosec B704
                  f"style='max-width:{width:.0f}px' role='img' aria-label='drift heatmap'>"
                  f"{''.join(parts)}</svg>")


def _link(href: Callable[[int, str | None], str] | None, window_id: int, feature: str | None,
          inner: str) -> str:
    if href is None:
        return inner
    return f"<a href='{_e(href(window_id, feature))}'>{inner}</a>"


def feature_anchor(feature: str) -> str:
    """The id of a feature's section on a window's page (a link's ``#fragment``)."""
    return "f-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in feature)


def distribution_svg(col: dict[str, Any], *, width: int = 600, height: int = 180) -> Markup:
    """One feature in one window: the reference share per bin (or category) beside the
    window's, on the reference's bins. ``col`` is a column of a stored drift report
    (``labels``, ``reference_hist``, ``window_hist``: shares that sum to 1). Each bar is a
    mark: ``ref`` for the reference, ``cur`` for the window (``drifted`` when it drifted)."""
    labels, ref, cur = col["labels"], col["reference_hist"], col["window_hist"]
    n = len(labels)
    if not n:
        return Markup("<p class='muted'>No bins recorded.</p>")
    left, top, bottom = 36, 8, 34
    plot_h = height - top - bottom
    slot = (width - left - 4) / n
    bar = max(slot * 0.4, 0.8)
    peak = max([*ref, *cur, 1e-9])
    drifted = " drifted" if col.get("drifted") else ""
    parts = [f"<line x1='{left}' x2='{width - 4}' y1='{top + plot_h}' y2='{top + plot_h}' "
             f"class='base'/>",
             f"<text x='{left - 4}' y='{top + 8}' class='tick end'>{peak:.0%}</text>",
             f"<text x='{left - 4}' y='{top + plot_h}' class='tick end'>0</text>"]
    label_every = max(1, math.ceil(n / ((width - left) // 70)))  # a label every ~70 px
    for i, label in enumerate(labels):
        x = left + i * slot + slot * 0.1
        for cls, share, dx, who in (("ref", ref[i], 0.0, "reference"),
                                    (f"cur{drifted}", cur[i], bar, "this window")):
            h = max(share / peak * plot_h, 0.5 if share else 0.0)
            parts.append(f"<rect class='mark {cls}' x='{x + dx:.1f}' "
                         f"y='{top + plot_h - h:.1f}' width='{bar:.1f}' height='{h:.1f}'>"
                         f"<title>{_e(label)}: {share:.1%} of {who}</title></rect>")
        if i % label_every == 0:
            parts.append(f"<text x='{x:.1f}' y='{top + plot_h + 12}' class='tick'>"
                         f"{_e(_bin_label(str(label)))}</text>")
    # every text in parts went through _e (html.escape); the rest are numbers and fixed names
    return Markup(f"<svg class='chart dist' viewBox='0 0 {width} {height}' role='img' "  # nosec B704
                  f"aria-label='{_e(col.get('column', ''))}: reference vs window'>"
                  f"{''.join(parts)}</svg>")


def _bin_label(label: str) -> str:
    """A numeric bin ``[a, b)`` is labelled by its lower edge under its bar (the bar's title
    gives both); a category by its name, cut to fit."""
    if label.startswith("[") and ", " in label:
        return label[1:label.index(", ")]
    return label if len(label) <= 10 else label[:9] + "…"


def cost_by_day_svg(days: Sequence[dict[str, Any]], currency: str, *,
                    budget: float | None = None, width: int = 1100,
                    height: int = 220) -> Markup:
    """What each UTC day cost: training (runs, trials, retrains) and serving stacked, the
    budget per day as a line when one is set. ``days`` are ``mloop cost --by day`` rows
    (``key`` the day, ``training_cost``, ``serving_cost``). Each bar is a mark (``train`` or
    ``serve``, ``over`` on a day above the budget) whose title gives the figures."""
    if not days:
        return Markup("<p class='muted'>Nothing recorded yet: no run, trial or served "
                      "prediction in this range.</p>")
    left, top, bottom = 56, 10, 30
    plot_h = height - top - bottom
    slot = (width - left - 4) / len(days)
    bar = max(min(slot * 0.7, 40.0), 1.0)
    totals = [float(d["training_cost"] or 0.0) + float(d["serving_cost"] or 0.0) for d in days]
    peak = max([*totals, budget or 0.0, 1e-12])
    parts = [f"<line x1='{left}' x2='{width - 4}' y1='{top + plot_h}' y2='{top + plot_h}' "
             f"class='base'/>",
             f"<text x='{left - 4}' y='{top + 8}' class='tick end'>{peak:.3g}</text>",
             f"<text x='{left - 4}' y='{top + plot_h}' class='tick end'>0</text>"]
    label_every = max(1, math.ceil(len(days) / ((width - left) // 70)))
    for i, (d, total) in enumerate(zip(days, totals, strict=True)):
        x = left + i * slot + (slot - bar) / 2
        over = " over" if budget is not None and total > budget else ""
        y = float(top + plot_h)
        for cls, value, what in (("train", d["training_cost"], "training"),
                                 ("serve", d["serving_cost"], "serving")):
            value = float(value or 0.0)
            h = value / peak * plot_h
            y -= h
            parts.append(f"<rect class='mark {cls}{over}' x='{x:.1f}' y='{y:.1f}' "
                         f"width='{bar:.1f}' height='{h:.1f}'><title>{_e(d['key'])}: "
                         f"{what} {value:.4g} {_e(currency)} (day total {total:.4g}"
                         f"{', over the budget' if over else ''})</title></rect>")
        if i % label_every == 0:
            parts.append(f"<text x='{x:.1f}' y='{top + plot_h + 14}' class='tick'>"
                         f"{_e(str(d['key'])[5:])}</text>")
    if budget is not None:
        yb = top + plot_h - budget / peak * plot_h
        parts.append(f"<line class='budget' x1='{left}' x2='{width - 4}' y1='{yb:.1f}' "
                     f"y2='{yb:.1f}'><title>budget {budget:.4g} {_e(currency)} per day"
                     f"</title></line>")
    # every text in parts went through _e (html.escape); the rest are numbers and fixed names
    return Markup(f"<svg class='chart cost' viewBox='0 0 {width} {height}' role='img' "  # nosec B704
                  f"aria-label='cost per day, {_e(currency)}'>{''.join(parts)}</svg>")

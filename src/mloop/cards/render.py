"""A model card as Markdown (the terminal and ``--md``) and as self-contained HTML (``--html``,
a jinja template beside this module).

Both print what :func:`mloop.cards.model_card.build_card` holds and nothing else: a number as
stored (six significant digits, the precision mloop tags versions with), a missing fact as
"not recorded".
"""

from __future__ import annotations

from importlib import resources
from typing import Any

NOT_RECORDED = "not recorded"


def num(x: Any) -> str:
    """A recorded number as the card prints it: integers whole, floats to 6 significant
    digits; None (nothing recorded) as "not recorded"."""
    if x is None:
        return NOT_RECORDED
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.6g}"
    return str(x)


def text(x: Any) -> str:
    return NOT_RECORDED if x is None or x == "" else str(x)


def _code(x: Any) -> str:
    """An identifier as a Markdown code span, or "not recorded" as plain text."""
    return NOT_RECORDED if x is None or x == "" else f"`{x}`"


def _cell(x: Any) -> str:
    """A Markdown table cell: pipes escaped, one line."""
    return text(x).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def column_summary(c: dict[str, Any]) -> str:
    """One profiled column in a line: range, most frequent values or span."""
    if c["kind"] == "numeric":
        return (f"mean {num(c.get('mean'))}, std {num(c.get('std'))}, "
                f"min {num(c.get('min'))}, max {num(c.get('max'))}")
    if c["kind"] == "categorical":
        top = ", ".join(f"{k} ({v})" for k, v in (c.get("top") or {}).items())
        return f"{num(c.get('n_unique'))} values; most frequent: {top}"
    if c["kind"] == "datetime":
        return f"{text(c.get('min'))} to {text(c.get('max'))}"
    return ""


def window_drift(w: dict[str, Any]) -> str:
    if w["drifted"] is None:
        return NOT_RECORDED
    share = f" (share {num(w['drift_share'])})" if w["drift_share"] is not None else ""
    feats = f": {', '.join(w['drifted_features'])}" if w["drifted_features"] else ""
    return f"{'drifted' if w['drifted'] else 'no'}{share}{feats}"


def window_metric(w: dict[str, Any]) -> str:
    if w["metric_value"] is None:
        if w.get("estimated_value") is not None:
            return (f"not labelled; estimated {w['estimated_metric']} "
                    f"{num(w['estimated_value'])}")
        return NOT_RECORDED
    return (f"{w['metric']} {num(w['metric_value'])} (reference "
            f"{num(w['reference_metric'])}, label coverage {num(w['label_coverage'])})")


def render_markdown(card: dict[str, Any]) -> str:
    """The card as Markdown: one section per part of the card, in the card's order."""
    lines: list[str] = []
    for section in (_md_head, _md_data, _md_metrics, _md_gates, _md_serving, _md_lineage):
        lines += section(card)
    if card["not_recorded"]:
        lines += ["## Not recorded", "", *[f"- {p}" for p in card["not_recorded"]], ""]
    return "\n".join(lines)


def _md_head(c: dict[str, Any]) -> list[str]:
    use = c["intended_use"]
    return [f"# Model card: {c['model']} v{c['version']}", "",
            f"- registered: {text(c['registered_at'])}",
            f"- aliases now: {', '.join(c['aliases']) or 'none'}",
            f"- task: {text(c['task'])}; target: {text(c['target'])}",
            f"- estimator: {text(c['estimator'])}", "",
            "## Intended use", "", text(use["description"]), "",
            "## Limitations", "", text(use["limitations"]), "",
            f"_Source: {use['source']}._", ""]


def _md_data(c: dict[str, Any]) -> list[str]:
    lines = ["## Training data", ""]
    train, hold = c["training_data"]["train"], c["training_data"]["holdout"]
    if train is None:
        lines.append(f"- training snapshot: {NOT_RECORDED}")
    else:
        period = train["period"]
        lines += [f"- training snapshot `{train['digest']}`: {num(train['rows'])} rows, "
                  f"{num(train['columns'])} columns, from {text(train['source'])}",
                  "- period: " + (f"{period['column']} from {period['min']} to {period['max']}"
                                  if period else NOT_RECORDED)]
    lines += [f"- holdout snapshot `{hold['digest']}`: {num(hold['rows'])} rows"
              if hold else f"- holdout snapshot: {NOT_RECORDED}", ""]
    profile = (train or {}).get("profile")
    if profile:
        lines += [f"Profile of the training snapshot ({num(profile['rows'])} rows):", ""]
        lines += _table(["column", "kind", "missing rate", "summary"],
                        [[p["column"], p["kind"], num(p["missing_rate"]), column_summary(p)]
                         for p in profile["columns"]])
    elif train is not None:
        lines += [f"Profile: {NOT_RECORDED}.", ""]
    return lines


def _md_metrics(c: dict[str, Any]) -> list[str]:
    metrics = c["metrics"]
    lines = ["## Metrics (holdout)", ""]
    if metrics["values"] is None:
        lines += [f"{NOT_RECORDED}.", ""]
    else:
        where = (f"MLflow run `{metrics['run_id']}`" if metrics["source"] == "mlflow_run"
                 else "the version's tags")
        lines += [f"From {where}.", ""]
        lines += _table(["metric", "value"], [[k, num(v)] for k, v in
                                             sorted(metrics["values"].items())])
    lines += ["### Slices", ""]
    if not c["slices"]:
        lines += [f"{NOT_RECORDED} (no slice gate was evaluated).", ""]
    for s in c["slices"]:
        lines += [f"By `{s['column']}` ({s['status']}; worst slice worse than overall by "
                  f"{num(s['worst_by'])}, margin {num(s['margin'])}):", ""]
        lines += _table(["slice", "rows", "value", "worse than overall by", "status"],
                        [[x["slice"], num(x.get("rows")), num(x.get("value")),
                          num(x.get("worse_by")), x["status"]] for x in s["slices"]])
    return lines


def _md_gates(c: dict[str, Any]) -> list[str]:
    gates = c["gates"]
    if gates is None:
        return ["## Gates", "", f"{NOT_RECORDED}: never gated.", ""]
    against = f"v{gates['champion']}" if gates["champion"] is not None else "no champion"
    return ["## Gates", "", f"{'Passed' if gates['passed'] else 'Failed'} against {against}, "
            f"evaluated {gates['evaluated_at']}.", "",
            *_table(["gate", "status", "value", "threshold", "message"],
                    [[r["gate"], r["status"], num(r["value"]), num(r["threshold"]),
                      r["message"]] for r in gates["results"]])]


def _md_serving(c: dict[str, Any]) -> list[str]:
    serving = c["serving"]
    lines = ["## Serving history", "", "### Deployments", ""]
    if not serving["deployments"]:
        lines += [f"{NOT_RECORDED}: never deployed.", ""]
    else:
        lines += _table(["alias", "action", "traffic", "from", "to", "by", "reason"],
                        [[d["alias"], d["action"], num(d["traffic"]), d["started_at"],
                          d["ended_at"] or "now", d["actor"], d["reason"]]
                         for d in serving["deployments"]])
    lines += [f"### Drift and performance while it served (windows of {serving['window']})",
              ""]
    summary = serving["summary"]
    if summary is None:
        return [*lines, f"{NOT_RECORDED}: no monitored window holds traffic it answered.", ""]
    lines += [serving_summary(summary), ""]
    lines += _table(["window", "start", "end", "rows", "shared with", "drift",
                     "prediction drift", "performance"],
                    [[w["id"], w["start"], w["end"], num(w["rows"]),
                      ", ".join(f"v{v}" for v in w["shared_with"]) or "-",
                      window_drift(w), num(w["prediction_drifted"]), window_metric(w)]
                     for w in serving["windows"]])
    return lines


def serving_summary(s: dict[str, Any]) -> str:
    scored = (f"; {s['metric']} from {num(s['metric_min'])} to {num(s['metric_max'])}"
              if s["metric"] else "")
    return (f"{s['windows']} windows from {s['first']} to {s['last']}, {s['rows']} rows; "
            f"{s['drifted_windows']} drifted, {s['prediction_drifted_windows']} with "
            f"prediction drift, {s['labelled_windows']} labelled{scored}.")


def _md_lineage(c: dict[str, Any]) -> list[str]:
    lin = c["lineage"]
    pr, code = lin["pipeline_run"], lin["code"]
    lines = ["## Lineage", "",
             f"- MLflow run: {_code(lin['run']['mlflow_run_id'])}",
             f"- pipeline run: {_code(pr.get('run_id'))} ({text(pr.get('pipeline'))}, "
             f"{text(pr.get('status'))}, started {text(pr.get('started_at'))})",
             f"- code: git {text(code['git_commit'])}"
             f"{' (dirty)' if code['git_dirty'] == 'true' else ''}, mloop "
             f"{text(code['mloop_version'])}",
             f"- config hash: {_code(lin['config_hash'])}"]
    lines += [f"- {role} snapshot: `{snap['digest']}`" if snap
              else f"- {role} snapshot: {NOT_RECORDED}" for role, snap in lin["data"].items()]
    return [*lines, ""]


def render_html(card: dict[str, Any]) -> str:
    """The card as one self-contained HTML page (no script, no external asset)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resources.files("mloop.cards") / "templates")),
        autoescape=True, trim_blocks=True, lstrip_blocks=True,
        undefined=jinja2.StrictUndefined)
    env.filters["num"] = num
    env.filters["text"] = text
    env.globals.update(column_summary=column_summary, window_drift=window_drift,
                       window_metric=window_metric, serving_summary=serving_summary,
                       NOT_RECORDED=NOT_RECORDED)
    return env.get_template("model_card.html").render(c=card)

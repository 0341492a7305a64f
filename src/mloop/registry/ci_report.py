"""The Markdown report of ``mloop ci check`` (fit for a pull request comment) and its plots.

The report stays well under GitHub's 65,536-character comment limit: long parts (the config
diff, the profile changes, slices) are cut with a line saying how much was left out. Plots are
PNG files next to the report (matplotlib, headless); the report links them by file name, so
they show where the files travel with it (a CI artifact, a checked-out folder).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from mloop.errors import MloopError
from mloop.registry.ci_check import CiCheck

__all__ = ["check_report_path", "render_markdown", "write_report"]

MAX_DIFF_LINES = 150
MAX_ROWS = 40
_MARK = {"pass": "✅ pass", "fail": "❌ fail", "skip": "➖ skip"}


def check_report_path(path: Path) -> Path:
    """Refuse a report path before anything is trained: it must name a ``.md`` file in a
    folder that exists or can be made."""
    path = Path(path)
    if path.is_dir():
        raise MloopError(f"--report {path}: is a folder; name the file, e.g. {path / 'report.md'}")
    if path.suffix.lower() != ".md":
        raise MloopError(f"--report {path}: the report is Markdown; name a file ending in .md")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise MloopError(f"--report {path}: {parent} is a file, not a folder")
            break
    return path


def _num(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _cell(x: Any) -> str:
    return _num(x).replace("|", "\\|").replace("\n", " ")


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    shown = rows[:MAX_ROWS]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in shown]
    if len(rows) > len(shown):
        out.append(f"\n_{len(rows) - len(shown)} more rows not shown (see `--json`)._")
    return out


def _short(digest: str | None) -> str:
    return f"`{digest[:12]}`" if digest else "—"


def _delta(row: dict[str, Any]) -> str:
    if row["delta"] is None:
        return "—"
    arrow = {True: " (better)", False: " (worse)", None: ""}[row["better"]]
    return f"{row['delta']:+.4g}{arrow}"


def render_markdown(check: CiCheck, plots: dict[str, str] | None = None) -> str:
    """The report as Markdown; ``plots`` maps a plot's title to its file name."""
    champ = f"v{check.base.version}" if check.base.version is not None else "no champion yet"
    verdict = "✅ every gate passed" if check.passed else "❌ a gate failed"
    lines = [f"## mloop ci check: {verdict}",
             "",
             f"**{check.model} v{check.version}** (pipeline run `{check.pipeline_run_id}`"
             f"{'' if check.trained else ', taken as given'}) against the "
             f"**{check.base.env}** champion: {champ}. Nothing was promoted.", ""]

    lines += ["### Metrics", ""]
    if check.metrics:
        lines += _table(["metric", f"v{check.version}", f"champion ({champ})", "delta"],
                        [[m["metric"], m["candidate"], m["champion"], _delta(m)]
                         for m in check.metrics])
        lines += ["", "_As recorded at registration, each version on its own holdout; the "
                      "non-inferiority gate compares both on the candidate's._"]
    else:
        lines.append("_No metrics were recorded on the version._")

    lines += ["", "### Gates", ""]
    lines += _table(["gate", "status", "value", "threshold", "detail"],
                    [[r["gate"], _MARK.get(r["status"], r["status"]), r["value"],
                      r["threshold"], r["message"]] for r in check.gates["results"]])

    lines += ["", "### Slices", ""]
    if not check.slices:
        lines.append("_No slice gates in mloop.yaml (`gates.slices`)._")
    for s in check.slices:
        lines += [f"**{s['column']}** ({_MARK.get(s['status'], s['status'])})", ""]
        lines += _table(["slice", "rows", "value", "worse than overall by", "status"],
                        [[x["slice"], x["rows"], x.get("value"), x.get("worse_by"),
                          _MARK.get(x["status"], x["status"])] for x in s["slices"]])
        lines.append("")

    lines += ["", "### Data", ""]
    lines += _table(["snapshot", f"v{check.version}", "champion", "rows", ""],
                    [[s["role"], _short(s["candidate"]), _short(s["champion"]),
                      f"{_num(s['candidate_rows'])} (was {_num(s['champion_rows'])})",
                      "same" if s["same"] else "**changed**"]
                     for s in check.data["snapshots"]])
    profile = check.data.get("train_profile")
    if profile:
        lines += ["", "Training data profile, champion → candidate:", ""]
        rows: list[list[Any]] = []
        for p in profile:
            if p["change"] != "changed":
                rows.append([p["column"], p["change"], "", ""])
                continue
            for stat, v in p["stats"].items():
                rows.append([p["column"], stat, v["champion"], v["candidate"]])
        lines += _table(["column", "statistic", "champion", "candidate"], rows)
    elif profile is not None:
        lines += ["", "_The training data's profile is unchanged._"]

    lines += ["", "### Config", ""]
    cfg = check.config
    if cfg["status"] == "no champion":
        lines.append("_No champion to compare mloop.yaml with._")
    elif cfg["status"] == "not recorded":
        lines.append(f"_Not recorded: the {cfg.get('missing', 'champion')}'s pipeline run "
                     f"logged no mloop.yaml._")
    elif cfg["status"] == "same":
        lines.append("mloop.yaml is the same as the champion's.")
    else:
        diff = cfg["diff"].splitlines()
        lines += ["```diff", *diff[:MAX_DIFF_LINES], "```"]
        if len(diff) > MAX_DIFF_LINES:
            lines.append(f"_{len(diff) - MAX_DIFF_LINES} more diff lines not shown._")

    lines += ["", "### Plots", ""]
    if plots:
        lines += [f"![{title}]({name})" for title, name in plots.items()]
    elif plots is None:
        lines.append("_Plots are written with `--report`, as PNG files next to it._")
    else:
        lines.append("_No plots: no metrics were recorded and no slice gate ran._")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ plots


def _plot_metrics(check: CiCheck, path: Path) -> bool:
    rows = [m for m in check.metrics if isinstance(m["candidate"], int | float)]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one panel per metric: their scales differ (r2 near 1, mae in the target's units)
    fig, axes = plt.subplots(1, len(rows), figsize=(2.4 * len(rows) + 1, 3), squeeze=False)
    try:
        for ax, m in zip(axes[0], rows, strict=True):
            labels, values = [f"v{check.version}"], [m["candidate"]]
            if isinstance(m["champion"], int | float):
                labels.insert(0, f"v{check.base.version}")
                values.insert(0, m["champion"])
            ax.bar(labels, values, color=["tab:gray", "tab:blue"][-len(values):])
            ax.set_title(m["metric"])
        fig.suptitle(f"{check.model}: champion vs candidate, each on its own holdout")
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)
    return True


def _plot_slices(check: CiCheck, path: Path) -> bool:
    slices = [s for s in check.slices if any("value" in x for x in s["slices"])]
    if not slices:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(slices), 1, figsize=(7, 2.5 * len(slices)), squeeze=False)
    try:
        for ax, s in zip(axes[:, 0], slices, strict=True):
            xs = [x for x in s["slices"] if "value" in x]
            ax.bar([str(x["slice"]) for x in xs], [x["value"] for x in xs],
                   color=["tab:red" if x["status"] == "fail" else "tab:blue" for x in xs])
            ax.set_title(f"v{check.version}: metric by {s['column']} (red: over the margin)")
            ax.tick_params(axis="x", labelrotation=30)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)
    return True


def write_report(check: CiCheck, path: Path) -> dict[str, str]:
    """Write the plots next to ``path`` (``<stem>-metrics.png``, ``<stem>-slices.png``), then
    the report, each via a temporary file and a rename (a reader never sees half a file);
    return what was written, by kind, and record it in ``check.files``."""
    path = check_report_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    plots: dict[str, str] = {}
    files: dict[str, str] = {}
    staged: list[tuple[Path, Path]] = []
    try:
        for kind, title, draw in (("metrics", "metrics", _plot_metrics),
                                  ("slices", "slices", _plot_slices)):
            final = path.with_name(f"{path.stem}-{kind}.png")
            tmp = final.with_name(f".{final.name}.tmp-{token}")
            if draw(check, tmp):
                staged.append((tmp, final))
                plots[title] = final.name
                files[f"plot_{kind}"] = str(final)
        tmp = path.with_name(f".{path.name}.tmp-{token}")
        tmp.write_text(render_markdown(check, plots), encoding="utf-8")
        staged.append((tmp, path))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, final in staged:  # the report last: it links the plots
        os.replace(tmp, final)
    files["report"] = str(path)
    check.files = files
    return files

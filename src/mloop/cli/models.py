"""Registered versions: ``mloop models list|gate|promote|approve|soak|rollback|history|
lineage|diff|reproduce|card``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mloop.cli._common import (
    JsonOpt,
    ReasonOpt,
    open_project,
    open_project_as,
    report,
    write_text,
)
from mloop.cli.render import err, fmt_metrics, num, out, print_change, print_gates, short, table
from mloop.errors import MloopError

models_app = typer.Typer(no_args_is_help=True, help="Registered versions and their gates.")


@models_app.command("list")
def models_list(limit: Annotated[int, typer.Option(min=1)] = 20, json_: JsonOpt = False) -> None:
    """Versions with aliases, gate status, metrics and training snapshot."""
    from mloop.status import model_versions

    def render(rows: list[dict[str, Any]]) -> None:
        out.print(table("model versions", ["version", "aliases", "gates", "metrics",
                                           "train snapshot", "pipeline run"],
                        [[m["version"], ",".join(m["aliases"]), m["gates"] or "not run",
                          fmt_metrics(m["metrics"]), short(m["snapshot_train"]),
                          short(m["pipeline_run_id"])] for m in rows]))

    report(model_versions(open_project(), limit=limit), json_, render,
           to_json=lambda rows: {"versions": rows})


@models_app.command("gate")
def models_gate(version: Annotated[int, typer.Argument(min=1)], json_: JsonOpt = False) -> None:
    """Run the gates from mloop.yaml on VERSION; exit 1 if any gate fails."""
    from mloop.registry.gates import evaluate_gates

    gates = evaluate_gates(open_project_as("train"), version)
    report(gates.to_dict(), json_, print_gates)
    if not gates.passed:
        raise typer.Exit(1)


ToEnvOpt = Annotated[str | None, typer.Option(
    "--to", help="Environment to carry VERSION into (the next one of promotion.order); "
                 "VERSION is numbered as in the one before it.", show_default=False)]


@models_app.command("promote")
def models_promote(
    version: Annotated[int, typer.Argument(min=1)],
    reason: ReasonOpt,
    to: ToEnvOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Promote despite failed gates "
                                                        "(recorded as an override).")] = False,
    json_: JsonOpt = False,
) -> None:
    """Make VERSION the champion, if its gates passed against the current champion; with
    --to ENV, carry it from the environment before ENV into ENV's registry and make it the
    champion there (gated against ENV's champion, after its soak and approval)."""
    if to is None:
        from mloop.registry.promotion import promote

        project = open_project_as("promote")
        report(promote(project, version, reason=reason, force=force).to_dict(), json_,
               print_change)
        return
    from mloop.registry.env_promotion import promote_to_environment

    source, target = _promotion_sides(to)
    from mloop.security.people import authorize

    authorize(target.store, "promote")  # the person acts in the environment it changes
    with err.status(f"promoting v{version} from {source.env} to {target.env}"):
        done = promote_to_environment(source, target, version, reason=reason, force=force)
    report(done.to_dict(), json_, _print_env_promotion)


def _promotion_sides(to: str) -> tuple[Any, Any]:
    """The (source, target) projects of a promotion ``--to``: the source is the environment
    before it in the order, which an explicit --env must name."""
    import os

    from mloop.cli._common import open_environment, root_options
    from mloop.project import ENV_VAR
    from mloop.registry.environments import source_environment

    target = open_environment(to)
    given = root_options().env or os.environ.get(ENV_VAR) or None
    return open_environment(source_environment(target, to, given)), target


def _print_env_promotion(p: dict[str, Any]) -> None:
    out.print(f"{p['model']}: v{p['source_version']} of {p['source_env']} is now "
              f"v{p['version']}, champion of {p['target_env']} (was "
              f"{'v' + str(p['replaced']) if p['replaced'] else 'nothing'}); gates "
              f"{'passed' if p['gates'].get('passed') else 'overridden'}")
    if p["soak"]:
        out.print(f"soaked in {p['soak']['env']} since {p['soak']['since']} "
                  f"({p['soak']['required']} required)")
    if p["approval"]:
        out.print(f"approved by {p['approval']['by']} at {p['approval']['at']}")


@models_app.command("approve")
def models_approve(
    version: Annotated[int, typer.Argument(min=1)],
    to: Annotated[str, typer.Option("--to", help="The environment the approval is for.")],
    by: Annotated[str, typer.Option("--by", help="The approving operator's name.")],
    reason: Annotated[str, typer.Option("--reason", help="Why: recorded with it.")] = "",
    json_: JsonOpt = False,
) -> None:
    """Approve VERSION (numbered as in the environment before --to) for promotion into --to;
    recorded in that environment's audit chain."""
    from mloop.registry.environments import approve

    source, target = _promotion_sides(to)
    from mloop.security.people import authorize

    authorize(target.store, "promote")  # an approval is an operator's, recorded there
    report(approve(source, target, version, by=by, reason=reason), json_,
           lambda a: out.print(f"v{a['source_version']} of {a['source_env']} approved for "
                               f"{a['env']} by {a['by']} (event {a['event_id']})"))


@models_app.command("soak")
def models_soak(
    version: Annotated[int, typer.Argument(min=1)],
    json_: JsonOpt = False,
) -> None:
    """How long VERSION has served as champion in this environment (--env) without a breach,
    against promotion.soak; exit 1 while it may not leave yet."""
    from mloop.registry.environments import soak_status

    project = open_project()
    status = soak_status(project, version)
    order = project.config.environment_order
    after = order[order.index(status.env) + 1] if status.env in order[:-1] else \
        "the next environment"
    report(status, json_, lambda s: out.print(
        f"v{s.version} in {s.env}: " + ("soak met" if s.met else s.refusal(after))),
        to_json=lambda s: s.to_dict())
    if not status.met:
        raise typer.Exit(1)


@models_app.command("rollback")
def models_rollback(
    reason: ReasonOpt,
    to: Annotated[int | None, typer.Option("--to", min=1, help="A version that was champion "
                                                               "before.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Move the champion back to the previous champion (or --to an earlier one)."""
    from mloop.registry.promotion import rollback

    project = open_project_as("rollback")
    report(rollback(project, reason=reason, to=to).to_dict(), json_, print_change)


@models_app.command("history")
def models_history(
    at: Annotated[str | None, typer.Option("--at", help="ISO time: what served then.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Every champion change, what served at a given time, and aliases changed outside mloop."""
    from datetime import datetime

    from mloop.registry.promotion import history

    when = None
    if at is not None:
        try:
            when = datetime.fromisoformat(at)
        except ValueError:
            raise MloopError(f"--at '{at}' is not an ISO time like 2026-11-20T10:00") from None

    def render(h: dict[str, Any]) -> None:
        for d in h["drift"]:
            err.print(f"[red]warning:[/] {d['message']}")
        if "serving" in h:
            serving = ", ".join(f"{a}=v{x['version']} ({x['traffic']:.0%})"
                                for a, x in h["serving"].items()) or "nothing"
            out.print(f"at {h['at']}: {serving}")
        out.print(table(f"deployment history of {h['model']}",
                        ["version", "alias", "action", "from", "to", "actor", "reason"],
                        [[d["version"], d["alias"], d["action"], d["started_at"],
                          d["ended_at"] or "now", d["actor"], d["reason"]]
                         for d in h["deployments"]]))

    report(history(open_project(), at=when), json_, render)


@models_app.command("lineage")
def models_lineage(version: Annotated[int, typer.Argument(min=1)],
                   json_: JsonOpt = False) -> None:
    """VERSION -> run -> pipeline run -> snapshots -> source, code commit, config, params."""
    from mloop.registry.lineage import lineage

    report(lineage(open_project(), version), json_, _print_lineage)


def _print_lineage(lin: dict[str, Any]) -> None:
    from rich.tree import Tree

    root = Tree(f"[bold]{lin['model']}[/] v{lin['version']} "
                f"{' '.join(lin['aliases'])} gates={lin['gates'] or 'not run'} "
                f"{fmt_metrics(lin['metrics'])}")
    root.add(f"MLflow run {lin['run']['mlflow_run_id']}")
    pr = lin["pipeline_run"]
    pnode = root.add(f"pipeline run {pr.get('run_id')} ({pr.get('pipeline')}, "
                     f"{pr.get('status')}, {pr.get('started_at')})")
    code = lin["code"]
    pnode.add(f"code: git {code['git_commit'] or 'not a git tree'}"
              f"{' (dirty)' if code['git_dirty'] == 'true' else ''}, mloop "
              f"{code['mloop_version']}, config {short(lin['config_hash'])}")
    for st in pr.get("steps", []):
        snode = pnode.add(f"{st['step']} {'(cache hit)' if st['cache_hit'] else ''} -> "
                          + ", ".join(f"{k}={short(v)}" for k, v in st["outputs"].items()))
        for k, v in st["params"].items():
            # what shaped the model and where its features came from; the rest is in --json
            # and `mloop models diff`
            if k.startswith(("model.", "feast.")):
                snode.add(f"[dim]{k} = {v}")
    dnode = root.add("data")
    for role, snap in lin["data"].items():
        if snap:
            dnode.add(f"{role}: {snap['digest']} ({snap.get('rows')} rows) "
                      f"from {snap.get('source')}")
    out.print(root)


@models_app.command("diff")
def models_diff(a: Annotated[int, typer.Argument(min=1)],
                b: Annotated[int, typer.Argument(min=1)],
                all_: Annotated[bool, typer.Option("--all", help="Show equal rows too.")] = False,
                json_: JsonOpt = False) -> None:
    """Two versions side by side: params, metrics, data digests, gate results, code."""
    from mloop.registry.lineage import diff

    def render(d: dict[str, Any]) -> None:
        for section in ("params", "metrics", "data", "gates", "code"):
            rows = d[section] if all_ else [r for r in d[section] if not r["same"]]
            same = sum(r["same"] for r in d[section])
            title = f"{section} ({same} equal{' not shown' if not all_ and same else ''})"
            if section == "metrics":  # the change too, b - a
                out.print(table(title, ["", f"v{a}", f"v{b}", "delta"],
                                [[r["key"], num(r["a"]), num(r["b"]), num(r["delta"])]
                                 for r in rows]))
                continue
            out.print(table(title, ["", f"v{a}", f"v{b}"], [[r["key"], r["a"], r["b"]]
                                                           for r in rows]))

    report(diff(open_project(), a, b), json_, render)


@models_app.command("reproduce")
def models_reproduce(version: Annotated[int, typer.Argument(min=1)],
                     json_: JsonOpt = False) -> None:
    """Re-run VERSION's recorded pipeline on its recorded snapshots and params; compare
    metrics. Exit 1 when the data changed or the metrics differ beyond the tolerance."""
    from mloop.registry.reproduce import reproduce

    with err.status(f"reproducing v{version}"):
        r = reproduce(open_project_as("train"), version)

    def render(r: dict[str, Any]) -> None:
        for w in r["warnings"]:
            err.print(f"[yellow]warning:[/] {w}")
        out.print(table(f"v{version} reproduced as pipeline run {short(r['reproduced_run_id'])}",
                        ["metric", "recorded", "reproduced", "difference", ""],
                        [[c["metric"], num(c["recorded"]), num(c["reproduced"]),
                          num(c["difference"]), "same" if c["same"] else "[red]differs"]
                         for c in r["metrics"]]))
        for p in r["problems"]:
            out.print(f"[red]{p}")
        if r["reproduced"]:
            out.print("[green]reproduced")

    report(r, json_, render)
    if not r["reproduced"]:
        raise typer.Exit(1)


@models_app.command("card")
def models_card(
    version: Annotated[int, typer.Argument(min=1)],
    html_out: Annotated[Path | None, typer.Option("--html", help="Write the card as "
                                                  "self-contained HTML to this file.")] = None,
    md_out: Annotated[Path | None, typer.Option("--md", help="Write the card as Markdown to "
                                                "this file.")] = None,
    json_: JsonOpt = False,
) -> None:
    """VERSION's model card from recorded facts only: intended use, training data, metrics
    and slices, gates, serving history with drift and performance, lineage. Without --html
    or --md it prints the Markdown."""
    from mloop.cards import build_card
    from mloop.cards.render import render_html, render_markdown

    files = {"--html": html_out, "--md": md_out}
    for flag, path in files.items():
        if path is not None and path.is_dir():
            raise MloopError(f"{flag} {path}: is a folder; name the file to write")
    if html_out is not None and md_out is not None and html_out.resolve() == md_out.resolve():
        raise MloopError(f"--html and --md both name {html_out}: give each its own file")
    card = build_card(open_project(), version)
    # both texts first, then the files: a failure leaves neither half-written
    texts = {path: (render_html if flag == "--html" else render_markdown)(card)
             for flag, path in files.items() if path is not None}
    for path, body in texts.items():
        write_text(path, body)

    def render(c: dict[str, Any]) -> None:
        if not texts:  # a file written is announced on stderr by write_text
            out.print(render_markdown(c), markup=False, highlight=False, soft_wrap=True)

    report(card, json_, render)

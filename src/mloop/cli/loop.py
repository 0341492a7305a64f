"""The closed loop: ``mloop loop``, ``mloop events``, ``mloop audit verify|report`` and
``mloop demo``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from mloop.cli._common import (
    AllowOverrideOpt,
    JsonOpt,
    confirm_override,
    iso_arg,
    open_project,
    open_project_as,
    report,
)
from mloop.cli.render import emit_json, err, fields, num, out, table
from mloop.errors import LeaseHeldError

if TYPE_CHECKING:
    from mloop.loop.lease import LoopLease
    from mloop.project import Project

audit_app = typer.Typer(no_args_is_help=True, help="The tamper-evident event chain.")


# `mloop loop --once` when another controller holds the lease: not a failure of this
# process (1) nor a usage error (2); a scheduler or script can tell "someone else is on it"
LEASE_HELD_EXIT = 3


def loop_cmd(
    once: Annotated[bool, typer.Option("--once", help="One pass, then exit (for cron, "
                                                      "Airflow, a Kubernetes CronJob).")] = False,
    every: Annotated[float, typer.Option(min=1, help="Seconds between passes.")] = 60.0,
    held_ok: Annotated[bool, typer.Option(
        "--held-ok", help="With --once: exit 0, not 3, when another controller holds the "
                          "lease (for schedulers that count any non-zero exit as a failed "
                          "job, e.g. a Kubernetes CronJob).")] = False,
    json_: JsonOpt = False,
) -> None:
    """The controller: monitor new windows, judge canaries, retrain and roll out by policy.

    It acts only while it holds the model's loop lease (loop.lease in mloop.yaml). With
    --once, a pass that finds another controller holding it does nothing, names the holder
    and exits 3 (0 with --held-ok). Without --once it stands by until the lease is free (its
    holder stopped, or was killed and the lease expired), then holds it across passes."""
    import signal

    project = open_project_as("loop")
    # SIGTERM (a pod stopped, a CronJob past its deadline) unwinds like Ctrl-C, so the lease
    # is released for the next controller instead of left to expire
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        if once:
            try:
                result = _run_once(project)
            except LeaseHeldError as exc:
                _lease_held(exc, json_, 0 if held_ok else LEASE_HELD_EXIT)
            report(result, json_, _print_pass,
                   to_json=lambda r: {k: v for k, v in r.items() if k != "monitor"})
            return
        _run_forever(project, every, json_)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def _run_once(project: Project, lease: LoopLease | None = None) -> dict[str, Any]:
    from mloop.loop.controller import run_once

    return run_once(project, lease=lease)


def _lease_held(exc: LeaseHeldError, json_: bool, code: int) -> NoReturn:
    _say(f"mloop loop: {exc}")
    if json_:
        emit_json({"now": None, "actions": [], "message": str(exc),
                   "lease": {"model": exc.model, "holder": exc.holder,
                             "acquired_at": exc.acquired_at.isoformat(),
                             "expires_at": exc.expires_at.isoformat()}})
    raise typer.Exit(code)


def _run_forever(project: Project, every: float, json_: bool) -> None:
    """Stand by until the lease is free, then pass every ``every`` seconds holding it; a
    lease lost (the store unreachable for a whole lease) sends it back to standing by."""
    import time

    from mloop.errors import LeaseLostError
    from mloop.loop.lease import LoopLease

    while True:
        lease = LoopLease.of(project)
        try:  # from before it is taken: a SIGTERM the moment after must still release it
            _take_when_free(lease, every)
            lease.start_renewing()
            while True:
                report(_run_once(project, lease), json_, _print_pass,
                       to_json=lambda r: {k: v for k, v in r.items() if k != "monitor"})
                time.sleep(every)
        except LeaseLostError as exc:
            _say(f"{exc}; standing by")
        finally:
            lease.release()


def _take_when_free(lease: LoopLease, every: float) -> LoopLease:
    import time
    from datetime import UTC, datetime

    announced = None
    while True:
        try:
            lease.acquire()
        except LeaseHeldError as exc:
            if exc.holder != announced:
                _say(f"standing by: the loop lease of '{exc.model}' is held by {exc.holder} "
                     f"until {exc.expires_at.isoformat(timespec='seconds')}; retrying at most "
                     f"every {every:g} s")
                announced = exc.holder
            left = (exc.expires_at - datetime.now(UTC)).total_seconds()
            time.sleep(min(every, max(0.5, left + 0.2)))
            continue
        took = lease.taken_over
        _say(f"took the loop lease of '{lease.model}' as {lease.holder} (loop.lease "
             f"{lease.duration})" + (f", after {took.holder} left it unreleased"
                                    if took is not None else ""))
        return lease


def _say(line: str) -> None:
    """One unwrapped line on stderr, at once: operators and scripts grep these (rich would
    wrap it at the width of a pipe)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _print_pass(result: dict[str, Any]) -> None:
    done = result.get("materialized")
    if done:
        out.print(f"materialized {', '.join(done['materialized'])} up to {done['until']}",
                  highlight=False)
    if result.get("now") is None:
        out.print(result.get("message") or "no traffic in the inference log yet")
    else:
        mon = result.get("monitor") or {}
        triggers = result.get("triggers") or []
        out.print(f"event time {result['now']}: {len(mon.get('evaluated', []))} new "
                  f"window(s), triggers: {', '.join(t['trigger'] for t in triggers) or 'none'}",
                  highlight=False)
        for t in triggers:
            out.print(f"  trigger [bold]{t['trigger']}[/]", highlight=False)
            rest = {k: v for k, v in t.items() if k != "trigger"}
            if rest:
                out.print(fields(rest, 4), markup=False, highlight=False)
    if not result["actions"]:
        out.print("  no action")
    for a in result["actions"]:
        version = f" v{a['version']}" if a.get("version") is not None else ""
        why = a.get("reason") or a.get("guard") or a.get("error")
        out.print(f"  [bold]{a['action']}[/]{version}" + (f": {why}" if why else ""),
                  highlight=False)
        rest = {k: v for k, v in a.items()
                if k not in ("action", "version", "reason", "guard", "error", "triggers")}
        if rest:
            out.print(fields(rest, 4), markup=False, highlight=False)


def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the run, summary.json and "
                                                        "loop.html.")] = Path("mloop-demo"),
    until: Annotated[str, typer.Option(help="Replay up to this date (2013-01-01: all of "
                                            "2011-2012; earlier for a quick run).")] =
    "2013-01-01",
    label_delay_days: Annotated[float, typer.Option(help="Labels arrive this long after the "
                                                         "prediction.")] = 2.0,
    allow_override: AllowOverrideOpt = False,
    inject_shift: Annotated[str | None, typer.Option(
        help="Move a numeric input in the replayed requests by N training standard "
             "deviations from --shift-at on (e.g. temp+0.5sd); the summary measures how long "
             "monitoring took to flag it.")] = None,
    shift_at: Annotated[str | None, typer.Option(
        help="The injected shift's onset (ISO date; default: halfway through the "
             "replay).")] = None,
    schedules: Annotated[bool, typer.Option(
        help="Fixed-schedule baselines beside the loop (fitted while the replay runs).")] =
    True,
    json_: JsonOpt = False,
) -> None:
    """The whole loop on the bike data: train, serve, replay 2011-2012 over HTTP with late
    labels, let the controller retrain/canary/promote; compare with the frozen model. If the
    initial model fails a gate, it is promoted only with --allow-override or a yes at the
    terminal, and the override is recorded (history, summary.json)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from mloop.demo import DemoOptions, run_demo

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn(
        "{task.completed:,.0f}/{task.fields[hours]} h"), TimeElapsedColumn(), console=err,
        disable=json_)
    task = bar.add_task("preparing", total=None, hours="?")

    def on(kind: str, info: dict[str, Any]) -> None:
        if kind == "phase":
            bar.update(task, description=info["text"])
            if info["text"].startswith("OVERRIDE"):  # kept on screen, --json or not
                err.print(f"[bold yellow]{info['text']}[/]", highlight=False)
        elif kind == "replay":
            bar.update(task, total=info["total"], completed=0, hours=f"{info['total']:,}",
                       description="replaying 2011-2012 over HTTP")
        elif kind == "progress":
            done, total = info.get("baselines") or (0, 0)
            bar.update(task, completed=info["done"],
                       description=f"replaying: {info['now'][:10]}" + (
                           f" (schedule baselines: {done}/{total} fits)" if total else ""))
            for a in info["actions"]:
                err.print(f"  {info['now'][:10]} [bold]{a['action']}[/] "
                          f"{a.get('version', '') and 'v' + str(a.get('version'))} "
                          f"{a.get('reason', a.get('guard', ''))}", highlight=False)

    def ask(question: str) -> bool:
        bar.stop()  # a prompt under a live progress bar would be redrawn over
        try:
            return confirm_override(question, allowed=False) is not None
        finally:
            bar.start()

    with bar:
        summary = run_demo(DemoOptions(out=out_dir, end=until, label_delay_days=label_delay_days,
                                       allow_override=allow_override, schedules=schedules,
                                       inject_shift=inject_shift, shift_at=shift_at),
                           progress=on,
                           confirm_override=ask if sys.stdin.isatty() else None)

    def render(summary: dict[str, Any]) -> None:
        out.print(table("MAE per month (rentals/hour)", ["month", "hours", "frozen", "loop",
                                                         "served by"],
                        [[m["month"], f"{m['hours']:,}", f"{m['mae_frozen']:.1f}",
                          f"{m['mae_loop']:.1f}", ", ".join(f"v{v}" for v in m["versions"])]
                         for m in summary["months"]]))
        loop = summary["loop"]
        # a replay that stops before 2012 (--until) has no 2012 to score: the whole replay
        span, key = (("2012", "2012") if summary.get("mae_2012_loop") is not None
                     else ("replay", "all"))
        out.print(f"{span} MAE: loop [bold]{num(summary[f'mae_{key}_loop'])}[/] vs frozen "
                  f"{num(summary[f'mae_{key}_frozen'])}; retrains {loop['retrains']}, promoted "
                  f"{loop['promoted']}, rolled back {loop['rolled_back']}, rejected "
                  f"{loop['rejected']}; time to detect {num(loop['time_to_detect_hours'])} h, "
                  f"to deploy {num(loop['time_to_deploy_hours'])} h (event time); "
                  f"{summary['seconds']} s in all")
        if summary.get("schedules"):
            out.print(schedules_table(summary))
        if summary.get("injected_shift"):
            d = summary["injected_shift"]
            seen = (f"detected at {d['detected_at']} ({d['time_to_detect_hours']} h after the "
                    f"onset, window {d['windows_after_onset_to_detect']} after it)"
                    if d["detected_at"] else "never detected")
            out.print(f"injected shift: {d['column']} {d['sd']:+g} sd ({d['delta']:+.4g}) from "
                      f"{d['onset']}: {seen}; the same column was flagged in "
                      f"{d['flagged_before_onset']} of {d['windows_before_onset']} windows "
                      f"before the onset", highlight=False)
        for o in summary["overrides"]:
            out.print(f"[bold yellow]override[/]: v{o['version']} promoted despite failed "
                      f"gate(s) {', '.join(g['gate'] for g in o['failed_gates'])} "
                      f"({o['allowed_by']})", highlight=False)
        out.print(f"wrote {out_dir / 'summary.json'} and {out_dir / 'loop.html'}")
        # last, and never wrapped: the line to copy
        out.print("what served when, and why, in the dashboard (then open "
                  "http://127.0.0.1:8050):", highlight=False)
        out.print(f"  {summary['ui_command']}", markup=False, highlight=False, soft_wrap=True)

    report(summary, json_, render,
           to_json=lambda s: {k: v for k, v in s.items() if k != "history"})


def schedules_table(summary: dict[str, Any]) -> Any:
    """The loop beside the fixed-schedule baselines and the frozen model: MAE over the
    scored period against how many retrains each took."""
    setup, cmp = summary["schedule_setup"], summary["loop_vs_schedules"]
    span = "2012" if setup["scored"] == "2012" else "replay"
    loop = summary["loop"]
    rows = [["frozen first model", "0", num(summary[f"mae_{setup['scored']}_frozen"]), ""],
            *([s["name"], str(s["retrains"]), num(s["mae"]), ""]
              for s in summary["schedules"]),
            ["[bold]mloop's loop[/]", str(loop["retrains"]), f"[bold]{num(cmp['mae'])}[/]",
             f"curve at {loop['retrains']}: {num(cmp['curve_mae'])} ("
             + ("on or below" if cmp["on_or_below_curve"] else "above") + ")"]]
    return table(f"{span} MAE: the loop vs retraining on a fixed schedule (same model, "
                 f"{setup['window_days']:g}-day window, {setup['label_delay_days']:g}-day "
                 f"label delay, holdout {setup['holdout']:g})",
                 ["retrained", "retrains", "MAE", "vs the schedules' curve"], rows)


def events(
    since: Annotated[str | None, typer.Option(help="ISO time: only events at or after.")] =
    None,
    type_: Annotated[str | None, typer.Option("--type", help="An event kind, or a prefix "
                                                             "ending in '.' (loop.).")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 50,
    follow: Annotated[bool, typer.Option(
        "--follow", "-f", help="Keep printing new events. With --json: one JSON document per "
                               "line (NDJSON), as they come, instead of one document.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Every action and its cause, newest first (the audit chain); each payload in full."""
    import json as _json
    import time

    from mloop.security.audit import list_events

    project = open_project()
    rows = list_events(project.store, limit=limit, kind=type_,
                       since=iso_arg(since, "--since"))

    def body(e: Any) -> dict[str, Any]:
        return {"id": e.id, "at": e.at.isoformat(timespec="seconds"), "kind": e.kind,
                "actor": e.actor, "payload": e.payload}

    def show(batch: list[Any]) -> None:
        for e in batch:
            if json_:  # --follow: a stream has no end to close one document with
                sys.stdout.write(_json.dumps(body(e), default=str) + "\n")
                sys.stdout.flush()
                continue
            out.print(f"{e.at.isoformat(timespec='seconds')}  [bold]{e.kind}[/]  {e.actor}  "
                      f"(#{e.id})", highlight=False)
            if e.payload:
                out.print(fields(e.payload, 4), markup=False, highlight=False)

    if not follow:
        report(rows, json_, show, to_json=lambda r: {"events": [body(e) for e in r]})
        return
    show(rows)
    last = max((e.id for e in rows), default=0)
    while True:
        time.sleep(1.0)
        new = list(reversed(list_events(project.store, limit=1000, kind=type_,
                                        after_id=last)))
        show(new)
        last = max([last, *(e.id for e in new)])


@audit_app.command("verify")
def audit_verify(json_: JsonOpt = False) -> None:
    """Recompute the event chain's hashes; exit 1 and name the first broken row if any."""
    from mloop.security.audit import verify_chain

    chain = verify_chain(open_project().store)

    def render(c: dict[str, Any]) -> None:
        if c["ok"]:
            notes = [f"checkpoint outside the store at {c['checkpoint']}"
                     if c["checkpoint"] else "no checkpoint outside the store yet"]
            if c["unkeyed"]:
                notes.append(f"{c['unkeyed']} from before keying")
            out.print(f"audit chain intact: {c['events']} events ({'; '.join(notes)})",
                      highlight=False)
        else:
            sys.stderr.write(f"audit chain broken: {c['problem']}\n")

    report(chain.to_dict(), json_, render)
    if not chain.ok:
        raise typer.Exit(1)


@audit_app.command("report")
def audit_report_cmd(
    since: Annotated[str | None, typer.Option(help="ISO time: the period's start (default: "
                                                   "the first event).")] = None,
    until: Annotated[str | None, typer.Option(help="ISO time: the period's end (default: "
                                                   "now).")] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Also write the report as one "
                                                             "HTML page.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Every promotion, forced override, rollback, gate failure, alert, retrain and loop
    decision in the period, who acted and why; each version that served with the data
    snapshots behind it; and the chain's verification. Exit 1 if the chain is broken (the
    report is still written, saying so)."""
    from mloop.cli._common import write_text
    from mloop.loop.audit_report import audit_report, audit_report_html

    doc = audit_report(open_project(), since=iso_arg(since, "--since"),
                       until=iso_arg(until, "--until"))
    if html is not None:
        write_text(html, audit_report_html(doc))
    report(doc, json_, _print_audit_report)
    if not doc["chain"]["ok"]:
        raise typer.Exit(1)


def _print_audit_report(doc: dict[str, Any]) -> None:
    chain = doc["chain"]
    if chain["ok"]:
        out.print(f"audit chain intact: {chain['events']} events", highlight=False)
    else:
        sys.stderr.write(f"audit chain broken: {chain['problem']}\n")
    out.print(f"{doc['model']}: {doc['since'] or 'the first event'} to {doc['until']}; "
              + ", ".join(f"{n} {c}" for c, n in doc["counts"].items() if n), highlight=False)
    out.print(table("decisions", ["#", "when", "decision", "version", "who", "why"],
                    [[d["id"], d["at"][:19], d["category"],
                      "" if d["version"] is None else f"v{d['version']}", d["who"], d["why"]]
                     for d in doc["decisions"]]))
    out.print(table("served", ["version", "alias", "from", "to", "train snapshot"],
                    [[f"v{s['version']}", s["alias"], s["from"], s["to"] or "now",
                      (s["data"].get("train") or {}).get("digest", "not recorded")[:12]
                      if "error" not in s["data"] else s["data"]["error"]]
                     for s in doc["served"]]))

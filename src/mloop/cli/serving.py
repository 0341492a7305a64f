"""Serving and what feeds it: ``mloop serve``, ``mloop deploy``, ``mloop predict``,
``mloop labels`` and ``mloop tokens``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from mloop.cli._common import JsonOpt, TlsCertOpt, TlsKeyOpt, open_project, open_project_as, report
from mloop.cli.render import err, out, print_change, table
from mloop.errors import MloopError

deploy_app = typer.Typer(no_args_is_help=True, help="Challengers: canary (a share of traffic) "
                                                    "or shadow (a copy of it).")
labels_app = typer.Typer(no_args_is_help=True, help="Late ground truth, joined by request id.")
tokens_app = typer.Typer(no_args_is_help=True, help="API tokens for `mloop serve` and `mloop ui` "
                                                    "(stored as hashes).")


def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default serving.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default serving.port).")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Processes (default "
                                                            "serving.workers).")] = None,
    auth: Annotated[bool | None, typer.Option(
        "--auth/--no-auth", help="Require bearer tokens (default: on unless bound to "
                                 "loopback).")] = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    ui: Annotated[bool, typer.Option(
        "--ui", help="Also serve the dashboard under /ui (the app `mloop ui` serves; same "
                     "auth rule as the server, acting needs an operator token).")] = False,
) -> None:
    """Serve the champion (and challenger) over HTTP until SIGINT/SIGTERM."""
    from mloop.server import serve as run_server

    project = open_project()
    name = project.config.model_name
    extra: dict[str, Any] = {}
    if ui:
        from mloop.ui.mount import FACTORY, MOUNT, build_app_with_ui, session_secret

        session_secret()  # chosen once here: every worker signs sessions with it
        extra = {"build": build_app_with_ui, "factory": FACTORY}

    def announce(url: str) -> None:
        err.print(f"serving '{name}' on {url} (docs at {url}/docs"
                  f"{f', dashboard at {url}{MOUNT}/' if ui else ''})")

    # announced only once every check passed: a refused start prints its error alone
    run_server(project, host=host, port=port, workers=workers, auth=auth, tls_cert=tls_cert,
               tls_key=tls_key, announce=announce, **extra)


@deploy_app.command("canary")
def deploy_canary(
    version: Annotated[int, typer.Argument(min=1)],
    weight: Annotated[float, typer.Option(help="Share of traffic (0..1).")] = 0.1,
    reason: Annotated[str, typer.Option(help="Why: recorded in the history.")] = "canary",
    json_: JsonOpt = False,
) -> None:
    """VERSION becomes the challenger and answers WEIGHT of the traffic."""
    from mloop.serving.deploy import deploy_challenger

    report(deploy_challenger(open_project_as("deploy"), version, mode="canary", weight=weight,
                             reason=reason).to_dict(), json_, print_change)


@deploy_app.command("shadow")
def deploy_shadow(
    version: Annotated[int, typer.Argument(min=1)],
    reason: Annotated[str, typer.Option(help="Why: recorded in the history.")] = "shadow",
    json_: JsonOpt = False,
) -> None:
    """VERSION is scored on a copy of every request; its answers are logged, never returned."""
    from mloop.serving.deploy import deploy_challenger

    project = open_project_as("deploy")
    report(deploy_challenger(project, version, mode="shadow", reason=reason).to_dict(),
           json_, print_change)


@deploy_app.command("stop-challenger")
def deploy_stop(
    reason: Annotated[str, typer.Option(help="Why: recorded in the history.")] =
    "challenger stopped",
    json_: JsonOpt = False,
) -> None:
    """Remove the challenger: the champion answers everything again."""
    from mloop.serving.deploy import stop_challenger

    report(stop_challenger(open_project_as("deploy"), reason=reason).to_dict(), json_, print_change)


@deploy_app.command("status")
def deploy_status(json_: JsonOpt = False) -> None:
    """What should serve now: champion, challenger, mode and traffic share."""
    from mloop.serving.deploy import desired_state

    def render(state: dict[str, Any]) -> None:
        def v(version: int | None) -> str:
            return "none" if version is None else f"v{version}"

        out.print(table("deployment", ["role", "version", "mode", "traffic"], [
            ["champion", v(state["champion"]), "",
             f"{1 - state['weight']:.0%}" if state["champion"] is not None else ""],
            ["challenger", v(state["challenger"]), state["mode"] or "",
             f"{state['weight']:.0%}" if state["challenger"] is not None else ""]]))

    report(desired_state(open_project()).to_dict(), json_, render)


def predict(
    # str, not Path: Path("s3://b/k") would lose a slash (--engine spark reads URIs)
    input: Annotated[str, typer.Option("--input", "-i", help="Parquet or CSV file.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Parquet or CSV file to write, "
                                        "by its extension (a folder with --engine spark).")],
    version: Annotated[int | None, typer.Option(min=1, help="Default: the champion.")] = None,
    chunk_rows: Annotated[int, typer.Option(min=1, help="Rows per chunk (bounds memory).")] =
    50_000,
    engine: Annotated[str, typer.Option(help="local (chunks in this process) or spark "
                                             "(mloop\\[spark]; INPUT/OUTPUT may be folders or "
                                             "s3:// URIs, OUTPUT is a Parquet folder).")] =
    "local",
    master: Annotated[str | None, typer.Option(help="Spark master (--engine spark). Default: "
                                                    "spark.master in mloop.yaml, local[2].")] =
    None,
    json_: JsonOpt = False,
) -> None:
    """Batch scoring: stream INPUT through a version, write predictions to OUTPUT."""
    if engine not in ("local", "spark"):
        raise MloopError(f"--engine '{engine}': expected local or spark")
    if engine == "spark":
        from mloop.serving.spark_batch import predict_spark

        def render_spark(result: dict[str, Any]) -> None:
            out.print(f"scored {result['rows']:,} rows with v{result['version']} on Spark "
                      f"{result['spark_version']} ({result['master']}) in "
                      f"{result['seconds']} s -> {result['output']}")

        report(predict_spark(open_project_as("predict"), input, output, version=version,
                             master=master, progress=not json_), json_, render_spark)
        return
    if master is not None:
        raise MloopError("--master is for --engine spark")
    from mloop.serving.batch import predict_file

    def render(result: dict[str, Any]) -> None:
        out.print(f"scored {result['rows']:,} rows with v{result['version']} in "
                  f"{result['seconds']} s ({result['rows_per_s']:,} rows/s, peak RSS "
                  f"{result['peak_rss_mb']} MB) -> {result['output']}")
        if result.get("features"):
            f = result["features"]
            out.print(f"features looked up {f['mode']} from the feature store: "
                      f"{', '.join(f['looked_up'])} (by {', '.join(f['join_keys'])}"
                      + (f" as of '{f['time_column']}')" if f["time_column"] else ")"))

    report(predict_file(open_project_as("predict"), Path(input), Path(output), version=version,
                        chunk_rows=chunk_rows, progress=not json_), json_, render)


@labels_app.command("ingest")
def labels_ingest(
    file: Annotated[Path, typer.Argument(help="CSV or Parquet with request_id,label.")],
    json_: JsonOpt = False,
) -> None:
    """Store ground truth by request id; ids the inference log does not hold are reported
    (and make the exit code 1), never stored."""
    from mloop.traffic.labels import ingest_label_file

    result = ingest_label_file(open_project_as("feedback"), file)

    def render(result: dict[str, Any]) -> None:
        out.print(f"stored {result['stored']} label(s) from {file}")
        if result["unknown"]:
            shown = ", ".join(result["unknown_ids"][:10])
            err.print(f"[yellow]{result['unknown']} unknown request id(s), not stored: "
                      f"{shown}{' ...' if result['unknown'] > 10 else ''}")
        if result.get("quarantined"):
            err.print(f"[yellow]{result['quarantined']} damaged log segment(s) moved to "
                      "quarantine on the way (see `mloop events --type log.`)")

    report(result, json_, render)
    if result["unknown"]:
        raise typer.Exit(1)


@tokens_app.command("create")
def tokens_create(
    role: Annotated[str, typer.Option(help="viewer (reads the dashboard), predict (also "
                                          "scores), operator (also trains, promotes, rolls "
                                          "back, deploys) or admin (also manages tokens and "
                                          "keys).")] = "predict",
    person: Annotated[str, typer.Option(help="Who the token belongs to: recorded as the actor "
                                            "of everything done with it (default: --name).")]
    = "",
    name: Annotated[str, typer.Option(help="A label for the token.")] = "",
    json_: JsonOpt = False,
) -> None:
    """Create a token; it is printed once and stored only as a hash. Needs the admin role
    (against a central store with no token yet, whoever reaches the store makes the first)."""
    from mloop.security.tokens import create_token

    tok = create_token(open_project_as("tokens").store, role=role, name=name, person=person)

    def render(_: dict[str, Any]) -> None:
        err.print(f"token {tok.id} for {tok.person} ({tok.role}, '{tok.name}'); shown once, "
                  f"keep it secret:")
        sys.stdout.write(tok.token + "\n")  # plain: the value alone on stdout

    report(tok.__dict__, json_, render)


@tokens_app.command("list")
def tokens_list(json_: JsonOpt = False) -> None:
    """Tokens (never their values)."""
    from mloop.security.tokens import list_tokens

    def render(rows: list[dict[str, Any]]) -> None:
        out.print(table("tokens", ["id", "person", "name", "role", "created", "by",
                                   "revoked"],
                        [[r["id"], r["person"], r["name"], r["role"], r["created_at"],
                          r["created_by"],
                          "yes" if r["revoked"] else ""] for r in rows]))

    report(list_tokens(open_project_as("tokens").store), json_, render)


@tokens_app.command("revoke")
def tokens_revoke(token_id: Annotated[int, typer.Argument(min=1)]) -> None:
    """Revoke a token (servers notice within serving.poll_seconds)."""
    from mloop.security.tokens import revoke_token

    revoke_token(open_project_as("tokens").store, token_id)
    out.print(f"token {token_id} revoked")

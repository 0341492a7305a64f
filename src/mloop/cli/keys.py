"""``mloop keys``: the master key of encryption at rest (``security.encryption``): create one,
see which key the stored files are sealed under, rotate."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
import yaml

from mloop.cli._common import JsonOpt, open_project, open_project_as, report
from mloop.cli.render import err, out, table

keys_app = typer.Typer(no_args_is_help=True, help="Master keys of encryption at rest "
                                                  "(security.encryption).")


@keys_app.command("init")
def keys_init(
    source: Annotated[str, typer.Option(help="Where the new key lives: file (a key file "
                                             "created 0600), env (printed once, for an "
                                             "environment variable) or aws-kms (an existing "
                                             "KMS key, checked).")] = "file",
    key_file: Annotated[str | None, typer.Option(
        "--key-file", help="--source file: the path (default ~/.mloop/keys/PROJECT.key, "
                           "outside the project and its stores).")] = None,
    env: Annotated[str | None, typer.Option(
        "--env-var", help="--source env: the variable's name (default MLOOP_MASTER_KEY).")] = None,
    kms_key_id: Annotated[str | None, typer.Option(
        "--kms-key-id", help="--source aws-kms: the KMS key id, ARN or alias.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Create a master key and print the mloop.yaml lines that use it (recorded as an event)."""
    from mloop.security.key_admin import init_key

    project = open_project_as("keys")
    result = init_key(source, root=project.root, audit=project.store,
                      key_file=key_file or f"~/.mloop/keys/{project.name}.key", env=env,
                      kms_key_id=kms_key_id)

    def render(r: dict[str, Any]) -> None:
        err.print(f"new master key {r['kid']} in {r['where']}; to use it, put in mloop.yaml "
                  f"(a current key moves under security.encryption.previous, then run "
                  f"`mloop keys rotate`):")
        out.print(yaml.safe_dump(r["config"], sort_keys=False).rstrip())
        if "secret" in r:
            err.print(f"the key, shown once: set {r['config']['security']['encryption']['env']}"
                      f" to it wherever mloop runs")
            sys.stdout.write(r["secret"] + "\n")

    report(result, json_, render)


@keys_app.command("status")
def keys_status(json_: JsonOpt = False) -> None:
    """The configured key, and per store how many files are plain or sealed under which key."""
    from mloop.security.key_admin import key_status

    project = open_project()
    result = key_status(project.sealed_stores(), project.codec)

    def render(r: dict[str, Any]) -> None:
        if not r["enabled"]:
            out.print("encryption at rest: off (no security.encryption in mloop.yaml)")
        else:
            out.print(f"encryption at rest: on, key {r['kid'] or '(cannot load)'} from "
                      f"{r['sources'][0]}")
        if r["key_error"]:
            err.print(f"[red]{r['key_error']}[/red]")
        out.print(table("files", ["store", "files", "plain", "current key", "other keys"],
                        [[k, s["files"], s["plain"], s["sealed_current"], s["sealed_other"]]
                         for k, s in r["stores"].items()]))

    report(result, json_, render)
    if result["key_error"]:
        raise typer.Exit(1)


@keys_app.command("rotate")
def keys_rotate(json_: JsonOpt = False) -> None:
    """Re-wrap every file sealed under a previous key under the current one (the data is not
    re-encrypted); recorded as an event."""
    from mloop.security.key_admin import rotate_keys

    project = open_project_as("keys")
    result = rotate_keys(project.sealed_stores(), project.codec,
                         audit=project.store)

    def render(r: dict[str, Any]) -> None:
        out.print(f"re-wrapped {r['rewrapped']} file(s) under {r['kid']} ({r['source']})"
                  + "".join(f"\n  from {k}: {n}" for k, n in r["from_kids"].items()))

    report(result, json_, render)

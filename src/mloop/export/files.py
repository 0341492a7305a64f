"""Writing an export's files into its ``--out`` folder, never over someone else's files.

``out`` may be missing or empty (the files are written to a temporary sibling folder, then
renamed into place), or a previous export by the same command (it holds ``MARKER``): then only
the files that export wrote are replaced, each via temp + rename after all are written, and
files of the previous export the new one no longer has are removed. Anything else is refused,
so a hand-written file is never overwritten.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from mloop import __version__
from mloop.errors import MloopError

MARKER = ".mloop-export.json"  # lists the files an export wrote: only those are overwritten


def _previous_export(out: Path, generator: str) -> set[str] | None:
    try:
        data = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("generator") != generator:
        return None
    return {f for f in data.get("files", []) if isinstance(f, str) and "/" not in f}


def _marker(generator: str, project: str, names: list[str]) -> str:
    return json.dumps({"generator": generator, "mloop_version": __version__,
                       "project": project, "files": names}, indent=2) + "\n"


def write_export(out: Path, files: dict[str, str], *, generator: str,
                 project: str) -> list[Path]:
    """Write ``files`` (name -> text) into ``out`` for ``generator`` (e.g. "mloop export k8s");
    return the paths written. See the module's docstring for what is refused."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MloopError(f"--out {out}: exists and is not a folder")
    occupied = out.is_dir() and any(out.iterdir())
    previous = _previous_export(out, generator) if occupied else None
    if occupied and previous is None:
        raise MloopError(f"--out {out}: the folder is not empty and was not written by "
                         f"`{generator}` (no {MARKER}); choose a new or empty folder")
    names = list(files)
    marker = _marker(generator, project, names)
    if previous is not None:
        foreign = sorted(n for n in names if (out / n).exists() and n not in previous)
        if foreign:
            raise MloopError(f"--out {out}: would overwrite {', '.join(foreign)}, which the "
                             f"previous export did not write; move it away or choose another "
                             f"folder")
        _replace_in(out, files, marker, stale=sorted(previous - set(names)))
    else:
        _write_fresh(out, files, marker)
    return [out / n for n in names]


def _write_fresh(out: Path, files: dict[str, str], marker: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / MARKER).write_text(marker, encoding="utf-8")
        if out.is_dir():
            out.rmdir()  # empty (checked): the rename needs the name free
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_in(out: Path, files: dict[str, str], marker: str, stale: list[str]) -> None:
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    staged: list[tuple[Path, Path]] = []
    try:
        for name, text in {**files, MARKER: marker}.items():
            tmp = out / f".{name}.tmp-{token}"
            staged.append((tmp, out / name))
            tmp.write_text(text, encoding="utf-8")
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, final in staged:  # the marker last: it lists what is now there
        os.replace(tmp, final)
    for name in stale:
        (out / name).unlink(missing_ok=True)

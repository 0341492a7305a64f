"""CLI latency: mloop's read commands as a user runs them, next to MLflow on the same store.

    python benchmarks/bench_cli.py [--project PATH] [--repeats 3] [--out FILE] [--no-anchors]
        [--allow-override]

Every command runs in a fresh process (``mloop -C PROJECT ...``, stdout to a pipe), ``--repeats``
times; the table shows the median wall time and the median CPU time (user + system of that
process and what it waited for). Target: every read command <= 1 s wall. Next to each command,
where one exists, the MLflow call that answers the same question on the same tracking store:
MLflow's own CLI (``mlflow experiments search``, ``mlflow runs list``, ``mlflow runs
describe``) or, for the model registry, which MLflow's CLI does not cover, the
``MlflowClient`` call in a fresh ``python -c``. First, as a floor, a fresh ``python -c`` that
only imports the libraries every mloop command stands on (SQLAlchemy's ORM, pydantic, typer,
rich, PyYAML): what the machine charges before mloop does anything.

Writes (``mloop deploy canary`` then ``mloop deploy stop-challenger``; ``mloop models gate``,
``mloop models promote`` then ``mloop models rollback``) run on a copy of the project, so the
project measured is left as it was. ``models promote`` is timed on a version that is neither
champion nor challenger; its gates are evaluated once first (untimed): if they pass it runs
without ``--force``; if they fail, timing it needs ``--force``, an override, which the benchmark
does only with ``--allow-override`` or a yes at the terminal (it stops otherwise, e.g. in CI).
The promotion follows the gate run, as it follows ``mloop run`` in a user's session, so it
reuses that stored report (same champion, same gate config) instead of gating again; ``models
gate`` shows what gating costs when it must run. A write's own work is the time the same
service calls take in one warm process (modules imported, stores open; gating still loads both
models from disk and scores them on the holdout); its overhead is the fresh command's wall time
minus that, and the target is an overhead <= 2 s.

Without ``--project`` the state is built first: ``mloop demo --until 2011-07-01`` on the bundled
bike example in a temporary folder (about a minute on an idle machine); ``--allow-override`` is
passed on to it (if its initial model fails a gate the demo stops without it).

Results go to ``--out`` (default ``benchmarks/cli_results.json``) with the git commit, whether
the work tree was clean, every override (``overrides``: the demo's and the timed
promotion's, each with its version, failed gates, reason and who allowed it), the MLflow version
and how busy the machine was (other processes'
CPU use over 2 s before the run: on a shared machine a command's wall time includes waiting
for a core, its CPU time does not). Python's bytecode cache is on for the commands, as in an
installed package, even if ``PYTHONDONTWRITEBYTECODE`` is set (``--no-bytecode-cache`` keeps
it: then every command recompiles mloop's modules first).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import git_state

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
READ_TARGET_S = 1.0
# The libraries under every mloop command (metadata store, config, CLI): a fresh process that
# only imports them is the floor this machine sets, whatever mloop does.
FLOOR_IMPORTS = "import sqlalchemy.orm, pydantic.main, typer, rich.console, rich.table, yaml"
WRITE_OVERHEAD_S = 2.0
_CLK = os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    wall_s: float
    cpu_s: float


@dataclass
class Timing:
    argv: list[str]
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None

    @property
    def wall(self) -> float | None:
        return statistics.median(s.wall_s for s in self.samples) if self.samples else None

    @property
    def cpu(self) -> float | None:
        return statistics.median(s.cpu_s for s in self.samples) if self.samples else None

    def to_dict(self) -> dict[str, Any]:
        return {"argv": self.argv, "wall_s": _r(self.wall), "cpu_s": _r(self.cpu),
                "samples": [{"wall_s": _r(s.wall_s), "cpu_s": _r(s.cpu_s)}
                            for s in self.samples], "error": self.error}


def _r(x: float | None) -> float | None:
    return round(x, 3) if x is not None else None


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(argv: list[str], *, cwd: Path, env: dict[str, str]) -> tuple[Sample, str, str, int]:
    """One fresh process: wall clock around it; CPU (user + system) from the kernel's account
    of reaped children, which between the two readings is this child and what it waited for."""
    cpu0, t0 = _children_cpu(), time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    return Sample(wall, _children_cpu() - cpu0), proc.stdout, proc.stderr, proc.returncode


def measure(argv: list[str], *, cwd: Path, env: dict[str, str], repeats: int) -> Timing:
    timing = Timing(argv)
    for _ in range(repeats):
        sample, out, err, code = run_once(argv, cwd=cwd, env=env)
        if code != 0:
            timing.error = f"exit {code}: {(err or out).strip()[-400:]}"
            return timing
        timing.samples.append(sample)
    return timing


def _busy_share(seconds: float = 2.0) -> float:
    """How many cores other processes kept busy, averaged over ``seconds``."""
    def jiffies() -> int:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        return sum(int(x) for i, x in enumerate(fields) if i not in (3, 4))  # minus idle, iowait

    j0, w0 = jiffies(), time.perf_counter()
    time.sleep(seconds)
    return (jiffies() - j0) / _CLK / (time.perf_counter() - w0)


def build_state(folder: Path, mloop: str, env: dict[str, str], *, allow_override: bool
                ) -> tuple[Path, list[dict[str, Any]]]:
    """``mloop demo`` (stdin passed through: at a terminal it may ask about an override);
    returns the project and the demo's overrides."""
    argv = [mloop, "demo", "--out", str(folder), "--until", "2011-07-01", "--json"]
    if allow_override:
        argv.append("--allow-override")
    print(f"building the state: {' '.join(argv[1:])} ...", flush=True)
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        raise SystemExit(f"`mloop demo` failed (exit {done.returncode}; its message is above)")
    overrides = json.loads((folder / "summary.json").read_text()).get("overrides", [])
    for o in overrides:
        print(f"OVERRIDE (mloop demo): v{o['version']} promoted despite failed gate(s) "
              f"{', '.join(g['gate'] for g in o['failed_gates'])} ({o['allowed_by']})",
              flush=True)
    return folder / "project", [{"where": "mloop demo (the measured state)", **o}
                                for o in overrides]


_GATES = """
import json, sys
from mloop.project import open_project
from mloop.registry.gates import evaluate_gates
r = evaluate_gates(open_project(sys.argv[1]), int(sys.argv[2]), record=False)  # no trace
print(json.dumps({"passed": r.passed, "failed": [f"{x.gate} ({x.message})" for x in r.results
                                                 if x.status == "fail"]}))
"""


def promote_override(project: Path, version: int, env: dict[str, str], *, allowed: bool
                     ) -> dict[str, Any] | None:
    """Will timing ``models promote VERSION`` override failed gates? Evaluated once (untimed)
    against the champion the timed promotions replace; an override goes ahead only with
    ``--allow-override`` or a yes at the terminal (SystemExit otherwise). Returns its record."""
    from mloop.cli._common import confirm_override

    verdict = _json([sys.executable, "-c", _GATES, str(project), str(version)], cwd=project,
                    env=env)
    if verdict["passed"]:
        return None
    what = f"v{version} failed gate(s) {'; '.join(verdict['failed'])}"
    allowed_by = confirm_override(f"bench_cli: {what}. Time `models promote {version} --force` "
                                  f"anyway (an override, on a copy of the project)?",
                                  allowed=allowed)
    if allowed_by is None:
        raise SystemExit(f"bench_cli: {what}; timing its promotion needs --force. Rerun with "
                         f"--allow-override to do so (recorded in the results as an override), "
                         f"or with --no-writes.")
    print(f"OVERRIDE (timed writes): {what}; `models promote` is timed with --force "
          f"({allowed_by})", flush=True)
    return {"where": "timed `models promote` (a copy of the project)", "version": version,
            "failed_gates": verdict["failed"], "allowed_by": allowed_by,
            "reason": f"bench_cli: timing the promotion despite failed gates ({allowed_by})"}


def _json(argv: list[str], *, cwd: Path, env: dict[str, str]) -> Any:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout)


def _facts(project: Path, mloop: str, env: dict[str, str]) -> dict[str, Any]:
    """Ids the commands need, asked of mloop once (untimed; also warms the file cache)."""
    base = [mloop, "-C", str(project)]
    status = _json([*base, "status", "--json"], cwd=project, env=env)
    runs = _json([*base, "runs", "list", "--json", "--limit", "1"], cwd=project, env=env)["runs"]
    state = _json([*base, "deploy", "status", "--json"], cwd=project, env=env)
    versions = _json([*base, "models", "list", "--json"], cwd=project, env=env)["versions"]
    if not runs or state["champion"] is None or len(versions) < 2:
        raise SystemExit(f"{project} needs a pipeline run, a champion and two versions "
                         f"(run `mloop demo` first)")
    other = next(v["version"] for v in versions
                 if v["version"] not in (state["champion"], state["challenger"]))
    code = ("import json,sys; from mloop.project import open_project; p=open_project(sys.argv[1]);"
            " print(json.dumps({'tracking_uri': p.uris['tracking_uri'],"
            " 'experiment_id': p.experiment_id, 'model': p.config.model_name}))")
    info = _json([sys.executable, "-c", code, str(project)], cwd=project, env=env)
    return {**info, "run_id": runs[0]["run_id"], "mlflow_run_id": runs[0]["mlflow_run_id"],
            "champion": state["champion"], "other_version": other,
            "project_name": status["project"]}


def read_commands(f: dict[str, Any]) -> list[tuple[list[str], list[str] | None, str]]:
    """(mloop args, anchor argv or None, anchor label)."""
    py = sys.executable
    client = ("from mlflow.tracking import MlflowClient; c = MlflowClient(); m = "
              f"{f['model']!r}; ")
    return [
        (["status"], ["mlflow", "experiments", "search"], "mlflow experiments search"),
        (["runs", "list"], ["mlflow", "runs", "list", "--experiment-id", f["experiment_id"]],
         "mlflow runs list --experiment-id"),
        (["runs", "show", f["run_id"]], ["mlflow", "runs", "describe", "--run-id",
                                         f["mlflow_run_id"]], "mlflow runs describe"),
        (["models", "list"], [py, "-c", client + "c.search_model_versions(f\"name='{m}'\")"],
         "MlflowClient.search_model_versions"),
        (["models", "history"], None, ""),
        (["models", "lineage", str(f["champion"])],
         [py, "-c", client + f"v = c.get_model_version(m, '{f['champion']}'); "
                             "c.get_run(v.run_id)"],
         "MlflowClient.get_model_version + get_run"),
        (["deploy", "status"],
         [py, "-c", client + "c.get_model_version_by_alias(m, 'champion')"],
         "MlflowClient.get_model_version_by_alias"),
        (["events"], None, ""),
        (["monitor", "windows"], None, ""),
        (["data", "list"], None, ""),
    ]


_OWN_WORK = """
import json, sys, time
from mloop.project import open_project
from mloop.registry.candidates import _PYFUNCS
from mloop.registry.gates import evaluate_gates
from mloop.registry.promotion import promote, rollback
from mloop.serving.deploy import deploy_challenger, desired_state, stop_challenger

project = open_project(sys.argv[1])
other, repeats, force = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "force"
desired_state(project)
project.mlflow  # opened once, as a long-lived process would have it
times = {"canary": [], "stop": [], "gate": [], "promote": [], "rollback": []}
for _ in range(repeats):
    for key, call in (
        ("canary", lambda: deploy_challenger(project, other, mode="canary", weight=0.1,
                                             reason="bench")),
        ("stop", lambda: stop_challenger(project, reason="bench")),
        ("gate", lambda: evaluate_gates(project, other)),
        ("promote", lambda: promote(project, other, reason="bench", force=force)),
        ("rollback", lambda: rollback(project, reason="bench")),
    ):
        _PYFUNCS.clear()  # gating loads its models from disk: that is its own work
        t0 = time.perf_counter()
        call()
        times[key].append(time.perf_counter() - t0)
print(json.dumps(times))
"""


def write_commands(f: dict[str, Any], *, force: bool) -> list[tuple[str, list[str]]]:
    v = str(f["other_version"])
    return [
        ("canary", ["deploy", "canary", v, "--weight", "0.1", "--reason", "bench"]),
        ("stop", ["deploy", "stop-challenger", "--reason", "bench"]),
        ("gate", ["models", "gate", v]),
        ("promote", ["models", "promote", v, *(["--force"] if force else []), "--reason",
                     "bench"]),
        ("rollback", ["models", "rollback", "--reason", "bench"]),
    ]


def measure_writes(project: Path, f: dict[str, Any], *, mloop: str, env: dict[str, str],
                   repeats: int, force: bool) -> list[dict[str, Any]]:
    """Writes on a copy of the project: each fresh command, then the same calls warm."""
    with tempfile.TemporaryDirectory(prefix="mloop-bench-cli-") as tmp:
        copy = Path(tmp) / "project"
        shutil.copytree(project, copy, ignore=shutil.ignore_patterns("inference"))
        cmds = write_commands(f, force=force)
        fresh: dict[str, Timing] = {name: Timing([mloop, *args]) for name, args in cmds}
        for _ in range(repeats):  # in this order, so each pair leaves the state as it found it
            for name, args in cmds:
                t = fresh[name]
                if t.error:
                    continue
                sample, out, err, code = run_once([mloop, "-C", str(copy), *args], cwd=copy,
                                                  env=env)
                if code != 0 and not (name == "gate" and code == 1):  # 1: a gate failed
                    t.error = f"exit {code}: {(err or out).strip()[-400:]}"
                else:
                    t.samples.append(sample)
        proc = subprocess.run([sys.executable, "-c", _OWN_WORK, str(copy),
                               str(f["other_version"]), str(repeats),
                               "force" if force else "gates"], cwd=copy, env=env,
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"timing the writes in one process failed: {proc.stderr[-800:]}")
        warm = json.loads(proc.stdout.strip().splitlines()[-1])
    out = []
    for name, args in cmds:
        t, own = fresh[name], statistics.median(warm[name])
        overhead = t.wall - own if t.wall is not None else None
        out.append({"command": "mloop " + " ".join(args), **t.to_dict(),
                    "own_work_s": _r(own), "overhead_s": _r(overhead),
                    "pass": overhead is not None and overhead <= WRITE_OVERHEAD_S})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", type=Path, help="a project after `mloop demo` (default: "
                    "build one in a temporary folder)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per command; medians shown")
    ap.add_argument("--no-anchors", action="store_true", help="skip the MLflow calls")
    ap.add_argument("--no-writes", action="store_true", help="skip the write commands")
    ap.add_argument("--no-bytecode-cache", action="store_true", help="keep "
                    "PYTHONDONTWRITEBYTECODE if set (every command compiles mloop's modules)")
    ap.add_argument("--out", type=Path, default=HERE / "cli_results.json")
    ap.add_argument("--allow-override", action="store_true",
                    help="if a model the benchmark promotes (the demo's initial one, the timed "
                         "`models promote`) fails a gate, promote it anyway (recorded as an "
                         "override); without it the benchmark asks at a terminal and stops "
                         "otherwise")
    args = ap.parse_args()

    bindir = Path(sys.executable).parent
    mloop, mlflow = str(bindir / "mloop"), str(bindir / "mlflow")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if not args.no_bytecode_cache:
        # as installed: pip compiles a package's modules once; without this variable an
        # editable checkout caches them on first import. With it, every command recompiles.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    loadavg = Path("/proc/loadavg").read_text().split()[:3]
    busy = _busy_share()
    tmp = None
    project = args.project
    overrides: list[dict[str, Any]] = []
    if project is None:
        tmp = Path(tempfile.mkdtemp(prefix="mloop-bench-cli-state-"))
        project, overrides = build_state(tmp / "demo", mloop, env,
                                         allow_override=args.allow_override)
    project = project.resolve()
    try:
        facts = _facts(project, mloop, env)
        anchor_env = {**env, "MLFLOW_TRACKING_URI": facts["tracking_uri"]}
        floor = measure([sys.executable, "-c", FLOOR_IMPORTS], cwd=project, env=env,
                        repeats=args.repeats)
        print(f"floor: python importing what every mloop command needs ({FLOOR_IMPORTS[7:]}): "
              f"{_fmt(floor.wall).strip()} s wall, {_fmt(floor.cpu).strip()} s CPU", flush=True)
        reads = []
        print(f"{'command':<34} {'wall':>6} {'cpu':>6}   {'':<4}  {'MLflow on the same store':<44}"
              f" {'wall':>6} {'cpu':>6}", flush=True)
        for mloop_args, anchor, label in read_commands(facts):
            t = measure([mloop, "-C", str(project), *mloop_args], cwd=project, env=env,
                        repeats=args.repeats)
            a = None
            if anchor is not None and not args.no_anchors:
                argv = [mlflow, *anchor[1:]] if anchor[0] == "mlflow" else anchor
                a = measure(argv, cwd=project, env=anchor_env, repeats=args.repeats)
            ok = t.wall is not None and t.wall <= READ_TARGET_S
            name = "mloop " + " ".join(mloop_args[:2] if mloop_args[0] != "runs"
                                       or mloop_args[1] != "show" else ["runs", "show"])
            verdict = "PASS" if ok else ("FAIL" if t.error else "MISS")
            line = f"{name:<34} {_fmt(t.wall)} {_fmt(t.cpu)}   {verdict:<4}  "
            if a is not None:
                line += f"{label:<44} {_fmt(a.wall)} {_fmt(a.cpu)}"
            print(line + (f"\n    {t.error}" if t.error else ""), flush=True)
            reads.append({"command": name, "mloop": t.to_dict(), "pass": ok,
                          "anchor": ({"what": label, **a.to_dict()} if a is not None else None)})
        writes = []
        if not args.no_writes:
            forced = promote_override(project, facts["other_version"], env,
                                      allowed=args.allow_override)
            if forced is not None:
                overrides.append(forced)
            writes = measure_writes(project, facts, mloop=mloop, env=env, repeats=args.repeats,
                                    force=forced is not None)
        if writes:
            print(f"\n{'write':<48} {'wall':>6} {'cpu':>6} {'own':>6} {'extra':>6}")
            for w in writes:
                verdict = "PASS" if w["pass"] else ("FAIL" if w["error"] else "MISS")
                print(f"{w['command']:<48} {_fmt(w['wall_s'])} {_fmt(w['cpu_s'])} "
                      f"{_fmt(w['own_work_s'])} {_fmt(w['overhead_s'])}   {verdict}"
                      + (f"\n    {w['error']}" if w["error"] else ""))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    import mlflow as _mlflow  # only for its version; after the timings

    result = {
        "benchmark": "cli", "git": git_state(REPO), "repeats": args.repeats,
        "target": {"read_wall_s": READ_TARGET_S, "write_overhead_s": WRITE_OVERHEAD_S},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": loadavg, "busy_cores_before": round(busy, 2)},
        "mlflow_version": _mlflow.__version__, "project": str(project),
        "bytecode_cache": "PYTHONDONTWRITEBYTECODE" not in env,
        "floor": {"what": FLOOR_IMPORTS, **floor.to_dict()},
        "reads": reads, "writes": writes, "overrides": overrides,
        "all_reads_pass": all(r["pass"] for r in reads),
        "all_writes_pass": all(w["pass"] for w in writes),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nmachine: {os.cpu_count()} cpus, load {' '.join(loadavg)}, other processes kept "
          f"{busy:.1f} cores busy before the run"
          + (" (wall times include waiting for a core)" if busy > 0.5 else "")
          + f"; wrote {args.out}")
    for o in overrides:
        print(f"note: OVERRIDE in {o['where']}: v{o['version']} despite failed gate(s) "
              f"({o['allowed_by']})")
    if not result["all_reads_pass"]:
        sys.exit(1)


def _fmt(x: float | None) -> str:
    return f"{x:6.2f}" if x is not None else "     -"


if __name__ == "__main__":
    main()

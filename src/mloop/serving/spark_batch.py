"""Batch scoring on Spark: ``mloop predict --engine spark`` (the ``mloop[spark]`` extra).

The same job as :func:`mloop.serving.batch.predict_file`, for inputs too big for one machine:
a Parquet (or CSV with a header) file, folder or URI is read by Spark, the registered version
is applied with ``mlflow.pyfunc.spark_udf`` (``env_manager="local"``: the workers use this
Python environment, as the local path does) to the columns of the version's input signature,
and the input columns plus ``prediction`` are written as Parquet: a folder of part files.

Same semantics as the local path: the champion unless a version is given, input columns cast
to the signature's types (a value that cannot be cast, or a null in a required column, fails
the job before anything is written, naming the column), ``prediction`` is the model's
``predict`` (the first column of a 2-D output), every input column is kept as it was read
(columns outside the signature are not given to the model, and are an error with
``serving.strict_columns: true``).
Spark does not keep row order across part files: carry an id column through if you join the
predictions back.

Writing: a local output is written to a hidden temporary sibling and renamed into place when
the job has committed, so a failure leaves no half-written output. On an object store
(``s3://``, written through Hadoop's ``s3a://``) a rename is a copy, so the job writes the
output prefix directly with Spark's output committer; ``_SUCCESS`` appears last and marks a
complete output (configure the S3A "magic" committer in ``spark.conf`` for a faster, safer
commit on S3).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mloop.errors import DataSourceError, MloopError
from mloop.extras import require_extra
from mloop.project import Project
from mloop.serving.schema import InputSchema

DEFAULT_MASTER = "local[2]"

# MLflow signature type -> Spark SQL type (DDL names)
_SPARK_TYPES = {"double": "double", "float": "float", "long": "bigint", "integer": "int",
                "string": "string", "boolean": "boolean", "binary": "binary",
                "datetime": "timestamp"}
# numpy dtype kind/size of a tensor output -> Spark SQL type
_TENSOR_TYPES = {("f", 8): "double", ("f", 4): "float", ("i", 8): "bigint", ("i", 4): "int",
                 ("b", 1): "boolean"}
_FRACTIONAL = ("float", "double", "decimal")


def require_pyspark() -> Any:
    """The pyspark module (with its SQL layer), or MissingExtraError naming the extra."""
    require_extra("spark", "pyspark.sql")
    return require_extra("spark", "pyspark")


def spark_path(uri: str | Path) -> str:
    """The path Spark (Hadoop) reads: absolute for local paths, ``s3a://`` for ``s3://``."""
    text = str(uri)
    if text.startswith("s3://"):
        return "s3a://" + text[len("s3://"):]
    if "://" not in text:
        return str(Path(text).resolve())
    return text


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _local_path(uri: str) -> Path:
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri).resolve()


def _input_format(src: str, fmt: str | None) -> str:
    """``parquet`` or ``csv``: given, else from the suffix, else from a local folder's files,
    else Parquet (an object-store prefix)."""
    if fmt is not None:
        if fmt not in ("parquet", "csv"):
            raise MloopError(f"unsupported input format '{fmt}' (use parquet or csv)")
        return fmt
    name = src.rstrip("/").rsplit("/", 1)[-1].lower()
    for suffix, kind in ((".parquet", "parquet"), (".csv", "csv"), (".csv.gz", "csv")):
        if name.endswith(suffix):
            return kind
    if _is_local(src):
        path = _local_path(src)
        if path.is_file():
            raise DataSourceError(f"{src}: unsupported input type '{path.suffix}' "
                                  f"(use .parquet or .csv, or a folder of them)")
        files = [p.name.lower() for p in path.rglob("*") if p.is_file()
                 and not p.name.startswith((".", "_"))]
        if any(f.endswith(".parquet") for f in files):
            return "parquet"
        if any(f.endswith((".csv", ".csv.gz")) for f in files):
            return "csv"
        raise DataSourceError(f"{src}: no .parquet or .csv files in this folder")
    return "parquet"


def _result_type(outputs: Any) -> str:
    """The Spark type of ``prediction``, from the output signature (what the local path writes:
    the model's predict output, first column); double when the signature does not say."""
    specs = list(getattr(outputs, "inputs", None) or [])
    if not specs:
        return "double"
    spec = specs[0]
    kind = getattr(getattr(spec, "type", None), "name", None)
    if isinstance(kind, str) and kind in _SPARK_TYPES:
        return _SPARK_TYPES[kind]
    dtype = getattr(spec, "type", None)
    if dtype is not None and hasattr(dtype, "kind"):
        if dtype.kind in ("U", "S", "O"):
            return "string"
        return _TENSOR_TYPES.get((dtype.kind, dtype.itemsize), "double")
    return "double"


def _signature(project: Project, version: int) -> tuple[InputSchema, str]:
    """The version's input schema and prediction type, from its MLmodel file alone (the model
    itself is loaded by the workers)."""
    from mlflow.models import get_model_info

    project.mlflow  # noqa: B018 - get_model_info follows the fluent API's URIs: this project's
    info = get_model_info(f"models:/{project.config.model_name}/{version}")
    sig = info.signature
    if sig is None or sig.inputs is None:
        raise MloopError(f"version {version} of '{project.config.model_name}' has no input "
                         f"signature; mloop scores only versions with one")
    return InputSchema.from_mlflow(sig.inputs), _result_type(sig.outputs)


def spark_session(master: str = DEFAULT_MASTER, conf: dict[str, Any] | None = None, *,
                  progress: bool = True) -> Any:
    """A SparkSession named mloop: Arrow transfers on, logs at WARN, and (local masters) no
    web UI and this Python for the workers. ``conf`` (``spark.conf`` in mloop.yaml) wins."""
    require_pyspark()
    from pyspark.sql import SparkSession

    from mloop.storage import s3_settings

    settings: dict[str, str] = {
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.session.timeZone": "UTC",
        "spark.ui.showConsoleProgress": "true" if progress else "false",
    }
    if master.startswith("local"):
        # one process on this machine: bind to loopback only (and no "hostname resolves to a
        # loopback address" warning), no web UI port
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        settings["spark.ui.enabled"] = "false"
        if not os.environ.get("PYSPARK_PYTHON"):
            settings["spark.pyspark.python"] = sys.executable
    s3 = s3_settings()
    if s3["endpoint"]:  # MinIO, moto, Ceph...: the endpoint boto3 and MLflow use
        settings["spark.hadoop.fs.s3a.endpoint"] = str(s3["endpoint"])
        settings["spark.hadoop.fs.s3a.path.style.access"] = "true"
    if s3["region"]:
        settings["spark.hadoop.fs.s3a.endpoint.region"] = str(s3["region"])
    for key, value in (conf or {}).items():
        settings[key] = str(value).lower() if isinstance(value, bool) else str(value)
    builder = SparkSession.builder.master(master).appName("mloop")
    for key, value in settings.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("WARN")
    return session


class _DropEnvManagerWarning(logging.Filter):
    """env_manager="local" is mloop's choice, not a mistake to warn about on every run (a
    requirement that does not match this environment is still warned about)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return 'env_manager="local"' not in record.getMessage()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No artifact-download progress bars, env-manager advice or pandas-version warnings from
    the driver while the job runs (Spark's own stage progress still shows)."""
    log = logging.getLogger("mlflow.pyfunc")
    drop = _DropEnvManagerWarning()
    log.addFilter(drop)
    before = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        with warnings.catch_warnings():
            # PySpark 4.x warns that it "does not yet fully support pandas >= 3.0.0"; the
            # scoring path (Arrow-backed pandas UDF) is checked against the local path in
            # tests/test_spark_predict.py
            warnings.filterwarnings("ignore", message="PySpark does not yet fully support")
            yield
    finally:
        log.removeFilter(drop)
        if before is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = before


def _col(name: str) -> Any:
    from pyspark.sql import functions as F

    return F.col("`" + name.replace("`", "``") + "`")


def _read(session: Any, src: str, fmt: str) -> Any:
    from pyspark.errors import AnalysisException

    try:
        if fmt == "csv":
            # inferSchema (one extra pass), integers widened to 64 bits: the types pyarrow's
            # CSV reader gives the local path
            df = session.read.options(header=True, inferSchema=True).csv(spark_path(src))
            return df.select(*[_col(f.name).cast("bigint").alias(f.name)
                               if f.dataType.simpleString() in ("int", "smallint", "tinyint")
                               else _col(f.name) for f in df.schema.fields])
        return session.read.parquet(spark_path(src))
    except AnalysisException as exc:
        if "PATH_NOT_FOUND" in str(exc) or "Path does not exist" in str(exc):
            raise DataSourceError(f"{src}: no such file or folder") from None
        raise DataSourceError(f"{src}: Spark cannot read it as {fmt} "
                              f"({_first_line(exc)})") from None
    except Exception as exc:
        if "S3AFileSystem" in str(exc) or "No FileSystem for scheme" in str(exc):
            raise MloopError(_s3a_hint(src)) from None
        raise


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _s3a_hint(uri: str) -> str:
    return (f"{uri}: Spark reads s3:// through Hadoop's s3a:// filesystem, which is not on "
            f"Spark's classpath: add the hadoop-aws jar matching Spark's Hadoop (and the AWS "
            f"SDK bundle) with spark.jars or spark.jars.packages under spark.conf in mloop.yaml")


def _check_s3a(session: Any, *uris: str) -> None:
    s3 = [u for u in uris if u.startswith(("s3://", "s3a://"))]
    if not s3:
        return
    try:
        session.sparkContext._jvm.java.lang.Class.forName(
            "org.apache.hadoop.fs.s3a.S3AFileSystem")
    except Exception:
        raise MloopError(_s3a_hint(s3[0])) from None


def _validate(df: Any, schema: InputSchema, src: str, version: int, *, strict: bool = False
              ) -> tuple[int, list[Any]]:
    """Rows, and the signature's columns cast to its types; a MloopError naming each missing
    column, null in a required column or value that cannot be cast (or, with ``strict``, a
    column outside the signature), before any output."""
    from pyspark.sql import functions as F

    names = df.columns
    schema.extra_columns(names, source=src, strict=strict)
    missing = [c.name for c in schema.columns if c.name not in names]
    if missing:
        raise DataSourceError(f"{src}: missing column(s) {missing} that v{version}'s signature "
                              f"requires (found {names})")
    types = {f.name: f.dataType.simpleString() for f in df.schema.fields}
    aggs = [F.count(F.lit(1))]
    checks: list[tuple[str, str, str]] = []  # (column, kind, detail)
    cast_cols = []
    for c in schema.columns:
        col = _col(c.name)
        if c.required:
            aggs.append(F.sum(F.when(col.isNull(), 1).otherwise(0)))
            checks.append((c.name, "null", ""))
        target = _SPARK_TYPES.get(c.type)
        source = types[c.name]
        if target is None or source == target:
            cast_cols.append(col.alias(c.name))
            continue
        if target != "string":
            cast = col.try_cast(target)
            bad = col.isNotNull() & cast.isNull()
            if target in ("bigint", "int") and source.startswith(_FRACTIONAL):
                bad = bad | (col.isNotNull() & (cast != col))  # 2.5 is no integer
            aggs.append(F.sum(F.when(bad, 1).otherwise(0)))
            aggs.append(F.first(F.when(bad, col.cast("string")), ignorenulls=True))
            checks.append((c.name, "cast", f"{source}, the signature expects {c.type}"))
        cast_cols.append(col.cast(target).alias(c.name))
    row = df.agg(*aggs).first()
    rows = int(row[0])
    if rows == 0:
        raise DataSourceError(f"{src}: no rows to score")
    i = 1
    for name, kind, detail in checks:
        count = int(row[i] or 0)
        if kind == "null":
            i += 1
            if count:
                raise DataSourceError(f"{src}: column '{name}' is null in {count} row(s) but the "
                                      f"signature requires a value")
        else:
            example, i = row[i + 1], i + 2
            if count:
                raise DataSourceError(f"{src}: column '{name}' is {detail} ({count} value(s) "
                                      f"cannot be cast, e.g. {example!r})")
    return rows, cast_cols


def _replace(tmp: Path, dst: Path) -> None:
    """Put the finished ``tmp`` folder at ``dst``, replacing what was there (a file or a
    folder from an earlier run) with two renames."""
    old = None
    if dst.exists() or dst.is_symlink():
        old = dst.with_name(f".old-{uuid.uuid4().hex[:8]}-{dst.name}")
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def predict_spark(project: Project, input: str | Path, output: str | Path, *,
                  version: int | None = None, master: str | None = None,
                  spark: Any = None, conf: dict[str, Any] | None = None,
                  input_format: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Score ``input`` (file, folder or URI) into the Parquet folder ``output`` on Spark.

    ``spark``: a SparkSession to use (and leave running), else the active one (a notebook's),
    else one is started on ``master`` (else ``spark.master`` in mloop.yaml, else local[2])
    with ``spark.conf`` plus ``conf``, and stopped at the end. Returns rows, version and
    seconds, as ``predict_file`` does.
    """
    require_pyspark()
    from mloop.registry.aliases import require_champion
    from mloop.registry.candidates import get_version

    src, dst = str(input), str(output)
    if _is_local(src) and not _local_path(src).exists():
        raise DataSourceError(f"{src}: no such file or folder")
    fmt = _input_format(src, input_format)
    cfg = getattr(project.config, "spark", None)
    master = master or getattr(cfg, "master", None) or DEFAULT_MASTER
    settings = {**(getattr(cfg, "conf", None) or {}), **(conf or {})}
    _ = project.mlflow  # points MLflow's fluent API (spark_udf's download) at the project
    if version is None:
        version = require_champion(project, needed_for="`mloop predict` scores with it "
                                                       "unless --version names a version")
    get_version(project, version)  # ModelNotFoundError naming it
    schema, result_type = _signature(project, version)

    import mlflow.pyfunc

    if spark is None:  # a notebook's or pyspark shell's session is used as it is, and kept
        from pyspark.sql import SparkSession

        spark = SparkSession.getActiveSession()
    owned = spark is None
    t0 = time.perf_counter()
    local_out = _is_local(dst)
    tmp: Path | None = None
    with _quiet():
        session = spark_session(master, settings, progress=progress) if owned else spark
        try:
            _check_s3a(session, src, dst)
            df = _read(session, src, fmt)
            rows, cast_cols = _validate(df, schema, src, version,
                                        strict=project.config.serving.strict_columns)
            ignored = [n for n in df.columns if n not in schema.names]
            from pyspark.sql import functions as F

            udf = mlflow.pyfunc.spark_udf(
                session, f"models:/{project.config.model_name}/{version}",
                result_type=result_type, env_manager="local")
            scored = df.withColumn("prediction", udf(F.struct(*cast_cols)))
            writer = scored.write.option("compression", "zstd")
            if local_out:
                final = _local_path(dst)
                final.parent.mkdir(parents=True, exist_ok=True)
                tmp = final.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{final.name}")
                writer.mode("errorifexists").parquet(str(tmp))
                _replace(tmp, final)
                tmp = None
            else:
                writer.mode("overwrite").parquet(spark_path(dst))
            spark_version = session.version
            used_master = session.sparkContext.master
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if owned:
                session.stop()
    seconds = time.perf_counter() - t0
    return {"engine": "spark", "master": used_master,
            "spark_version": spark_version, "input": src, "output": dst, "version": version,
            "rows": rows, "seconds": round(seconds, 3),
            "rows_per_s": round(rows / seconds, 1) if seconds else None,
            "ignored_columns": ignored}

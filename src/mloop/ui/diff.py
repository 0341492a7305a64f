"""Two versions side by side (``/versions/diff?a=V&b=W``): metrics with their deltas,
params, gate results, training data digests, code and each one's compile verdict, from
:func:`mloop.registry.lineage.diff`, what ``mloop models diff`` prints."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from mloop.ui.auth import require_reader
from mloop.ui.params import int_param
from mloop.ui.render import render


def diff_page(request: Request) -> Response:
    """``a`` and ``b`` are version numbers: a missing or non-integer one is a 400 naming it,
    an unknown one a 404 naming it (ModelNotFoundError). ``?all=1`` shows equal rows too."""
    from mloop.metrics import HIGHER_IS_BETTER
    from mloop.registry.lineage import diff
    from mloop.ui.links import project_mlflow_ui

    require_reader(request)
    project = request.app.state.project
    a, b = int_param(request, "a"), int_param(request, "b")
    show_all = request.query_params.get("all") in ("1", "true", "on")
    d = diff(project, a, b)
    better = {r["key"]: _better(r.get("delta"), HIGHER_IS_BETTER.get(r["key"]))
              for r in d["metrics"]}
    return render(request, "diff.html", page="versions", d=d, a=a, b=b, show_all=show_all,
                  better=better, mlflow=project_mlflow_ui(project))


def _better(delta: float | None, higher_is_better: bool | None) -> str:
    """'better' or 'worse' for b against a, '' when equal or the direction is unknown."""
    if delta is None or delta == 0 or higher_is_better is None:
        return ""
    return "better" if (delta > 0) == higher_is_better else "worse"

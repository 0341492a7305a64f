"""The loop's paired verdict on a classifier whose classes are integers (0/1) and whose
primary metric is binary f1: labels are kept as text, so f1's positive class (1) is not among
them; the verdict falls back to accuracy instead of crashing the controller."""

from __future__ import annotations

import pandas as pd
import pytest

from mloop.pipeline.runner import run_pipeline
from mloop.project import open_project

from .helpers import busy_config, rentals_frame

pytestmark = pytest.mark.slow

BUSY = busy_config(params="{max_iter: 300, C: 1.0}", metrics="[f1, accuracy]")


def test_paired_verdict_on_integer_classes_with_binary_f1(make_project) -> None:
    from mloop.loop.controller import paired_scores
    from mloop.monitoring.windows import read_rows
    from mloop.serving.model import load_served
    from mloop.storage import ObjectStore
    from mloop.traffic.inference_log import InferenceLog, LogEntry, new_request_id
    from mloop.traffic.labels import read_labels, store_labels

    frame = rentals_frame(600)
    frame["busy"] = (frame["cnt"] > frame["cnt"].median()).astype(int)
    root = make_project(BUSY, frame=frame)
    assert run_pipeline(open_project(root)).status == "succeeded"
    text = (root / "mloop.yaml").read_text().replace("C: 1.0", "C: 0.001")
    (root / "mloop.yaml").write_text(text)
    project = open_project(root)
    assert run_pipeline(project).status == "succeeded"

    traffic = rentals_frame(300, seed=9)
    truth = (traffic["cnt"] > frame["cnt"].median()).astype(int).tolist()
    cols = {c: traffic[c].tolist() for c in ("hour", "weather", "temp")}
    preds = load_served(project, 1).predict_columns(cols)
    uri = project.uris["inference_log_uri"]
    log = InferenceLog(uri, commit_interval=3600)
    start = pd.Timestamp("2024-03-01", tz="UTC").timestamp()
    ids = []
    for i in range(len(traffic)):
        rid = new_request_id(start + 60 * i)
        ids.append(rid)
        log.append(LogEntry([rid], start + 60 * i, 1, "champion", 1.0, [preds[i]],
                            {c: [v[i]] for c, v in cols.items()}))
    log.close()
    store_labels(ObjectStore(uri), dict(zip(ids, truth, strict=True)), task="classification",
                 source="test")
    labelled = read_rows(uri).join(read_labels(uri), keys="_request_id")
    assert labelled.num_rows == 300

    paired = paired_scores(project, labelled, [2, 1])
    # labels come back as text ("0"/"1"); binary f1 scores the larger label, "1", as the
    # model's own classes 0/1 score 1 (it fell back to accuracy when f1 asked for the int 1)
    assert paired["metric"] == "f1" and paired["rows"] == 300
    assert paired.get("fallback") is None, paired
    from sklearn.metrics import f1_score

    truth_text = [str(t) for t in truth]
    # v1 answered these rows live: its re-scored f1 is the live one
    assert paired["values"][1] == pytest.approx(
        f1_score(truth_text, [str(p) for p in preds], pos_label="1"))
    # and v2, which never answered them, is scored on the same rows
    rescored = load_served(project, 2).predict_columns(cols)
    assert paired["values"][2] == pytest.approx(
        f1_score(truth_text, [str(p) for p in rescored], pos_label="1"))
    assert paired["values"][2] != paired["values"][1]  # two models, not one scored twice

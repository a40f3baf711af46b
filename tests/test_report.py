"""The run report and the merged label metrics."""
from __future__ import annotations

import json
import re

import numpy as np

from pipeline.report import gallery, merge_label_metrics, per_class_bars, per_class_table, stage_rows, write_report


def _m(miou, cov=100.0):
    return {"miou": miou, "coverage": cov, "pixel_accuracy": 90.0, "per_class_iou": {"background": 80.0, "a": miou}}


def test_merge_label_metrics_lists_only_the_stages_that_ran(tmp_path):
    (tmp_path / "cam.json").write_text(json.dumps(_m(40.0)))
    (tmp_path / "rw.json").write_text(json.dumps(_m(55.0)))
    out = merge_label_metrics({"cam": tmp_path / "cam.json", "crf": tmp_path / "crf.json", "rw": tmp_path / "rw.json"})
    assert out["stages_run"] == ["cam", "rw"]
    assert out["crf"] is None and out["rw"]["miou"] == 55.0


def test_stage_rows_keep_pipeline_order_and_add_the_upper_bound():
    labels = {"cam": _m(40.0), "crf": _m(60.0, 70.0), "rw": _m(55.0)}
    rows = stage_rows(labels, _m(50.0), _m(70.0))
    assert [r["stage"] for r in rows] == ["cam", "crf", "rw", "segmenter", "upper_bound"]
    assert [r["split"] for r in rows] == ["train", "train", "train", "val", "val"]
    assert rows[1]["coverage"] == 70.0
    assert [r["stage"] for r in stage_rows({"cam": None}, _m(50.0), None)] == ["segmenter"]


def test_report_is_self_contained_html_with_its_figures_next_to_it(tmp_path):
    names, table = per_class_table({"cam": _m(40.0), "segmenter": _m(50.0), "upper_bound": None})
    assert names == ["background", "a"] and list(table) == ["cam", "segmenter"]
    bars = per_class_bars(names, table, tmp_path / "per_class_iou.png")
    img = np.zeros((20, 30, 3), np.uint8)
    gal = gallery(["x", "y"], [("image", lambda i: img), ("missing", lambda i: None)], tmp_path / "gallery.png")
    page = write_report(tmp_path, title="t", rows=stage_rows({"cam": _m(40.0)}, _m(50.0), None),
                        class_names=names, per_class=table,
                        figures=[("bars", bars, "c"), ("gallery", gal, "g"), ("none", None, "skipped")], notes=["n"])
    text = page.read_text()
    srcs = re.findall(r'src="([^"]+)"', text)
    assert srcs == ["per_class_iou.png", "gallery.png"]
    assert all((tmp_path / s).is_file() for s in srcs)
    assert "http" not in text.replace("<!doctype html>", "")  # nothing fetched from elsewhere
    assert "50.0" in text and "segmenter" in text


def test_quality_table_of_a_gt_run_shows_the_segmenter_only_as_the_upper_bound(tmp_path):
    """A `seg.labels=gt` run's segmenter.json is the upper bound: no "trained on the pseudo masks" row
    and no 85% goal scored on it."""
    from pipeline.quality import read_metrics, write_quality

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "segmenter.json").write_text(json.dumps({"miou": 47.95, "trained_on": "gt", "ground_truth": True}))
    (tmp_path / "m" / "rw.json").write_text(json.dumps({"miou": 50.19}))
    m = read_metrics(tmp_path / "m")
    assert m["segmenter"] is None and m["upper_bound"]["miou"] == 47.95
    write_quality(tmp_path / "m", tmp_path / "q.md", "t", "cmd", [])
    text = (tmp_path / "q.md").read_text()
    assert "| segmenter trained on GT (upper bound) | val | 48.0 |" in text
    assert "segmenter trained on the pseudo masks" not in text
    assert "48.0 = " not in text  # no 85% goal scored on the GT-trained segmenter

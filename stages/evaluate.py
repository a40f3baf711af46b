"""Stage evaluate: segmenter on the eval split -> data/predictions.zarr, metrics/segmenter.json,
metrics/labels.json (cam + crf + rw merged), plots/evaluate/*.csv and reports/index.html.

When the segmenter was trained on GT (``dvc exp run -S seg.labels=gt``) its metrics are also
written to metrics/segmenter_gt.json; later runs on pseudo masks show that file as the
fully-supervised upper bound.
"""
import csv
from pathlib import Path

import numpy as np

from pipeline.compute import resolve_device, set_torch_threads
from pipeline.datasets import PreparedData
from pipeline.metrics import write_json
from pipeline.progress import stage_timer
from pipeline.report import (LABEL_STAGES, gallery, ground_truth_note, merge_label_metrics, per_class_bars,
                             per_class_table, read_json, stage_bars, stage_rows, write_report)
from pipeline.segment import load_segmenter, predict_mask, predict_store, score_store
from pipeline.store import Store, StoreError
from pipeline.visual import colourise, heatmap
from stages.common import (CAMS, LABEL_METRICS, PLOTS, PREDICTIONS, PREPARED, PSEUDO, REPORTS, SEEDS, SEG_METRICS,
                           SEG_MODEL, start)

UPPER_BOUND = Path("metrics/segmenter_gt.json")


def _open(path):
    try:
        return Store(path)
    except StoreError:
        return None


def _write_csv(path: Path, header: list[str], rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def main() -> None:
    params = start("evaluate")
    seg, data = params["seg"], params["data"]
    device = resolve_device(params["compute"]["device"])
    set_torch_threads(params["compute"], device)
    prepared = PreparedData(data, PREPARED)
    names = prepared.class_names
    ids = prepared.ids(data["eval_split"])
    model, ckpt = load_segmenter(SEG_MODEL / "segmenter.pt", device)
    if ckpt.get("class_names") not in (None, names):
        raise ValueError(f"{SEG_MODEL / 'segmenter.pt'}: trained for classes {ckpt['class_names']}, data has {names}")
    with stage_timer("evaluate") as t:
        predict_store(model, prepared, ids, PREDICTIONS, device, seg, params["crf"],
                      {"kind": "segmenter_prediction", "class_names": names, "split": data["eval_split"],
                       "trained_on": ckpt["labels"], "stride": 1,
                       "eval": {k: seg[k] for k in ("eval_scales", "eval_flip", "eval_crf")}},
                      shard_images=params["compute"]["shard_images"])
        cm = score_store(Store(PREDICTIONS), prepared, ids)
        metrics = {**cm.summary(names), "split": data["eval_split"], "images": len(ids), "trained_on": ckpt["labels"],
                   "eval": {k: seg[k] for k in ("eval_scales", "eval_flip", "eval_crf")}}
        t.n = len(ids)
        t.extra = (f"segmenter (trained on {ckpt['labels']}) {data['eval_split']} "
                   + (f"mIoU {metrics['miou']}%" if metrics["ground_truth"] else "not scored: no ground truth"))
    write_json(SEG_METRICS, metrics)
    if ckpt["labels"] == "gt":
        write_json(UPPER_BOUND, metrics)
    on_gt = ckpt["labels"] == "gt"
    seg_row = None if on_gt else metrics
    upper = metrics if on_gt else read_json(UPPER_BOUND)

    labels = merge_label_metrics({"cam": "metrics/cam.json", "crf": "metrics/crf.json", "rw": "metrics/rw.json"})
    write_json(LABEL_METRICS, labels)

    _write_csv(PLOTS / "evaluate" / "per_class_iou.csv", ["class", "iou"],
               [(c, "" if v is None else v) for c, v in metrics["per_class_iou"].items()])
    rows = stage_rows(labels, seg_row, upper, data["train_split"], data["eval_split"])
    _write_csv(PLOTS / "evaluate" / "stages.csv", ["stage", "miou"], [(r["stage"], r["miou"]) for r in rows])

    # report: tables, bars and galleries (train images: every stage; eval images: segmenter vs GT)
    stores = {"cam": _open(CAMS), "crf": _open(SEEDS), "rw": _open(PSEUDO)}
    pal = prepared.palette

    def col_image(i):
        return prepared.image(i)

    def col_cam(i):
        s = stores["cam"]
        return heatmap(prepared.image(i), s.read("cam", i).astype(np.float32).max(0)) if s and i in s.ids else None

    def col_mask(key, array):
        s = stores[key]
        return lambda i: colourise(s.read(array, i), pal) if s and array in s.specs and i in s.ids else None

    def col_pred(i):
        return colourise(predict_mask(model, prepared.image(i), device, seg, params["crf"]), pal)

    def col_gt(i):
        g = prepared.gt(i)
        return None if g is None else colourise(g, pal)

    n = data["gallery_ids"]
    figures = []
    train_cols = [("image", col_image), ("CAM", col_cam), ("CRF seeds", col_mask("crf", "seed")),
                  ("random walk", col_mask("rw", "mask")), ("segmenter", col_pred), ("GT", col_gt)]
    g1 = gallery(prepared.ids(data["train_split"])[:n], train_cols, REPORTS / "gallery_train.png")
    g2 = gallery(ids[:n], [("image", col_image), ("segmenter", col_pred), ("GT", col_gt)], REPORTS / "gallery_eval.png")
    stage_png = stage_bars(rows, REPORTS / "stages.png") if any(r["miou"] is not None for r in rows) else None
    per_class_stages = {key: labels.get(key) for key, _, _ in LABEL_STAGES}
    per_class_stages["segmenter"] = seg_row
    per_class_stages["upper_bound"] = upper
    pc_names, pc_table = per_class_table(per_class_stages)
    pc_png = per_class_bars(pc_names, pc_table, REPORTS / "per_class_iou.png") if pc_table else None
    figures += [("mIoU per stage", stage_png, "Label stages are scored on the train split (the images they label); "
                 "the segmenter on the held-out eval split."),
                ("Per-class IoU", pc_png, "One bar per stage and class."),
                (f"Gallery: {data['train_split']} images through every stage", g1,
                 "Image, CAM (max over classes), CRF seeds (grey = 255 unsure), random-walk pseudo mask, the "
                 "segmenter's prediction, ground truth. Columns whose stage did not run are left out."),
                (f"Gallery: {data['eval_split']} images", g2, "Held-out images: segmenter prediction next to the GT.")]
    notes = [f"Segmenter trained on {ckpt['labels']} masks ({ckpt['seg'].get('epochs')} epochs, backbone "
             f"{ckpt['arch']['backbone']}); evaluated with scales {seg['eval_scales']}, flip {seg['eval_flip']}, "
             f"CRF {seg['eval_crf']}.",
             "Upper bound: " + ("this run trained on GT, so its segmenter is the upper bound." if on_gt else
                                f"read from {UPPER_BOUND} (an earlier run with seg.labels=gt)." if upper else
                                f"unknown; run `dvc exp run -S seg.labels=gt` once to write {UPPER_BOUND}."),
             "Coverage = share of GT-labelled pixels the stage labels (CRF seeds leave unsure pixels at 255; mIoU is "
             "over the labelled ones)."]
    no_gt = ground_truth_note({**{key: labels.get(key) for key, _, _ in LABEL_STAGES}, "segmenter": metrics})
    if no_gt:
        notes.insert(0, no_gt)
    write_report(REPORTS, title=f"WSSS run report: {prepared.index.get('dataset')}", rows=rows, class_names=names,
                 per_class=pc_table, figures=figures, notes=notes,
                 details={"segmenter": {k: v for k, v in metrics.items() if not k.startswith("per_class_p")
                                        and k != "per_class_recall"}, "stages_run": labels["stages_run"]})


if __name__ == "__main__":
    main()

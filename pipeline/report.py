"""The run's report: a self-contained ``index.html`` with its pictures as PNG files next to it.

It shows the per-stage table (CAM -> CRF seeds -> random walk on the train split, segmenter on
the eval split, and the fully-supervised upper bound when one was measured), per-class IoU
bars, and galleries with every stage side by side, and links the worst-first page
(:mod:`pipeline.worst_first`). An upper bound is shown as this run's only when its provenance (code
and params digests) equals this run's; otherwise its row and note say "from another run", in red.
Nothing in it needs our code to read.
"""
from __future__ import annotations

import datetime as _dt
import html
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.metrics import json_safe, read_json
from pipeline.visual import grid, save_figure, save_png

# (key in metrics/labels.json or the report's own rows, label shown, which split it is measured on)
LABEL_STAGES = (("cam", "CAM", "train"), ("crf", "CRF seeds", "train"), ("rw", "random walk (pseudo masks)", "train"))


def merge_label_metrics(metric_files: dict[str, str | Path]) -> dict:
    """{"cam": …, "crf": …, "rw": …, "stages_run": [keys whose file exists]} (missing stages are None)."""
    out = {key: read_json(path) for key, path in metric_files.items()}
    out["stages_run"] = [k for k in metric_files if out[k] is not None]
    return out


def measured(metrics: dict | None) -> bool:
    """Whether a stage's metrics hold numbers: False when the stage did not run or had no ground truth."""
    return bool(metrics) and metrics.get("ground_truth", True) is not False and metrics.get("miou") is not None


NO_GROUND_TRUTH = ("No ground truth: the dataset has no GT masks for these images, so no stage is scored (no mIoU, "
                   "coverage or accuracy); the labels and the segmenter were still made, see the galleries.")


def ground_truth_note(stages: dict[str, dict | None]) -> str | None:
    """:data:`NO_GROUND_TRUTH` when none of the stages that ran was scored against GT, else None."""
    ran = [m for m in stages.values() if m]
    return NO_GROUND_TRUTH if ran and not any(measured(m) for m in ran) else None


def stage_rows(labels: dict, segmenter: dict | None, upper_bound: dict | None, train_split: str = "train",
               eval_split: str = "val") -> list[dict]:
    """One row per stage that has metrics: {"stage", "label", "split", "miou", "coverage", "pixel_accuracy"}."""
    rows = []
    for key, label, _ in LABEL_STAGES:
        m = labels.get(key)
        if m:
            rows.append({"stage": key, "label": label, "split": m.get("split", train_split), "miou": m.get("miou"),
                         "coverage": m.get("coverage"), "pixel_accuracy": m.get("pixel_accuracy")})
    for key, label, m in (("segmenter", "segmenter", segmenter), ("upper_bound", "segmenter on GT (upper bound)", upper_bound)):
        if m and m.get("measured", True) is not False:
            foreign = key == "upper_bound" and m.get("foreign", False)
            rows.append({"stage": key, "label": label + (" — from another run" if foreign else ""),
                         "split": m.get("split", eval_split), "miou": m.get("miou"), "coverage": m.get("coverage"),
                         "pixel_accuracy": m.get("pixel_accuracy"), "foreign": foreign})
    return rows


def per_class_table(stages: dict[str, dict | None]) -> tuple[list[str], dict[str, dict[str, float | None]]]:
    """(class names, {stage: {class: iou %}}) over the stages whose metrics exist."""
    names: list[str] = []
    table = {}
    for stage, m in stages.items():
        if not measured(m) or "per_class_iou" not in m:
            continue
        table[stage] = dict(m["per_class_iou"])
        names += [n for n in m["per_class_iou"] if n not in names]
    return names, table


def per_class_bars(names: Sequence[str], table: dict[str, dict[str, float | None]], path: str | Path) -> Path:
    """Grouped horizontal bars of per-class IoU, one colour per stage; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(table)
    n = max(len(stages), 1)
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) * n + 1.2), dpi=90)
    h = 0.8 / n
    y = np.arange(len(names))
    for j, s in enumerate(stages):
        vals = [table[s].get(c) for c in names]
        ax.barh(y + j * h, [0 if v is None else v for v in vals], height=h, label=s)
    ax.set_yticks(y + h * (n - 1) / 2, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU %")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def stage_bars(rows: Sequence[dict], path: str | Path) -> Path:
    """Horizontal bars of mIoU per stage (split in the label); saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.0), dpi=90)
    labels = [f"{r['label']} ({r['split']})" for r in rows]
    vals = [r["miou"] or 0 for r in rows]
    ax.barh(labels, vals, color=["#4c72b0" if r["stage"] not in ("segmenter", "upper_bound") else "#dd8452" for r in rows])
    for i, v in enumerate(vals):
        ax.text(v + 1, i, f"{v:.1f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("mIoU %")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def gallery(ids: Sequence[str], columns: Sequence[tuple[str, Callable[[str], np.ndarray | None]]], path: str | Path,
            cell: int = 112) -> Path | None:
    """A grid: one row per image id, one column per (title, id -> RGB image or None) that gives images."""
    if not ids:
        return None
    cols = []
    for title, fn in columns:
        cells = [fn(i) for i in ids]
        if all(c is not None for c in cells):
            cols.append((title, cells))
    rows = [[c[1][r] for c in cols] for r in range(len(ids))]
    return save_png(path, grid(rows, titles=[c[0] for c in cols], cell=cell, row_labels=list(ids)))


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def write_report(out_dir: str | Path, *, title: str, rows: Sequence[dict], class_names: Sequence[str],
                 per_class: dict[str, dict], figures: Sequence[tuple[str, str | Path | None, str]], notes: Sequence[str | tuple[str, str]],
                 details: dict | None = None) -> Path:
    """Write ``out_dir/index.html``. figures: (heading, PNG path inside out_dir or None, caption)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    e = html.escape
    stage_table = "".join(
        f"<tr{' class=foreign' if r.get('foreign') else ''} data-stage=\"{e(r['stage'])}\"><td>{e(r['label'])}</td>"
        f"<td>{e(str(r['split']))}</td><td class=n>{_fmt(r['miou'])}</td>"
        f"<td class=n>{_fmt(r['coverage'])}</td><td class=n>{_fmt(r['pixel_accuracy'])}</td></tr>" for r in rows)
    head = "".join(f"<th>{e(s)}</th>" for s in per_class)
    pc_rows = "".join(f"<tr><td>{e(c)}</td>" + "".join(f"<td class=n>{_fmt(per_class[s].get(c))}</td>" for s in per_class)
                      + "</tr>" for c in class_names)
    figs = "".join(
        f"<h2>{e(h)}</h2><p>{e(cap)}</p><img src=\"{e(Path(p).name)}\" alt=\"{e(h)}\">" for h, p, cap in figures if p)
    note_html = "".join(f"<li class=foreign>{e(n[1])}</li>" if isinstance(n, tuple) else f"<li>{e(n)}</li>"
                        for n in notes)  # a ("foreign", text) note is drawn red
    worst = ('<p><a id="worst-link" href="worst.html">Worst images first →</a> every image with ground truth, '
             'its IoU at each stage, sortable and filterable by class.</p>' if (out_dir / "worst.html").is_file() else "")
    details_html = (f"<h2>Details</h2><pre>{e(json.dumps(json_safe(details), indent=1))}</pre>" if details else "")
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 9px}}
th{{background:#f3f3f3}}td.n{{text-align:right;font-variant-numeric:tabular-nums}}
img{{max-width:100%;border:1px solid #ddd}}pre{{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}}
.foreign{{color:#c00000;font-weight:600}}
</style></head><body>
<h1>{e(title)}</h1><p>Generated {created}. All numbers are percentages; 255 (unsure) pixels are left out of every IoU.</p>
{worst}
<h2>Stages</h2>
<table><tr><th>stage</th><th>split</th><th>mIoU</th><th>coverage</th><th>pixel accuracy</th></tr>{stage_table}</table>
<ul>{note_html}</ul>
<h2>Per-class IoU</h2>
<table><tr><th>class</th>{head}</tr>{pc_rows}</table>
{figs}
{details_html}
</body></html>
"""
    path = out_dir / "index.html"
    path.write_text(doc)
    return path


def write_worst_first(prepared, data: dict, labels: dict, stores: dict, out_dir: Path,
                      cam_picture: Callable[[str], np.ndarray | None], palette: np.ndarray) -> Path:
    """The worst-first page of the run (:mod:`pipeline.worst_first`): each image's mask per stage from
    the opened ``stores`` ({"cam", "crf", "rw", "segmenter"}: Store or None), the CAM's at the
    sweep's best threshold (argmax over the labels without a background)."""
    from pipeline.cam.evaluate import pseudo_label
    from pipeline.labels import grid_to_image
    from pipeline.worst_first import worst_first_rows, write_worst_page

    cam_metrics = labels.get("cam") or {}
    threshold = cam_metrics.get("best_threshold")

    def read(key, array):
        s = stores.get(key)
        return lambda i: s.read(array, i) if s is not None and array in s.specs and i in s else None

    def cam_mask(i):
        s = stores.get("cam")
        if s is None or i not in s or (threshold is None and prepared.background):
            return None
        full = grid_to_image(s.read("cam", i).astype(np.float32), prepared.size(i), int(s.attrs["stride"]))
        return pseudo_label(full, threshold, prepared.labels(i), background=prepared.background)

    masks = {"cam": cam_mask, "crf": read("crf", "seed"), "rw": read("rw", "mask"), "segmenter": read("segmenter", "mask")}
    rows = worst_first_rows(prepared, prepared.ids(data["train_split"]), prepared.ids(data["eval_split"]), masks,
                            cam_picture, palette, out_dir)
    return write_worst_page(out_dir, rows, prepared.class_names, f"WSSS run: {prepared.index.get('dataset')}")


def build_run_report(prepared, params: dict, seg_result: dict, labels: dict, upper: dict | None,
                     stores: dict[str, str | Path], out_dir: str | Path, device) -> list[dict]:
    """The evaluate stage's report: ``out_dir/index.html`` with the per-stage table, per-class bars and
    the galleries (train images through every stage; eval images: segmenter vs GT).

    ``seg_result``: :func:`pipeline.segment.run_evaluate`'s result; ``labels``: the merged label
    metrics (:func:`merge_label_metrics`); ``upper``: the upper_bound stage's metrics or None (shown
    as this run's only when :func:`pipeline.upper_bound.provenance_matches`); ``stores``: {"cam",
    "crf", "rw", "segmenter"} store paths (a missing store leaves its column out). Also writes the
    worst-first page (:mod:`pipeline.worst_first`). Returns the per-stage rows (for the stages plot)."""
    from pipeline.segment import predict_mask
    from pipeline.store import Store, StoreError
    from pipeline.upper_bound import bound_for_report
    from pipeline.visual import colourise, heatmap

    seg, data = params["seg"], params["data"]
    model, ckpt, metrics = seg_result["model"], seg_result["checkpoint"], seg_result["metrics"]
    on_gt = ckpt["labels"] == "gt"
    seg_row = None if on_gt else metrics
    if on_gt:
        upper, upper_note = metrics, "Upper bound: this run trained its segmenter on GT, so its segmenter is the upper bound."
    else:
        upper, upper_note = bound_for_report(upper, params)

    def open_or_none(path):
        try:
            return Store(path)
        except StoreError:
            return None

    opened = {key: open_or_none(path) for key, path in stores.items()}
    pal = prepared.palette

    def col_cam(i):
        s = opened["cam"]
        return heatmap(prepared.image(i), s.read("cam", i).astype(np.float32).max(0)) if s and i in s else None

    def col_mask(key, array):
        s = opened[key]
        return lambda i: colourise(s.read(array, i), pal) if s and array in s.specs and i in s else None

    def col_pred(i):
        return colourise(predict_mask(model, prepared.image(i), device, seg, params["crf"]), pal)

    def col_gt(i):
        g = prepared.gt(i)
        return None if g is None else colourise(g, pal)

    out_dir = Path(out_dir)
    n = data["gallery_ids"]
    rows = stage_rows(labels, seg_row, upper, data["train_split"], data["eval_split"])
    train_cols = [("image", prepared.image), ("CAM", col_cam), ("CRF seeds", col_mask("crf", "seed")),
                  ("random walk", col_mask("rw", "mask")), ("segmenter", col_pred), ("GT", col_gt)]
    g1 = gallery(prepared.ids(data["train_split"])[:n], train_cols, out_dir / "gallery_train.png")
    g2 = gallery(prepared.ids(data["eval_split"])[:n], [("image", prepared.image), ("segmenter", col_pred),
                                                        ("GT", col_gt)], out_dir / "gallery_eval.png")
    stage_png = stage_bars(rows, out_dir / "stages.png") if any(r["miou"] is not None for r in rows) else None
    per_class_stages = {key: labels.get(key) for key, _, _ in LABEL_STAGES}
    per_class_stages["segmenter"] = seg_row
    per_class_stages["upper_bound"] = upper
    pc_names, pc_table = per_class_table(per_class_stages)
    pc_png = per_class_bars(pc_names, pc_table, out_dir / "per_class_iou.png") if pc_table else None
    figures = [("mIoU per stage", stage_png, "Label stages are scored on the train split (the images they label); "
                "the segmenter on the held-out eval split."),
               ("Per-class IoU", pc_png, "One bar per stage and class."),
               (f"Gallery: {data['train_split']} images through every stage", g1,
                "Image, CAM (max over classes), CRF seeds (grey = 255 unsure), random-walk pseudo mask, the "
                "segmenter's prediction, ground truth. Columns whose stage did not run are left out."),
               (f"Gallery: {data['eval_split']} images", g2, "Held-out images: segmenter prediction next to the GT.")]
    notes = [f"Segmenter trained on {ckpt['labels']} masks ({ckpt['seg'].get('epochs')} epochs, backbone "
             f"{ckpt['arch']['backbone']}); evaluated with scales {seg['eval_scales']}, flip {seg['eval_flip']}, "
             f"CRF {seg['eval_crf']}.",
             upper_note,
             "Coverage = share of GT-labelled pixels the stage labels (CRF seeds leave unsure pixels at 255; mIoU is "
             "over the labelled ones)."]
    no_gt = ground_truth_note({**{key: labels.get(key) for key, _, _ in LABEL_STAGES}, "segmenter": metrics})
    if no_gt:
        notes.insert(0, no_gt)
    write_worst_first(prepared, data, labels, opened, out_dir, col_cam, pal)
    write_report(out_dir, title=f"WSSS run report: {prepared.index.get('dataset')}", rows=rows,
                 class_names=prepared.class_names, per_class=pc_table, figures=figures, notes=notes,
                 details={"segmenter": {k: v for k, v in metrics.items() if not k.startswith("per_class_p")
                                        and k != "per_class_recall"}, "stages_run": labels["stages_run"]})
    return rows

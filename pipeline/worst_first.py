"""The "worst first" page: every image with GT, its IoU at each stage, worst pseudo masks first.

The evaluate stage writes, beside ``reports/index.html``:

- ``worst.html``: a static page (no server, no network): a table sortable by any stage's IoU,
  filterable by class, paged (``PAGE_SIZE`` rows), with one lazy-loaded thumbnail strip per row;
- ``worst_data.js``: the rows as ``window.WSSS_WORST = {...}`` (a script, so the page also works from
  ``file://``, where browsers refuse to fetch JSON);
- ``thumbs/<id>.jpg``: per image, small cells side by side: image | CAM | seeds | pseudo mask | GT for
  the train split, image | segmenter | GT for the eval split. Made once per run, ~64 px high.

An image's IoU at a stage is the mean, over the classes in its GT or in the stage's mask, of
intersection over union on the pixels both label (GT 255 and the stage's 255 left out, as in the
stage metrics).
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from pipeline.labels import IGNORE_INDEX

PAGE_SIZE = 50
THUMB_HEIGHT = 64
# (key, column title, split kind): label stages on the train split, the segmenter on the eval split
STAGES = (("cam", "CAM", "train"), ("crf", "seeds", "train"), ("rw", "pseudo mask", "train"),
          ("segmenter", "segmenter", "eval"))


def image_iou(pred: np.ndarray, gt: np.ndarray) -> float | None:
    """Mean IoU (%) over the classes in ``gt`` or ``pred``, on pixels neither marks 255; None when
    no pixel is labelled by both."""
    keep = (gt != IGNORE_INDEX) & (pred != IGNORE_INDEX)
    if not keep.any():
        return None
    g, p = gt[keep].astype(np.int64), pred[keep].astype(np.int64)
    ious = []
    for c in np.union1d(np.unique(g), np.unique(p)):
        inter = np.count_nonzero((g == c) & (p == c))
        union = np.count_nonzero((g == c) | (p == c))
        ious.append(inter / union)
    return round(100.0 * float(np.mean(ious)), 1)


def _cell(picture: np.ndarray) -> np.ndarray:
    h, w = picture.shape[:2]
    width = max(1, round(w * THUMB_HEIGHT / h))
    return cv2.resize(picture, (width, THUMB_HEIGHT), interpolation=cv2.INTER_AREA)


def write_thumb(path: Path, pictures: Sequence[np.ndarray]) -> None:
    """Cells side by side with a 2 px white gap, as a JPEG."""
    cells = [_cell(p) for p in pictures]
    gap = np.full((THUMB_HEIGHT, 2, 3), 255, np.uint8)
    strip = np.concatenate([x for c in cells for x in (c, gap)][:-1], axis=1)
    cv2.imwrite(str(path), np.ascontiguousarray(strip[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 80])


# the cells of a thumbnail strip per split: the image, the CAM heatmap, the stages' masks, the GT
THUMB_TITLES = {"train": ["image", "CAM", "seeds", "pseudo mask", "GT"], "eval": ["image", "segmenter", "GT"]}


def worst_first_rows(prepared, train_ids: Sequence[str], eval_ids: Sequence[str],
                     masks: dict[str, Callable[[str], np.ndarray | None]],
                     cam_heatmap: Callable[[str], np.ndarray | None], palette: np.ndarray,
                     out_dir: str | Path, progress: bool = True) -> list[dict]:
    """One row per image with GT: {"id", "split", "classes" (names in its GT and labels), "iou": {stage:
    % or None}, "thumb"}; writes the thumbnails (:data:`THUMB_TITLES`) from the same masks the IoUs
    are of. ``masks``: stage key -> (id -> (H, W) uint8 mask or None); ``cam_heatmap``: id -> the CAM
    drawn over the image (train split); a cell that is None is left out of the strip."""
    from pipeline.progress import progress_bar
    from pipeline.visual import colourise

    thumbs = Path(out_dir) / "thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    rows = []
    names = prepared.class_names
    todo = [(i, "train") for i in train_ids] + [(i, "eval") for i in eval_ids]
    with progress_bar(total=len(todo), desc="worst-first page", unit="img", disable=not progress) as bar:
        for image_id, kind in todo:
            bar.update(1)
            gt = prepared.gt(image_id)
            if gt is None:
                continue
            stage_masks = {key: masks[key](image_id) if stage_kind == kind and key in masks else None
                           for key, _, stage_kind in STAGES}
            iou = {key: None if m is None else image_iou(m, gt) for key, m in stage_masks.items()}
            classes = sorted(set(int(c) for c in np.unique(gt) if c != IGNORE_INDEX) | set(prepared.labels(image_id)))
            drawn = ("crf", "rw") if kind == "train" else ("segmenter",)
            cells = [prepared.image(image_id), cam_heatmap(image_id) if kind == "train" else None,
                     *(None if stage_masks[k] is None else colourise(stage_masks[k], palette) for k in drawn),
                     colourise(gt, palette)]
            write_thumb(thumbs / f"{image_id}.jpg", [c for c in cells if c is not None])
            rows.append({"id": image_id, "split": kind, "classes": [names[c] for c in classes], "iou": iou,
                         "thumb": f"thumbs/{image_id}.jpg"})
    return rows


def write_worst_page(out_dir: str | Path, rows: Sequence[dict], class_names: Sequence[str], title: str) -> Path:
    """``out_dir/worst.html`` + ``worst_data.js`` for ``rows`` (see :func:`worst_first_rows`)."""
    out_dir = Path(out_dir)
    stages = [{"key": k, "title": t, "split": s} for k, t, s in STAGES if any(r["iou"].get(k) is not None for r in rows)]
    data = {"rows": list(rows), "classes": list(class_names), "stages": stages, "page_size": PAGE_SIZE,
            "thumb_titles": THUMB_TITLES}
    (out_dir / "worst_data.js").write_text("window.WSSS_WORST = " + json.dumps(data, separators=(",", ":")) + ";\n")
    page = _PAGE.replace("__TITLE__", html.escape(title))
    path = out_dir / "worst.html"
    path.write_text(page)
    return path


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__ — worst images first</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;vertical-align:middle}
th{background:#f3f3f3}th.sort{cursor:pointer;text-decoration:underline dotted}th.active{background:#dde6f5}
td.n{text-align:right;font-variant-numeric:tabular-nums}td.bad{background:#fbe3e3}
.controls{display:flex;gap:1.2em;align-items:center}img.thumb{height:64px;display:block}
</style></head><body>
<h1>__TITLE__ — worst images first</h1>
<p><a href="index.html">← run report</a>. Every image with ground truth and its IoU (%) at each stage
(mean over the classes in its GT or the stage's mask; 255 pixels left out). Click a column to sort
by it; the default is the pseudo masks, worst first. <span id="thumbs-help"></span></p>
<div class="controls">
<label>class <select id="class-filter"><option value="">all classes</option></select></label>
<button id="prev">← previous</button><span id="page-info"></span><button id="next">next →</button>
</div>
<table id="worst"><thead><tr id="head"></tr></thead><tbody id="body"></tbody></table>
<script src="worst_data.js"></script>
<script>
(function () {
  const data = window.WSSS_WORST;
  const state = {key: null, asc: true, cls: "", page: 0};
  const keys = data.stages.map(s => s.key);
  state.key = keys.includes("rw") ? "rw" : keys[0];
  const head = document.getElementById("head"), body = document.getElementById("body");
  const select = document.getElementById("class-filter");
  data.classes.forEach(c => { const o = document.createElement("option"); o.value = c; o.textContent = c; select.appendChild(o); });
  document.getElementById("thumbs-help").textContent = "Thumbnails: train " + data.thumb_titles.train.join(" | ")
    + "; eval " + data.thumb_titles.eval.join(" | ") + ".";
  function cell(text, cls) { const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; return td; }
  function drawHead() {
    head.innerHTML = "";
    ["image", "split", "classes"].forEach(t => { const th = document.createElement("th"); th.textContent = t; head.appendChild(th); });
    data.stages.forEach(s => {
      const th = document.createElement("th");
      th.textContent = s.title + (state.key === s.key ? (state.asc ? " ▲" : " ▼") : "");
      th.className = "sort" + (state.key === s.key ? " active" : "");
      th.dataset.key = s.key;
      th.onclick = () => { if (state.key === s.key) state.asc = !state.asc; else { state.key = s.key; state.asc = true; } state.page = 0; draw(); };
      head.appendChild(th);
    });
    const th = document.createElement("th"); th.textContent = "thumbnail"; head.appendChild(th);
  }
  function visible() {
    const rows = data.rows.filter(r => !state.cls || r.classes.includes(state.cls));
    const v = r => r.iou[state.key];
    rows.sort((a, b) => {
      const x = v(a), y = v(b);
      if (x === null && y === null) return a.id < b.id ? -1 : 1;
      if (x === null) return 1;
      if (y === null) return -1;
      return (state.asc ? x - y : y - x) || (a.id < b.id ? -1 : 1);
    });
    return rows;
  }
  function draw() {
    drawHead();
    const rows = visible(), size = data.page_size;
    const pages = Math.max(1, Math.ceil(rows.length / size));
    state.page = Math.min(state.page, pages - 1);
    const start = state.page * size, shown = rows.slice(start, start + size);
    body.innerHTML = "";
    shown.forEach(r => {
      const tr = document.createElement("tr");
      tr.dataset.id = r.id;
      tr.appendChild(cell(r.id)); tr.appendChild(cell(r.split)); tr.appendChild(cell(r.classes.join(", ")));
      data.stages.forEach(s => { const x = r.iou[s.key]; tr.appendChild(cell(x === null ? "–" : x.toFixed(1), "n" + (x !== null && x < 50 ? " bad" : ""))); });
      const td = document.createElement("td"), img = document.createElement("img");
      img.className = "thumb"; img.loading = "lazy"; img.src = r.thumb; img.alt = r.id;
      td.appendChild(img); tr.appendChild(td); body.appendChild(tr);
    });
    document.getElementById("page-info").textContent = rows.length
      ? `rows ${start + 1}–${start + shown.length} of ${rows.length} (page ${state.page + 1} of ${pages})` : "no images";
    document.getElementById("prev").disabled = state.page === 0;
    document.getElementById("next").disabled = state.page >= pages - 1;
  }
  select.onchange = () => { state.cls = select.value; state.page = 0; draw(); };
  document.getElementById("prev").onclick = () => { state.page -= 1; draw(); };
  document.getElementById("next").onclick = () => { state.page += 1; draw(); };
  draw();
})();
</script>
</body></html>
"""

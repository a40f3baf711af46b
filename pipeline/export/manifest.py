"""What travels with every export: ``manifest.json`` (machine-readable) and ``README.md`` (a datasheet).

The manifest records what the masks are (dataset, split, count, classes, palette, ignore value),
how they were made (params, code revision, DVC hashes of the inputs) and how good they are
(mIoU against the ground truth where it exists, and the per-stage metrics of the run). A code
revision or input hash that cannot be had is None with the reason beside it
(``code_revision_unavailable``, ``inputs_unavailable``), never silently missing.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.provenance import git_revision_status

MANIFEST_VERSION = 1


def git_revision(repo_dir: str | Path = ".") -> dict | None:
    """{"commit": sha, "dirty": bool} of the git work tree at ``repo_dir``, or None outside git
    (:func:`git_revision_status` also says why)."""
    return git_revision_status(repo_dir)[0]


def dvc_lock_hashes_status(lock_path: str | Path, paths: list[str | Path]) -> tuple[dict, dict]:
    """``(hashes, why)``: for each input path, the hash DVC recorded in ``dvc.lock`` for the stage
    output of that path, ``{path: {"stage": name, "md5": ..., "size": ..., "nfiles": ...}}``; a path
    without one maps to None there and to the reason in ``why`` (no lock file, a lock that is not
    YAML, no stage listing the path as an output)."""
    lock_path = Path(lock_path)
    want = {Path(p).as_posix().rstrip("/"): None for p in paths}

    def every(reason: str) -> tuple[dict, dict]:
        return want, {p: reason for p in want}

    if not lock_path.is_file():
        return every(f"no {lock_path} (the DVC pipeline has not run here)")
    try:
        lock = yaml.safe_load(lock_path.read_text()) or {}
    except yaml.YAMLError as e:
        return every(f"{lock_path} is not valid YAML: {str(e).splitlines()[0]}")
    except OSError as e:
        return every(f"{lock_path} cannot be read: {e.strerror or e}")
    if not isinstance(lock, dict) or not isinstance(lock.get("stages") or {}, dict):
        return every(f"{lock_path} has no mapping of stages")
    for stage, entry in (lock.get("stages") or {}).items():
        for out in (entry or {}).get("outs") or []:
            p = str(out.get("path", "")).rstrip("/")
            if p in want:
                want[p] = {"stage": stage, **{k: out[k] for k in ("md5", "hash", "size", "nfiles") if k in out}}
    return want, {p: f"no stage in {lock_path} lists it as an output" for p, v in want.items() if v is None}


def dvc_lock_hashes(lock_path: str | Path, paths: list[str | Path]) -> dict:
    """For each input path, the hash DVC recorded in ``dvc.lock`` for the stage output of that path.

    Returns {path: {"stage": name, "md5": ..., "size": ..., "nfiles": ...}}; paths that no stage
    lists as an output (or a missing lock file) map to None (:func:`dvc_lock_hashes_status` says why).
    """
    return dvc_lock_hashes_status(lock_path, paths)[0]


def build_manifest(*, fmt: str, files: dict, dataset: dict, split: str, ids_count: int, class_names: list[str],
                   palette: list, ignore_value: int, params: dict, code_revision: dict | None, inputs: dict,
                   label_quality: dict | None, stage_metrics: dict | None, source: dict, created: str,
                   code_revision_unavailable: str | None = None, inputs_unavailable: dict | None = None,
                   background: bool = True) -> dict:
    """The manifest dict. A missing code revision or input hash stays None under its key and the
    reason goes beside it: ``code_revision_unavailable`` (str), ``inputs_unavailable`` ({path: str})."""
    why = {}
    if code_revision is None:
        why["code_revision_unavailable"] = code_revision_unavailable or "unknown reason"
    missing = {p: (inputs_unavailable or {}).get(p) or "unknown reason" for p, v in inputs.items() if v is None}
    if missing:
        why["inputs_unavailable"] = missing
    return {
        "manifest_version": MANIFEST_VERSION,
        "format": fmt,
        "files": files,
        "dataset": dataset,
        "split": split,
        "count": ids_count,
        "class_names": class_names,
        "background": bool(background),
        "palette": palette,
        "ignore_value": ignore_value,
        "params": params,
        "code_revision": code_revision,
        "inputs": inputs,
        **why,
        "label_quality": label_quality,
        "stage_metrics": stage_metrics,
        "source": source,
        "created": created,
    }


_FORMAT_TEXT = {
    "voc": ("PASCAL-VOC style: one palette PNG per image in `SegmentationClass/<id>.png` whose pixel values are "
            "class indices (the palette only colours them), the image list in `ImageSets/Segmentation/{split}.txt` "
            "and the class names in `class_names.txt` (line k = class k). Read a mask with "
            "`numpy.array(PIL.Image.open(path))` - do not convert to RGB."),
    "coco": ("COCO json (`{annotations}`): one annotation per class present per image, `segmentation` in compressed "
             "RLE, `iscrowd` 0, `category_id` = class index (background is category 0, so the annotations of an "
             "image tile every labelled pixel). Pixels covered by no annotation are unsure (255). `images[].image_key` "
             "is the dataset's image id. Decode with `pycocotools.coco.COCO(path).annToMask(ann)`."),
    "coco_instances": ("COCO json (`{annotations}`): one annotation per instance pseudo mask (IRNet-style, from the "
                       "displacement field), `segmentation` in compressed RLE, `category_id` = class index (background "
                       "is not a category), `score` in (0, 1] (the instance's peak score), `iscrowd` 0. "
                       "`images[].image_key` is the dataset's image id. Load with `pycocotools.coco.COCO(path)`; "
                       "as detections for COCOeval: `coco_gt.loadRes(annotations)` after mapping image ids."),
    "zarr": ("A zarr v3 group `masks.zarr` (readable with `zarr.open_group`): array `mask` (N, H_max, W_max) uint8, "
             "image i occupies `[i, :h_i, :w_i]` where `size[i] = (h_i, w_i)`; the rest is 255 padding. The image "
             "ids are in the group attribute `ids` (same order)."),
}


def _fmt_pct(v) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def datasheet(manifest: dict) -> str:
    """A short README for the team that receives the export."""
    m = manifest
    q = m.get("label_quality") or {}
    fmt_text = _FORMAT_TEXT[m["format"]].format(split=m["split"], annotations=m["files"].get("annotations", ""))
    background = m.get("background", True)
    if not background:  # category 0 is a class like the others: say so instead of the background sentences
        fmt_text = (fmt_text.replace("(background is category 0, so the annotations of an image tile every labelled pixel)",
                                     "(no background class: category 0 is the first class, and the annotations of an "
                                     "image tile every labelled pixel)")
                    .replace("(background is not a category)", "(every class is a category: no background)"))
    classes = ", ".join(f"{k} = {n}" for k, n in enumerate(m["class_names"]))
    classes += "" if background else " (no background class: every pixel is one of these, or 255)"
    rev = m.get("code_revision") or {}
    rev_text = ((f"`{rev.get('commit', '?')[:12]}`" + (" (with uncommitted changes)" if rev.get("dirty") else ""))
                if rev else f"unknown ({m.get('code_revision_unavailable') or 'not a git checkout'})")
    p = m.get("params") or {}
    how = []
    if p:
        cam, crf, rw = p.get("cam", {}), p.get("crf", {}), p.get("rw", {})
        how.append(f"1. A multi-label classifier (backbone `{cam.get('backbone')}`) was trained on the image-level labels only; "
                   f"its class activation maps (method `{cam.get('method')}`, scales {cam.get('scales')}, flip {cam.get('flip')}) "
                   "give a coarse score per class.")
        thresholds = (f"{crf.get('fg_ratio')} / {crf.get('bg_ratio')} x the CAM's best threshold"
                      if crf.get("thresholds") == "cam_sweep" else f"{crf.get('fg_threshold')} / {crf.get('bg_threshold')}")
        if background:
            how.append(f"2. A dense CRF turned the CAMs into confident seeds (enabled: {crf.get('enabled')}, mode "
                       f"`{crf.get('mode')}`, merge rule `{crf.get('merge')}`; foreground / background thresholds "
                       f"{thresholds}); pixels neither confidently foreground nor background became 255.")
        else:
            how.append(f"2. Seeds: a pixel took its image's top class where that class beat the runner-up by "
                       f"{crf.get('margin')} (dense CRF over the image's labels: {crf.get('enabled')}); elsewhere 255.")
        how.append(f"3. An affinity network learned from the seeds which neighbouring pixels belong together; a random walk "
                   f"(enabled: {rw.get('enabled')}, beta {rw.get('beta')}, 2^{rw.get('logt')} steps) spread the CAM scores "
                   "inside objects, and each pixel took the best class.")
        how.append("All params are in `manifest.json` under `params`.")
    else:
        how.append("The params that made them were not recorded with this export.")
    quality = []
    if q.get("miou") is not None:
        quality.append(f"Measured at export time against the ground truth of the {q.get('images_with_gt')} exported images that "
                       f"have one: **mIoU {_fmt_pct(q.get('miou'))}%**, pixel accuracy {_fmt_pct(q.get('pixel_accuracy'))}%, "
                       f"coverage (share of pixels not 255) {_fmt_pct(q.get('coverage'))}%. 255 pixels are left out of the mIoU.")
        pc = q.get("per_class_iou") or {}
        if pc:
            quality.append("")
            quality.append("| class | IoU % |")
            quality.append("|---|---|")
            quality += [f"| {n} | {_fmt_pct(v)} |" for n, v in pc.items()]
    else:
        quality.append("No ground truth was available for these images, so their quality was not measured here.")
    sm = m.get("stage_metrics") or {}
    stages = [(k, v.get("miou")) for k, v in sm.items() if isinstance(v, dict) and v.get("miou") is not None]
    if stages:
        quality.append("")
        quality.append("mIoU of each stage of the run that made them (train split): "
                       + ", ".join(f"{k} {_fmt_pct(v)}%" for k, v in stages) + ".")
    inputs = m.get("inputs") or {}
    why = m.get("inputs_unavailable") or {}
    input_lines = [f"- `{k}`: " + (f"md5 `{v.get('md5') or v.get('hash')}` (stage `{v['stage']}`)" if v
                                   else f"hash unknown: {why.get(k, 'not in dvc.lock')}")
                   for k, v in inputs.items()]
    return "\n".join([
        f"# Pseudo segmentation masks: {m['dataset'].get('name')} / {m['split']} ({m['format']})",
        "",
        "## What these are",
        f"{m['count']} per-pixel class masks for the `{m['split']}` split of the `{m['dataset'].get('name')}` dataset, "
        "made **without any pixel-level annotation**: only image-level labels (which classes appear in each image) "
        "were used. They are *pseudo* labels, meant for training a segmentation network; they are not ground truth "
        "(see \"How good they are\").",
        "",
        f"Classes: {classes}.",
        "",
        f"**Value {m['ignore_value']} means ignore / unsure**: the pipeline could not decide the class of that pixel. "
        f"Leave 255 pixels out of the loss (e.g. `CrossEntropyLoss(ignore_index={m['ignore_value']})`) and out of any "
        "metric; do not treat them as background.",
        "",
        "## Layout",
        fmt_text,
        "`manifest.json` holds everything below in machine-readable form.",
        "",
        "## How they were made",
        *how,
        "",
        "## How good they are",
        *quality,
        "",
        "## Provenance",
        f"- created: {m['created']}",
        f"- code revision: {rev_text}",
        *input_lines,
        "",
    ])

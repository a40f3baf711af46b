"""The label-quality table of a finished run, as markdown: ``wsss quality --out docs/REAL_PHOTOS.md``.

Reads the metrics files the stages wrote (``metrics/{train_cam,cam,crf,rw,segmenter,segmenter_gt,
stage_times}.json``) and writes: the per-stage table (CAM -> seeds -> random walk on the train
split, segmenter and its GT-trained upper bound on the eval split), the goals of a real-photo run
with met / missed, the seeds' precision and coverage per class, the per-class IoU of every stage,
and the diagnostics (thresholds used, affinity separation, what the walk did to the background).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pipeline.metrics import read_json
from pipeline.paths import METRICS

# the metrics files the table reads (file names inside the metrics folder given)
METRIC_FILES = {key: METRICS[key].name for key in ("train_cam", "cam", "crf", "rw", "segmenter", "upper_bound")}

# (label, key) of the stages in table order
STAGES = (("CAM (best threshold)", "cam"), ("CRF seeds (labelled pixels)", "crf"), ("random walk = pseudo masks", "rw"),
          ("segmenter trained on the pseudo masks", "segmenter"), ("segmenter trained on GT (upper bound)", "upper_bound"))


def read_metrics(metrics_dir: str | Path) -> dict[str, dict | None]:
    """{key: the metrics dict or None} for every file of :data:`METRIC_FILES`. A segmenter.json of a
    segmenter trained on GT (``trained_on: gt``, a ``seg.labels=gt`` run) is the upper bound, not a
    pseudo-mask-trained segmenter: it is shown only as such (and no pseudo-mask goal is scored on it)."""
    out = {key: read_json(Path(metrics_dir) / name) for key, name in METRIC_FILES.items()}
    if (out.get("upper_bound") or {}).get("measured") is False:  # the upper_bound stage ran without seg.upper_bound
        out["upper_bound"] = None
    if (out.get("segmenter") or {}).get("trained_on") == "gt":
        out["upper_bound"], out["segmenter"] = out["segmenter"], None
    return out


def _f(v, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def goals(m: dict[str, dict | None]) -> list[tuple[str, str, bool | None]]:
    """(goal, measured, met?) for a real-photo run; met is None when a figure is missing."""
    cam, crf, rw, seg = (m.get(k) or {} for k in ("cam", "crf", "rw", "segmenter"))
    out = []
    c = cam.get("miou")
    out.append(("CAM mIoU ≥ 35 (train, best threshold)", _f(c), None if c is None else c >= 35))
    r = rw.get("miou")
    out.append(("random walk ≥ CAM + 5 (train)", f"{_f(r)} = CAM {'+' if (r or 0) >= (c or 0) else '−'} "
                f"{_f(abs((r or 0) - (c or 0)))}" if None not in (r, c) else "–",
                None if None in (r, c) else r >= c + 5))
    p, cov = crf.get("pixel_accuracy"), crf.get("coverage")
    out.append(("CRF seeds precision ≥ 80% at coverage ≥ 50% (train)", f"precision {_f(p)}, coverage {_f(cov)}",
                None if None in (p, cov) else p >= 80 and cov >= 50))
    s = seg.get("miou")
    out.append(("segmenter ≥ 85% of the pseudo-mask mIoU (val vs train)",
                f"{_f(s)} = {_f(100 * s / r)}% of {_f(r)}" if None not in (s, r) and r else "–",
                None if None in (s, r) or not r else s >= 0.85 * r))
    return out


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def quality_markdown(m: dict[str, dict | None], title: str, command: str, notes: Sequence[str] = ()) -> str:
    """The markdown page for the metrics ``m`` (see :func:`read_metrics`)."""
    lines = [f"# {title}", "", f"Produced by `{command}` from the run's `metrics/`. All figures in %; "
             "255 (unsure) pixels are left out of every IoU, `coverage` is the share of GT-labelled pixels a stage "
             "labels.", ""]
    lines += list(notes) + [""] if notes else []
    rows = []
    no_bg = (m.get("cam") or {}).get("background") is False
    for label, key in STAGES:
        label = "CAM (argmax over the labels)" if key == "cam" and no_bg else label
        s = m.get(key)
        if s:
            rows.append([label, str(s.get("split", "train" if key in ("cam", "crf", "rw") else "val")), _f(s.get("miou")),
                         _f(s.get("coverage")), _f(s.get("pixel_accuracy"))])
    lines += ["## Stages", ""] + _table(["stage", "split", "mIoU", "coverage", "precision (pixel accuracy)"], rows)
    tc = m.get("train_cam")
    if tc and tc.get("val_map") is not None:
        lines += ["", f"Classifier: val mAP {_f(tc['val_map'])} ({tc.get('epochs')} epochs on {tc.get('train_images')} images)."]
    lines += ["", "## Goals", ""] + _table(["goal", "measured", "result"], [
        [g, v, "–" if ok is None else ("met" if ok else "**missed**")] for g, v, ok in goals(m)])

    cam, crf, rw = m.get("cam") or {}, m.get("crf") or {}, m.get("rw") or {}
    lines += ["", "## Diagnostics", ""]
    no_background = (cam or crf or rw).get("background") is False
    if cam:
        b = cam.get("baselines", {})
        if no_background:
            lines.append(f"- CAM: no background class, each pixel the argmax of its image's labels (no threshold; "
                         f"top-label baseline {_f(b.get('top_label', {}).get('miou'))}).")
        else:
            lines.append(f"- CAM: best background threshold {cam.get('best_threshold')} "
                         f"(all-background baseline {_f(b.get('all_background', {}).get('miou'))}, "
                         f"top-label baseline {_f(b.get('top_label', {}).get('miou'))}).")
    if crf:
        if no_background:
            lines.append(f"- Seeds: mode {crf.get('mode')}, the top class where it beats the runner-up by "
                         f"{crf.get('margin')}; mIoU over labelled pixels {_f(crf.get('miou'))}.")
        else:
            lines.append(f"- Seeds: mode {crf.get('mode')}, foreground where CAM ≥ {crf.get('fg_threshold')}, background "
                         f"where max CAM < {crf.get('bg_threshold')}; mIoU over labelled pixels {_f(crf.get('miou'))}.")
    if rw:
        exponent = "no background channel" if no_background else f"background exponent {rw.get('alpha')}"
        lines.append(f"- Random walk: beta {rw.get('beta')}, 2^{rw.get('logt')} steps, {exponent} "
                     f"(stride {rw.get('affinity_stride')}, radius {rw.get('radius')}).")
        sep = rw.get("affinity_separation")
        if sep:
            if no_background:
                lines.append(f"- Affinity separation on {sep['images']} GT images: mean affinity of same-class pairs "
                             f"{sep['same_object']}, pairs across a class boundary {sep['different']} (gap {sep['gap']}).")
            else:
                lines.append(f"- Affinity separation on {sep['images']} GT images: mean affinity of same-object pairs "
                             f"{sep['same_object']}, background pairs {sep['same_background']}, pairs across a class "
                             f"boundary {sep['different']} (gap {sep['gap']}).")
        if cam and not no_background:
            bg = "background"
            lines.append(f"- Background through the walk: IoU {_f(cam['per_class_iou'].get(bg))} → "
                         f"{_f(rw['per_class_iou'].get(bg))}, precision {_f(cam['per_class_precision'].get(bg))} → "
                         f"{_f(rw['per_class_precision'].get(bg))}, recall {_f(cam['per_class_recall'].get(bg))} → "
                         f"{_f(rw['per_class_recall'].get(bg))}.")

    names = list((cam or crf or rw).get("per_class_iou", {}))
    if crf.get("per_class_precision"):
        lines += ["", "## Seeds per class (train)", ""] + _table(
            ["class", "precision", "coverage", "IoU over labelled"],
            [[n, _f(crf["per_class_precision"].get(n)), _f(crf.get("per_class_coverage", {}).get(n)),
              _f(crf["per_class_iou"].get(n))] for n in names])
    present = [(label, key) for label, key in (("CAM", "cam"), ("seeds", "crf"), ("random walk", "rw"),
                                               ("segmenter (val)", "segmenter"), ("GT upper bound (val)", "upper_bound"))
               if m.get(key) and m[key].get("per_class_iou")]
    if present and names:
        lines += ["", "## IoU per class", ""] + _table(
            ["class"] + [label for label, _ in present],
            [[n] + [_f(m[key]["per_class_iou"].get(n)) for _, key in present] for n in names])
    return "\n".join(lines) + "\n"


def write_quality(metrics_dir: str | Path, out: str | Path, title: str, command: str, notes: Sequence[str] = ()) -> Path:
    m = read_metrics(metrics_dir)
    if not any(m.get(k) for k in ("cam", "crf", "rw")):
        raise FileNotFoundError(f"{metrics_dir}: no label metrics (cam.json, crf.json, rw.json); run the pipeline first")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(quality_markdown(m, title, command, notes))
    return out

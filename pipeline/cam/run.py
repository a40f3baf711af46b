"""What the train_cam and make_cam stages do, as functions of params, data and paths (the stages pick the paths)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.cam.evaluate import LabelArgmax, ThresholdSweep, threshold_range, top_label
from pipeline.cam.gallery import cam_gallery
from pipeline.cam.infer import CamInference, compute_cams
from pipeline.cam.methods import build_method
from pipeline.cam.train import ClassificationSet, mean_average_precision, predict_scores, train_classifier
from pipeline.distributed import world_size
from pipeline.labels import grid_to_image
from pipeline.models.classifier import CamClassifier, save_classifier
from pipeline.progress import progress_bar
from pipeline.provenance import file_digest, prepared_digest
from pipeline.store import ArraySpec, Store, write_store
from pipeline.training import clear_resume

log = logging.getLogger("wsss")


# ---------------------------------------------------------------- train_cam

def run_train_cam(prepared, params: dict, out: str | Path, *, device: torch.device, resume: str | Path) -> dict:
    """What the train_cam stage does: train on ``data.train_split``, save the classifier checkpoint
    ``out``, score mAP on ``data.eval_split``.

    Returns {"history": [...], "metrics": {...}} (the resume file is removed once the checkpoint exists)."""
    from pipeline.datasets.prepared import as_prepared

    prepared, checkpoint = as_prepared(prepared, params["data"]), Path(out)
    cam, data, seed = params["cam"], params["data"], params["compute"]["seed"]
    ids = prepared.ids(data["train_split"])
    if not ids:
        raise ValueError(f"split {data['train_split']!r} (param data.train_split) has no images")
    ds = ClassificationSet(prepared.image, ids, [prepared.label_vector(i) for i in ids], cam["crop_size"],
                           cam["scale_min"], cam["scale_max"], seed)
    model, history = train_classifier(ds, cam, prepared.num_label_classes, device, seed,
                                      num_workers=cam["num_workers"], resume_path=resume,
                                      inputs={"prepared": prepared_digest(prepared.dir)})
    save_classifier(checkpoint, model, cam["backbone"], prepared.class_names, cam)
    clear_resume(resume)
    metrics = {"train_images": len(ids), "epochs": cam["epochs"], "world_size": world_size(),
               "final_loss": round(history[-1]["loss"], 5),
               "images_per_s": round(float(np.mean([h.get("images_per_s", 0.0) for h in history])), 1)}
    val_ids = prepared.ids(data["eval_split"]) if data["eval_split"] in prepared.index["splits"] else []
    if val_ids:
        scores = predict_scores(model, [prepared.image(i) for i in val_ids], device)
        targets = np.stack([prepared.label_vector(i) for i in val_ids])
        cls = mean_average_precision(scores, targets, prepared.label_class_names)
        metrics.update({"val_images": len(val_ids), "val_map": cls["map"], "val_per_class_ap": cls["per_class_ap"]})
    return {"history": history, "metrics": metrics}


# ---------------------------------------------------------------- make_cam

def cam_spec(stride: int, num_fg: int) -> ArraySpec:
    return ArraySpec("float16", stride=stride, channels=num_fg, fill=0)


@dataclass(frozen=True)
class CamChunk:
    """Some images' CAMs, computed by a dask worker on its own device (``compute.scheduler: gpus``:
    the worker's GPU). Paths are absolute; the worker loads the classifier once."""

    prepared_dir: str
    data: dict
    classifier: str
    cam: dict
    keys: tuple
    device: str = "cuda"


_WORKER_MODEL: dict = {}


def cam_chunk(task: CamChunk) -> dict:
    """Worker entry (top level, picklable): {image id: (CAMs float16, logits)} for ``task.keys``."""
    from pipeline.models.classifier import load_classifier
    from pipeline.refine.runner import open_prepared

    key = (task.classifier, task.device)
    if key not in _WORKER_MODEL:
        _WORKER_MODEL.clear()
        _WORKER_MODEL[key] = load_classifier(task.classifier, task.device)[0]
    model, cam = _WORKER_MODEL[key], task.cam
    prepared = open_prepared(task.prepared_dir, task.data)
    inference = CamInference(build_method(cam["method"], model, cam["method_options"]), cam["scales"], cam["flip"],
                             cam["stride"], task.device, dtype=cam["infer_dtype"])
    keys = list(task.keys)
    res = compute_cams(inference, prepared.image, keys, prepared.sizes(keys), [prepared.label_vector(k) for k in keys],
                       num_workers=0, max_batch=cam["infer_batch"])
    return {k: (res[k][0].astype(np.float16), res[k][1]) for k in keys}


def make_cam_store(prepared, model: CamClassifier, meta: dict, params: dict, device: torch.device, out: Path,
                   classifier_digest: str, ids: Sequence[str] | None = None, classifier: str | Path | None = None
                   ) -> tuple[Path, dict]:
    """Write ``out`` (array "cam", see the data contract) for the train split, shard by shard (resumable).
    With ``compute.scheduler: gpus`` each shard's images are split into chunks of ``cam.infer_batch``
    that the GPU workers compute (:func:`cam_chunk`, the checkpoint ``classifier``); otherwise this
    process computes them on ``device``.

    Returns (path, {image id: logits (K,)}) for the images computed in this run."""
    cam, data = params["cam"], params["data"]
    if list(meta["class_names"]) != list(prepared.class_names):
        raise ValueError(f"the classifier was trained for classes {meta['class_names']}, but the prepared data has "
                         f"{prepared.class_names}; re-run train_cam")
    ids = list(prepared.ids(data["train_split"]) if ids is None else ids)
    sizes = prepared.sizes(ids)
    method = build_method(cam["method"], model, cam["method_options"])
    inference = CamInference(method, cam["scales"], cam["flip"], cam["stride"], device, dtype=cam["infer_dtype"])
    logits_by_id: dict[str, np.ndarray] = {}

    on_gpus = params["compute"]["scheduler"] == "gpus"
    run_on_workers = None

    def compute(idx: list[int]) -> dict:
        keys = [ids[i] for i in idx]
        if on_gpus:
            step = cam["infer_batch"]
            tasks = [CamChunk(str(Path(prepared.dir).resolve()), dict(data), str(Path(classifier).resolve()), dict(cam),
                              tuple(keys[j:j + step])) for j in range(0, len(keys), step)]
            res = {k: v for part in run_on_workers(cam_chunk, tasks) for k, v in part.items()}
        else:
            res = compute_cams(inference, prepared.image, keys, [sizes[i] for i in idx],
                               [prepared.label_vector(k) for k in keys], num_workers=cam["num_workers"],
                               max_batch=cam["infer_batch"])
        logits_by_id.update({k: res[k][1] for k in keys})
        return {"cam": [res[k][0].astype(np.float16) for k in keys]}

    attrs = {"class_names": list(prepared.class_names), "background": prepared.background,
             "stride": cam["stride"], "method": cam["method"],
             "params": dict(cam), "split": data["train_split"], "backbone": meta["backbone"],
             "classifier": classifier_digest,
             "inputs": {"classifier": classifier_digest, "prepared": prepared_digest(prepared.dir)}}
    if not on_gpus:
        path = write_store(out, ids, sizes, {"cam": cam_spec(cam["stride"], prepared.num_label_classes)}, attrs, compute,
                           shard_images=params["compute"]["shard_images"], progress="make_cam")
        return path, logits_by_id
    if classifier is None:
        raise ValueError("make_cam on the gpus scheduler needs the classifier checkpoint's path for its workers")
    from pipeline.compute import dask_client

    with dask_client("gpus", params["compute"]["workers"]) as run_on_workers:
        path = write_store(out, ids, sizes, {"cam": cam_spec(cam["stride"], prepared.num_label_classes)}, attrs,
                           compute, shard_images=params["compute"]["shard_images"], progress="make_cam")
    return path, logits_by_id


def evaluate_cam_store(prepared, store: Store, model: CamClassifier, logits_by_id: dict, params: dict,
                       device: torch.device) -> dict:
    """Threshold sweep + baselines over the store's images that have GT. Returns the metrics dict."""
    cam = params["cam"]
    if prepared.background:
        sweep = ThresholdSweep(threshold_range(cam["eval_thr_min"], cam["eval_thr_max"], cam["eval_thr_step"]),
                               prepared.num_classes)
    else:  # cam.eval_thr_* mean nothing here: the metrics carry the note that says so
        sweep = LabelArgmax(prepared.num_classes)
    stride = int(store.attrs["stride"])
    with progress_bar(total=len(store), desc="cam eval", unit="img") as bar:
        for i, image_id in enumerate(store.ids):
            bar.update(1)
            gt = prepared.gt(image_id)
            if gt is None:
                continue
            logits = logits_by_id.get(image_id)
            if logits is None:  # computed by an earlier, interrupted run: score it again
                logits = predict_scores(model, [prepared.image(image_id)], device)[0]
            full = grid_to_image(store.read("cam", i).astype(np.float32), gt.shape, stride)
            labels = prepared.labels(image_id)
            sweep.update(full, gt, top_label(labels, logits, prepared.first_class), labels)
    out = sweep.summary(prepared.class_names)
    out["method"] = cam["method"]
    out["split"] = store.attrs.get("split")
    if not prepared.background:  # (metrics of a dataset with background stay as they were: no key)
        out["background"] = False
        log.info("make_cam: %s (cam.eval_thr_* not used)", out["note"])
    if not out["ground_truth"]:  # GT is optional: the CAMs are written, there is just nothing to score them on
        out["note"] = (f"no ground truth: no image of split {out['split']!r} has a GT mask, so the CAMs are not "
                       f"scored and there is no best threshold")
        log.info("make_cam: %s", out["note"])
    return out


def gallery_threshold(metrics: dict, cam: dict) -> float | None:
    """The threshold the CAM gallery's pseudo labels use: the sweep's best, or without ground truth
    (no best) the middle of the swept range (the gallery's column title shows it); None without a
    background class (argmax over the labels)."""
    if metrics.get("background") is False:
        return None
    if metrics.get("best_threshold") is not None:
        return float(metrics["best_threshold"])
    grid = threshold_range(cam["eval_thr_min"], cam["eval_thr_max"], cam["eval_thr_step"])
    return grid[len(grid) // 2]


def gallery_picture(prepared, store: Store, count: int, threshold: float | None) -> np.ndarray | None:
    """Gallery of the first ``count`` images of the store (None when count is 0)."""
    rows = []
    for image_id in store.ids[:count]:
        rows.append({"id": image_id, "image": prepared.image(image_id), "gt": prepared.gt(image_id),
                     "cam": store.read("cam", image_id), "labels": prepared.labels(image_id)})
    if not rows:
        return None
    return cam_gallery(rows, prepared.class_names, prepared.palette, int(store.attrs["stride"]), threshold,
                       first=prepared.first_class)


def run_make_cam(prepared, params: dict, classifier: str | Path, out: str | Path, *, device: torch.device) -> dict:
    """What the make_cam stage does: CAMs of the train split by the classifier checkpoint
    ``classifier`` into ``out`` (resumable), the threshold sweep against GT and the gallery. Returns
    {"metrics", "curve" (rows for the plot), "gallery" (an RGB array or None), "images" (computed in
    this run)}."""
    from pipeline.datasets.prepared import as_prepared
    from pipeline.models.classifier import load_classifier

    prepared, checkpoint, out = as_prepared(prepared, params["data"]), Path(classifier), Path(out)

    model, meta = load_classifier(checkpoint, device)
    _, logits = make_cam_store(prepared, model, meta, params, device, out, file_digest(checkpoint),
                               classifier=checkpoint)
    store = Store(out)
    metrics = evaluate_cam_store(prepared, store, model, logits, params, device)
    picture = gallery_picture(prepared, store, params["data"]["gallery_ids"], gallery_threshold(metrics, params["cam"]))
    return {"metrics": metrics, "curve": metrics["curve"], "gallery": picture, "images": len(store.ids)}

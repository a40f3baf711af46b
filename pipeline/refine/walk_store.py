"""The random_walk stage's job: one :class:`WalkTask` per image (CAMs, the affinity model, the
background cue) run through the dask helper into ``data/pseudo.zarr``, scored against GT, with the
affinity diagnostic and the gallery. The walk itself is :mod:`pipeline.refine.random_walk`."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.labels import grid_to_image, with_background
from pipeline.refine.random_walk import pseudo_mask, resolve_background
from pipeline.refine.runner import (ImageTask, open_prepared, open_store, saliency_store_fingerprint,
                                    write_scored_label_store)
from pipeline.refine.walk_affinity import cached_affinity_model, image_affinities
from pipeline.saliency.rules import saliency_for, walk_background
from pipeline.saliency.store import read_saliency

log = logging.getLogger("wsss")


@dataclass(frozen=True)
class WalkTask(ImageTask):
    """One image's walk: the common task fields, the affinity model and the walk's params."""

    model_path: str | None
    rw: dict
    crf: dict
    device: str = "cpu"
    torch_threads: int = 0
    saliency: dict | None = None  # the saliency params when rw.background_cue uses saliency
    saliency_store: str | None = None  # the saliency stage's store (data/saliency.zarr) then


def make_pseudo_mask(task: WalkTask) -> np.ndarray:
    """Worker entry (top level, picklable): loads image, CAMs and AffinityNet itself -> (H, W) uint8."""
    from pipeline.models.pairs import pair_offsets
    from pipeline.refine.runner import task_inputs

    image, classes, cam_grid, cam_stride = task_inputs(task)
    has_background = open_prepared(task.prepared_dir, task.data).background
    background = None
    if task.saliency is not None:
        sal = read_saliency(task.saliency_store, task.image_id)
        if sal is not None:
            cam_background = (with_background(grid_to_image(cam_grid, image.shape[:2], cam_stride), task.rw["alpha"])[0]
                              if task.rw["background_cue"] == "saliency_cam" else None)  # only that cue reads it
            background = walk_background(task.rw["background_cue"], sal, cam_background, task.saliency)
    if not task.rw["enabled"]:
        return pseudo_mask(image, cam_grid, cam_stride, classes, task.rw, task.crf, background=background,
                           has_background=has_background)
    model = cached_affinity_model(task.model_path, task.device, task.rw)
    offsets = pair_offsets(model.radius)
    aff = image_affinities(model, image, offsets)
    return pseudo_mask(image, cam_grid, cam_stride, classes, task.rw, task.crf, aff=aff, offsets=offsets,
                       aff_stride=model.stride, background=background, has_background=has_background)


def make_pseudo_store(prepared_dir: str | Path, data: dict, cams_path: str | Path, model_path: str | Path | None,
                      out_path: str | Path, rw: dict, crf: dict, compute: dict,
                      cam_threshold: float | None = None, saliency: dict | None = None,
                      saliency_store: str | Path | None = None) -> dict:
    """Pseudo masks for every image of the CAM store -> ``out_path`` (array "mask").

    Per-image work (AffinityNet forward + walk) runs through the dask helper; each worker process
    loads the model once (device and threads: :func:`pipeline.compute.per_image_torch`). ``cam_threshold``: the CAM sweep's best threshold, for ``rw.background:
    cam_sweep``; ``saliency``: the saliency params, used when ``rw.background_cue`` uses saliency,
    with the maps of ``saliency_store`` (the saliency stage's store).
    Returns the metrics dict (ConfusionMatrix summary + run facts).
    """
    from pipeline.compute import per_image_torch
    from pipeline.provenance import file_digest, prepared_digest

    rw = resolve_background(rw, cam_threshold)
    prepared = open_prepared(prepared_dir, data)
    cams = open_store(cams_path)
    ids = list(cams.ids)
    split = cams.attrs.get("split") or data["train_split"]
    model_meta = {}
    if rw["enabled"]:
        if model_path is None or not Path(model_path).is_file():
            raise FileNotFoundError(f"AffinityNet checkpoint not found: {model_path}; run the train_aff stage "
                                    "(or set rw.enabled: false)")
        from pipeline.models.affinity import read_affinity_checkpoint

        ck = read_affinity_checkpoint(model_path)
        model_meta = {"affinity_stride": ck["stride"], "radius": ck["radius"], "backbone": ck["backbone"],
                      "affinity": rw.get("affinity", "affinitynet")}
        cached_affinity_model(model_path, "cpu", rw)  # fail early when the checkpoint is not rw.affinity's kind
    inputs = {"cams": cams.attrs.get("fingerprint"), "prepared": prepared_digest(prepared_dir),
              "affinity_model": file_digest(model_path) if rw["enabled"] else None}
    sal = saliency_for(rw.get("background_cue", "cam"), saliency, "rw.background_cue")
    if sal is not None:
        inputs["saliency"] = saliency_store_fingerprint(saliency_store, "rw.background_cue")
    device, threads = per_image_torch(compute)
    tasks = [WalkTask(i, str(prepared_dir), data, str(cams_path), str(model_path) if model_path else None, rw, crf,
                      device, threads, sal, str(Path(saliency_store).resolve()) if sal else None) for i in ids]
    attrs = {"kind": "pseudo_masks", "class_names": prepared.class_names, "stride": 1, "split": split,
             "params": {"rw": rw, "crf": crf if rw["final_crf"] else None, "saliency": sal}, **model_meta,
             "method": "random_walk" if rw["enabled"] else "cam",
             "cams_fingerprint": cams.attrs.get("fingerprint"), "inputs": inputs}
    metrics = write_scored_label_store(prepared, ids, out_path, "mask", attrs, make_pseudo_mask, tasks, compute,
                                       "random walk")
    if not prepared.background:
        log.info("random_walk: no background class: rw.alpha and rw.background are not used; each pixel takes "
                 "the walked argmax of its image's labels")
    metrics.update({"enabled": bool(rw["enabled"]), "beta": rw["beta"], "logt": rw["logt"],
                    "alpha": rw["alpha"] if prepared.background else None,
                    **({} if prepared.background else {"background": False}),
                    "background_cue": rw.get("background_cue", "cam"),
                    **model_meta, "images": len(ids), "split": split})
    return metrics


def run_random_walk(prepared, params: dict, cams: str | Path, affinity: str | Path, out: str | Path, *,
                    seeds: str | Path | None = None, cam_threshold: float | None = None,
                    saliency_store: str | Path | None = None) -> dict:
    """What the random_walk stage does: :func:`make_pseudo_store` from the CAM store ``cams`` and the
    affinity model ``affinity`` into ``out``, the affinity separation diagnostic (walk on) and the
    gallery (with the seeds column when the seed store ``seeds`` exists).
    Returns {"metrics", "gallery" (an RGB array or None)}."""
    from pipeline.refine.affinity_diagnostic import SEPARATION_IMAGES, affinity_separation
    from pipeline.refine.gallery import refine_gallery

    from pipeline.datasets.prepared import prepared_folder

    prepared_dir, cams_path, model_path, out_path, seeds_path = prepared_folder(prepared), cams, affinity, out, seeds
    rw = params["rw"]
    metrics = make_pseudo_store(prepared_dir, params["data"], cams_path, model_path, out_path, rw, params["crf"],
                                params["compute"], cam_threshold=cam_threshold, saliency=params["saliency"],
                                saliency_store=saliency_store)
    prepared, pseudo = open_prepared(prepared_dir, params["data"]), open_store(out_path)
    if rw["enabled"]:
        metrics["affinity_separation"] = affinity_separation(model_path, prepared, pseudo.ids[:SEPARATION_IMAGES], rw=rw)
    ids = pseudo.ids[: params["data"]["gallery_ids"]]
    columns = {"CRF seeds": open_store(seeds_path)} if seeds_path and Path(seeds_path).exists() else {}
    columns["random walk" if rw["enabled"] else "pseudo (no walk)"] = pseudo
    picture = refine_gallery(prepared, ids, open_store(cams_path), columns, metrics["alpha"]) if ids else None
    return {"metrics": metrics, "gallery": picture}

"""Instance pseudo masks from the displacement field (IRNet, Ahn, Cho & Kwak, CVPR 2019).

For one image, on the affinity grid:

1. **Centres.** Every cell starts a point at its own position and moves it by the displacement
   field where the point stands, ``instances.iterations`` times (IRNet's refinement). Points of
   one object meet at its centre. Converged points about ``instances.merge_radius`` cells apart or
   closer make one centre (connected components of the dilated cells where at least three points
   landed: a cell no point moved to holds one); each cell belongs
   to the centre its point reached (cells whose point reached none: see step 2).
2. **Instance CAMs.** For each present class c and each centre k whose cells the CAM calls c
   (c beats the background channel and the other classes there), the instance CAM is c's CAM
   kept on k's cells only. c's cells that reached no centre are split into connected regions, one
   instance CAM each (a field that learned nothing gives connected components). At most ``instances.max_instances`` of them, largest CAM mass first.
3. **Walk.** The instance CAMs, with the CAM's background channel ((1 - max CAM)^alpha, alpha as
   the semantic walk resolves it), are propagated by the same random walk and affinities as the
   pseudo masks (:mod:`pipeline.refine.random_walk`), upsampled, and each pixel takes the argmax.
   ``rw.background_cue: saliency`` and ``rw.final_crf`` apply to the pseudo masks only.
4. **Instances.** Each non-background channel's pixels are one instance; instances smaller than
   ``instances.min_area`` of the image are dropped. An instance's score is the highest walked
   score inside it over the image's highest foreground score (in (0, 1]).

Stored per image (``data/instances.zarr``): ``instance`` (uint16, 0 = none, 1..n), ``mask`` (the
class of each instance's pixels, 0 background, 255 unsure: a semantic pseudo mask scored against
GT like the others) and ``score`` (each instance's score painted on its pixels, 0 elsewhere).
Where the dataset has instance masks, ``metrics/instances.json`` holds their COCO mask AP
(pycocotools' COCOeval, the scores ranking the instances).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from pipeline.labels import IGNORE_INDEX, first_class, grid_to_image, label_scores, with_background
from pipeline.refine.runner import ImageTask, open_prepared

NO_INSTANCE = 0

log = logging.getLogger("wsss")


def converge(disp: np.ndarray, iterations: int) -> np.ndarray:
    """disp (2, h, w) in grid cells -> (2, h, w) where each cell's point ends after ``iterations``
    moves p <- p + disp(round(p)) (points kept inside the grid)."""
    _, h, w = disp.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    py, px = ys.copy(), xs.copy()
    for _ in range(int(iterations)):
        iy = np.clip(np.rint(py), 0, h - 1).astype(np.intp)
        ix = np.clip(np.rint(px), 0, w - 1).astype(np.intp)
        py = np.clip(py + disp[0, iy, ix], 0, h - 1)
        px = np.clip(px + disp[1, iy, ix], 0, w - 1)
    return np.stack([py, px])


CENTRE_MIN_POINTS = 3  # a centre is where at least this many points land (a cell nobody moved to gets 1)


def centre_clusters(points: np.ndarray, merge_radius: int) -> tuple[np.ndarray, int]:
    """Converged points (2, h, w) -> ((h, w) int32 centre index per cell, 1..n, 0 where the cell's
    point reached no centre; n centres). Centres: the cells where at least CENTRE_MIN_POINTS points
    landed, grown by about merge_radius / 2 cells, connected components of that."""
    _, h, w = points.shape
    iy = np.clip(np.rint(points[0]), 0, h - 1).astype(np.intp)
    ix = np.clip(np.rint(points[1]), 0, w - 1).astype(np.intp)
    counts = np.zeros((h, w), np.int32)
    np.add.at(counts, (iy, ix), 1)
    centre = (counts >= CENTRE_MIN_POINTS).astype(np.uint8)
    r = (int(merge_radius) + 1) // 2
    if r > 0:
        centre = cv2.dilate(centre, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    n, components = cv2.connectedComponents(centre, connectivity=8)
    return components[iy, ix].astype(np.int32), int(n - 1)


def instance_candidates(cams: np.ndarray, centres: np.ndarray, classes: Sequence[int], alpha: float,
                        max_instances: int, background: bool = True) -> tuple[np.ndarray, list[int]]:
    """cams (K, h, w) for ``classes`` on the grid, centres (h, w) -> (instance CAMs (M, h, w), class of
    each). A (class, centre) pair is a candidate where the CAM labels some of the centre's cells with
    that class; the class's cells whose points reached no centre are split into connected regions,
    one candidate each (so a flat displacement field falls back to connected components). At most
    ``max_instances``, largest CAM mass first. Without ``background`` the CAM's argmax is over the
    classes only, so every cell is some class's (instances per class, no background)."""
    empty = np.zeros((0,) + cams.shape[1:], np.float32), []
    if not len(classes):
        return empty
    first = first_class(background)
    winner = label_scores(cams, alpha, background).argmax(0)  # with background: 0 background, k + 1 class k
    found = []
    for k, cls in enumerate(classes):
        cells = winner == k + first
        for centre in np.unique(centres[cells & (centres > 0)]):
            keep = centres == centre
            found.append((float(cams[k][keep & cells].sum()), k, keep))
        n, regions = cv2.connectedComponents((cells & (centres == 0)).astype(np.uint8), connectivity=8)
        for region in range(1, n):
            keep = regions == region
            found.append((float(cams[k][keep].sum()), k, keep))
    if not found:
        return empty
    found.sort(key=lambda f: -f[0])
    found = found[:max_instances]
    maps = np.stack([cams[k] * keep for _, k, keep in found]).astype(np.float32)
    return maps, [int(classes[k]) for _, k, _ in found]


def instances_from_scores(scores: np.ndarray, classes: Sequence[int], min_area: float,
                          ignore_below: float = 0.0, background: bool = True) -> dict[str, np.ndarray]:
    """Walked scores (1 + M, H, W) (background first; (M, H, W) without ``background``) and each
    instance channel's class -> the stored arrays
    {"instance", "mask", "score"} (see the module docstring). Pixels whose top score is below
    ``ignore_below``, and those of instances under ``min_area`` of the image, are 255 in ``mask``
    and belong to no instance; the kept instances are numbered 1..n."""
    h, w = scores.shape[1:]
    if not len(scores):
        top = np.full((h, w), -1, np.int64)
    else:
        top = scores.argmax(0)
        if ignore_below > 0:
            top = np.where(scores.max(0) < ignore_below, -1, top)  # unsure: 255 in mask, no instance
    instance = np.zeros((h, w), np.uint16)
    # what no instance takes: background, or unsure where there is no background to fall back on
    mask = np.where(top < 0, IGNORE_INDEX, 0 if background else IGNORE_INDEX).astype(np.uint8)
    score = np.zeros((h, w), np.float32)
    first = first_class(background)
    fg_max = float(scores[first:].max()) if len(scores) > first else 0.0
    next_id = 1
    for m, cls in enumerate(classes, start=first):
        pixels = top == m
        if not pixels.any():
            continue
        if pixels.sum() < min_area * h * w:  # too small to be an object: its pixels are unsure, not background
            mask[pixels] = IGNORE_INDEX
            continue
        instance[pixels] = next_id
        mask[pixels] = cls
        score[pixels] = float(scores[m][pixels].max()) / fg_max if fg_max > 0 else 0.0
        next_id += 1
    return {"instance": instance, "mask": mask, "score": score}


def instance_masks(image: np.ndarray, cam_grid: np.ndarray, cam_stride: int, classes: Sequence[int], rw: dict,
                   inst: dict, aff, disp: np.ndarray, offsets, aff_stride: int,
                   background: bool = True) -> dict[str, np.ndarray]:
    """One image's instance pseudo masks: cam_grid (K, gh, gw) for ``classes``, ``aff`` (P, h, w) and
    ``disp`` (2, h, w) on the affinity grid. Returns {"instance", "mask", "score"} at image size.
    Without ``background`` the walk has no background channel: instances tile the image, per class."""
    from pipeline.refine.random_walk import affinity_grid_cams, random_walk

    size = image.shape[:2]
    grid = tuple(disp.shape[-2:])
    cams = affinity_grid_cams(cam_grid, cam_stride, size, grid, aff_stride)
    centres, _ = centre_clusters(converge(disp, inst["iterations"]), inst["merge_radius"])
    maps, inst_classes = instance_candidates(cams, centres, classes, rw["alpha"], inst["max_instances"], background)
    start = np.concatenate([with_background(cams, rw["alpha"])[:1], maps]) if background else maps
    if not len(start):  # nothing to walk (no labels): no instance, every pixel unsure
        return instances_from_scores(np.zeros((0,) + tuple(size), np.float32), [], inst["min_area"], 0.0, background)
    walked = random_walk(start, aff, offsets, rw["beta"], rw["logt"]) if rw["enabled"] else start
    scores = grid_to_image(walked, size, aff_stride)
    return instances_from_scores(scores, inst_classes, inst["min_area"], rw["ignore_below"], background)


@dataclass(frozen=True)
class InstanceTask(ImageTask):
    """One image's instances: the common task fields, the AffinityNet (with its displacement field) and params."""

    model_path: str
    rw: dict
    instances: dict
    device: str = "cpu"
    torch_threads: int = 0


def make_instance_masks(task: InstanceTask) -> dict[str, np.ndarray]:
    """Worker entry (top level, picklable): loads image, CAMs and the affinity model itself."""
    from pipeline.models.pairs import pair_offsets
    from pipeline.refine.walk_affinity import cached_affinity_model, image_relations
    from pipeline.refine.runner import task_inputs

    image, classes, cam_grid, cam_stride = task_inputs(task)
    background = open_prepared(task.prepared_dir, task.data).background
    model = cached_affinity_model(task.model_path, task.device, task.rw)
    offsets = pair_offsets(model.radius)
    aff, disp = image_relations(model, image, offsets)
    return instance_masks(image, cam_grid, cam_stride, classes, task.rw, task.instances, aff, disp.cpu().numpy(),
                          offsets, model.stride, background)


def instance_counts(store) -> dict:
    """How many instances the store holds: total, per image, and images with two or more of one class."""
    from pipeline.refine.instance_store import instance_items

    total, multi = 0, 0
    for _, inst, mask, _ in instance_items(store):
        ids = np.unique(inst[inst != NO_INSTANCE])
        total += len(ids)
        classes = [int(mask[inst == k][0]) for k in ids]
        multi += len(classes) != len(set(classes))
    n = len(store.ids)
    return {"instances": total, "per_image": round(total / n, 3) if n else None,
            "images_with_several_of_one_class": multi}


def gt_instance_annotations(instance_gt: np.ndarray, gt: np.ndarray) -> list[dict]:
    """COCO annotations (without ids) of an image's GT instances: each instance's class is the GT
    class under most of its pixels (void 255 and background left out)."""
    from pipeline.coco import rle_regions

    regions, classes = [], []
    for k in np.unique(instance_gt):
        if k in (0, IGNORE_INDEX):
            continue
        under = gt[instance_gt == k]
        under = under[(under != 0) & (under != IGNORE_INDEX)]
        if under.size:
            regions.append(instance_gt == k)
            classes.append(int(np.bincount(under).argmax()))
    return [{"category_id": c, **r} for c, r in zip(classes, rle_regions(regions))]


def instance_ap(prepared, store) -> dict:
    """COCO mask AP of the instance store against the prepared instance GT (images that have one),
    with pycocotools' COCOeval: {"instance_gt_images", "gt_instances", "ap", "ap50", "ap75"} in %
    (None without instance GT)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from pipeline.coco import instance_annotations, quiet_pycocotools
    from pipeline.refine.instance_store import instance_items

    images, gts, dets = [], [], []
    for n, (image_id, instance, mask, score) in enumerate(instance_items(store), start=1):
        inst_gt = prepared.instance_gt(image_id) if image_id in prepared else None
        if inst_gt is None:
            continue
        h, w = inst_gt.shape
        images.append({"id": n, "height": int(h), "width": int(w)})
        for ann in gt_instance_annotations(inst_gt, prepared.gt(image_id)):
            gts.append({"id": len(gts) + 1, "image_id": n, **ann})
        try:
            anns = instance_annotations(instance, mask, score, prepared.num_classes)
        except ValueError as e:
            raise ValueError(f"{store.path}: image {image_id!r}: {e}") from None
        dets.extend({"image_id": n, **ann} for ann in anns)
    out = {"instance_gt_images": len(images), "gt_instances": len(gts), "ap": None, "ap50": None, "ap75": None}
    if not images or not gts:
        return out
    if not dets:
        return {**out, "ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    doc = {"images": images, "annotations": gts,
           "categories": [{"id": k, "name": c} for k, c in enumerate(prepared.class_names) if k > 0]}
    with quiet_pycocotools():
        coco = COCO()
        coco.dataset = doc
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dets), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap, ap50, ap75 = (round(100 * float(v), 2) for v in ev.stats[:3])
    return {**out, "ap": ap, "ap50": ap50, "ap75": ap75}


def make_instance_store(prepared_dir: str | Path, params: dict, cams_path: str | Path, model_path: str | Path,
                        out_path: str | Path, cam_threshold: float | None = None) -> dict:
    """What the instances stage does: instance pseudo masks for every image of the CAM store ->
    ``out_path`` (arrays instance, mask, score), per-image work through dask. Returns the metrics:
    the semantic mIoU of ``mask`` against GT, the instance counts and, where the dataset has instance
    masks (VOC's SegmentationObject, the demo), COCO mask AP (:func:`instance_ap`)."""
    from pipeline.compute import per_image_torch
    from pipeline.models.affinity import load_affinity_net
    from pipeline.provenance import file_digest, prepared_digest
    from pipeline.refine.random_walk import resolve_background
    from pipeline.refine.runner import open_prepared, open_store, write_scored_label_store
    from pipeline.store import ArraySpec, Store

    if not Path(model_path).is_file():
        raise FileNotFoundError(f"affinity model not found: {model_path}; run the train_aff stage")
    if params["rw"].get("affinity") == "features":
        log.warning("rw.affinity features learns no displacement field: instances are the connected regions of "
                    "each class's walked CAM")
    elif not load_affinity_net(model_path).has_displacement:
        raise ValueError(f"{model_path}: saved before the displacement branch existed (no instances from it); "
                         "re-run the train_aff stage")
    rw = resolve_background(params["rw"], cam_threshold)
    inst = dict(params["instances"])
    prepared = open_prepared(prepared_dir, params["data"])
    cams = open_store(cams_path)
    ids = list(cams.ids)
    device, threads = per_image_torch(params["compute"])
    tasks = [InstanceTask(i, str(prepared_dir), params["data"], str(cams_path), str(model_path), rw, inst, device,
                          threads) for i in ids]
    attrs = {"kind": "instance_masks", "class_names": prepared.class_names, "stride": 1,
             "split": cams.attrs.get("split") or params["data"]["train_split"], "params": {"rw": rw, "instances": inst},
             "method": "irn_instances", "inputs": {"cams": cams.attrs.get("fingerprint"),
                                                   "prepared": prepared_digest(prepared_dir),
                                                   "affinity_model": file_digest(model_path)}}
    extra = {"instance": ArraySpec("uint16", stride=1, fill=NO_INSTANCE), "score": ArraySpec("float32", stride=1)}
    metrics = write_scored_label_store(prepared, ids, out_path, "mask", attrs, make_instance_masks, tasks,
                                       params["compute"], "instances", extra_arrays=extra)
    metrics.update(instance_counts(Store(out_path)))
    metrics["instance_quality"] = instance_ap(prepared, Store(out_path))
    metrics.update({"images": len(ids), "alpha": rw["alpha"], **inst})
    return metrics


def run_instances(prepared, params: dict, cams: str | Path, affinity: str | Path, out: str | Path, *,
                  cam_threshold: float | None = None) -> dict:
    """What the instances stage does: :func:`make_instance_store` from the CAM store ``cams`` and the
    affinity model ``affinity`` (with its displacement field) into ``out``, and the gallery.
    Returns {"metrics", "gallery" (an RGB array or None)}."""
    from pipeline.datasets.prepared import prepared_folder
    from pipeline.refine.gallery import instance_gallery
    from pipeline.refine.runner import open_prepared, open_store

    prepared_dir, cams_path, model_path, out_path = prepared_folder(prepared), cams, affinity, out

    metrics = make_instance_store(prepared_dir, params, cams_path, model_path, out_path, cam_threshold)
    store = open_store(out_path)
    ids = store.ids[: params["data"]["gallery_ids"]]
    picture = instance_gallery(open_prepared(prepared_dir, params["data"]), ids, store) if ids else None
    return {"metrics": metrics, "gallery": picture}

"""The saliency stage's work: one map per train image of the configured source into a zarr store
(array ``saliency``, uint8 0..255 = saliency x 255 at full resolution; array ``valid``, one value
per image, 0 where ``saliency.on_missing: skip`` skipped a missing map), scored against the GT
foreground; reading one image's map back; writing the maps as grey PNGs for people and for
``saliency.source: folder``."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from pipeline.saliency.sources import SaliencySource, saliency_digest

log = logging.getLogger("wsss")

ONE_PER_IMAGE = 1 << 16  # stride that gives a 1 x 1 grid for any image (the per-image "valid" flag)


def to_uint8(sal: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(sal * 255.0), 0, 255).astype(np.uint8)


class ForegroundScore:
    """Binary foreground / background IoU of thresholded saliency against GT (class > 0 is
    foreground, 255 ignored), accumulated over images."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.tp = self.fp = self.fn = self.tn = 0
        self.images = 0

    def update(self, sal: np.ndarray, gt: np.ndarray) -> None:
        valid = gt != 255
        pred = sal >= self.threshold
        fg = (gt > 0) & valid
        self.tp += int((pred & fg).sum())
        self.fp += int((pred & ~fg & valid).sum())
        self.fn += int((~pred & fg).sum())
        self.tn += int((~pred & ~fg & valid).sum())
        self.images += 1

    def summary(self) -> dict:
        def pct(a, b):
            return round(100.0 * a / b, 2) if b else None

        return {"images_scored": self.images, "threshold": self.threshold,
                "foreground_iou": pct(self.tp, self.tp + self.fp + self.fn),
                "background_iou": pct(self.tn, self.tn + self.fp + self.fn),
                "foreground_precision": pct(self.tp, self.tp + self.fp),
                "foreground_recall": pct(self.tp, self.tp + self.fn)}


def run_saliency(prepared, params: dict, out: str | Path, *, device: str = "cpu") -> dict:
    """What the saliency stage does: :func:`make_saliency_store` for ``saliency.source`` into ``out``.
    Returns {"metrics"}."""
    from pipeline.datasets.prepared import prepared_folder

    return {"metrics": make_saliency_store(prepared_folder(prepared), params["data"], params["saliency"],
                                           params["compute"], out, device=device)}


def make_saliency_store(prepared_dir: str | Path, data: dict, sal: dict, compute: dict, out_path: str | Path,
                        device: str = "cpu", ids: Sequence[str] | None = None) -> dict:
    """Maps of ``saliency.source`` for every image of ``data.train_split`` (or ``ids``) ->
    ``out_path``; resumable shard by shard like every store. Returns the metrics dict: the GT
    foreground / background IoU at ``saliency.fg_threshold`` (images with GT), the images, seconds
    and seconds per image."""
    from pipeline.provenance import prepared_digest
    from pipeline.refine.runner import open_prepared
    from pipeline.store import ArraySpec, write_store

    prepared = open_prepared(prepared_dir, data)
    ids = list(prepared.ids(data["train_split"]) if ids is None else ids)
    source = SaliencySource(sal, device=device)
    attrs = {"kind": "saliency", "split": data["train_split"], "source": sal["source"],
             "params": {k: sal[k] for k in ("source", "folder", "model", "on_missing") if k in sal},
             "scale": "uint8: saliency x 255", "inputs": {"prepared": prepared_digest(prepared_dir),
                                                          "source": saliency_digest(sal)["digest"]}}
    specs = {"saliency": ArraySpec("uint8"), "valid": ArraySpec("uint8", stride=ONE_PER_IMAGE)}
    score = ForegroundScore(sal["fg_threshold"])
    computed = [0]  # images mapped in this run (the rest were resumed from a partial store)
    t0 = time.perf_counter()

    def compute_shard(indices: list[int]) -> dict:
        keys = [ids[i] for i in indices]
        computed[0] += len(keys)
        maps = source(keys, [prepared.image(k) for k in keys])
        out = {"saliency": [], "valid": []}
        for key, m in zip(keys, maps):
            h, w = prepared.size(key)
            if m is not None and m.shape != (h, w):
                raise ValueError(f"saliency source {sal['source']!r} returned shape {m.shape} for image {key!r} of "
                                 f"size {(h, w)}")
            out["saliency"].append(np.zeros((h, w), np.uint8) if m is None else to_uint8(m))
            out["valid"].append(np.full((1, 1), 0 if m is None else 1, np.uint8))
            gt = prepared.gt(key) if prepared.background else None  # no background: no foreground to score
            if m is not None and gt is not None:
                score.update(m, gt)
        return out

    write_store(out_path, ids, prepared.sizes(ids), specs, attrs, compute_shard,
                shard_images=compute["shard_images"], progress=f"saliency {sal['source']}")
    seconds = time.perf_counter() - t0
    metrics = {"source": sal["source"], "images": len(ids), "split": data["train_split"],
               "seconds": round(seconds, 2), **score.summary()}
    if not prepared.background:
        metrics["note"] = ("no background class (data.background: false): the maps are not scored, and no stage "
                           "uses them (crf.background_cue and rw.background_cue must be cam)")
    elif computed[0] < len(ids):  # resumed shards were not scored in this run: score what the store holds
        metrics.update(score_store(out_path, prepared, sal["fg_threshold"]))
    metrics["seconds_per_image"] = round(seconds / max(len(ids), 1), 4)
    return metrics


def score_store(path: str | Path, prepared, threshold: float) -> dict:
    """:class:`ForegroundScore` over every valid map of a saliency store."""
    from pipeline.store import Store

    store = Store(path)
    score = ForegroundScore(threshold)
    for image_id in store.ids:
        gt = prepared.gt(image_id)
        m = read_saliency(path, image_id)
        if gt is not None and m is not None:
            score.update(m, gt)
    return score.summary()


def read_saliency(path: str | Path, image_id: str) -> np.ndarray | None:
    """One image's map (H, W) float32 in [0, 1] from a saliency store, or None where the source
    skipped it (``saliency.on_missing: skip``). A store without the image is an error naming both."""
    from pipeline.refine.runner import open_store

    store = open_store(path)
    if image_id not in store:
        raise KeyError(f"saliency store {path} has no map for image {image_id!r}: re-run the saliency stage "
                       f"(it covers data.train_split)")
    if not int(store.read("valid", image_id).ravel()[0]):
        return None
    return store.read("saliency", image_id).astype(np.float32) / 255.0


def write_saliency_pngs(prepared_dir: str | Path, data: dict, sal: dict, out_dir: str | Path, split: str,
                        store_path: str | Path | None = None, device: str = "cpu") -> dict:
    """Grey 8-bit PNGs ``<out_dir>/<id>.png`` of ``split``'s maps, read from ``store_path`` when it
    holds this source's maps for these images, else computed. Returns {"count", "out_dir", "from"}."""
    from pipeline.refine.runner import open_prepared
    from pipeline.store import Store

    prepared = open_prepared(prepared_dir, data)
    ids = list(prepared.ids(split))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = None
    if store_path is not None and (Path(store_path) / "zarr.json").is_file():
        candidate = Store(store_path)
        same = (candidate.attrs.get("source") == sal["source"]
                and candidate.attrs.get("inputs", {}).get("source") == saliency_digest(sal)["digest"])
        if same and all(i in candidate for i in ids):
            store = candidate
    source = None if store is not None else SaliencySource(sal, device=device)
    count = 0
    for lo in range(0, len(ids), 8):
        keys = ids[lo:lo + 8]
        if store is not None:
            maps = [read_saliency(store_path, k) for k in keys]
        else:
            maps = source(keys, [prepared.image(k) for k in keys])
        for key, m in zip(keys, maps):
            if m is None:
                log.warning("saliency: no map for image %s (skipped by saliency.on_missing)", key)
                continue
            if not cv2.imwrite(str(out_dir / f"{key}.png"), to_uint8(m)):
                raise OSError(f"cannot write {out_dir / (key + '.png')}")
            count += 1
    return {"count": count, "out_dir": str(out_dir), "from": str(store_path) if store is not None else sal["source"]}

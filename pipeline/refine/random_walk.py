"""Random walk with AffinityNet affinities (Ahn & Kwak 2018), without the dense N x N matrix.

The transition is T = D^-1 A^beta on the affinity grid, where A holds the affinities of each
cell with itself (1) and with its neighbours within the training radius (both directions of
every half-plane offset), and D is A^beta's row sum. The scores (C, h, w) are propagated by
t = 2^logt applications of T as a fixed stencil: each step is ``sum_k W_k * shift_k(v)`` over
the 2P + 1 stencil offsets. Memory is O(N x (2P + 1)) and time O(t x N x (2P + 1) x C), against
O(N^2) memory and O(logt x N^3) time for squaring the dense matrix as the published code does
(kept here as :func:`random_walk_dense`, for tests and the benchmark only).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from pipeline.labels import IGNORE_INDEX, grid_to_image, resize_maps, to_class_labels, with_background
from pipeline.models.affinity import in_bounds, shifted
from pipeline.saliency.rules import saliency_for, walk_background
from pipeline.saliency.store import read_saliency
from pipeline.refine.runner import (open_prepared, open_store, required_cam_threshold, saliency_store_fingerprint,
                                    write_scored_label_store)

Offsets = Sequence[tuple[int, int]]


def stencil(offsets: Offsets) -> list[tuple[int, int]]:
    """Self, the half-plane offsets, then their mirror images: 2P + 1 offsets."""
    return [(0, 0)] + list(offsets) + [(-dy, -dx) for dy, dx in offsets]


def transition_weights(aff: torch.Tensor, offsets: Offsets, beta: float) -> torch.Tensor:
    """aff (P, h, w) half-plane affinities (0 where the partner is outside) -> row-normalised
    transition weights (2P + 1, h, w) for :func:`stencil` offsets: W[k, y, x] = T[(y, x), (y, x) + o_k]."""
    if aff.dim() != 3 or aff.shape[0] != len(offsets):
        raise ValueError(f"affinities must be (P={len(offsets)}, h, w), got {tuple(aff.shape)}")
    a = aff.float().clamp(0.0, 1.0).pow(beta) * in_bounds(aff.shape[1], aff.shape[2], offsets, aff.device)
    # the mirrored pair (y, x) -> (y - dy, x - dx) is the forward pair stored at (y - dy, x - dx)
    back = torch.stack([shifted(a[p], -dy, -dx) for p, (dy, dx) in enumerate(offsets)], 0)
    w = torch.cat([torch.ones_like(a[:1]), a, back], 0)
    return w / w.sum(0, keepdim=True)


def propagate(scores: torch.Tensor, weights: torch.Tensor, offsets: Offsets, steps: int) -> torch.Tensor:
    """Apply T ``steps`` times to scores (C, h, w): v <- sum_k W_k * v(. + o_k)."""
    full = stencil(offsets)
    if weights.shape[0] != len(full):
        raise ValueError(f"weights have {weights.shape[0]} stencil entries, offsets give {len(full)}")
    c, h, w = scores.shape
    r = max([max(abs(dy), abs(dx)) for dy, dx in full] + [0])
    pad = torch.zeros(c, h + 2 * r, w + 2 * r, dtype=weights.dtype, device=weights.device)
    inner = pad[:, r:r + h, r:r + w]
    inner.copy_(scores)
    views = [pad[:, r + dy:r + dy + h, r + dx:r + dx + w] for dy, dx in full]
    out = torch.empty_like(inner)
    for _ in range(int(steps)):
        torch.mul(views[0], weights[0], out=out)
        for k in range(1, len(full)):
            out.addcmul_(views[k], weights[k])
        inner.copy_(out)  # the zero border stays zero: out-of-grid partners have weight 0 anyway
    return inner.clone()


def random_walk(scores: torch.Tensor | np.ndarray, aff: torch.Tensor | np.ndarray, offsets: Offsets, beta: float,
                logt: int) -> np.ndarray:
    """scores (C, h, w), aff (P, h, w) -> propagated scores (C, h, w) float32 after 2^logt steps."""
    threads = torch.get_num_threads()
    try:
        # each of the t x (2P + 1) ops touches only C x N floats: intra-op threads cost more than they
        # give, and on a shared CPU their spin-waits are ruinous (10-100x slower measured at load 4)
        torch.set_num_threads(1)
        with torch.no_grad():
            aff = torch.as_tensor(aff, dtype=torch.float32)
            scores = torch.as_tensor(scores, dtype=torch.float32, device=aff.device)
            w = transition_weights(aff, offsets, beta)
            return propagate(scores, w, offsets, 2 ** int(logt)).cpu().numpy()
    finally:
        torch.set_num_threads(threads)


def dense_transition(aff: np.ndarray, offsets: Offsets, beta: float) -> np.ndarray:
    """The same T as a dense (N, N) float32 matrix, N = h * w. Reference only: O(N^2) memory."""
    w = transition_weights(torch.as_tensor(aff, dtype=torch.float32), offsets, beta).numpy()
    _, h, wd = w.shape
    n = h * wd
    t = np.zeros((n, n), np.float32)
    ys, xs = np.mgrid[0:h, 0:wd]
    src = (ys * wd + xs).ravel()
    for k, (dy, dx) in enumerate(stencil(offsets)):
        y2, x2 = (ys + dy).ravel(), (xs + dx).ravel()
        ok = (y2 >= 0) & (y2 < h) & (x2 >= 0) & (x2 < wd)
        t[src[ok], (y2 * wd + x2)[ok]] = w[k].ravel()[ok]
    return t


def random_walk_dense(scores: np.ndarray, aff: np.ndarray, offsets: Offsets, beta: float, logt: int,
                      squarings: int | None = None) -> np.ndarray:
    """Reference: square the dense transition ``logt`` times, then one product (the published
    way). ``squarings`` < logt stops early (for timing only; the result is then T^(2^squarings))."""
    c, h, w = scores.shape
    t = dense_transition(aff, offsets, beta)
    for _ in range(logt if squarings is None else squarings):
        t = t @ t
    return (t @ scores.reshape(c, -1).T.astype(np.float32)).T.reshape(c, h, w)


def affinity_grid_cams(cam_grid: np.ndarray, cam_stride: int, size: Sequence[int], grid: Sequence[int],
                       aff_stride: int) -> np.ndarray:
    """CAMs on their own stride grid -> the affinity grid (K, gh, gw)."""
    if cam_stride == aff_stride and tuple(cam_grid.shape[-2:]) == tuple(grid):
        return cam_grid.astype(np.float32)
    full = grid_to_image(cam_grid, size, cam_stride)
    h, w = int(size[0]), int(size[1])
    canvas = np.zeros((len(full), grid[0] * aff_stride, grid[1] * aff_stride), np.float32)
    canvas[:, :h, :w] = full
    return resize_maps(canvas, grid, interp=cv2.INTER_AREA)


def pseudo_mask(image: np.ndarray, cam_grid: np.ndarray, cam_stride: int, classes: Sequence[int], rw: dict, crf: dict,
                aff: np.ndarray | torch.Tensor | None = None, offsets: Offsets = (), aff_stride: int = 8,
                background: np.ndarray | None = None) -> np.ndarray:
    """One image's pseudo mask (H, W) uint8.

    cam_grid (K, gh, gw) for ``classes``; background channel (1 - max)^rw.alpha, or ``background``
    (H, W) at image resolution when given (the saliency cue). With ``aff``
    (P, ha, wa) on the affinity grid the scores are propagated first; with ``aff=None`` (rw
    disabled) the CAM scores are used as they are. Then upsample, argmax, 255 where the top
    score < rw.ignore_below, optional final dense CRF (crf params).
    """
    size = image.shape[:2]
    if aff is None:
        if background is None:
            scores = grid_to_image(with_background(cam_grid, rw["alpha"]), size, cam_stride)
        else:
            scores = np.concatenate([background[None].astype(np.float32), grid_to_image(cam_grid, size, cam_stride)])
    else:
        grid = tuple(aff.shape[-2:])
        cams = affinity_grid_cams(cam_grid, cam_stride, size, grid, aff_stride)
        if background is None:
            start = with_background(cams, rw["alpha"])
        else:
            start = np.concatenate([affinity_grid_cams(background[None], 1, size, grid, aff_stride), cams])
        walked = random_walk(start, aff, offsets, rw["beta"], rw["logt"])
        scores = grid_to_image(walked, size, aff_stride)
    if rw["final_crf"]:
        from pipeline.refine.crf import CrfSettings, crf_argmax

        probs = scores / np.maximum(scores.sum(0, keepdims=True), 1e-8)
        index = crf_argmax(image, probs, CrfSettings.from_params(crf))
    else:
        index = scores.argmax(0)
    if rw["ignore_below"] > 0:
        index = np.where(scores.max(0) < rw["ignore_below"], IGNORE_INDEX, index)
    return to_class_labels(index, classes)


@lru_cache(maxsize=2)
def _load_cached(path: str, stamp: int, device: str, kind: str, colour_sigma: float):
    from pipeline.refine.feature_affinity import load_walk_affinity

    return load_walk_affinity(path, {"affinity": kind, "colour_sigma": colour_sigma}, device)


def cached_affinity_model(path: str | Path, device: str, rw: dict | None = None):
    """The affinity model at ``path`` for ``rw.affinity`` (default the trained AffinityNet), loaded once
    per worker process (reloaded when the file changes)."""
    rw = rw or {}
    return _load_cached(str(path), Path(path).stat().st_mtime_ns, device, rw.get("affinity", "affinitynet"),
                        float(rw.get("colour_sigma", 0.0)))


def image_affinities(model, image: np.ndarray, offsets: Offsets) -> torch.Tensor:
    """(H, W, 3) uint8 -> (P, ceil(H/s), ceil(W/s)) affinities (on the model's device)."""
    from pipeline.augment import normalise

    device = next(model.parameters()).device
    with torch.no_grad():
        x = normalise(image)[None].to(device)
        return model(x, offsets)[0].float()


def image_relations(model, image: np.ndarray, offsets: Offsets) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W, 3) uint8 -> (affinities (P, h, w) on the model's device, displacement field (2, h, w) on
    the CPU), one backbone pass."""
    from pipeline.augment import normalise

    device = next(model.parameters()).device
    with torch.no_grad():
        aff, disp = model.relations(normalise(image)[None].to(device), offsets)
    return aff[0].float(), disp[0].float().cpu()


def affinity_separation(model_path: str | Path, prepared, ids: Sequence[str], device: str = "cpu",
                        rw: dict | None = None) -> dict:
    """How well the AffinityNet separates classes, measured on GT: the mean predicted affinity of
    pixel pairs (cell centres of the affinity grid, within the training radius) whose GT classes are
    the same (background-background and object-object apart) and different. Images without GT are
    skipped. Returns {"images", "same_background", "same_object", "different", "gap"} (means, and
    same-object minus different: a walk can only separate objects when the gap is large)."""
    from pipeline.models.affinity import pair_labels, pair_offsets, seed_to_grid

    model = cached_affinity_model(model_path, device, rw)
    offsets = pair_offsets(model.radius)
    sums, counts, used = np.zeros(3), np.zeros(3), 0
    for image_id in ids:
        gt = prepared.gt(image_id)
        if gt is None:
            continue
        aff = image_affinities(model, prepared.image(image_id), offsets).cpu()
        grid = torch.from_numpy(seed_to_grid(gt, model.stride).astype(np.int64))[None]
        for k, mask in enumerate(pair_labels(grid, offsets)):
            sums[k] += float(aff[mask[0]].sum())
            counts[k] += int(mask.sum())
        used += 1
    means = [round(float(sv / c), 4) if c else None for sv, c in zip(sums, counts)]
    gap = round(means[1] - means[2], 4) if None not in (means[1], means[2]) else None
    return {"images": used, "same_background": means[0], "same_object": means[1], "different": means[2], "gap": gap}


@dataclass(frozen=True)
class WalkTask:
    """Everything one worker needs for one image (small and picklable)."""

    image_id: str
    prepared_dir: str
    data: dict
    cams_path: str
    model_path: str | None
    rw: dict
    crf: dict
    device: str = "cpu"
    torch_threads: int = 0
    saliency: dict | None = None  # the saliency params when rw.background_cue uses saliency
    saliency_store: str | None = None  # the saliency stage's store (data/saliency.zarr) then


def make_pseudo_mask(task: WalkTask) -> np.ndarray:
    """Worker entry (top level, picklable): loads image, CAMs and AffinityNet itself -> (H, W) uint8."""
    from pipeline.models.affinity import pair_offsets
    from pipeline.refine.runner import task_inputs

    image, classes, cam_grid, cam_stride = task_inputs(task)
    background = None
    if task.saliency is not None:
        sal = read_saliency(task.saliency_store, task.image_id)
        if sal is not None:
            cam_background = (with_background(grid_to_image(cam_grid, image.shape[:2], cam_stride), task.rw["alpha"])[0]
                              if task.rw["background_cue"] == "saliency_cam" else None)  # only that cue reads it
            background = walk_background(task.rw["background_cue"], sal, cam_background, task.saliency)
    if not task.rw["enabled"]:
        return pseudo_mask(image, cam_grid, cam_stride, classes, task.rw, task.crf, background=background)
    model = cached_affinity_model(task.model_path, task.device, task.rw)
    offsets = pair_offsets(model.radius)
    aff = image_affinities(model, image, offsets)
    return pseudo_mask(image, cam_grid, cam_stride, classes, task.rw, task.crf, aff=aff, offsets=offsets,
                       aff_stride=model.stride, background=background)


def background_alpha(threshold: float) -> float:
    """The exponent at which the background channel (1 - m)^alpha equals the CAM m at ``threshold``:
    then argmax over [background, CAMs] is background exactly where max CAM < threshold."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"a background threshold must lie in (0, 1), got {threshold}")
    return float(np.log(threshold) / np.log1p(-threshold))


def resolve_background(rw: dict, cam_threshold: float | None) -> dict:
    """The ``rw`` params with the background exponent this run uses: ``rw.alpha`` (``rw.background:
    fixed``) or the one that puts the background at the CAM sweep's best threshold (``cam_sweep``;
    PSA's alpha 16 corresponds to a threshold of 0.12)."""
    if rw["background"] == "fixed":
        return dict(rw)
    if rw["background"] != "cam_sweep":
        raise ValueError(f"param rw.background: {rw['background']!r} is not 'fixed' or 'cam_sweep'")
    return {**rw, "alpha": round(background_alpha(required_cam_threshold("rw.background", cam_threshold)), 4)}


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
    metrics.update({"enabled": bool(rw["enabled"]), "beta": rw["beta"], "logt": rw["logt"], "alpha": rw["alpha"],
                    "background_cue": rw.get("background_cue", "cam"),
                    **model_meta, "images": len(ids), "split": split})
    return metrics


SEPARATION_IMAGES = 64  # images the affinity diagnostic looks at (GT pairs: same class vs different)


def make_pseudo_masks(prepared_dir: str | Path, params: dict, cams_path: str | Path, model_path: str | Path,
                      out_path: str | Path, seeds_path: str | Path | None = None,
                      cam_threshold: float | None = None, saliency_store: str | Path | None = None) -> dict:
    """What the random_walk stage does: :func:`make_pseudo_store`, the affinity separation diagnostic
    (walk on) and the gallery (with the seeds column when ``seeds_path`` exists).
    Returns {"metrics", "gallery" (an RGB array or None)}."""
    from pipeline.refine.gallery import refine_gallery

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


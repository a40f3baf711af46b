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

from typing import Sequence

import cv2
import numpy as np
import torch

from pipeline.labels import IGNORE_INDEX, grid_to_image, label_scores, resize_maps, to_class_labels
from pipeline.models.pairs import in_bounds, shifted
from pipeline.refine.runner import required_cam_threshold

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
                background: np.ndarray | None = None, has_background: bool = True) -> np.ndarray:
    """One image's pseudo mask (H, W) uint8.

    cam_grid (K, gh, gw) for ``classes``; background channel (1 - max)^rw.alpha, or ``background``
    (H, W) at image resolution when given (the saliency cue); no background channel at all when
    the dataset has none (``has_background`` False: every pixel takes one of ``classes``). With ``aff``
    (P, ha, wa) on the affinity grid the scores are propagated first; with ``aff=None`` (rw
    disabled) the CAM scores are used as they are. Then upsample, argmax, 255 where the top
    score < rw.ignore_below, optional final dense CRF (crf params).
    """
    size = image.shape[:2]
    if aff is None:
        if background is None:
            scores = grid_to_image(label_scores(cam_grid, rw["alpha"], has_background), size, cam_stride)
        else:
            scores = np.concatenate([background[None].astype(np.float32), grid_to_image(cam_grid, size, cam_stride)])
    else:
        grid = tuple(aff.shape[-2:])
        cams = affinity_grid_cams(cam_grid, cam_stride, size, grid, aff_stride)
        if background is None:
            start = label_scores(cams, rw["alpha"], has_background)
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
    return to_class_labels(index, classes, has_background)


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

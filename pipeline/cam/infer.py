"""Multi-scale + flip CAM inference, merged onto a fixed stride grid of the original image.

Geometry (one convention everywhere): a feature map of stride ``os`` computed on an input of
width ``w'`` has cell ``i`` covering input pixels ``[i·os, (i+1)·os)``; a stored map of stride ``s``
has cell ``j`` centred at ``(j + 0.5)·s`` in the original image (pixel edges at integers). Every
scale's maps are *sampled* at the stored grid's centres (bilinear, border clamp), the flipped pass
through mirrored coordinates, so no map is ever resized with an off-by-one shift.

Per image: sum over scales (and flips) → ReLU → each labelled class divided by its max; classes
not in the labels are exactly 0. Output (K, ceil(H/s), ceil(W/s)) float32 in [0, 1].
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
from typing import Iterable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.augment import normalise
from pipeline.cam.methods import CamMethod

log = logging.getLogger("wsss")


def scaled_size(size: Sequence[int], scale: float) -> tuple[int, int]:
    h, w = int(size[0]), int(size[1])
    return max(1, round(h * scale)), max(1, round(w * scale))


def scale_inputs(image: np.ndarray, scales: Sequence[float]) -> list[torch.Tensor]:
    """(H, W, 3) uint8 -> one normalised (3, h', w') float32 tensor per scale."""
    out = []
    for s in scales:
        h, w = scaled_size(image.shape[:2], s)
        im = image if (h, w) == image.shape[:2] else cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
        out.append(normalise(im))
    return out


def grid_coords(size: Sequence[int], input_size: Sequence[int], feat_size: Sequence[int], feat_stride: int,
                stride: int, flip: bool) -> torch.Tensor:
    """Sampling grid (1, gh, gw, 2) in grid_sample's normalised coords (align_corners=False) that
    reads a feature map of ``feat_size`` (computed on an input of ``input_size``, possibly mirrored)
    at the centres of the stride-``stride`` grid of an image of ``size``."""
    (h, w), (ih, iw), (fh, fw) = size, input_size, feat_size
    gh, gw = math.ceil(h / stride), math.ceil(w / stride)
    cy = (torch.arange(gh, dtype=torch.float64) + 0.5) * stride * (ih / h)  # centres in input pixels
    cx = (torch.arange(gw, dtype=torch.float64) + 0.5) * stride * (iw / w)
    if flip:
        cx = iw - cx
    ny = 2 * (cy / feat_stride) / fh - 1
    nx = 2 * (cx / feat_stride) / fw - 1
    gy, gx = torch.meshgrid(ny, nx, indexing="ij")
    return torch.stack([gx, gy], -1)[None].float()


def sample_to_grid(maps: torch.Tensor, size, input_size, feat_stride: int, stride: int, flip: bool) -> torch.Tensor:
    """(K, fh, fw) maps -> (K, gh, gw) float32 sampled on the stored grid."""
    grid = grid_coords(size, input_size, maps.shape[-2:], feat_stride, stride, flip).to(maps.device)
    return F.grid_sample(maps[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def normalise_cams(total: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ReLU, keep only labelled classes, divide each by its max. (K, h, w) -> (K, h, w) in [0, 1]."""
    cam = torch.relu(total) * labels[:, None, None].to(total.dtype)
    peak = cam.flatten(1).amax(1)
    return torch.where(peak[:, None, None] > 0, cam / peak.clamp_min(1e-12)[:, None, None], torch.zeros_like(cam))


def fuse_conv_bn(module: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode copy with every BatchNorm folded into the conv before it (same maps, fewer passes
    over memory). Falls back to the unfused copy when the module cannot be traced."""
    module = copy.deepcopy(module).eval()
    try:
        from torch.fx.experimental.optimization import fuse

        return fuse(module)
    except Exception as e:  # untraceable control flow (e.g. dynamic padding): keep it as is
        log.debug("conv-bn fusion skipped: %s", e)
        return module


class CamInference:
    """Runs a :class:`CamMethod` over images at several scales (+ flips) and merges the maps.

    Images of identical size are batched together (each scale and its flip in one forward pass);
    BatchNorm is folded into the convs (eval models), the backbone runs channels_last, and on CUDA
    under bf16 autocast unless ``dtype`` says otherwise.
    """

    def __init__(self, method: CamMethod, scales: Sequence[float], flip: bool, stride: int,
                 device: torch.device | str = "cpu", dtype: str = "auto", fuse_bn: bool = True):
        if not scales:
            raise ValueError("param cam.scales: needs at least one scale")
        if any(s <= 0 for s in scales):
            raise ValueError(f"param cam.scales: scales must be positive, got {list(scales)}")
        self.method, self.scales, self.flip, self.stride = method, list(scales), bool(flip), int(stride)
        self.device = torch.device(device)
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"param cam.infer_dtype: {dtype!r} is not auto|float32|bfloat16")
        self.dtype = dtype
        model = method.model
        self.feat_stride = int(model.stride)
        if fuse_bn and not model.training:
            model = copy.deepcopy(model)  # the caller's model stays untouched
            model.backbone = fuse_conv_bn(model.backbone)
            method = copy.copy(method)
            method.model = model
            self.method = method
        model.to(memory_format=torch.channels_last)  # faster convs on CUDA and with oneDNN on CPU

    def _grad_context(self):
        return torch.no_grad() if self.method.needs_grad else torch.inference_mode()

    def _autocast(self):
        if self.dtype == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward(self, x: torch.Tensor, labels: torch.Tensor):
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with self._autocast():
            return self.method(x, labels.to(self.device))

    def run_group(self, inputs: list[list[torch.Tensor]], size: Sequence[int], labels: torch.Tensor):
        """Images of one size. inputs[i][k]: image i at scale k, (3, h', w'); labels: (B, K) bool.

        Returns (cams (B, K, gh, gw) float32 in [0, 1], logits (B, K) at the first scale)."""
        b = len(inputs)
        total, logits = None, None
        with self._grad_context():
            for k in range(len(self.scales)):
                x = torch.stack([inp[k] for inp in inputs])
                lab = labels
                if self.flip:
                    x = torch.cat([x, x.flip(-1)])
                    lab = torch.cat([labels, labels])
                out = self._forward(x, lab)
                in_size = x.shape[-2:]
                part = torch.stack([sample_to_grid(out.maps[i], size, in_size, self.feat_stride, self.stride, False)
                                    for i in range(b)])
                if self.flip:
                    part = part + torch.stack([sample_to_grid(out.maps[b + i], size, in_size, self.feat_stride,
                                                              self.stride, True) for i in range(b)])
                total = part if total is None else total + part
                if logits is None:
                    logits = out.logits[:b].float()
            cams = torch.stack([normalise_cams(total[i], labels[i].to(total.device)) for i in range(b)])
        return cams.cpu(), logits.cpu()

    def run(self, items: Iterable[tuple], max_batch: int = 8):
        """items: (key, size (H, W), labels (K,) bool tensor, per-scale inputs) in any order.

        Yields (key, cams (K, gh, gw) float32 numpy, logits (K,) float32 numpy). Consecutive items
        of the same size are batched up to ``max_batch`` images."""
        pending: list[tuple] = []

        def flush():
            keys = [p[0] for p in pending]
            cams, logits = self.run_group([p[3] for p in pending], pending[0][1],
                                          torch.stack([p[2] for p in pending]).bool())
            pending.clear()
            for i, key in enumerate(keys):
                yield key, cams[i].numpy(), logits[i].numpy()

        for item in items:
            if pending and (tuple(item[1]) != tuple(pending[0][1]) or len(pending) >= max_batch):
                yield from flush()
            pending.append(item)
        if pending:
            yield from flush()


class _CamItems(torch.utils.data.Dataset):
    """Decodes and rescales one image per item (runs in DataLoader workers)."""

    def __init__(self, load_image, keys: Sequence, sizes: Sequence, labels: Sequence[np.ndarray], scales):
        self.load_image, self.keys, self.sizes, self.labels, self.scales = load_image, list(keys), sizes, labels, scales

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        image = self.load_image(self.keys[i])
        size = tuple(int(v) for v in image.shape[:2])
        if tuple(int(v) for v in self.sizes[i]) != size:
            raise ValueError(f"image {self.keys[i]!r}: decoded size {size} differs from the prepared size "
                             f"{tuple(self.sizes[i])}; re-run prepare")
        return (self.keys[i], size, torch.as_tensor(np.asarray(self.labels[i]) > 0), scale_inputs(image, self.scales))


def compute_cams(inference: CamInference, load_image, keys: Sequence, sizes: Sequence, labels: Sequence[np.ndarray],
                 num_workers: int = 0, max_batch: int = 8) -> dict:
    """CAMs for ``keys`` (images read with ``load_image(key)``); workers decode/rescale ahead.

    Images are visited sorted by size so equal sizes share forward passes.
    Returns {key: (cams (K, gh, gw) float32, logits (K,) float32)}."""
    order = sorted(range(len(keys)), key=lambda i: (tuple(sizes[i]), i))
    ds = _CamItems(load_image, [keys[i] for i in order], [sizes[i] for i in order], [labels[i] for i in order],
                   inference.scales)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=num_workers,
                                         prefetch_factor=4 if num_workers else None,
                                         pin_memory=inference.device.type == "cuda")
    return {key: (cam, logit) for key, cam, logit in inference.run(iter(loader), max_batch=max_batch)}

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
    """(K, fh, fw) maps of one image, or (B, K, fh, fw) of a batch of images of one size, -> the same
    leading shape with (gh, gw) float32 sampled on the stored grid (one grid for the whole batch)."""
    batch = maps if maps.dim() == 4 else maps[None]
    grid = grid_coords(size, input_size, maps.shape[-2:], feat_stride, stride, flip).to(maps.device)
    out = F.grid_sample(batch.float(), grid.expand(len(batch), -1, -1, -1), mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out if maps.dim() == 4 else out[0]


def normalise_cams(total: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ReLU, keep only labelled classes, divide each by its max. (..., K, h, w) maps with (..., K) labels
    (one image or a batch) -> the same shape in [0, 1]."""
    cam = torch.relu(total) * labels[..., None, None].to(total.dtype)
    peak = cam.flatten(-2).amax(-1)[..., None, None]
    return torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam))


def _fold_into_conv(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> None:
    """conv <- bn(conv(.)) for an eval-mode BatchNorm (weights scaled per output channel, bias added)."""
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    bias = -bn.running_mean.double() * scale
    if bn.bias is not None:
        bias = bias + bn.bias.double()
    if conv.bias is not None:
        bias = bias + conv.bias.double() * scale
    with torch.no_grad():
        conv.weight.copy_(conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1))))
    conv.bias = torch.nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)


def _replace_module(root: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def fuse_conv_bn(module: torch.nn.Module, probe: torch.Tensor | None = None) -> torch.nn.Module:
    """An eval-mode copy with every BatchNorm folded into the conv that feeds it (same maps, fewer passes
    over memory). The pairs are found by running ``probe`` (default (1, 3, 64, 64)) once with hooks: a
    BatchNorm whose input is the very tensor a conv just returned, each called once. The folded copy is
    checked against the original on the probe; when that fails, or nothing could be folded although there
    are BatchNorms, the unfused copy is returned and a warning says why."""
    module = copy.deepcopy(module).eval()
    names = {m: n for n, m in module.named_modules()}
    bns = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d) and m.track_running_stats]
    if not bns:
        return module
    probe = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) if probe is None else probe
    produced: dict[int, tuple[torch.nn.Module, torch.Tensor]] = {}
    calls: dict[torch.nn.Module, int] = {}
    pairs: dict[torch.nn.Module, torch.nn.Module] = {}  # bn -> conv

    def conv_hook(m, _inp, out):
        calls[m] = calls.get(m, 0) + 1
        produced[id(out)] = (m, out)  # the reference keeps the id unique while the forward runs

    def bn_hook(m, inp):
        calls[m] = calls.get(m, 0) + 1
        src = produced.get(id(inp[0]))
        if src is not None and src[1] is inp[0]:
            pairs[m] = src[0]

    hooks = [m.register_forward_hook(conv_hook) for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks += [m.register_forward_pre_hook(bn_hook) for m in bns]
    try:
        with torch.no_grad():
            expected = module(probe)
    except Exception as e:  # a backbone that cannot run the probe: keep it as is
        log.warning("conv-bn fusion skipped for %s: the probe input %s failed (%s: %s)", type(module).__name__,
                    tuple(probe.shape), type(e).__name__, e)
        return module
    finally:
        for h in hooks:
            h.remove()
        produced.clear()
    convs = list(pairs.values())
    fold = {bn: conv for bn, conv in pairs.items()
            if calls.get(bn) == 1 and calls.get(conv) == 1 and convs.count(conv) == 1}
    if not fold:
        log.warning("conv-bn fusion skipped for %s: none of its %d BatchNorms directly follows a conv",
                    type(module).__name__, len(bns))
        return module
    fused = copy.deepcopy(module)
    fused_names = dict(fused.named_modules())
    for bn, conv in fold.items():
        _fold_into_conv(fused_names[names[conv]], fused_names[names[bn]])
        _replace_module(fused, names[bn], torch.nn.Identity())
    with torch.no_grad():
        got = fused(probe)
    flat_e = expected if isinstance(expected, (list, tuple)) else [expected]
    flat_g = got if isinstance(got, (list, tuple)) else [got]
    worst = max(float((g - e).abs().max() / e.abs().max().clamp_min(1e-6)) for g, e in zip(flat_g, flat_e))
    if len(flat_g) != len(flat_e) or not worst <= 1e-3:  # a wrong fold is off by O(1), rounding by ~1e-5
        log.warning("conv-bn fusion skipped for %s: the folded copy differs from the original by %.2g (relative) "
                    "on the probe input (a conv output used by more than its BatchNorm?)", type(module).__name__, worst)
        return module
    if len(fold) < len(bns):
        log.debug("conv-bn fusion: %d of %d BatchNorms folded in %s", len(fold), len(bns), type(module).__name__)
    return fused


def static_same_padding(module: torch.nn.Module) -> torch.nn.Module:
    """Replace (in place) TF-'SAME' convs of stride 1 whose padding is symmetric for every input size
    ((kernel - 1) x dilation even) by plain convs with that padding: the same maps without the padded
    copy of the input that the dynamic 'SAME' padding makes on every call."""
    from pipeline.models.backbones import _SameConv2d

    for name, m in list(module.named_modules()):
        if type(m) is not _SameConv2d or any(s != 1 for s in m.stride):
            continue
        totals = [(k - 1) * d for k, d in zip(m.kernel_size, m.dilation)]
        if any(t % 2 for t in totals):
            continue
        conv = torch.nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, 1, tuple(t // 2 for t in totals),
                               m.dilation, m.groups, m.bias is not None)
        conv.load_state_dict(m.state_dict())
        _replace_module(module, name, conv.to(m.weight.device, m.weight.dtype))
    return module


def pointwise_convs_on_onednn(module: torch.nn.Module) -> torch.nn.Module:
    """Mark every 1x1 conv as dilated by 2 (in place): for a 1x1 kernel dilation changes nothing, but with
    one intra-op thread PyTorch runs undilated 1x1 convs through its generic im2col path (bias added in an
    extra pass) and dilated ones through oneDNN, measured 10 % faster for an EfficientNet-Lite0 pass.
    For the CPU only (cuDNN may pick a slower kernel for a dilated conv)."""
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.dilation == (1, 1):
            m.dilation = (2, 2)
    return module


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (process-wide): serve blocks up to 1 GiB from the
    heap instead of fresh mmaps, and do not give freed heap back to the system. A CPU forward pass frees
    and allocates activations of the same large sizes over and over; by default every block over 32 MB
    is a new mapping whose pages fault in one by one, which took half the time of an EfficientNet-Lite0
    pass at 1000x750 (bench/bench_cam.py). Costs a few hundred MB of resident memory kept after the peak.
    Returns False (and changes nothing) where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, (1 << 31) - 1))


class CamInference:
    """Runs a :class:`CamMethod` over images at several scales (+ flips) and merges the maps.

    Each scale of an image and its flip run in one forward pass (on an accelerator, together with the
    other images of the same size); BatchNorm is folded into the convs and stride-1 'SAME' paddings
    made static (eval models, on a copy; on the CPU 1x1 convs also go to oneDNN), the backbone runs
    channels_last, and on CUDA under bf16 autocast unless ``dtype`` says otherwise. On the CPU,
    ``keep_memory`` calls :func:`keep_freed_memory` (process-wide).
    """

    def __init__(self, method: CamMethod, scales: Sequence[float], flip: bool, stride: int,
                 device: torch.device | str = "cpu", dtype: str = "auto", fuse_bn: bool = True,
                 keep_memory: bool = True):
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
            static_same_padding(model.backbone)
            probe = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
            model.backbone = fuse_conv_bn(model.backbone, probe.to(next(model.parameters()).device))
            if self.device.type == "cpu":
                pointwise_convs_on_onednn(model.backbone)
            method = copy.copy(method)
            method.model = model
            self.method = method
        model.to(memory_format=torch.channels_last)  # faster convs on CUDA and with oneDNN on CPU
        if keep_memory and self.device.type == "cpu" and not keep_freed_memory():
            log.debug("keep_freed_memory: not glibc, malloc settings left as they are")

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
                in_size = tuple(x.shape[-2:])
                part = sample_to_grid(out.maps[:b], size, in_size, self.feat_stride, self.stride, False)
                if self.flip:
                    part = part + sample_to_grid(out.maps[b:], size, in_size, self.feat_stride, self.stride, True)
                total = part if total is None else total + part
                if logits is None:
                    logits = out.logits[:b].float()
            cams = normalise_cams(total, labels.to(total.device))
        return cams.cpu(), logits.cpu()

    def run(self, items: Iterable[tuple], max_batch: int = 8):
        """items: (key, size (H, W), labels (K,) bool tensor, per-scale inputs) in any order.

        Yields (key, cams (K, gh, gw) float32 numpy, logits (K,) float32 numpy). Consecutive items
        of the same size are batched up to ``max_batch`` images on an accelerator; on the CPU each image
        (with its flip) is one pass: batching measured no faster there and doubled the peak memory
        (bench/bench_cam.py)."""
        if self.device.type == "cpu":
            max_batch = 1
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

    Images are visited sorted by size so equal sizes share forward passes (on an accelerator).
    Returns {key: (cams (K, gh, gw) float32, logits (K,) float32)}."""
    order = sorted(range(len(keys)), key=lambda i: (tuple(sizes[i]), i))
    ds = _CamItems(load_image, [keys[i] for i in order], [sizes[i] for i in order], [labels[i] for i in order],
                   inference.scales)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=num_workers,
                                         prefetch_factor=4 if num_workers else None,
                                         pin_memory=inference.device.type == "cuda")
    return {key: (cam, logit) for key, cam, logit in inference.run(iter(loader), max_batch=max_batch)}

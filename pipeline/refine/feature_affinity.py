"""Affinities that need no training, for datasets too small to train AffinityNet on.

``rw.affinity: features``: the affinity of two cells of the walk's grid is the product of

- how alike the frozen backbone sees them: the mean over the backbone's levels (shallow: edges and
  texture; deep: parts and objects) of the cosine similarity of their feature vectors, each level
  resized to the grid, negative similarities counted as 0;
- how alike their colours are: exp(-|c_i - c_j|^2 / (2 rw.colour_sigma^2)) with c the cell's mean
  RGB (0..255), the colour kernel of the dense CRF and of training-free refiners such as PAR.

The backbone is the one ``affinity.init`` names (the CAM classifier's, ImageNet's or a file),
saved by train_aff without training. ``rw.affinity: mix`` trains AffinityNet as usual and takes the
geometric mean of its affinities and the training-free ones computed on its own backbone (one pass).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models.pairs import grid_size, in_bounds

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRAINED_KINDS = {"affinitynet": "affinitynet", "irn": "irn", "mix": "affinitynet"}  # rw.affinity -> model trained


def offset_views(x: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """(B, C, h, w) -> for each offset (dy, dx) the map of each cell's partner at (y + dy, x + dx) (0 outside)."""
    h, w = x.shape[-2:]
    r = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = F.pad(x, (r, r, r, r))
    return [padded[..., r + dy:r + dy + h, r + dx:r + dx + w] for dy, dx in offsets]


def feature_similarity(levels: Sequence[torch.Tensor], size: tuple[int, int],
                       offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Backbone feature maps (B, C_l, h_l, w_l) -> (B, P, h, w): the mean over levels of the
    cosine similarity of each cell and its partner, clamped at 0."""
    total = None
    for f in levels:
        f = F.normalize(f.float(), dim=1)
        if tuple(f.shape[-2:]) != tuple(size):
            f = F.normalize(F.interpolate(f, size=size, mode="bilinear", align_corners=False), dim=1)
        sim = torch.stack([(f * g).sum(1) for g in offset_views(f, offsets)], 1).clamp_min(0.0)
        total = sim if total is None else total + sim
    return total / len(levels)


def colour_similarity(x: torch.Tensor, stride: int, offsets: Sequence[tuple[int, int]], sigma: float) -> torch.Tensor:
    """Normalised images (B, 3, H, W) -> (B, P, h, w) colour kernel on the stride grid."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    rgb = (x.float() * std + mean) * 255.0
    size = grid_size(x.shape[-2:], stride)
    pad_h, pad_w = size[0] * stride - x.shape[-2], size[1] * stride - x.shape[-1]
    cells = F.avg_pool2d(F.pad(rgb, (0, pad_w, 0, pad_h), mode="replicate"), stride)
    d2 = torch.stack([((cells - g) ** 2).sum(1) for g in offset_views(cells, offsets)], 1)
    return torch.exp(-d2 / (2.0 * float(sigma) ** 2))


class FeatureAffinity(nn.Module):
    """A frozen backbone -> training-free affinities (see the module docstring).
    ``forward(x, offsets)``: (B, 3, H, W) normalised images -> (B, P, ceil(H/stride), ceil(W/stride))."""

    kind = "features"

    def __init__(self, backbone: nn.Module, stride: int, radius: int, colour_sigma: float):
        super().__init__()
        self.backbone = backbone
        self.stride, self.radius, self.colour_sigma = int(stride), int(radius), float(colour_sigma)
        self.has_displacement = False

    def forward(self, x: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
        size = grid_size(x.shape[-2:], self.stride)
        aff = feature_similarity(self.backbone(x), size, offsets) * colour_similarity(x, self.stride, offsets,
                                                                                      self.colour_sigma)
        return aff * in_bounds(size[0], size[1], offsets, x.device).unsqueeze(0)

    def relations(self, x: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(affinities, a zero displacement field (B, 2, h, w)): with no field the instances stage
        falls back to connected components of the walked CAMs."""
        aff = self.forward(x, offsets)
        return aff, aff.new_zeros(aff.shape[0], 2, *aff.shape[-2:])


class MixedAffinity(nn.Module):
    """A trained AffinityNet whose affinities are mixed (geometric mean) with the training-free ones
    computed on its own backbone's levels."""

    kind = "mix"

    def __init__(self, learnt: nn.Module, colour_sigma: float):
        super().__init__()
        self.learnt = learnt
        self.stride, self.radius, self.colour_sigma = learnt.stride, learnt.radius, float(colour_sigma)
        self.has_displacement = getattr(learnt, "has_displacement", False)

    def relations(self, x: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixed affinities (B, P, h, w), the AffinityNet's displacement field (B, 2, h, w)), one backbone pass."""
        feats = self.learnt.backbone(x)
        levels = [feats[i] for i in self.learnt.level_index]
        learnt = self.learnt.pair_affinities(x, levels, offsets).float()
        size = grid_size(x.shape[-2:], self.stride)
        free = feature_similarity(feats, size, offsets) * colour_similarity(x, self.stride, offsets, self.colour_sigma)
        return (learnt.clamp_min(0.0) * free).sqrt(), self.learnt.displacement_head(levels, size)

    def forward(self, x: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
        return self.relations(x, offsets)[0]


def save_feature_affinity(path: str | Path, backbone: nn.Module, backbone_name: str, stride: int, radius: int,
                          extra: dict | None = None) -> Path:
    """The checkpoint train_aff writes for ``rw.affinity: features``: the frozen backbone's weights
    and the grid (same keys as an AffinityNet checkpoint; kind ``features``, no heads)."""
    from pipeline.checkpoint import save_checkpoint

    return save_checkpoint(path, {"state_dict": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
                                  "backbone": backbone_name, "stride": int(stride), "dims": [], "radius": int(radius),
                                  "kind": "features", **(extra or {})})


def load_walk_affinity(path: str | Path, rw: dict, device: torch.device | str = "cpu") -> nn.Module:
    """The affinity model the walk uses for ``rw.affinity`` from the train_aff checkpoint at ``path``
    (eval mode, on ``device``); an error naming the file when the checkpoint was made for another kind."""
    from pipeline.models.affinity import load_affinity_net, read_affinity_checkpoint
    from pipeline.models.backbones import build_backbone

    kind = rw.get("affinity", "affinitynet")
    ck = read_affinity_checkpoint(path)
    saved = ck.get("kind", "affinitynet")
    wanted = "features" if kind == "features" else TRAINED_KINDS.get(kind)
    if wanted is None:
        raise ValueError(f"param rw.affinity: {kind!r} is not one of {sorted([*TRAINED_KINDS, 'features'])}")
    if saved != wanted:
        raise ValueError(f"{path}: holds a {saved!r} affinity model, rw.affinity {kind!r} needs {wanted!r}; "
                         "re-run the train_aff stage")
    if kind == "features":
        backbone = build_backbone(ck["backbone"], "none")
        backbone.load_state_dict(ck["state_dict"])
        return FeatureAffinity(backbone, ck["stride"], ck["radius"], rw["colour_sigma"]).to(device).eval()
    model = load_affinity_net(path, device)
    return MixedAffinity(model, rw["colour_sigma"]).to(device).eval() if kind == "mix" else model

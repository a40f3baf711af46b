"""AffinityNet: a backbone's multi-level features -> a per-pixel embedding whose L1 distances give
pixel-pair affinities on a fixed stride grid (Ahn & Kwak, CVPR 2018). ``rw.affinity: irn`` builds
:class:`BoundaryAffinityNet` instead: IRNet's inter-pixel relations (Ahn, Cho & Kwak, CVPR 2019),
a class-boundary map B with affinity(i, j) = 1 - max B on the segment from i to j.

Both also carry IRNet's displacement field branch (:class:`DisplacementHead`): for each grid cell a
vector (dy, dx), in grid cells, to the centre of the object instance it belongs to, learned from the
same seed pairs on detached backbone features (so it never changes the affinities). The
``instances`` stage turns it into instance pseudo masks (:mod:`pipeline.refine.instances`).

The pixel pairs and their labels are :mod:`pipeline.models.pairs`. Affinity maps are ``(B, P, h, w)``
with ``aff[:, p, y, x] = exp(-mean_d |f(y, x) - f(y + dy, x + dx)|)`` in (0, 1]; entries whose
partner falls outside the grid are 0 (and ignored by the loss and the random walk).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.distributed import global_count
from pipeline.models.backbones import Backbone, build_backbone
from pipeline.models.pairs import grid_size, in_bounds, segment_points, shifted

log = logging.getLogger("wsss")


def default_dims(levels: int, deepest: int = 128) -> list[int]:
    """Embedding channels per backbone level, shallow to deep, halving from ``deepest``: ..., 32, 64, 128."""
    return [max(8, deepest >> (levels - 1 - i)) for i in range(levels)]


class DisplacementHead(nn.Module):
    """IRNet's displacement field branch: a 1x1 conv (GroupNorm, ReLU) per backbone level on the
    *detached* features, resized to the grid, concatenated, then two 3x3 convs -> (B, 2, h, w), the
    (dy, dx) from each cell to its instance's centre, in grid cells. Its last conv starts at zero
    (every cell its own centre).

    The loss (:func:`displacement_loss`) sees only differences D(i) - D(j), so training leaves the
    field's constant free (the demo's came out at about (-2.1, +0.3) cells, where the background
    should read 0). As IRNet does, train_aff measures the field's mean over the training images
    after training (:func:`pipeline.refine.affinity_training.set_displacement_mean`) and the buffer
    ``mean`` subtracts it from then on, so the background's field is about zero."""

    def __init__(self, channels: Sequence[int], dims: Sequence[int]):
        super().__init__()
        self.levels = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d, 1, bias=False), nn.GroupNorm(min(8, d), d), nn.ReLU(inplace=True))
            for c, d in zip(channels, dims))
        total = sum(dims)
        self.mix = nn.Sequential(nn.Conv2d(total, total, 3, padding=1, bias=False), nn.GroupNorm(min(8, total), total),
                                 nn.ReLU(inplace=True), nn.Conv2d(total, 2, 3, padding=1))
        nn.init.zeros_(self.mix[-1].weight)
        nn.init.zeros_(self.mix[-1].bias)
        self.register_buffer("mean", torch.zeros(2))

    def forward(self, feats: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        parts = []
        for level, f in zip(self.levels, feats):
            f = level(f.detach())
            if f.shape[-2:] != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            parts.append(f)
        return self.mix(torch.cat(parts, 1)) - self.mean.view(1, 2, 1, 1)


class AffinityNet(nn.Module):
    """Backbone + one 1x1 conv (GroupNorm, ReLU) per level + a 1x1 mixing conv -> embedding.

    ``embedding(x)``: (B, 3, H, W) normalised images -> (B, D, ceil(H/stride), ceil(W/stride)).
    ``affinities(emb, offsets)``: -> (B, P, h, w) in [0, 1].
    ``relations(x, offsets)``: (affinities, displacement field (B, 2, h, w)) from one backbone pass.
    """

    def __init__(self, backbone: Backbone, stride: int = 4, dims: Sequence[int] | None = None,
                 freeze_bn: bool = True):
        super().__init__()
        self.backbone = backbone
        self.stride = int(stride)
        # every level, shallow ones too: a stride-4 grid needs stride-4 features to place boundaries
        self.dims = list(dims) if dims is not None else default_dims(len(backbone.channels))
        self.freeze_bn = freeze_bn
        levels = list(backbone.channels)[-len(self.dims):]
        if len(levels) < len(self.dims):
            raise ValueError(f"backbone has {len(levels)} feature levels, AffinityNet needs {len(self.dims)}")
        self.level_index = list(range(len(backbone.channels) - len(self.dims), len(backbone.channels)))
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d, 1, bias=False), nn.GroupNorm(min(8, d), d), nn.ReLU(inplace=True))
            for c, d in zip(levels, self.dims))
        total = sum(self.dims)
        self.mix = nn.Conv2d(total, total, 1, bias=False)
        nn.init.xavier_uniform_(self.mix.weight, gain=4.0)
        for h in self.heads:
            nn.init.kaiming_normal_(h[0].weight)
        self.displacement_head = DisplacementHead(levels, self.dims)
        self.has_displacement = True  # False for a checkpoint saved before the branch existed

    def head_parameters(self):
        """The affinity heads (trained at ``affinity.head_lr_mult`` x lr); not the displacement branch."""
        return list(self.heads.parameters()) + list(self.mix.parameters())

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.freeze_bn:  # batches are small: keep the classifier's BN statistics
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone feature maps this model reads, shallow to deep."""
        feats = self.backbone(x)
        return [feats[i] for i in self.level_index]

    def embedding(self, x: torch.Tensor, levels: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        size = grid_size(x.shape[-2:], self.stride)
        feats = self.levels(x) if levels is None else levels
        parts = []
        for head, f in zip(self.heads, feats):
            f = head(f)
            if f.shape[-2:] != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            parts.append(f)
        return self.mix(torch.cat(parts, 1))

    @staticmethod
    def affinities(emb: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
        h, w = emb.shape[-2:]
        r = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
        padded = F.pad(emb, (r, r, r, r))  # one padded copy, a view per offset (bench/bench_train_cpu.py)
        dist = torch.stack([(emb - padded[..., r + dy:r + dy + h, r + dx:r + dx + w]).abs().mean(1) for dy, dx in offsets], 1)
        return torch.exp(-dist) * in_bounds(h, w, offsets, emb.device).unsqueeze(0)

    kind = "affinitynet"
    head_lr_param = "head_lr_mult"  # the affinity param that sets its heads' lr multiplier

    def pair_affinities(self, x: torch.Tensor, levels: Sequence[torch.Tensor], offsets) -> torch.Tensor:
        return self.affinities(self.embedding(x, levels), offsets)

    def forward(self, x: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
        return self.pair_affinities(x, self.levels(x), offsets)

    def pair_loss(self, x: torch.Tensor, levels: Sequence[torch.Tensor], offsets, bg_pos, fg_pos, neg):
        """The pair loss of this model's affinities (:func:`affinity_loss`) -> (loss, pair counts)."""
        return affinity_loss(self.pair_affinities(x, levels, offsets).float(), bg_pos, fg_pos, neg)

    def training_outputs(self, x: torch.Tensor, offsets, bg_pos, fg_pos, neg):
        """One backbone pass -> (pair loss, pair counts, displacement field (B, 2, h, w))."""
        levels = self.levels(x)
        loss, counts = self.pair_loss(x, levels, offsets, bg_pos, fg_pos, neg)
        return loss, counts, self.displacement_head(levels, grid_size(x.shape[-2:], self.stride))

    def relations(self, x: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(affinities (B, P, h, w), displacement field (B, 2, h, w) in grid cells) from one backbone pass."""
        levels = self.levels(x)
        return self.pair_affinities(x, levels, offsets), self.displacement_head(levels, grid_size(x.shape[-2:], self.stride))


class BoundaryAffinityNet(AffinityNet):
    """IRNet's class-boundary branch on AffinityNet's multi-level heads: the mixed features -> one
    boundary probability per grid cell (``boundary(x)``: (B, 1, h, w)); the affinity of a pair is
    1 - the largest boundary probability on the segment between them (IRNet's path rule), so it is
    trained with the same pair labels and loss as AffinityNet (-log a on positives, -log(1 - a) on
    negatives), and the walk uses it the same way."""

    kind = "irn"
    head_lr_param = "boundary_lr_mult"  # the affinity param that sets its heads' lr multiplier

    def __init__(self, backbone: Backbone, stride: int = 4, dims: Sequence[int] | None = None, freeze_bn: bool = True):
        super().__init__(backbone, stride, dims, freeze_bn)
        self.edge = nn.Conv2d(sum(self.dims), 1, 1)

    def head_parameters(self):
        return super().head_parameters() + list(self.edge.parameters())

    def boundary_logits(self, x: torch.Tensor, levels: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        return self.edge(F.relu(self.embedding(x, levels)))

    def boundary(self, x: torch.Tensor, levels: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        return torch.sigmoid(self.boundary_logits(x, levels))

    @staticmethod
    def path_max(values: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
        """(B, 1, h, w) -> (B, P, h, w): the largest value on each pair's segment (0 padding outside)."""
        h, w = values.shape[-2:]
        r = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
        padded = F.pad(values, (r, r, r, r))
        return torch.cat([torch.stack([padded[..., r + py:r + py + h, r + px:r + px + w]
                                       for py, px in segment_points(dy, dx)], 0).amax(0) for dy, dx in offsets], 1)

    def pair_loss(self, x: torch.Tensor, levels: Sequence[torch.Tensor], offsets, bg_pos, fg_pos, neg):
        """:func:`affinity_loss` with affinity = 1 - sigmoid(max boundary logit on the path), written on
        the logits (-log a = softplus(z), -log(1 - a) = softplus(-z)): the same loss, but its gradient
        does not vanish when the sigmoid saturates. Computed on the probabilities, the demo's boundary
        map went to 0 everywhere (every affinity 1.0, walk 15.5 mIoU against 39.1) and could not come
        back: sigmoid'(z) ~ 0 there."""
        z = self.path_max(self.boundary_logits(x, levels), offsets).float()
        return pair_terms(F.softplus(z), F.softplus(-z), bg_pos, fg_pos, neg)

    @staticmethod
    def path_affinities(boundary: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
        """(B, 1, h, w) boundary -> (B, P, h, w) = 1 - max of the boundary over each pair's segment."""
        h, w = boundary.shape[-2:]
        return (1.0 - BoundaryAffinityNet.path_max(boundary, offsets)) * in_bounds(h, w, offsets, boundary.device).unsqueeze(0)

    def pair_affinities(self, x: torch.Tensor, levels: Sequence[torch.Tensor], offsets) -> torch.Tensor:
        return self.path_affinities(self.boundary(x, levels), offsets)


AFFINITY_MODELS = {"affinitynet": AffinityNet, "irn": BoundaryAffinityNet}


def displacement_loss(disp: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor,
                      offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """IRNet's displacement loss on the seed pairs. disp (B, 2, h, w) in grid cells; pairs as
    :func:`pair_labels`. Two cells i and j = i + (dy, dx) of one object share a centre, i + D(i) =
    j + D(j), so D(i) - D(j) should be (dy, dx): the mean L1 error of that over foreground positives,
    plus the mean |D(i) - D(j)| over background positives (a smooth background field). A term with
    no pairs contributes 0."""
    partner = torch.stack([shifted(disp, dy, dx) for dy, dx in offsets], 1)  # (B, P, 2, h, w): D(j)
    target = torch.tensor(offsets, dtype=disp.dtype, device=disp.device).view(1, len(offsets), 2, 1, 1)
    diff = disp.unsqueeze(1) - partner
    fg = (diff - target).abs().sum(2)
    bg = diff.abs().sum(2)
    return ((fg * fg_pos).sum() / global_count(fg_pos.sum()).clamp(min=1)
            + (bg * bg_pos).sum() / global_count(bg_pos.sum()).clamp(min=1))


def affinity_loss(aff: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor,
                  eps: float = 1e-5) -> tuple[torch.Tensor, dict]:
    """PSA-style loss: mean -log(aff) over bg positives and fg positives (each weighted 1/4) and
    mean -log(1 - aff) over negatives (weighted 1/2); a term with no pairs contributes 0."""
    return pair_terms(-torch.log(aff + eps), -torch.log(1.0 + eps - aff), bg_pos, fg_pos, neg)


def pair_terms(pos_term: torch.Tensor, neg_term: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor,
               neg: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """PSA's weighting of per-pair loss terms: mean ``pos_term`` over bg positives and fg positives
    (1/4 each), mean ``neg_term`` over negatives (1/2); a term with no pairs contributes 0."""
    def mean_over(values, mask):
        n = mask.sum()
        return (values * mask).sum() / global_count(n).clamp(min=1), int(n)

    bg, nbg = mean_over(pos_term, bg_pos)
    fg, nfg = mean_over(pos_term, fg_pos)
    ng, nng = mean_over(neg_term, neg)
    loss = bg / 4 + fg / 4 + ng / 2
    return loss, {"bg_pos": nbg, "fg_pos": nfg, "neg": nng}


def build_affinity_net(backbone_name: str, init: str, stride: int, classifier_checkpoint: str | Path | None = None,
                       embed_dim: int = 128, frozen_levels: int = 0, kind: str = "affinitynet") -> tuple[AffinityNet, str]:
    """``init``: ``classifier`` (the trained CAM classifier's backbone), ``imagenet``, ``none`` or a
    path to backbone weights. ``embed_dim``: channels of the deepest embedding level (see
    :func:`default_dims`); ``frozen_levels``: backbone levels left untrained; ``kind``
    (``rw.affinity``): ``affinitynet`` or ``irn``. Returns (model, backbone name); with
    ``classifier`` the name is the classifier's own."""
    if kind not in AFFINITY_MODELS:
        raise ValueError(f"param rw.affinity: {kind!r} is not one of {sorted(AFFINITY_MODELS)}")
    if init == "classifier":
        from pipeline.models.classifier import classifier_backbone

        backbone, backbone_name = classifier_backbone(classifier_checkpoint, "affinity.init")
    else:
        backbone = build_backbone(backbone_name, init)
    backbone.requires_grad_(True)  # the classifier may have frozen some levels: this model decides its own
    backbone.freeze_levels(frozen_levels, "affinity.frozen_levels")
    dims = default_dims(len(backbone.channels), embed_dim)
    return AFFINITY_MODELS[kind](backbone, stride=stride, dims=dims, freeze_bn=init != "none"), backbone_name


AFFINITY_KEYS = ("state_dict", "backbone", "stride", "dims", "radius")


def affinity_checkpoint(model: AffinityNet, backbone_name: str, radius: int, extra: dict | None = None) -> dict:
    return {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "backbone": backbone_name,
            "stride": model.stride, "dims": list(model.dims), "radius": int(radius), "kind": model.kind, **(extra or {})}


def save_affinity_net(path: str | Path, model: AffinityNet, backbone_name: str, radius: int,
                      extra: dict | None = None) -> Path:
    """Checkpoint {"state_dict", "backbone", "stride", "dims", "radius", "kind", **extra} (atomic)."""
    from pipeline.checkpoint import save_checkpoint

    return save_checkpoint(path, affinity_checkpoint(model, backbone_name, radius, extra))


def read_affinity_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict of an AffinityNet saved by :func:`save_affinity_net`, checked."""
    from pipeline.checkpoint import load_checkpoint

    ck = load_checkpoint(path)
    for key in AFFINITY_KEYS:
        if key not in ck:
            raise ValueError(f"{path}: not an AffinityNet checkpoint (missing {key!r}); re-run the train_aff stage")
    return ck


def load_affinity_net(path: str | Path, device: torch.device | str = "cpu") -> AffinityNet:
    """Rebuild an AffinityNet saved by the train_aff stage (eval mode, on ``device``)."""
    ck = read_affinity_checkpoint(path)
    kind = ck.get("kind", "affinitynet")  # checkpoints from before rw.affinity are AffinityNets
    if kind not in AFFINITY_MODELS:
        raise ValueError(f"{path}: unknown affinity model kind {kind!r}; re-run the train_aff stage")
    model = AFFINITY_MODELS[kind](build_backbone(ck["backbone"], "none"), stride=ck["stride"], dims=ck["dims"])
    missing, unexpected = model.load_state_dict(ck["state_dict"], strict=False)
    if unexpected or any(not k.startswith("displacement_head.") for k in missing):
        raise ValueError(f"{path}: does not match the {kind} model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); re-run the train_aff stage")
    branch_missing = [k for k in missing if k != "displacement_head.mean"]
    model.has_displacement = not branch_missing  # saved before the displacement branch: affinities only
    if model.has_displacement and missing:
        log.warning("%s: saved without the displacement field's mean (before it was measured); its field "
                    "keeps the constant offset IRNet subtracts; re-run the train_aff stage", path)
    model.radius = int(ck["radius"])
    return model.to(device).eval()

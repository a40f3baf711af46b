"""The final segmenter: a DeepLab-v2-style ASPP head on a registry backbone.

``Segmenter(num_classes, backbone, weights, rates, channels)`` maps a (B, 3, H, W) normalised
image batch to (B, num_classes, H, W) logits. The head follows DeepLab-v2's ASPP: parallel
3x3 convolutions with different dilation rates on the deepest feature map, one branch per
rate, whose class scores are summed; the sum is bilinearly upsampled to the input size.
Each branch has a small hidden layer (3x3 dilated -> 1x1, as DeepLab-v2's "ASPP-L" fc6/fc7)
because the demo backbone trains from scratch and a bare linear branch learns too slowly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.models.backbones import build_backbone, keep_frozen_bn
from pipeline.training import to_device


class ASPPBranch(nn.Module):
    """3x3 conv at one dilation rate -> BN -> ReLU -> 1x1 -> BN -> ReLU -> dropout -> 1x1 to classes
    (:meth:`features` stops before the last 1x1)."""

    def __init__(self, cin: int, hidden: int, num_classes: int, rate: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, hidden, 3, padding=rate, dilation=rate, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
        )
        self.classifier = nn.Conv2d(hidden, num_classes, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ASPPHead(nn.Module):
    """Sum of per-rate branches: (B, cin, h, w) -> (B, num_classes, h, w)."""

    def __init__(self, cin: int, num_classes: int, rates: Sequence[int], hidden: int = 128, dropout: float = 0.1):
        super().__init__()
        if not rates:
            raise ValueError("param seg.aspp_rates: needs at least one dilation rate")
        self.branches = nn.ModuleList(ASPPBranch(cin, hidden, num_classes, int(r), dropout) for r in rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parts(x)[0]

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class scores, hidden features), both summed over the branches, in one pass; the hidden
        features are what a decoder and the saliency head read."""
        hidden = [b.features(x) for b in self.branches]
        logits = sum(b.classifier(h) for b, h in zip(self.branches, hidden))
        return logits, sum(hidden)


def _separable(cin: int, cout: int) -> nn.Sequential:
    """3x3 depthwise -> BN -> ReLU -> 1x1 -> BN -> ReLU (DeepLab-v3+'s separable convolution)."""
    return nn.Sequential(nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                         nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Decoder(nn.Module):
    """DeepLab-v3+'s decoder: the ASPP features upsampled to the stride-4 map, concatenated with
    that map reduced to 48 channels, two separable 3x3 convolutions, a 1x1 to classes. It gives the
    head the shallow map's edges, which the stride-16 map has lost."""

    def __init__(self, low_channels: int, high_channels: int, num_classes: int, hidden: int = 128,
                 dropout: float = 0.1):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(low_channels, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU(inplace=True))
        self.fuse = nn.Sequential(_separable(high_channels + 48, hidden), _separable(hidden, hidden), nn.Dropout2d(dropout))
        self.classifier = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(torch.cat([self.reduce(low), high], 1)))


class Segmenter(nn.Module):
    """Backbone (deepest feature map) -> ASPP head -> logits at input resolution; with ``decoder``
    the ASPP features go through :class:`Decoder` with the backbone's stride-4 map first."""

    def __init__(self, num_classes: int, backbone: str = "tiny", weights: str = "none",
                 rates: Sequence[int] = (1, 2, 4), channels: int = 128, dropout: float = 0.1,
                 frozen_levels: int = 0, freeze_bn: bool = False, decoder: bool = False, saliency_head: bool = False):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a segmenter needs at least 2 classes (background + one), got {num_classes}")
        self.num_classes = num_classes
        self.backbone = build_backbone(backbone, weights)
        self.backbone.freeze_levels(frozen_levels, "seg.frozen_levels")
        self.freeze_bn = freeze_bn
        self.head = ASPPHead(self.backbone.out_channels, num_classes, rates, channels, dropout)
        if decoder:
            # the ASPP branches' own classifiers are unused with a decoder: the decoder holds the head's classifier
            for branch in self.head.branches:
                branch.classifier = nn.Identity()
            self.head.decoder = Decoder(self.backbone.channels[0], channels, num_classes, channels, dropout)
        self.decoder = decoder
        if saliency_head:  # joint saliency learning: one more output on the head's features (trained, not used to segment)
            self.head.saliency = nn.Conv2d(channels, 1, 1)
        self.saliency_head = saliency_head

    def train(self, mode: bool = True):
        """Training mode; the backbone's frozen BatchNorms (all of them with ``freeze_bn``, as DeepLab
        fine-tunes) keep their running statistics. The head's BatchNorms always train."""
        super().train(mode)
        if mode:
            keep_frozen_bn(self.backbone, all_bn=self.freeze_bn)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_saliency(x)[0]

    def forward_with_saliency(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(class logits (B, C, H, W), saliency logits (B, 1, H, W) or None without a saliency head)."""
        feats = self.backbone(x)
        logits, hidden = self.head.parts(feats[-1])
        if self.decoder:
            logits = self.head.decoder(feats[0], hidden)
        size = x.shape[-2:]
        saliency = None
        if self.saliency_head:
            saliency = F.interpolate(self.head.saliency(hidden), size=size, mode="bilinear", align_corners=False)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False), saliency


def build_segmenter(num_classes: int, seg: dict, classifier_checkpoint: str | Path | None = None) -> Segmenter:
    """A Segmenter from the ``seg`` params namespace. ``seg.weights: classifier`` starts the
    backbone from the trained CAM classifier's (``classifier_checkpoint``), which must have the
    same backbone architecture."""
    classifier = seg["weights"] == "classifier"
    model = Segmenter(num_classes, seg["backbone"], "none" if classifier else seg["weights"], rates=seg["aspp_rates"],
                      channels=seg["aspp_channels"], dropout=seg["dropout"], frozen_levels=seg.get("frozen_levels", 0),
                      freeze_bn=seg.get("freeze_bn", False),  # a loaded checkpoint's arch has neither: no training
                      decoder=seg.get("decoder", False),  # checkpoints written before seg.decoder have none
                      saliency_head=seg.get("saliency_weight", 0.0) > 0)
    if classifier:
        from pipeline.models.classifier import classifier_backbone

        backbone, name = classifier_backbone(classifier_checkpoint, "seg.weights")
        if name != seg["backbone"]:
            raise ValueError(f"param seg.weights=classifier: the classifier in {classifier_checkpoint} has backbone "
                             f"{name!r} but seg.backbone is {seg['backbone']!r}; set them equal")
        model.backbone.load_state_dict(backbone.state_dict())
    return model


ARCH_KEYS = ("backbone", "aspp_rates", "aspp_channels", "dropout", "decoder", "saliency_weight")


def save_segmenter(path: str | Path, model: torch.nn.Module, seg: dict, class_names: list[str], labels: str,
                   history: list[dict]) -> Path:
    """Checkpoint {"state_dict", "arch", "num_classes", "class_names", "labels", "seg", "history"} (atomic)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_checkpoint(path, {"state_dict": state, "arch": {k: seg[k] for k in ARCH_KEYS},
                                  "num_classes": len(class_names), "class_names": list(class_names), "labels": labels,
                                  "seg": dict(seg), "history": list(history)})


def load_segmenter(path: str | Path, device: torch.device):
    """(model in eval mode on ``device``, checkpoint dict) from :func:`save_segmenter`'s file."""
    ckpt = load_checkpoint(path)
    missing = [k for k in ("state_dict", "arch", "num_classes", "labels") if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: not a segmenter checkpoint (missing {missing}); re-run the train_seg stage")
    model = build_segmenter(ckpt["num_classes"], {**ckpt["arch"], "weights": "none"})
    model.load_state_dict(ckpt["state_dict"])
    return to_device(model, device).eval(), ckpt

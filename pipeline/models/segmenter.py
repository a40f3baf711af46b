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
    """3x3 conv at one dilation rate -> BN -> ReLU -> 1x1 -> BN -> ReLU -> dropout -> 1x1 to classes."""

    def __init__(self, cin: int, hidden: int, num_classes: int, rate: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, hidden, 3, padding=rate, dilation=rate, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
        )
        self.classifier = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


class ASPPHead(nn.Module):
    """Sum of per-rate branches: (B, cin, h, w) -> (B, num_classes, h, w)."""

    def __init__(self, cin: int, num_classes: int, rates: Sequence[int], hidden: int = 128, dropout: float = 0.1):
        super().__init__()
        if not rates:
            raise ValueError("param seg.aspp_rates: needs at least one dilation rate")
        self.branches = nn.ModuleList(ASPPBranch(cin, hidden, num_classes, int(r), dropout) for r in rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for b in self.branches[1:]:
            out = out + b(x)
        return out


class Segmenter(nn.Module):
    """Backbone (deepest feature map) -> ASPP head -> logits at input resolution."""

    def __init__(self, num_classes: int, backbone: str = "tiny", weights: str = "none",
                 rates: Sequence[int] = (1, 2, 4), channels: int = 128, dropout: float = 0.1,
                 frozen_levels: int = 0, freeze_bn: bool = False):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a segmenter needs at least 2 classes (background + one), got {num_classes}")
        self.num_classes = num_classes
        self.backbone = build_backbone(backbone, weights)
        self.backbone.freeze_levels(frozen_levels, "seg.frozen_levels")
        self.freeze_bn = freeze_bn
        self.head = ASPPHead(self.backbone.out_channels, num_classes, rates, channels, dropout)

    def train(self, mode: bool = True):
        """Training mode; the backbone's frozen BatchNorms (all of them with ``freeze_bn``, as DeepLab
        fine-tunes) keep their running statistics. The head's BatchNorms always train."""
        super().train(mode)
        if mode:
            keep_frozen_bn(self.backbone, all_bn=self.freeze_bn)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)[-1]
        logits = self.head(feats)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_segmenter(num_classes: int, seg: dict, classifier_checkpoint: str | Path | None = None) -> Segmenter:
    """A Segmenter from the ``seg`` params namespace. ``seg.weights: classifier`` starts the
    backbone from the trained CAM classifier's (``classifier_checkpoint``), which must have the
    same backbone architecture."""
    classifier = seg["weights"] == "classifier"
    model = Segmenter(num_classes, seg["backbone"], "none" if classifier else seg["weights"], rates=seg["aspp_rates"],
                      channels=seg["aspp_channels"], dropout=seg["dropout"], frozen_levels=seg.get("frozen_levels", 0),
                      freeze_bn=seg.get("freeze_bn", False))  # a loaded checkpoint's arch has neither: no training
    if classifier:
        from pipeline.models.classifier import classifier_backbone

        backbone, name = classifier_backbone(classifier_checkpoint, "seg.weights")
        if name != seg["backbone"]:
            raise ValueError(f"param seg.weights=classifier: the classifier in {classifier_checkpoint} has backbone "
                             f"{name!r} but seg.backbone is {seg['backbone']!r}; set them equal")
        model.backbone.load_state_dict(backbone.state_dict())
    return model


ARCH_KEYS = ("backbone", "aspp_rates", "aspp_channels", "dropout")


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

"""The CAM classifier: backbone → global average pooling → 1×1 conv without bias.

``model.backbone`` is the feature extractor (AffinityNet initialises from it); ``model.classifier``
holds one weight vector per foreground class, so ``model.cam(features)`` is the class activation map.
Saved by the train_cam stage as ``models/cam/classifier.pt``: a dict
``{"state_dict", "backbone", "num_classes", "class_names", "params"}``; read it with :func:`load_classifier`.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models.backbones import Backbone, build_backbone, keep_frozen_bn
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.training import to_device

CHECKPOINT_KEYS = ("state_dict", "backbone", "num_classes", "class_names", "params")


class CamClassifier(nn.Module):
    """Multi-label classifier over ``num_classes`` foreground classes (no background output)."""

    def __init__(self, backbone: Backbone, num_classes: int, frozen_levels: int = 0, freeze_bn: bool = False):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.classifier = nn.Conv2d(backbone.out_channels, num_classes, 1, bias=False)
        self.freeze_bn = freeze_bn
        backbone.freeze_levels(frozen_levels, "cam.frozen_levels")

    def train(self, mode: bool = True):
        """Training mode, except frozen BatchNorms (all of them with ``freeze_bn``, as IRNet and PSA
        train: batches of a few crops give poor batch statistics) keep their running statistics."""
        super().train(mode)
        if mode:
            keep_frozen_bn(self.backbone, all_bn=self.freeze_bn)
        return self

    @property
    def stride(self) -> int:
        return self.backbone.out_stride

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, D, h, w) last feature map."""
        return self.backbone(x)[-1]

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, K) logits (GAP then the 1×1 classifier)."""
        return self.classifier(features.mean((2, 3), keepdim=True)).flatten(1)

    def cam(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, K, h, w) raw class activation maps (before ReLU)."""
        return F.conv2d(features, self.classifier.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def head_parameters(self):
        return self.classifier.parameters()


def build_classifier(backbone: str, weights: str, num_classes: int, frozen_levels: int = 0,
                     freeze_bn: bool = False) -> CamClassifier:
    if num_classes < 1:
        raise ValueError(f"the classifier needs at least one foreground class, got {num_classes}")
    return CamClassifier(build_backbone(backbone, weights), num_classes, frozen_levels, freeze_bn)


def save_classifier(path: str | Path, model: CamClassifier, backbone: str, class_names: list[str], params: dict) -> Path:
    """Write ``{"state_dict", "backbone", "num_classes", "class_names", "params"}`` atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_checkpoint(path, {"state_dict": state, "backbone": backbone, "num_classes": model.num_classes,
                                  "class_names": list(class_names), "params": dict(params)})


def classifier_backbone(path: str | Path | None, param: str) -> tuple[Backbone, str]:
    """(backbone, its name) of the CAM classifier saved at ``path``, for a model that starts from it
    (``param``, e.g. ``affinity.init`` or ``seg.weights``, names the setting in the error)."""
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"param {param}=classifier: classifier checkpoint not found: {path}; "
                                f"run the train_cam stage or set {param} to imagenet | none | <path>")
    model, meta = load_classifier(path, torch.device("cpu"))
    return model.backbone, meta["backbone"]


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> tuple[CamClassifier, dict]:
    """Rebuild the classifier saved by train_cam (no weight download: random init, then the checkpoint).

    Returns ``(model in eval mode on device, checkpoint metadata without the state_dict)``.
    """
    path = Path(path)
    ckpt = load_checkpoint(path)
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: not a CAM classifier checkpoint (missing {missing}); re-run train_cam")
    model = build_classifier(ckpt["backbone"], "none", int(ckpt["num_classes"]))
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit backbone {ckpt['backbone']!r}: {e}") from e
    device = torch.device(device)
    model = to_device(model, device).eval()
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model, meta

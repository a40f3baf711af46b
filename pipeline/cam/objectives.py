"""What the CAM classifier is trained to minimise (``cam.training``), registered in
``pipeline.registry.CAM_TRAINING``.

An objective is built as ``Objective(model, **cam.training_options)`` and called on a batch of
normalised crops ``x`` (B, 3, H, W) and multi-hot labels ``y`` (B, K); it returns the scalar loss.
Built-ins:

- ``plain``: the multilabel soft-margin loss on the image logits (PSA, IRNet).
- ``seam``: SEAM's equivariant regularisation (Wang et al., CVPR 2020) without its pixel
  correlation module: the crops and a copy rescaled by ``scale`` are both classified, and the
  CAMs of the crop, rescaled the same way, must equal the rescaled copy's CAMs (mean L1 over the
  foreground channels of max-normalised CAMs). SEAM's published setting: scale 0.3, weight 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.registry import CAM_TRAINING


def classification_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.multilabel_soft_margin_loss(logits.float(), y)


def max_normalised(cams: torch.Tensor, y: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(B, K, h, w) raw CAMs -> ReLU, absent classes zeroed, each map divided by its own max."""
    cams = F.relu(cams.float()) * y[:, :, None, None]
    return cams / (cams.flatten(2).amax(2)[:, :, None, None] + eps)


def equivariance_loss(cams: torch.Tensor, cams_of_rescaled: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean |rescale(norm(cams)) - norm(cams_of_rescaled)|: zero when the CAM commutes with rescaling."""
    a = F.interpolate(max_normalised(cams, y), size=cams_of_rescaled.shape[-2:], mode="bilinear",
                      align_corners=True)
    return (a - max_normalised(cams_of_rescaled, y)).abs().mean()


@CAM_TRAINING.register("plain")
class PlainObjective:
    """Multilabel soft-margin loss on the classifier's logits."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return classification_loss(self.model(x), y)


@CAM_TRAINING.register("seam")
class SeamObjective:
    """SEAM's equivariant regularisation: ``(cls(x) + cls(x')) / 2 + weight * ER``, x' = x rescaled by
    ``scale`` (bilinear)."""

    def __init__(self, model, scale: float = 0.3, weight: float = 1.0):
        if not 0 < float(scale) < 4 or float(scale) == 1.0:
            raise ValueError(f"param cam.training_options: seam scale must be in (0, 4) and not 1, got {scale}")
        if float(weight) < 0:
            raise ValueError(f"param cam.training_options: seam weight must be >= 0, got {weight}")
        self.model, self.scale, self.weight = model, float(scale), float(weight)
        self.last: dict[str, float] = {}  # the two terms of the last call, for logs and tests

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model = self.model
        x2 = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=True, recompute_scale_factor=False)
        f1, f2 = model.features(x), model.features(x2)
        cls = (classification_loss(model.head(f1), y) + classification_loss(model.head(f2), y)) / 2
        er = equivariance_loss(model.cam(f1), model.cam(f2), y)
        self.last = {"classification": float(cls.detach()), "equivariance": float(er.detach())}
        return cls + self.weight * er


def build_objective(name: str, model, options: dict | None = None):
    """The ``cam.training`` objective ``name`` for ``model`` with ``cam.training_options``."""
    return CAM_TRAINING.get(name)(model, **(options or {}))

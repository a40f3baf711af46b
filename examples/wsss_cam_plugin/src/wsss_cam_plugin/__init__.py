"""LayerCAM (Jiang et al., TIP 2021) as a wsss-pipeline CAM method.

Each feature position is weighted by its own positive gradient instead of one weight per
channel, which keeps more of the object than Grad-CAM on shallow and deep layers alike.

Use it after ``pip install -e examples/wsss_cam_plugin`` with ``cam.method: layercam``, or
without installing, with ``cam.method: wsss_cam_plugin:LayerCAM`` and the package on PYTHONPATH.
"""
from __future__ import annotations

import torch

from pipeline.cam import GradientCamMethod


class LayerCAM(GradientCamMethod):
    """The base computes the features and, per labelled class, the gradients of its logit; LayerCAM
    only says how they make the map."""

    name = "layercam"

    def cam_image(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """acts, grads: (B, D, h, w) -> (B, h, w): ReLU(Σ_d ReLU(∂y/∂A_d) · A_d)."""
        return torch.relu((torch.relu(grads) * acts).sum(1))

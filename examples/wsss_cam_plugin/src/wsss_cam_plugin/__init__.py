"""LayerCAM (Jiang et al., TIP 2021) as a wsss-pipeline CAM method.

Each feature position is weighted by its own positive gradient instead of one weight per
channel, which keeps more of the object than Grad-CAM on shallow and deep layers alike.

Use it after ``pip install -e examples/wsss_cam_plugin`` with ``cam.method: layercam``, or
without installing, with ``cam.method: wsss_cam_plugin:LayerCAM`` and the package on PYTHONPATH.
"""
from __future__ import annotations

import torch

from pipeline.cam import CamMethod, CamOutput


class LayerCAM(CamMethod):
    name = "layercam"
    needs_grad = True

    def compute(self, features: torch.Tensor, labels: torch.Tensor) -> CamOutput:
        """features: (B, D, h, w); labels: (B, K) bool -> maps (B, K, h, w), logits (B, K)."""
        acts = features.detach().float().clone().requires_grad_(True)
        b, k = labels.shape
        maps = acts.new_zeros((b, k) + tuple(acts.shape[-2:]))
        with torch.enable_grad():
            logits = self.model.head(acts).float()
            present = [c for c in range(k) if bool(labels[:, c].any())]
            for n, c in enumerate(present):
                (grads,) = torch.autograd.grad(logits[:, c].sum(), acts, retain_graph=n < len(present) - 1)
                cam = torch.relu((torch.relu(grads) * acts.detach()).sum(1))
                maps[:, c] = cam * labels[:, c, None, None]
        return CamOutput(maps, logits.detach())
